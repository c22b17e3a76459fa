// One GPU rank of moe-perf from start to end (contract in gpu_rank.h).
#include "gpu_rank.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "gpu_aggregate.h"
#include "nccl_moe.h"
#include "topo/topo.h"
#include "transport.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

struct RankInfo {
  int rank, local, pid, device, sms;
  char host[64];
  char bus_id[32];
  char name[96];
};

// The topology block (nccl_moe::topo, GPUs of rank 0's host), then one line per rank like nccl-tests.
void printRankList(const std::vector<RankInfo>& infos) {
  std::vector<std::string> bus_ids;  // each GPU once (ranks may share one)
  for (const RankInfo& i : infos)
    if (std::strcmp(i.host, infos[0].host) == 0 && std::find(bus_ids.begin(), bus_ids.end(), i.bus_id) == bus_ids.end())
      bus_ids.push_back(i.bus_id);
  topo::Topology t;
  if (topo::discover(bus_ids, &t) == ncclSuccess) {
    const std::string text = topo::formatTopology(t);
    size_t start = 0;
    while (start < text.size()) {
      const size_t end = text.find('\n', start);
      out("# %s\n", text.substr(start, end == std::string::npos ? std::string::npos : end - start).c_str());
      if (end == std::string::npos) break;
      start = end + 1;
    }
  } else {
    out("# topology: not available (%s)\n", threadLastError());
  }
  for (const RankInfo& i : infos)
    out("#  Rank %2d Group %2d Pid %7d on %12s device %2d [%s] %s (%d SMs)\n", i.rank, i.local, i.pid, i.host, i.device,
        i.bus_id, i.name, i.sms);
}

}  // namespace

