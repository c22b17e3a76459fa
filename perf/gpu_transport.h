// moe-perf transport mode on the GPU (--mode transport, perf/transport.h): put and put_signal between two virtual
// nodes on GPU 0 over the software NIC, per backend; prints the table, writes the JSON rows. Returns the exit code
// (0: every row available and verified; 1: otherwise).
#pragma once

#include "run_common.h"

namespace nccl_moe::perf {

int runTransport(const RunInfo& run);

}  // namespace nccl_moe::perf
