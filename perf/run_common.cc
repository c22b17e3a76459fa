// Shared backend pieces of moe-perf (see run_common.h).
#include "run_common.h"

#include <algorithm>
#include <cstdarg>
#include <set>

#include "link_bytes.h"
#include "transport.h"  // kSoftNicLabel

namespace nccl_moe::perf {

double hostWaitSeconds(const Options& options) { return options.timeout_s > 0 ? options.timeout_s : 3600.0; }

void out(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stdout, fmt, ap);
  va_end(ap);
  std::fflush(stdout);
}

void printRoutingSummary(const Problem& p, bool full_experts) {
  const int R = p.spec.num_ranks, E = p.spec.experts, K = p.spec.topk;
  const bool ht = p.spec.mode == Mode::kHt;
  out("# %s routing, tokens %d per rank, %s, seed %llu\n", ht ? "HT" : "LL", p.spec.tokens, p.spec.routing.text.c_str(),
      static_cast<unsigned long long>(p.spec.seed));
  out("#   traffic matrix: %s from rank s (row) to rank d (column)\n",
      ht ? "tokens (deduplicated per rank)" : "(token, expert) selections");
  std::string line = "#     s\\d";
  for (int d = 0; d < R; ++d)
    line += "  " + std::string(9 - std::min<size_t>(9, std::to_string(d).size()), ' ') + std::to_string(d);
  out("%s\n", line.c_str());
  for (int s = 0; s < R; ++s) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "#   %5d", s);
    line = buf;
    for (int d = 0; d < R; ++d) {
      std::snprintf(buf, sizeof(buf), "  %9lld", static_cast<long long>(p.traffic[static_cast<size_t>(s * R + d)]));
      line += buf;
    }
    out("%s\n", line.c_str());
  }
  // Received rows per rank.
  line = ht ? "#   rows received per rank (N_recv):" : "#   selections received per rank:";
  double sum = 0;
  for (int d = 0; d < R; ++d) {
    const int64_t n = ht ? p.numRecv(d) : p.numLlRecv(d);
    sum += static_cast<double>(n);
    line += " " + std::to_string(n);
  }
  char buf[96];
  std::snprintf(buf, sizeof(buf), " (mean %.1f)", sum / R);
  out("%s%s\n", line.c_str(), buf);
  if (!ht) {
    line = "#   selections sent per rank:";
    for (int s = 0; s < R; ++s) line += " " + std::to_string(p.numSelections(s));
    out("%s\n", line.c_str());
  }
  // Per-expert load over all source ranks.
  std::vector<int64_t> per_expert(static_cast<size_t>(E), 0);
  int64_t masked = 0;
  for (const auto& rr : p.routing.ranks)
    for (int64_t e : rr.topk_idx) {
      if (e >= 0) {
        ++per_expert[static_cast<size_t>(e)];
      } else {
        ++masked;
      }
    }
  const auto mm = std::minmax_element(per_expert.begin(), per_expert.end());
  double mean = 0;
  for (int64_t c : per_expert) mean += static_cast<double>(c);
  mean /= E;
  out("#   selections per expert (all source ranks): min %lld, max %lld, mean %.1f; masked slots %lld of %lld\n",
      static_cast<long long>(*mm.first), static_cast<long long>(*mm.second), mean, static_cast<long long>(masked),
      static_cast<long long>(static_cast<int64_t>(R) * p.spec.tokens * K));
  if (full_experts) {
    for (int e0 = 0; e0 < E; e0 += 16) {
      std::snprintf(buf, sizeof(buf), "#     experts %3d-%3d:", e0, std::min(E, e0 + 16) - 1);
      line = buf;
      for (int e = e0; e < std::min(E, e0 + 16); ++e) {
        std::snprintf(buf, sizeof(buf), " %5lld", static_cast<long long>(per_expert[static_cast<size_t>(e)]));
        line += buf;
      }
      out("%s\n", line.c_str());
    }
  }
}

void printNodeNotes(Mode mode, int nodes, bool from_comm) {
  if (nodes <= 1) return;
  if (from_comm && mode == Mode::kLl) {
    out("# %d nodes (the MoE communicator's, ncclMoeCommNodeCount): [RDMA, NVLink per rank] = the bytes the internode\n"
        "#   LL kernels move for this routing, averaged over ranks: one message per (token, destination rank), to\n"
        "#   ranks of other nodes over the scale-out transport (here the software NIC) and to ranks of the same node\n"
        "#   over the NVLink path (here ranks sharing one GPU); combine one bf16 row per (token, rank) back. JSON:\n"
        "#   nodes, rdma_bytes_per_rank, nvl_bytes_per_rank. %s.\n",
        nodes, kSoftNicLabel);
    return;
  }
  if (mode == Mode::kHt) {
    out("# %d nodes (--ranks-per-node): [RDMA, NVLink per rank] = the bytes the internode HT path moves for this\n"
        "#   routing, averaged over ranks (on one node a model of the path; on several the bytes its kernels\n"
        "#   move): dispatch crosses RDMA once per (token, other destination node), to the rank of the same local\n"
        "#   index there, which forwards over NVLink to that node's other ranks holding its experts; combine is the\n"
        "#   reverse with one bf16 partial per (token, node) over RDMA. Row sizes as the logical bytes. JSON: nodes, "
        "rdma_bytes_per_rank,\n"
        "#   nvl_bytes_per_rank.\n",
        nodes);
  } else {
    out("# %d nodes (--ranks-per-node): [RDMA, NVLink per rank] = the bytes the internode LL path moves for this\n"
        "#   routing, averaged over ranks (a model of the path): one message per (token, destination rank), over RDMA\n"
        "#   to other nodes and NVLink inside the node; combine one bf16 row per (token, rank) back. JSON: nodes,\n"
        "#   rdma_bytes_per_rank, nvl_bytes_per_rank.\n",
        nodes);
  }
}

