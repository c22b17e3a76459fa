// Rank masks in the low-latency kernels (config.enable_rank_masks; contract in include/nccl_moe.h, "Rank masks").
// The kernels are templates on kMasks: the variant without masks (comm.rank_mask null) has none of this code, so the
// default path is the same machine code as before masks existed. The masked variant
//   - reads the set of active ranks (this rank's mask) when a block starts and again after each of its waits on
//     peers, sends nothing to masked ranks and waits for nothing from them;
//   - waits through dev::wait_geq_or_mask (src/device/wait.cuh): a wait that times out on a peer masks the peer
//     (no error is recorded) and the block goes on without it;
//   - treats a masked source as a source of no tokens (dispatch receive: s_tokens = -1, see dispatch_recv.cuh) and a
//     masked expert rank as holding no slot of any token (combine receive).
// What a masked rank writes late lands only in the slots of the active ranks' buffers indexed by the masked rank
// (its messages, flags, counters, partials, acks), which the active ranks do not read while it is masked and which
// ncclMoeSetRankMask / ncclMoeClearRankMask zero (after a barrier that includes every rank they unmask).
#pragma once

#include <cstdint>

#include "device/device_comm.h"
#include "device/wait.cuh"

namespace nccl_moe {
namespace ll {

// Bit d set: rank d is active in this rank's mask (read now; blocks of this rank may mask more later).
__device__ __forceinline__ uint32_t live_ranks(const DeviceComm& comm) {
  uint32_t live = 0;
  for (int d = 0; d < comm.num_ranks; ++d)
    if (!dev::rank_masked(comm, d)) live |= 1u << d;
  return live;
}

__device__ __forceinline__ bool is_live(uint32_t live, int d) { return ((live >> d) & 1u) != 0; }

}  // namespace ll
}  // namespace nccl_moe
