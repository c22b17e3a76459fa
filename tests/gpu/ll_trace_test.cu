// Timeline of the low-latency dispatch kernel at the DeepEP-comparable decode shape (hidden 7168, top-8 of 288,
// FP8 with float scales), one rank per GPU. Diagnostics, not a check: skipped unless NCCL_MOE_LL_TRACE is set.
//
// Each traced call runs after an NCCL all-reduce (lines the ranks' streams up) and a 20 us hold kernel (the
// dispatch is queued behind it, as in moe-perf), with comm->ll_dispatch_trace pointing at a zeroed buffer;
// thread 0 of every block stores %globaltimer at the points of src/kernels/low_latency/trace.h. Printed per
// token count, phase (Both, or the Send then the Recv half) and rank: for every point, the median over calls of
// the earliest / median / latest block, in us after that call's earliest block entry. Timestamps of the two
// GPUs are not compared with each other.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/comm.h"
#include "kernels/low_latency/trace.h"
#include "ll_world.h"
#include "nccl_moe.h"

namespace {

using Shape = ll_test::TargetShapeRank;
constexpr int kCalls = 30, kWarmup = 10;
constexpr int kMaxBlocks = 1024;

__global__ void holdKernel(unsigned long long ns) {
  unsigned long long t0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (;;) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 >= ns) break;
  }
}

const char* const kPointNames[nccl_moe::kLlTracePoints] = {
    "entry",        "tag",         "send stored", "send arrived", "recv ready",
    "recv scanned", "recv placed", "recv copied", "exit",         "sm"};

// stats[point] = {earliest, median, latest block} for one call, us after the earliest entry; -1 = no block.
using CallStats = std::vector<std::vector<double>>;

// The call's earliest block entry (ns), the origin of every time printed.
unsigned long long firstEntry(const std::vector<unsigned long long>& tr, int blocks) {
  unsigned long long t0 = ~0ull;
  for (int b = 0; b < blocks; ++b) {
    const unsigned long long e = tr[static_cast<size_t>(b) * nccl_moe::kLlTracePoints];
    if (e != 0) t0 = std::min(t0, e);
  }
  return t0;
}

CallStats summarise(const std::vector<unsigned long long>& tr, int blocks) {
  const unsigned long long t0 = firstEntry(tr, blocks);
  CallStats s(nccl_moe::kLlTracePoints, std::vector<double>(3, -1.0));
  for (int pt = 0; pt < nccl_moe::kLlTracePoints; ++pt) {
    if (pt == nccl_moe::kLlTraceSm) continue;
    std::vector<double> v;
    for (int b = 0; b < blocks; ++b) {
      const unsigned long long t = tr[static_cast<size_t>(b) * nccl_moe::kLlTracePoints + pt];
      if (t != 0 && t >= t0) v.push_back(static_cast<double>(t - t0) * 1e-3);
    }
    if (v.empty()) continue;
    std::sort(v.begin(), v.end());
    s[pt] = {v.front(), v[v.size() / 2], v.back()};
  }
  return s;
}

double medianOf(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? -1.0 : v[v.size() / 2];
}

