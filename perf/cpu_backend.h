// CPU mode of moe-perf: no GPU (or --cpu). Runs the CPU reference (nccl_moe::ref) on the configured shapes with the
// ranks simulated, times the reference operations, checks them against the reference's brute-force model and the
// problem's expected rows, and runs the all-to-all baseline with one host thread per rank (cpu_baseline.h).
#pragma once

#include <string>

#include "run_common.h"

namespace nccl_moe::perf {

// `reason`: why CPU mode ("no GPU found (...)" or "--cpu given"). Returns the process exit code.
int runCpu(RunInfo& run, int num_ranks, const std::string& reason);

}  // namespace nccl_moe::perf
