// Traffic matrices of a routing: how many rows each rank sends each rank in a HT or LL dispatch. moe-perf's CPU
// mode uses them for byte accounting and the tests for routing properties. Derived from the routing alone (the
// reference's layout for HT); not part of the reference's contract (reference.h).
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.h"

namespace nccl_moe::ref {

// Traffic of a HT dispatch: m[s * R + d] = tokens of s sent to d (deduplicated per rank; s == d included).
std::vector<int64_t> traffic_matrix(const Routing& routing);
// Traffic of a LL dispatch: m[s * R + d] = valid (token, slot) pairs of s whose expert lives on d.
std::vector<int64_t> ll_traffic_matrix(const Routing& routing);

}  // namespace nccl_moe::ref
