// How the ranks of a moe-perf run are laid out over processes, threads and GPUs, and the --procs launcher.
//
// Contract
//   - ranks = processes x threads (-t) x GPUs per thread (-g). Every GPU gets its own host thread: with -g > 1 the
//     process still starts threads x GPUs threads (one per GPU), never one thread driving several GPUs.
//   - Processes come from (in order): moe-perf's own --procs spawning (children carry MOE_PERF_PROC_RANK /
//     MOE_PERF_NUM_PROCS), an MPI launcher (OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/PMI_SIZE; the local rank from
//     OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, SLURM_LOCALID or PMI_LOCAL_RANK), else a single process.
//   - Rendezvous: one process -> ncclGetUniqueId in the process. Several processes -> NCCL_COMM_ID=<host>:<port>
//     (NCCL's own bootstrap: every process calls ncclGetUniqueId, global rank 0 opens the root). --procs sets it to
//     127.0.0.1:<free port> unless already set; under MPI it must be set by the user, except on a single host with a
//     launcher job id (OMPI_MCA_ess_base_jobid / PMIX_NAMESPACE / SLURM_JOB_ID), where a port is derived from it.
//   - GPU of local rank i: (local process index * ranks per process + i); more than the visible count is an error.
//   - Ranks sharing a GPU (--ranks-per-gpu N > 1): one process, no NCCL; ranks = threads (-t) x ranks per thread
//     (-g, default N), a multiple of N and at most kMaxSharedGpuRanks (one node); rank i runs on GPU i / N, so the run
//     uses ranks / N GPUs. --procs and MPI launchers are refused (ncclMoeCommInitAll makes every rank's communicator
//     in one process).
#pragma once

#include <string>
#include <vector>

#include "options.h"

namespace nccl_moe::perf {

// Every rank of a shared-GPU world is on one node: NCCL_MOE_MAX_NVL_PEERS (include/nccl_moe.h).
constexpr int kMaxSharedGpuRanks = 8;

struct RankLayout {
  int num_procs = 1;
  int proc_rank = 0;
  int local_proc_rank = 0;  // this process's index among the processes of its host
  int threads = 1;          // -t
  int gpus_per_thread = 1;  // -g: ranks per thread (one GPU each, unless ranks share GPUs)
  int ranks_per_gpu = 1;    // --ranks-per-gpu
  bool mpi = false;
  bool spawned = false;  // a child of --procs
  int ranksPerProc() const { return threads * gpus_per_thread; }
  int numRanks() const { return num_procs * ranksPerProc(); }
  int firstRank() const { return proc_rank * ranksPerProc(); }
  int firstDevice() const { return local_proc_rank * ranksPerProc(); }
  bool sharedGpu() const { return ranks_per_gpu > 1; }
  // CUDA device of this process's local rank `local`.
  int deviceOf(int local) const { return sharedGpu() ? (firstRank() + local) / ranks_per_gpu : firstDevice() + local; }
  // Distinct GPUs of the run (all processes).
  int numGpus() const { return sharedGpu() ? numRanks() / ranks_per_gpu : numRanks(); }
  // "4 ranks = 2 processes x 1 threads x 2 GPUs per thread (MPI launcher)", or for ranks sharing GPUs
  // "4 ranks = 1 process x 1 threads x 4 ranks per thread on 1 GPU (4 ranks per GPU)".
  std::string describe() const;
};

// True when this process is a --procs child or runs under an MPI launcher.
bool inMultiProcessJob();
// This process's index in a multi-process job (--procs child or MPI world rank); 0 otherwise.
int processRankFromEnv();

// Resolves the layout for GPU mode. `num_devices` = visible GPUs. Returns "" or an error.
std::string resolveGpuLayout(const Options& options, int num_devices, RankLayout* layout);

// Makes sure NCCL_COMM_ID is usable for a multi-process layout (see the contract). Returns "" or an error.
std::string prepareRendezvous(const RankLayout& layout);

// --procs N: re-executes this program N times with the same arguments (children inherit stdout/stderr; only global
// rank 0 prints results), waits for all of them and returns the worst exit code. When a child fails, the others
// get 20 s to finish and are then terminated (SIGTERM to their pids).
int spawnProcesses(int num_procs, int argc, char** argv);

}  // namespace nccl_moe::perf
