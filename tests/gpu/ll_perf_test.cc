// Timing of the low-latency kernels at the DeepEP-comparable decode shape (anchors.md): hidden 7168, top-8 of
// 288 experts, FP8 dispatch + BF16 weighted combine, every GPU of the machine as one rank (threads).
// Skipped unless NCCL_MOE_LL_PERF is set (it allocates ~4 GB per rank and takes a few seconds).
// LlPerf.TargetShape: one rank per GPU (the real numbers). LlPerf.EmulatedTargetShape: 2 ranks sharing one GPU
// (ncclMoeCommInitAll) with half the SMs each and local memory instead of NVLink (kernel-internal costs only).
//
// Reports, per token count and rank, the median over kIters of the time between CUDA events recorded right
// before and after each call on a busy stream (kernels queued back to back, so this is kernel time plus the
// launch gap), for phase Both and for each send/receive half, and the mean of a back-to-back loop of
// dispatch + combine pairs. Bytes use DeepEP's accounting (per valid (token, expert) selection, no
// deduplication): dispatch H + H/128*4 + 16, combine 2H.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "core/comm.h"
#include "ll_world.h"
#include "nccl_moe.h"

namespace {

using Shape = ll_test::TargetShapeRank;
constexpr int kExperts = Shape::kExperts, kHidden = Shape::kHidden, kTopk = Shape::kTopk;
constexpr int kIters = 200, kWarmup = 20;

struct Timing {
  int tokens = 0;
  double dispatch = 0, combine = 0, dispatch_send = 0, dispatch_recv = 0, combine_send = 0, combine_recv = 0,
         pair_loop = 0;
  long long selections = 0;
  bool counts_ok = false;
};

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : 1000.0 * v[v.size() / 2];  // ms -> us
}

