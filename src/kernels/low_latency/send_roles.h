// How the blocks of a low-latency dispatch's send part share the work and arrive. Pure arithmetic, host and device
// (unit-tested in tests/unit/ll_roles_test.cc); used by src/kernels/low_latency/dispatch.cu.
//
// Items: local item t = token t stored into this rank's own messages, on block t % grid; remote item t = token t
// stored into every other rank holding one of its experts, on block grid - 1 - t % grid. A block that stores only
// locally publishes its messages without waiting for NVLink, so receivers can place their own rank's rows while
// the peers' are still in flight. Arrival: per class, the blocks with class index i < senders = max(1, min(T,
// grid)) arrive (class index b for local, grid - 1 - b for remote) with arrival_share(i, senders): every item's
// block arrives, and the shares of a class sum to kLlArrivalUnits whatever the grid. count_block = T % grid counts
// the experts for the receivers (a block without items when 2T < grid).
#pragma once

#include <cuda_runtime.h>  // __host__ __device__ for host compilers too

#include <cstdint>

#include "mem/ll_layout.h"

namespace nccl_moe {
namespace ll {

// Share of kLlArrivalUnits of block b among n arriving blocks (0 <= b < n <= 4095): the n shares sum to
// kLlArrivalUnits, whatever n, so the counter's target does not depend on the peer's grid. 32-bit math (a
// 64-bit division is a call that makes the kernels spill).
__host__ __device__ __forceinline__ long long arrival_share(int b, int n) {
  static_assert(kLlArrivalUnits * 4095 <= 0xffffffffll, "32-bit share math");
  const uint32_t u = static_cast<uint32_t>(kLlArrivalUnits), nn = static_cast<uint32_t>(n);
  const uint32_t bb = static_cast<uint32_t>(b);
  return static_cast<long long>((bb + 1) * u / nn - bb * u / nn);
}

struct SendRoles {
  int senders;          // arriving blocks per class
  int remote_index;     // this block's class index among the remote class's blocks
  bool local_arrives;   // adds its share to this rank's own dispatch_count[me]
  bool remote_arrives;  // adds its share to every other rank's dispatch_count[me]
  bool has_items;       // at least one local or remote item
  int count_block;      // the block that counts the experts
};

// Roles of block b of `grid` blocks, T tokens, R ranks.
__host__ __device__ __forceinline__ SendRoles send_roles(int b, int grid, int T, int R) {
  SendRoles r;
  r.senders = T > 0 ? (T < grid ? T : grid) : 1;
  r.remote_index = grid - 1 - b;
  r.local_arrives = b < r.senders;
  r.remote_arrives = R > 1 && r.remote_index < r.senders;
  r.has_items = b < T || (R > 1 && r.remote_index < T);
  r.count_block = T % grid;
  return r;
}

}  // namespace ll
}  // namespace nccl_moe
