// Pieces shared by the CPU and GPU backends of moe-perf: run-wide settings, the routing summary printed before each
// size, the byte-accounting notes printed under each table, and row construction.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "options.h"
#include "problem.h"
#include "report.h"

namespace nccl_moe::perf {

struct RunInfo {
  Options options;
  std::string git_sha = "unknown";
  int iters = 20;
  int warmup = 5;
  JsonLinesWriter* json = nullptr;
  int num_gpus = 0;       // distinct GPUs the ranks use (0 in CPU mode): the rows' `gpus`
  int ranks_per_gpu = 1;  // > 1: ranks share GPUs (--ranks-per-gpu), a correctness run: the rows' `shared_gpu`
  // Processes (--procs, MPI) whose ranks turned out to share GPUs (found from every rank's host and bus id): also a
  // correctness run, though NCCL runs between them (over sockets when they claim different hosts).
  bool gpus_shared_by_processes = false;
  // Nodes of the run's MoE communicators (ncclMoeCommNodeCount; 1 in CPU mode). > 1: internode LL on virtual nodes,
  // ranks of other nodes reached through the software NIC (perf/transport.h): the rows take the communicator's
  // layout and are labelled as correctness runs.
  int comm_nodes = 1;
};

// How long a host wait between the ranks of a process (a barrier of rank threads) may last before it gives up and
// fails the run: --timeout seconds, or one hour with --timeout 0 (the watchdog is off then, host waits stay bounded).
double hostWaitSeconds(const Options& options);

// GPUs the ranks use: distinct (host, PCI bus id) pairs, rank r on hosts[r] / bus_ids[r]. Fewer than the ranks
// means ranks share GPUs (for processes: RunInfo::gpus_shared_by_processes).
int distinctGpus(const std::vector<std::string>& hosts, const std::vector<std::string>& bus_ids);

// Prints to stdout and flushes (progress must be visible while a long run is going).
void out(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// "# ..." lines: traffic matrix (rows = source rank s, columns = destination d), received rows per rank and the
// per-expert load summary. `full_experts` also lists every expert's count (CPU mode).
void printRoutingSummary(const Problem& p, bool full_experts);

// The notes written under a mode's table: byte accounting and what time_us / baseline_us measure. GPU mode:
// `kernel_timer` = the rows were timed with the CUPTI kernel timer (else CUDA events); `shared_gpu` = ranks shared
// GPUs (host barriers, no baseline).
void printTableNotes(Mode mode, bool cpu, bool kernel_timer = false, bool shared_gpu = false);
// With several nodes (--ranks-per-node, or a multi-node communicator), what the "[N nodes: RDMA, NVLink]" tag of each
// row means; nothing for one. `from_comm`: the layout is the communicator's (the internode LL kernels ran on it).
void printNodeNotes(Mode mode, int nodes, bool from_comm = false);

// The notes under a mode's table when --metrics selected comparable metrics: what each selected column measures
// (docs/moe-perf.md, "Comparable metrics"); CPU mode: that they are GPU-only (null).
void printMetricsNotes(const MetricsChoice& metrics, bool cpu);

// The loud lines printed in the header and under every table when ranks share GPUs: the timings are not NVLink
// numbers and there is no NCCL baseline.
void printSharedGpuBanner(int num_ranks, int num_gpus, int ranks_per_gpu);
// The same warning for processes (MPI, --procs) found to share GPUs (RunInfo::gpus_shared_by_processes).
void printProcessesShareGpuBanner(int num_ranks, int num_gpus);

// The header line of a run of one rank: nothing crosses a GPU boundary (GPU mode) / between ranks (CPU mode).
void printOneRankNote(bool cpu);

// A row with the shape fields of `p` filled in (and `gpus`, `shared_gpu`, `software_nic` from `run`; `nodes` and the
// link bytes from p's layout, which is the communicator's when it spans several nodes: layoutRanksPerNode()).
ResultRow makeRow(const RunInfo& run, const Problem& p, const std::string& op, int sms, bool cpu);

// Logical bytes of an op, averaged over ranks.
double opBytesPerRank(const Problem& p, const std::string& op);

}  // namespace nccl_moe::perf