void runPerf(ll_test::Placement world, int n) {
  const int token_counts[] = {1, 32, 128, 256};
  const int num_cases = 4;
  std::vector<std::vector<Timing>> results(n, std::vector<Timing>(num_cases));
  std::vector<int> sms(n);
  ll_test::Barrier barrier(n);
  ll_test::forEachRankIn(world, n, Shape::config(), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    sms[r] = comm->rank_sms;
    const int El = kExperts / n;
    Shape shape(r, n, 1234 + static_cast<uint64_t>(r));
    ASSERT_TRUE(shape.ok()) << "rank " << r << ": device buffers";
    ncclMoeHandle_t handle = nullptr;
    ASSERT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle));

    for (int ci = 0; ci < num_cases; ++ci) {
      const int T = token_counts[ci];
      shape.route(T, 1234 + static_cast<uint64_t>(T));
      std::vector<cudaEvent_t> ev(5 * kIters + 2);
      for (auto& e : ev) cudaEventCreate(&e);
      barrier.wait();  // every rank done allocating before any kernel waits on a peer

      ncclMoeLLDispatchArgs_t da = shape.dispatchArgs(T);
      ncclMoeLLCombineArgs_t ca = shape.combineArgs(T);
      auto D = [&](ncclMoePhase_t ph) {
        da.phase = ph;
        EXPECT_EQ(ncclSuccess, ncclMoeLowLatencyDispatch(comm, handle, &da, stream)) << ncclMoeGetLastError(comm);
      };
      auto C = [&](ncclMoePhase_t ph) {
        ca.phase = ph;
        EXPECT_EQ(ncclSuccess, ncclMoeLowLatencyCombine(comm, handle, &ca, stream)) << ncclMoeGetLastError(comm);
      };
      for (int i = 0; i < kWarmup; ++i) {
        D(ncclMoePhaseBoth);
        C(ncclMoePhaseBoth);
      }
      cudaStreamSynchronize(stream);
      // Received selections must add up (sum over experts of recv_count) -- a cheap sanity check.
      {
        std::vector<int> cnt(El);
        cudaMemcpyAsync(cnt.data(), shape.recvCount(), El * 4, cudaMemcpyDeviceToHost, stream);
        cudaStreamSynchronize(stream);
        long long got = 0;
        for (int c : cnt) got += c;
        results[r][ci].selections = got;
      }
      for (int i = 0; i < kIters; ++i) {
        cudaEventRecord(ev[3 * i], stream);
        D(ncclMoePhaseBoth);
        cudaEventRecord(ev[3 * i + 1], stream);
        C(ncclMoePhaseBoth);
        cudaEventRecord(ev[3 * i + 2], stream);
      }
      cudaStreamSynchronize(stream);
      std::vector<float> td, tc;
      for (int i = 0; i < kIters; ++i) {
        float a = 0, b = 0;
        cudaEventElapsedTime(&a, ev[3 * i], ev[3 * i + 1]);
        cudaEventElapsedTime(&b, ev[3 * i + 1], ev[3 * i + 2]);
        td.push_back(a);
        tc.push_back(b);
      }
      results[r][ci].dispatch = median(td);
      results[r][ci].combine = median(tc);
      for (int i = 0; i < kIters; ++i) {
        cudaEventRecord(ev[5 * i], stream);
        D(ncclMoePhaseSend);
        cudaEventRecord(ev[5 * i + 1], stream);
        D(ncclMoePhaseRecv);
        cudaEventRecord(ev[5 * i + 2], stream);
        C(ncclMoePhaseSend);
        cudaEventRecord(ev[5 * i + 3], stream);
        C(ncclMoePhaseRecv);
        cudaEventRecord(ev[5 * i + 4], stream);
      }
      cudaStreamSynchronize(stream);
      std::vector<float> part[4];
      for (int i = 0; i < kIters; ++i)
        for (int q = 0; q < 4; ++q) {
          float a = 0;
          cudaEventElapsedTime(&a, ev[5 * i + q], ev[5 * i + q + 1]);
          part[q].push_back(a);
        }
      results[r][ci].dispatch_send = median(part[0]);
      results[r][ci].dispatch_recv = median(part[1]);
      results[r][ci].combine_send = median(part[2]);
      results[r][ci].combine_recv = median(part[3]);
      // Back-to-back pairs, no events in between.
      cudaEventRecord(ev[5 * kIters], stream);
      for (int i = 0; i < kIters; ++i) {
        D(ncclMoePhaseBoth);
        C(ncclMoePhaseBoth);
      }
      cudaEventRecord(ev[5 * kIters + 1], stream);
      cudaStreamSynchronize(stream);
      float loop = 0;
      cudaEventElapsedTime(&loop, ev[5 * kIters], ev[5 * kIters + 1]);
      results[r][ci].pair_loop = 1000.0 * loop / kIters;
      results[r][ci].tokens = T;
      for (auto& e : ev) cudaEventDestroy(e);
      ncclResult_t async = ncclSuccess;
      ncclMoeCommGetAsyncError(comm, &async);
      EXPECT_EQ(ncclSuccess, async) << ncclMoeGetLastError(comm);
    }
    ncclMoeHandleDestroy(handle);
  });

  std::printf(
      "[ll perf] %s: %d ranks, %d SMs per rank, hidden %d, top-%d of %d experts, fp8 dispatch (float scales) + bf16 "
      "combine, median of %d (us)\n",
      world == ll_test::Placement::kOnePerGpu ? "one rank per GPU" : "RANKS SHARE GPU 0 (not NVLink numbers)", n,
      sms[0], kHidden, kTopk, kExperts, kIters);
  std::printf("[ll perf] %6s %4s %9s %9s %9s %9s %9s %9s %9s %10s %10s %8s\n", "tokens", "rank", "dispatch", "combine",
              "d.send", "d.recv", "c.send", "c.recv", "pair", "disp GB/s", "comb GB/s", "recv sel");
  for (int ci = 0; ci < num_cases; ++ci)
    for (int r = 0; r < n; ++r) {
      const Timing& t = results[r][ci];
      const double sel = static_cast<double>(t.tokens) * kTopk;  // selections sent by this rank
      const double dbytes = sel * (kHidden + kHidden / 128 * 4 + 16), cbytes = sel * kHidden * 2;
      std::printf("[ll perf] %6d %4d %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %10.1f %10.1f %8lld\n", t.tokens, r,
                  t.dispatch, t.combine, t.dispatch_send, t.dispatch_recv, t.combine_send, t.combine_recv, t.pair_loop,
                  dbytes / (t.dispatch * 1e3), cbytes / (t.combine * 1e3), t.selections);
    }
}

TEST(LlPerf, TargetShape) {
  if (std::getenv("NCCL_MOE_LL_PERF") == nullptr) GTEST_SKIP() << "set NCCL_MOE_LL_PERF=1 to run";
  const int n = ll_test::gpuRanks();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  runPerf(ll_test::Placement::kOnePerGpu, n);
}

TEST(LlPerf, EmulatedTargetShape) {
  if (std::getenv("NCCL_MOE_LL_PERF") == nullptr) GTEST_SKIP() << "set NCCL_MOE_LL_PERF=1 to run";
  if (ll_test::deviceCount() < 1) GTEST_SKIP() << "needs a GPU";
  runPerf(ll_test::Placement::kOneGpu, 2);
}

}  // namespace