void printTableNotes(Mode mode, bool cpu, bool kernel_timer, bool shared_gpu) {
  if (mode == Mode::kHt) {
    out("# bytes per rank (averaged over ranks): dispatch = N_recv*H*2 (bf16) or N_recv*H*(1+4/128) (fp8 + float\n"
        "#   scales); combine = N_recv*H*2 (bf16); notify_dispatch counts the dispatch bytes. N_recv = rows the rank\n"
        "#   receives, its own tokens included. logical_GB/s = bytes / time_us; baseline_GB/s = the same bytes /\n"
        "#   baseline_us.\n");
  } else {
    out("# bytes per rank (averaged over ranks): dispatch = S*(H + H/128*4 + 16) (fp8: data, float scales, header)\n"
        "#   or S*H*2 (bf16); combine = S*H*2; S = valid (token, expert) selections of the rank's tokens (no\n"
        "#   deduplication). logical_GB/s = bytes / time_us; baseline_GB/s = the same bytes / baseline_us. The\n"
        "#   send/recv rows time each half separately (no bandwidth).\n");
  }
  if (cpu) {
    out("# CPU reference timings: time_us = one nccl_moe::ref call computing all ranks on one thread (median);\n"
        "#   baseline_us = the ranks as threads: gather into per-destination order, memcpy all-to-all,\n"
        "#   un-permutation. #wrong = reference vs its brute-force model and vs the problem's expected rows;\n"
        "#   bl#wrong = CPU baseline vs the reference. Not comparable with GPU numbers.\n");
    return;
  }
  const char* barrier = shared_gpu ? "host barrier (every rank's stream drained)" : "NCCL barrier";
  if (kernel_timer) {
    out("# time_us = max over ranks of each rank's median kernel time (timer: kernel = CUPTI kernel records of\n"
        "#   the call, first kernel start to last kernel end, as DeepEP's kineto-based tests measure; %s,\n"
        "#   hold and start gate (if on, see above) before each call); baseline_us is timed the same way.\n"
        "#   notify_dispatch (MoE and baseline) includes a host wait and stays event-timed (CUDA events around the\n"
        "#   call). JSON event_median_us has the CUDA-event median of every row; rows marked [event-timed: ...] had\n"
        "#   no complete kernel records and use events for the MoE op and its baseline alike.\n",
        barrier);
  } else {
    out("# time_us = max over ranks of each rank's median (timer: event = CUDA events around each call, which\n"
        "#   include the GPU-side launch gap; %s, hold and start gate (if on, see above) before each\n"
        "#   call); baseline_us is timed the same way.\n",
        barrier);
  }
  if (shared_gpu) {
    out("# baseline: n/a (ranks share a GPU): NCCL refuses two ranks of one communicator on one GPU, so there is no\n"
        "#   NCCL all-to-all to compare with. #wrong = elements that differ from nccl_moe::ref (summed over ranks).\n");
  } else {
    out("# baseline = gather into per-destination order + grouped ncclSend/ncclRecv + un-permutation (scatter\n"
        "#   into expert slabs for LL dispatch, FP32 reduction into [T, H] for combines), same routing, same run;\n"
        "#   its notify_dispatch adds the per-peer count exchange and a host wait. #wrong / bl#wrong = elements\n"
        "#   that differ from nccl_moe::ref (summed over ranks).\n");
  }
}

void printMetricsNotes(const MetricsChoice& m, bool cpu) {
  if (cpu) {
    out("# --metrics %s: the comparable metrics are measured by the GPU backend only; CPU rows print -\n"
        "#   (JSON null).\n",
        metricsText(m).c_str());
    return;
  }
  out("# comparable metrics (--metrics %s): CUDA events, HT/LL dispatch and combine only,\n"
      "#   each metric in its own loop of -w + -n dispatch+combine iterations after the default one\n"
      "#   (docs/moe-perf.md, \"Comparable metrics\"):\n",
      metricsText(m).c_str());
  if (m.boundary)
    out("#   boundary_us = common-boundary time: before every call every stream drained and every rank past a\n"
        "#   host-synchronising rendezvous (GPU idle, no hold, no gate); one event pair around the call (the host's\n"
        "#   enqueue and all kernels); the slowest rank's median.\n");
  if (m.fresh)
    out("#   fresh_p50_us = fresh-entry p50: before every call the stream drained, then the barrier (rendezvous,\n"
        "#   hold, gate); one event pair around the call; per call the slowest rank's time, then the median over\n"
        "#   the calls.\n");
  if (m.chained)
    out("#   pair_period_us = chained pair period: one barrier, then -n dispatch+combine pairs back to back (no\n"
        "#   barrier between them), event time / -n; the slowest rank's; on the dispatch and the combine row.\n");
}

