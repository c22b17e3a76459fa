// GPU mode of moe-perf: one host thread per rank, NCCL communicator per rank, then per mode / dtype / size:
// the NCCL all-to-all baseline (gpu_baseline.h) and the NCCL-MoE operations through the public API
// (include/nccl_moe.h), each verified once against the CPU reference (untimed) and then timed (median of -n calls
// after -w warm-ups, an NCCL barrier and a stream hold before each call) with CUPTI kernel records or CUDA events
// (--timer, perf/kernel_timer.h). Results are reduced over ranks through NCCL and printed by global rank 0.
//
// Ranks sharing a GPU (--ranks-per-gpu): one process, no NCCL call; the collectives run over the rank threads in
// host memory (collective.h), the MoE communicators come from ncclMoeCommInitAll, there is no baseline, and the
// run is labelled loudly as a correctness run (gpu_rank.h).
//
// MoE operations that the library does not provide yet (any error returned by an API call, or recorded as an
// asynchronous error) are reported as "not available: <error>" and fail the run unless --allow-missing-moe;
// wrong results, baseline errors and CUDA/NCCL failures always do (exit code 1).
#pragma once

#include "launcher.h"
#include "run_common.h"

namespace nccl_moe::perf {

// Runs this process's ranks. Returns the process exit code.
int runGpu(RunInfo& run, const RankLayout& layout, int num_devices);

}  // namespace nccl_moe::perf
