// Timing of the high-throughput kernels at the target shape (4096 tokens per rank, hidden 7168, top-8 of 256
// experts, uniform routing) on all GPUs, sweeping the SM budget and the sender/local warp split. Skipped
// unless NCCL_MOE_HT_PERF=1 (it is a measurement, not a check; moe-perf is the official benchmark).
//
// Byte accounting (DeepEP-comparable, semantics.md): logical bytes = rows received by the rank, its own
// tokens included: BF16 N_recv * H * 2, FP8 N_recv * H * (1 + 4/128) (float scales), combine N_recv * H * 2;
// time = median over back-to-back cached-handle calls on one stream (the kernels synchronise the ranks).
// The first iteration at the target shape is also checked against the reference (bf16 dispatch + combine).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "ht_harness.h"
#include "kernels/intranode/tuning.h"
#include "reference/testing/generators.h"

namespace ht_test {
namespace {

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0f : v[v.size() / 2];
}

TEST(HtPerf, TargetShapeSweep) {
  if (std::getenv("NCCL_MOE_HT_PERF") == nullptr) GTEST_SKIP() << "set NCCL_MOE_HT_PERF=1 to run";
  // A timing: one rank per GPU only (ranks sharing a GPU say nothing about NVLink).
  const int n = std::min(gpu_test::gpuCount(), NCCL_MOE_MAX_NVL_PEERS);
  if (n < 2) GTEST_SKIP() << "a timing over NVLink: needs 2 GPUs, found " << n;
  const int E = 256, K = 8, T = 4096, H = 7168, kWarmup = 3, kIters = 20;
  ref::RoutingSpec spec;
  spec.num_ranks = n;
  spec.num_experts = E;
  spec.topk = K;
  spec.num_tokens = T;
  spec.seed = 5;
  const ref::Routing routing = ref::make_routing(spec);
  auto x_all = ref::make_bf16_rows_all(routing, 6, H, ref::ValueKind::kExact);
  std::vector<ref::Rows> rows;
  for (int s = 0; s < n; ++s) rows.push_back(ref::Rows::from_bf16(x_all[s], T, H));
  const ref::HtDispatch want = ref::ht_dispatch(routing, 1, &rows);
  std::vector<std::vector<uint16_t>> y(n);
  for (int d = 0; d < n; ++d) y[d] = want.recv[d].x.bf16;
  const ref::HtCombineResult want_c = ref::ht_combine(want, y, H);

  const std::vector<int> sms_list = {24, 48};
  // Warp roles: (0, 0) = library default; (sender warps per block, 0) = warp split; (0, sender blocks) =
  // block split (dispatch and combine alike).
  struct Split {
    int warps, blocks;
  };
  auto splits_for = [](int sms) {
    return std::vector<Split>{{0, 0},  {8, 0},       {12, 0},      {16, 0},      {20, 0},
                              {24, 0}, {0, sms / 4}, {0, sms / 3}, {0, sms / 2}, {0, 2 * sms / 3}};
  };
  struct Result {
    float bf16_us, fp8_us, combine_us;
  };
  std::vector<std::vector<Result>> results(n);  // [rank][config]
  std::vector<double> first_call_us(n);
  World world(n, Placement::kOnePerGpu);
  ASSERT_TRUE(world.ok());
  world.run([&](int rank) {
    ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
    config.num_experts = E;
    config.hidden = H;
    config.max_topk = K;
    config.max_tokens_per_rank = T;
    ncclMoeComm_t comm = nullptr;
    ASSERT_EQ(ncclSuccess, ncclMoeCommInit(&comm, world.nccl(rank), &config)) << ncclMoeGetLastError(nullptr);
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle));
    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    const ref::RankRouting& rr = routing.ranks[rank];
    DeviceBytes idx(rr.topk_idx.size() * 8), wts(rr.topk_weights.size() * 4), x(static_cast<size_t>(T) * H * 2);
    DeviceBytes x8(static_cast<size_t>(T) * H), s8(static_cast<size_t>(T) * (H / 128) * 4);
    idx.uploadBytes(rr.topk_idx);
    wts.uploadBytes(rr.topk_weights);
    x.uploadBytes(x_all[rank]);
    x8.fill(0x38);
    s8.fill(0x3c);
    ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
    na.topk_idx = idx.get();
    na.num_tokens = T;
    na.topk = K;
    int N = 0;
    na.num_recv_tokens = &N;
    EXPECT_EQ(ncclSuccess, ncclMoeDispatchNotify(comm, handle, &na, stream)) << ncclMoeGetLastError(comm);
    EXPECT_EQ(want.recv[rank].num_recv, N);
    DeviceBytes rx(static_cast<size_t>(N) * H * 2), rs(static_cast<size_t>(N) * (H / 128) * 4),
        ridx(static_cast<size_t>(N) * K * 8), rw(static_cast<size_t>(N) * K * 4), out(static_cast<size_t>(T) * H * 2);
    ncclMoeDispatchArgs_t bf = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
    bf.x = x.get();
    bf.hidden = H;
    bf.topk_weights = wts.as<float>();
    bf.recv_x = rx.get();
    bf.recv_topk_idx = ridx.get();
    bf.recv_topk_weights = rw.as<float>();
    ncclMoeDispatchArgs_t f8 = bf;
    f8.x = x8.get();
    f8.dtype = ncclMoeFp8E4M3;
    f8.x_scales = s8.get();
    f8.recv_x_scales = rs.get();
    ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
    ca.x = rx.get();
    ca.hidden = H;
    ca.combined_x = out.get();

    // Correctness at the target shape (default tuning).
    EXPECT_EQ(ncclSuccess, ncclMoeDispatch(comm, handle, &bf, stream)) << ncclMoeGetLastError(comm);
    EXPECT_EQ(ncclSuccess, ncclMoeCombine(comm, handle, &ca, stream)) << ncclMoeGetLastError(comm);
    EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
    ncclResult_t async = ncclSuccess;
    ncclMoeCommGetAsyncError(comm, &async);
    ASSERT_EQ(ncclSuccess, async) << ncclMoeGetLastError(comm);
    {
      auto got = rx.download<uint16_t>(static_cast<size_t>(N) * H);
      EXPECT_EQ(-1, firstDiff(got.data(), want.recv[rank].x.bf16.data(), got.size())) << "dispatch at target shape";
      auto gc = out.download<uint16_t>(static_cast<size_t>(T) * H);
      EXPECT_EQ(-1, firstDiff(gc.data(), want_c.x[rank].data(), gc.size())) << "combine at target shape";
    }

    std::vector<cudaEvent_t> ev(kWarmup + kIters + 1);
    for (auto& e : ev) cudaEventCreate(&e);
    auto time_op = [&](auto&& op) {
      for (int i = 0; i < kWarmup + kIters; ++i) {
        cudaEventRecord(ev[i], stream);
        op();
      }
      cudaEventRecord(ev[kWarmup + kIters], stream);
      cudaStreamSynchronize(stream);
      std::vector<float> t;
      for (int i = kWarmup; i < kWarmup + kIters; ++i) {
        float ms = 0;
        cudaEventElapsedTime(&ms, ev[i], ev[i + 1]);
        t.push_back(ms * 1000.0f);
      }
      return median(t);
    };
    for (int sms : sms_list) {
      for (const Split& split : splits_for(sms)) {
        world.barrier().wait();
        if (rank == 0) {
          nccl_moe::htTuning().dispatch_send_warps = split.warps;
          nccl_moe::htTuning().combine_send_warps = split.warps;
          nccl_moe::htTuning().dispatch_send_blocks = split.blocks;
          nccl_moe::htTuning().combine_send_blocks = split.blocks;
        }
        world.barrier().wait();
        bf.num_sms = f8.num_sms = ca.num_sms = sms;
        Result r{};
        r.bf16_us = time_op([&] { ncclMoeDispatch(comm, handle, &bf, stream); });
        r.fp8_us = time_op([&] { ncclMoeDispatch(comm, handle, &f8, stream); });
        r.combine_us = time_op([&] { ncclMoeCombine(comm, handle, &ca, stream); });
        results[rank].push_back(r);
      }
    }
    ncclMoeCommGetAsyncError(comm, &async);
    EXPECT_EQ(ncclSuccess, async) << ncclMoeGetLastError(comm);
    // Full first call: notify (host-count mode, includes the host wait) + dispatch, default tuning.
    world.barrier().wait();
    if (rank == 0) nccl_moe::htTuning() = nccl_moe::HtTuning{};
    world.barrier().wait();
    bf.num_sms = 24;
    const auto start = std::chrono::steady_clock::now();
    ncclMoeDispatchNotify(comm, handle, &na, stream);
    ncclMoeDispatch(comm, handle, &bf, stream);
    cudaStreamSynchronize(stream);
    first_call_us[rank] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    for (auto& e : ev) cudaEventDestroy(e);
    cudaStreamDestroy(stream);
    ncclMoeHandleDestroy(handle);
    ncclMoeCommDestroy(comm);
  });

  size_t num_configs = 0;
  for (int sms : sms_list) num_configs += splits_for(sms).size();
  for (int r = 0; r < n; ++r) ASSERT_EQ(num_configs, results[r].size()) << "rank " << r;
  double recv_rows = 0;
  for (int d = 0; d < n; ++d) recv_rows += want.recv[d].num_recv;
  recv_rows /= n;  // mean N_recv per rank
  const double bf16_bytes = recv_rows * H * 2, fp8_bytes = recv_rows * H * (1.0 + 4.0 / 128.0);
  std::printf("\nHT intranode, %d GPUs, T=%d H=%d top-%d of %d experts, mean N_recv=%.0f\n", n, T, H, K, E, recv_rows);
  std::printf("%5s %8s | %10s %8s | %10s %8s | %10s %8s\n", "sms", "senders", "bf16 us", "GB/s", "fp8 us", "GB/s",
              "comb us", "GB/s");
  size_t cfg = 0;
  for (int sms : sms_list) {
    for (const Split& split : splits_for(sms)) {
      Result worst{0, 0, 0};
      for (int r = 0; r < n; ++r) {
        worst.bf16_us = std::max(worst.bf16_us, results[r][cfg].bf16_us);
        worst.fp8_us = std::max(worst.fp8_us, results[r][cfg].fp8_us);
        worst.combine_us = std::max(worst.combine_us, results[r][cfg].combine_us);
      }
      char label[32];
      if (split.blocks == 0 && split.warps == 0)
        std::snprintf(label, sizeof(label), "default");
      else if (split.blocks > 0)
        std::snprintf(label, sizeof(label), "%d blk", split.blocks);
      else
        std::snprintf(label, sizeof(label), "%d warp", split.warps);
      std::printf("%5d %8s | %10.1f %8.1f | %10.1f %8.1f | %10.1f %8.1f\n", sms, label, worst.bf16_us,
                  bf16_bytes / worst.bf16_us / 1e3, worst.fp8_us, fp8_bytes / worst.fp8_us / 1e3, worst.combine_us,
                  bf16_bytes / worst.combine_us / 1e3);
      ++cfg;
    }
  }
  std::printf("first call (notify host-count + dispatch bf16, 24 SMs, host wall time): %.1f us\n\n",
              *std::max_element(first_call_us.begin(), first_call_us.end()));
}

}  // namespace
}  // namespace ht_test