// The frame of the loud warnings below.
constexpr const char* kBannerRule =
    "# !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n";

void printSharedGpuBanner(int num_ranks, int num_gpus, int ranks_per_gpu) {
  out("%s"
      "# !!! RANKS SHARE A GPU: %d ranks on %d GPU%s (%d ranks per GPU, each rank's kernels get SMs/%d).\n"
      "# !!! CORRECTNESS RUN: every call is verified against the CPU reference, but the times say nothing about\n"
      "# !!! NVLink or NCCL-MoE's speed, and there is no NCCL baseline (NCCL refuses two ranks on one GPU).\n"
      "%s",
      kBannerRule, num_ranks, num_gpus, num_gpus == 1 ? "" : "s", ranks_per_gpu, ranks_per_gpu, kBannerRule);
}

void printProcessesShareGpuBanner(int num_ranks, int num_gpus) {
  out("%s"
      "# !!! PROCESSES SHARE A GPU: %d ranks on %d GPU%s (found from every rank's host and PCI bus id).\n"
      "# !!! CORRECTNESS RUN: every call is verified, but neither the MoE times nor the NCCL baseline say\n"
      "# !!! anything about NVLink (the ranks time-slice or share SMs under MPS; NCCL may run over sockets).\n"
      "%s",
      kBannerRule, num_ranks, num_gpus, num_gpus == 1 ? "" : "s", kBannerRule);
}

void printOneRankNote(bool cpu) {
  if (cpu) {
    out("# ONE RANK: nothing is exchanged between ranks; dispatch and combine only copy within the rank (rows "
        "marked [1 rank: everything local])\n");
  } else {
    out("# ONE RANK: nothing crosses a GPU boundary; dispatch and combine move data within one GPU (rows marked\n"
        "#   [1 rank: everything local]). To check several ranks on one GPU: moe-perf -g 4 --ranks-per-gpu 4\n");
  }
}

double opBytesPerRank(const Problem& p, const std::string& op) {
  const int R = p.spec.num_ranks, H = p.spec.hidden;
  double sum = 0;
  for (int r = 0; r < R; ++r) {
    if (p.spec.mode == Mode::kHt) {
      sum += op == "combine" ? htCombineBytes(p.numRecv(r), H) : htDispatchBytes(p.numRecv(r), H, p.spec.dtype);
    } else {
      const bool combine = op.rfind("combine", 0) == 0;
      sum += combine ? llCombineBytes(p.numSelections(r), H) : llDispatchBytes(p.numSelections(r), H, p.spec.dtype);
    }
  }
  return sum / R;
}

int distinctGpus(const std::vector<std::string>& hosts, const std::vector<std::string>& bus_ids) {
  std::set<std::pair<std::string, std::string>> gpus;
  for (size_t r = 0; r < hosts.size() && r < bus_ids.size(); ++r) gpus.emplace(hosts[r], bus_ids[r]);
  return static_cast<int>(gpus.size());
}

ResultRow makeRow(const RunInfo& run, const Problem& p, const std::string& op, int sms, bool cpu) {
  ResultRow row;
  row.backend = cpu ? "cpu" : "gpu";
  row.timer = cpu ? "host" : "event";  // the GPU backend sets "kernel" on rows the kernel timer measured
  row.mode = p.spec.mode;
  row.op = op;
  row.dtype = p.spec.dtype;
  row.ranks = p.spec.num_ranks;
  row.gpus = cpu ? 0 : run.num_gpus;
  row.shared_gpu = !cpu && (run.ranks_per_gpu > 1 || run.gpus_shared_by_processes);
  row.software_nic = !cpu && run.comm_nodes > 1;
  row.sms = sms;
  row.tokens = p.spec.tokens;
  row.hidden = p.spec.hidden;
  row.topk = p.spec.topk;
  row.experts = p.spec.experts;
  row.routing = p.spec.routing.text;
  row.seed = p.spec.seed;
  row.iters = run.iters;
  row.warmup = run.warmup;
  row.git_sha = run.git_sha;
  row.checked = run.options.check != 0;
  row.bytes_per_rank = opBytesPerRank(p, op);
  row.nodes = p.numNodes();
  if (row.nodes > 1) {
    const LinkBytes lb =
        linkBytesPerRank(p.spec.mode, op, p.spec.dtype, p.spec.hidden, p.routing, p.spec.ranks_per_node);
    row.rdma_bytes_per_rank = lb.rdma_per_rank;
    row.nvl_bytes_per_rank = lb.nvl_per_rank;
  }
  row.has_gbps = op.find("_send") == std::string::npos && op.find("_recv") == std::string::npos;
  return row;
}

}  // namespace nccl_moe::perf