TEST(LlTrace, DispatchTimeline) {
  if (std::getenv("NCCL_MOE_LL_TRACE") == nullptr) GTEST_SKIP() << "set NCCL_MOE_LL_TRACE=1 to run";
  const int n = ll_test::gpuRanks();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  const int token_counts[] = {1, 128};
  std::vector<std::string> text_of(2 * static_cast<size_t>(n));  // [case * n + rank]
  ll_test::Barrier barrier(n);
  const ncclMoeConfig_t config = Shape::config();
  ll_test::forEachRankIn(
      ll_test::Placement::kOnePerGpu, n, config, [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
        const int El = Shape::kExperts / n;
        Shape shape(r, n, 77);
        ASSERT_TRUE(shape.ok()) << "rank " << r << ": device buffers";
        ncclMoeHandle_t handle = nullptr;
        ASSERT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle));
        unsigned long long* trace = nullptr;
        const size_t trace_words = static_cast<size_t>(kMaxBlocks) * nccl_moe::kLlTracePoints;
        ASSERT_EQ(cudaSuccess, cudaMalloc(&trace, trace_words * 8));
        std::vector<unsigned long long> host(trace_words);

        for (int ci = 0; ci < 2; ++ci) {
          const int T = token_counts[ci];
          shape.route(T, 77 + static_cast<uint64_t>(T));
          barrier.wait();

          ncclMoeLLDispatchArgs_t da = shape.dispatchArgs(T);
          ncclMoeLLCombineArgs_t ca = shape.combineArgs(T);
          auto align = [&] {
            // Host-aligned start: every rank's stream is idle at the barrier, then a hold long enough for every rank
            // to enqueue the traced call behind it.
            ASSERT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
            barrier.wait();
            holdKernel<<<1, 1, 0, stream>>>(20000);
          };
          // Both calls: per block, its SM and its "send stored" time after the call's first entry (us).
          std::vector<int> block_sm(kMaxBlocks, -1);
          std::vector<std::vector<double>> stored(kMaxBlocks);
          auto keepBlocks = [&] {
            const unsigned long long t0 = firstEntry(host, kMaxBlocks);
            for (int b = 0; b < kMaxBlocks; ++b) {
              const unsigned long long* row = &host[static_cast<size_t>(b) * nccl_moe::kLlTracePoints];
              if (row[nccl_moe::kLlTraceEntry] == 0) continue;
              block_sm[static_cast<size_t>(b)] = static_cast<int>(row[nccl_moe::kLlTraceSm]);
              const unsigned long long st = row[nccl_moe::kLlTraceSendStored];
              if (st >= t0) stored[static_cast<size_t>(b)].push_back(static_cast<double>(st - t0) * 1e-3);
            }
          };
          auto traced = [&](ncclMoePhase_t ph, std::vector<CallStats>* calls, bool keep) {
            cudaMemsetAsync(trace, 0, trace_words * 8, stream);
            if (ph != ncclMoePhaseRecv) align();
            comm->ll_dispatch_trace = trace;
            da.phase = ph;
            EXPECT_EQ(ncclSuccess, ncclMoeLowLatencyDispatch(comm, handle, &da, stream)) << ncclMoeGetLastError(comm);
            comm->ll_dispatch_trace = nullptr;
            cudaMemcpyAsync(host.data(), trace, trace_words * 8, cudaMemcpyDeviceToHost, stream);
            cudaStreamSynchronize(stream);
            if (keep) calls->push_back(summarise(host, kMaxBlocks));
            if (keep && ph == ncclMoePhaseBoth) keepBlocks();
          };
          std::vector<CallStats> both, send, recv;
          for (int i = 0; i < kWarmup + kCalls; ++i) {
            const bool keep = i >= kWarmup;
            traced(ncclMoePhaseBoth, &both, keep);
            ca.phase = ncclMoePhaseBoth;
            EXPECT_EQ(ncclSuccess, ncclMoeLowLatencyCombine(comm, handle, &ca, stream));
            traced(ncclMoePhaseSend, &send, keep);
            // The receive half after the peer's data is surely there: measures the expansion alone.
            align();
            traced(ncclMoePhaseRecv, &recv, keep);
            EXPECT_EQ(ncclSuccess, ncclMoeLowLatencyCombine(comm, handle, &ca, stream));
          }
          cudaStreamSynchronize(stream);
          ncclResult_t async = ncclSuccess;
          ncclMoeCommGetAsyncError(comm, &async);
          EXPECT_EQ(ncclSuccess, async) << ncclMoeGetLastError(comm);
          const std::vector<CallStats>* sets[3] = {&both, &send, &recv};
          const char* names[3] = {"both", "send", "recv"};
          std::string text;
          for (int ph = 0; ph < 3; ++ph) {
            for (int pt = 0; pt < nccl_moe::kLlTracePoints; ++pt) {
              double st[3];
              for (int q = 0; q < 3; ++q) {
                std::vector<double> v;
                for (const CallStats& c : *sets[ph])
                  if (c[pt][q] >= 0) v.push_back(c[pt][q]);
                st[q] = medianOf(v);
              }
              if (st[0] < 0) continue;
              char buf[200];
              std::snprintf(buf, sizeof(buf),
                            "[ll trace] T=%-4d rank %d %-5s %-13s first %6.2f  median %6.2f  last %6.2f\n", T, r,
                            names[ph], kPointNames[pt], st[0], st[1], st[2]);
              text += buf;
            }
          }
          // The slowest send blocks of the Both calls (median over calls), with what else ran on their SM in the last
          // call (placement can change between calls): a send block; otherwise a receiver of expert b when b < E_l,
          // which polls from the start, or idle.
          std::vector<std::pair<double, int>> slow;
          for (int b = 0; b < kMaxBlocks; ++b)
            if (!stored[static_cast<size_t>(b)].empty()) slow.emplace_back(medianOf(stored[static_cast<size_t>(b)]), b);
          std::sort(slow.rbegin(), slow.rend());
          auto role = [&](int b) {
            return !stored[static_cast<size_t>(b)].empty() ? "sender" : b < El ? "poller" : "idle";
          };
          for (size_t i = 0; i < slow.size() && i < 8; ++i) {
            const int b = slow[i].second, sm = block_sm[static_cast<size_t>(b)];
            std::string mates;
            for (int o = 0; o < kMaxBlocks; ++o)
              if (o != b && block_sm[static_cast<size_t>(o)] == sm) mates += " " + std::to_string(o) + ":" + role(o);
            char buf[200];
            std::snprintf(buf, sizeof(buf),
                          "[ll trace] T=%-4d rank %d both  slow sender %3d (%s) sm %3d stored %6.2f  with%s\n", T, r, b,
                          role(b), sm, slow[i].first, mates.c_str());
            text += buf;
          }
          if (!slow.empty()) {
            char buf[120];
            std::snprintf(buf, sizeof(buf),
                          "[ll trace] T=%-4d rank %d both  sender stored median %6.2f over %zu blocks\n", T, r,
                          slow[slow.size() / 2].first, slow.size());
            text += buf;
          }
          text_of[static_cast<size_t>(ci) * n + r] = text;
        }
        ncclMoeHandleDestroy(handle);
        cudaFree(trace);
      });
  for (const std::string& s : text_of) std::fputs(s.c_str(), stdout);
}

}  // namespace