void rankMain(ProcessState& sh, int local) {
  RunInfo run = sh.run;  // this rank's copy: the GPU count is only known once every rank's bus id is
  const Options& o = run.options;
  Progress& prog = sh.progress[local];
  RankDevice rd;
  rd.rank = sh.layout.firstRank() + local;
  rd.num_ranks = sh.layout.numRanks();
  rd.device = sh.layout.deviceOf(local);
  const bool printer = rd.rank == 0;
  const bool shared = sh.layout.sharedGpu();  // ranks share GPUs: host collectives, no NCCL call at all
  Timing tm;
  tm.kernel = sh.kernel_timer ? &KernelTimer::instance() : nullptr;
  tm.local = &sh.barrier;
  tm.local_wait_s = sh.host_wait_s;
  prog.set("cudaSetDevice");
  HARNESS_CUDA(cudaSetDevice(rd.device));
  HARNESS_CUDA(cudaStreamCreateWithFlags(&rd.stream, cudaStreamNonBlocking));
  std::unique_ptr<Collective> collective;
  if (shared) {
    collective = makeHostCollective(rd, sh.exchange.get());
  } else {
    prog.set("ncclCommInitRank");
    PERF_NCCL(ncclCommInitRank(&rd.comm, rd.num_ranks, sh.id, rd.rank));
    collective = makeNcclCollective(rd);
  }
  Collective& col = *collective;

  // Who is where.
  RankInfo info{};
  cudaDeviceProp prop{};
  HARNESS_CUDA(cudaGetDeviceProperties(&prop, rd.device));
  info.rank = rd.rank;
  info.local = local;
  info.pid = static_cast<int>(::getpid());
  info.device = rd.device;
  info.sms = prop.multiProcessorCount;
  ::gethostname(info.host, sizeof(info.host) - 1);
  HARNESS_CUDA(cudaDeviceGetPCIBusId(info.bus_id, sizeof(info.bus_id), rd.device));
  std::snprintf(info.name, sizeof(info.name), "%.95s", prop.name);
  std::vector<char> mine(sizeof(RankInfo));
  std::memcpy(mine.data(), &info, sizeof(RankInfo));
  const std::vector<char> all = col.allGather(mine);
  std::vector<RankInfo> infos(sz(rd.num_ranks));
  std::memcpy(infos.data(), all.data(), all.size());
  if (printer) printRankList(infos);
  if (!shared) {
    // Processes on one GPU (MPI or --procs, NCCL_HOSTID per process): a correctness run like --ranks-per-gpu.
    std::vector<std::string> hosts, bus_ids;
    for (const RankInfo& i : infos) {
      hosts.emplace_back(i.host);
      bus_ids.emplace_back(i.bus_id);
    }
    const int gpus = distinctGpus(hosts, bus_ids);
    if (gpus < rd.num_ranks) {
      run.gpus_shared_by_processes = true;
      run.num_gpus = gpus;
      sh.distinct_gpus.store(run.num_gpus);
      if (printer) printProcessesShareGpuBanner(rd.num_ranks, run.num_gpus);
    }
  }
  const std::string gpu_name = infos[0].name;
  prog.set("start gate setup");
  std::vector<Collective::Place> places;
  for (const RankInfo& i : infos) places.push_back({i.host, i.pid, i.device});
  // Ranks sharing a GPU run for correctness: no device-side start gate there (its meeting kernels would wait for
  // peers whose threads may be inside a call that waits for the whole device); the host barrier aligns the calls.
  col.quiesce();  // ranks sharing a GPU: the gate's allocations happen while every rank is idle
  const bool gate = shared ? false : col.setupGate(places);
  col.quiesce();
  if (printer) {
    const char* rendezvous =
        shared ? "a host barrier of the rank threads (every rank's stream drained)" : "an NCCL barrier";
    if (gate) {
      out("# start gate: on (each timed call follows %s, a %d us hold and a device-side meeting of all ranks)\n",
          rendezvous, Collective::kHoldUs);
    } else {
      out("# start gate: off, %s (each timed call follows %s and a %d us hold)\n",
          shared ? "ranks share a GPU (correctness run)" : "some rank cannot reach another's memory", rendezvous,
          Collective::kHoldUs);
    }
  }

  const int num_problems = countProblems(o);
  const int metric_calls = o.metrics.any() ? run.iters : 0;  // aggregate(): reduce the comparable metrics
  int problem_idx = 0;                                       // of the progress lines (progress.h)
  for (Mode mode : resolveModes(o)) {
    const ModeConfig cfg = resolveMode(o, mode);
    const int cap = static_cast<int>(*std::max_element(cfg.tokens.begin(), cfg.tokens.end()));
    prog.set("ncclMoeCommInit");
    MoeSession moe;
    moe.init(rd, col, cfg, cap, shared ? sh.world.get() : nullptr);
    // Processes (MPI, --procs): main() could not ask for the node count (each process's host identity decides it,
    // NCCL_HOSTID per process), so the first usable communicator tells it; refused like main()'s refusals.
    if (!sh.layout.sharedGpu() && col.agree(moe.usable) && moe.num_nodes != run.comm_nodes) {
      run.comm_nodes = moe.num_nodes;
      const std::string refused = checkCommNodes(resolveModes(o), o.ranks_per_node, rd.num_ranks, run.comm_nodes);
      if (!refused.empty()) {
        moe.usable = false;
        moe.error = refused;
      } else if (printer && run.comm_nodes > 1) {
        out("%s", softNicMoeBanner(run.comm_nodes, rd.num_ranks, run.num_gpus, true).c_str());
      }
    }
    // The rows are labelled with the node count main() learnt (probeWorldNodes); a session with another one (or a
    // multi-node communicator where main() could not ask) would be mislabelled: it is not used.
    if (!col.agree(!moe.usable || moe.num_nodes == run.comm_nodes) && moe.usable) {
      moe.usable = false;
      moe.error = "the MoE communicator spans " + std::to_string(moe.num_nodes) + " node(s), but moe-perf set up " +
                  "the run for " + std::to_string(run.comm_nodes) + " (ncclMoeCommNodeCount); its rows would be " +
                  "mislabelled";
    }
    if (printer) {
      out("#\n# %s mode: %d ranks on %d GPUs%s, capacity %d tokens per rank, hidden %d, top-%d of %d experts\n",
          mode == Mode::kHt ? "HT (high-throughput)" : "LL (low-latency)", rd.num_ranks, run.num_gpus,
          shared ? " (ranks share GPUs)" : "", cap, cfg.hidden, cfg.topk, cfg.experts);
      if (run.comm_nodes > 1)
        out("# %d nodes of %d ranks (the communicator's: ncclMoeCommNodeCount), other nodes through the software NIC: "
            "%s\n",
            run.comm_nodes, rd.num_ranks / run.comm_nodes, kSoftNicLabel);
      if (moe.usable) {
        out("# MoE communicator: %.1f MiB of communication buffer per rank%s\n",
            static_cast<double>(moe.buffer_bytes) / (1 << 20),
            run.comm_nodes > 1 ? " (ncclMoeGetBufferSize's one-node layout; the internode LL region is not counted)"
                               : "");
      } else {
        out("# MoE communicator not available: %s\n", moe.error.c_str());
      }
    }
    // The rows' node layout: the communicator's when it spans several nodes (a --ranks-per-node that disagrees was
    // refused), else --ranks-per-node (a modelled layout; 0: one node).
    const int ranks_per_node = layoutRanksPerNode(o.ranks_per_node, rd.num_ranks, run.comm_nodes);
    bool header = false;
    for (DType dtype : cfg.dtypes) {
      std::string bad = checkShape(cfg, dtype, rd.num_ranks);
      if (bad.empty()) bad = checkNodes(o.routing, ranks_per_node, cfg, rd.num_ranks);
      if (!bad.empty()) {
        if (printer) out("# %s %s: invalid shape: %s\n", modeName(mode), dtypeName(dtype), bad.c_str());
        sh.fail(2);
        problem_idx += static_cast<int>(cfg.tokens.size());
        continue;
      }
      for (int64_t tokens : cfg.tokens) {
        prog.enterProblem(mode, dtype, tokens, ++problem_idx, num_problems);
        // One problem per process, built by local rank 0.
        if (local == 0) {
          prog.set("building the problem (CPU reference)");
          if (printer)
            out("# building %s %s problem: %lld tokens per rank%s\n", modeName(mode), dtypeName(dtype),
                static_cast<long long>(tokens), o.check ? " (with expected results)" : "");
          ProblemSpec spec;
          spec.mode = mode;
          spec.dtype = dtype;
          spec.num_ranks = rd.num_ranks;
          spec.tokens = static_cast<int>(tokens);
          spec.hidden = cfg.hidden;
          spec.topk = cfg.topk;
          spec.experts = cfg.experts;
          spec.ll_max_tokens = cap;
          spec.expert_alignment = o.expert_alignment;
          spec.routing = o.routing;
          spec.ranks_per_node = ranks_per_node;
          spec.comm_nodes = run.comm_nodes > 1 ? run.comm_nodes : 1;
          spec.seed = o.seed;
          spec.build_expected = o.check != 0;
          spec.ranks_needed.assign(sz(rd.num_ranks), false);
          for (int i = 0; i < sh.layout.ranksPerProc(); ++i) spec.ranks_needed[sz(sh.layout.firstRank() + i)] = true;
          sh.problem_error.clear();
          try {
            sh.problem = std::make_unique<Problem>(buildProblem(spec));
          } catch (const std::exception& e) {
            sh.problem.reset();
            sh.problem_error = e.what();
          }
        }
        prog.set("waiting for the problem");
        meet(sh.barrier, sh.host_wait_s, "problem built");
        if (!sh.problem) {
          if (printer)
            out("# %s %s %lld tokens: error: %s\n", modeName(mode), dtypeName(dtype), static_cast<long long>(tokens),
                sh.problem_error.c_str());
          sh.fail(1);
          meet(sh.barrier, sh.host_wait_s, "problem failed");
          continue;
        }
        const Problem& p = *sh.problem;
        if (printer) {
          printRoutingSummary(p, false);
          if (!header) out("%s", tableHeader(o.metrics).c_str());
          header = true;
        }
        // The NCCL baseline: [dispatch, combine, first], empty when ranks share a GPU (NCCL cannot run there).
        std::vector<Aggregate> bla;
        if (shared) {
          if (printer) out("# [gpu] NCCL baseline: n/a (ranks share a GPU; NCCL refuses two ranks on one GPU)\n");
        } else {
          if (printer)
            out("# [gpu] NCCL baseline: verification pass + %d timed calls per op\n", run.warmup + run.iters);
          BaselineResult bl;
          runBaseline(p, rd, col, run, tm, prog, &bl);
          bla = aggregate(col, {&bl.dispatch, &bl.combine, &bl.first}, rd.num_ranks);
          for (const Aggregate& a : bla)
            if (a.wrong != 0) sh.fail(1);
        }
        // Op i's baseline (HT: all three ops, LL: dispatch and combine), or null with the reason in the row.
        auto baselineOf = [&](ResultRow* row, int i, bool has_one) -> const Aggregate* {
          if (!has_one) return nullptr;
          if (bla.empty()) {
            row->baseline_note = "ranks share a GPU";
            return nullptr;
          }
          return &bla[sz(i)];
        };

        for (int sms : cfg.sms) {
          if (mode == Mode::kHt) prog.setSms(sms);
          if (printer && moe.usable)
            out("# [gpu] MoE %s ops (sms %s): verification pass + %d timed calls per op\n", modeName(mode),
                sms ? std::to_string(sms).c_str() : "auto", run.warmup + run.iters);
          std::vector<ResultRow> rows;
          if (mode == Mode::kHt) {
            HtResult ht;
            runMoeHt(p, rd, col, moe, sms, run, tm, prog, &ht);
            const std::vector<Aggregate> a =
                aggregate(col, {&ht.dispatch, &ht.combine, &ht.first}, rd.num_ranks, metric_calls);
            const char* names[3] = {"dispatch", "combine", "notify_dispatch"};
            for (int i = 0; i < 3; ++i) {
              ResultRow row = makeRow(run, p, names[i], sms, false);
              const Aggregate* baseline = baselineOf(&row, i, true);
              fillRow(&row, a[sz(i)], baseline, sh.kernel_timer && i != 2);  // notify_dispatch: events
              rows.push_back(row);
            }
          } else {
            LlResult ll;
            runMoeLl(p, rd, col, moe, run, tm, prog, &ll);
            const std::vector<Aggregate> a = aggregate(
                col,
                {&ll.dispatch, &ll.combine, &ll.dispatch_send, &ll.dispatch_recv, &ll.combine_send, &ll.combine_recv},
                rd.num_ranks, metric_calls);
            const char* names[6] = {"dispatch",      "combine",      "dispatch_send",
                                    "dispatch_recv", "combine_send", "combine_recv"};
            for (int i = 0; i < 6; ++i) {
              ResultRow row = makeRow(run, p, names[i], sms, false);
              const Aggregate* baseline = baselineOf(&row, i, i < 2);
              fillRow(&row, a[sz(i)], baseline, sh.kernel_timer);
              rows.push_back(row);
            }
          }
          for (ResultRow& row : rows) {
            row.gpu_name = gpu_name;
            if (row.available && row.wrong != 0) sh.fail(1);
            if (!row.available && o.require_moe) sh.fail(1);
            if (printer) {
              if (!row.available) ++sh.unavailable_rows;
              out("%s", tableRow(row, o.metrics).c_str());
              if (run.json) run.json->write(row);
            }
          }
        }
        prog.set("end of size");
        meet(sh.barrier, sh.host_wait_s, "end of size");
        if (local == 0) sh.problem.reset();
      }
    }
    prog.set("ncclMoeCommDestroy");
    moe.destroy(col);
    if (printer && header) {
      printTableNotes(mode, false, sh.kernel_timer, shared);
      printNodeNotes(mode, numNodes(rd.num_ranks, ranks_per_node), run.comm_nodes > 1);
      if (o.metrics.any()) printMetricsNotes(o.metrics, false);
      if (shared) printSharedGpuBanner(rd.num_ranks, sh.layout.numGpus(), sh.layout.ranks_per_gpu);
      if (run.comm_nodes > 1)
        out("%s", softNicMoeBanner(run.comm_nodes, rd.num_ranks, run.num_gpus, !sh.layout.sharedGpu()).c_str());
    }
  }
  prog.set(shared ? "teardown" : "ncclCommDestroy");
  col.barrier();
  HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  if (col.gateTimedOut()) {
    std::fprintf(stderr,
                 "moe-perf: rank %d: a start-gate meeting gave up after %.0f s waiting for a peer; the ranks' "
                 "calls were not aligned and the timings are suspect\n",
                 rd.rank, Collective::kGateTimeoutS);
    sh.fail(1);
  }
  if (!shared) ncclCommDestroy(rd.comm);
  col.quiesce();  // ranks sharing a GPU: the collective's buffers are freed while every rank is idle
  collective.reset();
  cudaStreamDestroy(rd.stream);
  prog.set("done");
  prog.finished.store(true);
}

}  // namespace nccl_moe::perf
