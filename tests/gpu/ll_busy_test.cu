// LL calls next to a kernel that holds most of the GPU (issue 16: "an LL call launched while a kernel that occupies
// most SMs runs on another stream" completes, verified).
//
//   LlBudget.CallsCompleteNextToAKernelHoldingMostSms   two ranks on GPU 0 with an LL budget of 8 SMs each
//                                                        (config.ll_num_sms): a kernel on another stream holds every
//                                                        other SM but a few (one block per SM: all the shared memory
//                                                        an SM has), and stays resident, spinning, until released;
//                                                        meanwhile 20 LL dispatch + combine rounds (both-phase and
//                                                        split) run and are checked bit for bit; the holder is
//                                                        still resident afterwards, then released.
// The decode frameworks run LL next to compute this way (the send/receive split); an LL grid that needed every SM
// resident at once would wait for the holder until the timeout instead.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

#include "device/ptx.cuh"
#include "gpu_world.h"
#include "ll_case.h"
#include "ll_world.h"
#include "nccl_moe.h"

namespace {

using ll_test::Barrier;
using ll_test::describe;
using ll_test::Expected;
using ll_test::makeExpected;
using ll_test::Problem;
using ll_test::Rank;
using ll_test::RankResult;
using ll_test::testProblem;

constexpr int kLlSms = 8;     // each rank's LL budget
constexpr int kSpareSms = 4;  // SMs neither the ranks' LL grids nor the holder take

// One block per SM (it asks for all the shared memory an SM has): thread 0 counts the block in, then spins until the
// host releases it (bounded by max_ns, so a test failure cannot leave the GPU busy).
__global__ void hold_sms_kernel(const volatile int* release, int* resident, unsigned long long max_ns) {
  extern __shared__ unsigned char hold_smem[];
  if (threadIdx.x != 0) return;
  hold_smem[0] = 1;
  atomicAdd(resident, 1);
  const uint64_t t0 = nccl_moe::dev::globaltimer_ns();
  while (*release == 0 && nccl_moe::dev::globaltimer_ns() - t0 <= max_ns) __nanosleep(1000);
}

TEST(LlBudget, CallsCompleteNextToAKernelHoldingMostSms) {
  constexpr int n = 2;
  if (gpu_test::gpuCount() < 1) GTEST_SKIP() << "needs a GPU";
  ASSERT_EQ(cudaSuccess, cudaSetDevice(0));
  cudaDeviceProp prop{};
  ASSERT_EQ(cudaSuccess, cudaGetDeviceProperties(&prop, 0));
  const int hold_blocks = prop.multiProcessorCount - n * kLlSms - kSpareSms;
  if (hold_blocks < prop.multiProcessorCount / 2) GTEST_SKIP() << "too few SMs to leave most of them to the holder";
  const size_t smem = prop.sharedMemPerBlockOptin;
  ASSERT_EQ(cudaSuccess,
            cudaFuncSetAttribute(hold_sms_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int* flags = nullptr;  // [0] release, [1] resident blocks (host-mapped)
  ASSERT_EQ(cudaSuccess, cudaHostAlloc(reinterpret_cast<void**>(&flags), 2 * sizeof(int), cudaHostAllocMapped));
  flags[0] = 0;
  flags[1] = 0;
  int* dev_flags = nullptr;
  ASSERT_EQ(cudaSuccess, cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_flags), flags, 0));
  cudaStream_t hold_stream = nullptr;
  ASSERT_EQ(cudaSuccess, cudaStreamCreateWithFlags(&hold_stream, cudaStreamNonBlocking));

  ncclMoeConfig_t config = ll_test::testConfig(n);
  config.ll_num_sms = kLlSms;
  Barrier barrier(n);
  int resident_after = -1;
  ll_test::forEachRankIn(gpu_test::Placement::kOneGpu, n, config, [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, config);
    RankResult res;
    rk.allocResult(res);
    if (r == 0) {  // the holder starts before any LL call and is resident (all its blocks) before the ranks go on
      hold_sms_kernel<<<hold_blocks, 32, smem, hold_stream>>>(dev_flags, dev_flags + 1, 120ull * 1000 * 1000 * 1000);
      EXPECT_EQ(cudaSuccess, cudaGetLastError());
      const auto t0 = std::chrono::steady_clock::now();
      while (reinterpret_cast<volatile int*>(flags)[1] < hold_blocks &&
             std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30))
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      EXPECT_EQ(hold_blocks, reinterpret_cast<volatile int*>(flags)[1]) << "the holder's blocks are not all resident";
    }
    barrier.wait();
    for (int round = 0; round < 20 && !::testing::Test::HasFailure(); ++round) {
      Problem pb = testProblem(n, 8800 + round);
      pb.fp8 = round % 2 == 1;
      const Expected ex = makeExpected(pb);
      rk.uploadInputs(ex, res);
      const ncclMoePhase_t phase = round % 3 == 0 ? ncclMoePhaseBoth : ncclMoePhaseSend;
      rk.dispatch(ex, res, phase);
      if (phase == ncclMoePhaseSend) rk.dispatch(ex, res, ncclMoePhaseRecv);
      rk.checkDispatch(ex, res, "next to the holder, round " + std::to_string(round) + " " + describe(pb));
      rk.uploadExpertOutputs(ex, res, false);
      rk.combine(ex, res, phase, false);
      if (phase == ncclMoePhaseSend) rk.combine(ex, res, ncclMoePhaseRecv, false);
      rk.checkCombine(ex, res, "next to the holder, round " + std::to_string(round) + " " + describe(pb));
    }
    barrier.wait();
    if (r == 0) {
      // Still resident (not finished by its own bound): the LL calls ran next to it, not after it.
      resident_after = cudaStreamQuery(hold_stream) == cudaErrorNotReady ? 1 : 0;
      reinterpret_cast<volatile int*>(flags)[0] = 1;
      EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(hold_stream));
    }
    barrier.wait();
    rk.freeResult(res);
  });
  EXPECT_EQ(1, resident_after) << "the holder had ended before the LL rounds did";
  cudaStreamDestroy(hold_stream);
  cudaFreeHost(flags);
}

}  // namespace
