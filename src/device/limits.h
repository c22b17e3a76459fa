// The library's limits, in one place: every array bound of kernels, layouts and host objects comes from here.
// The public values are in include/nccl_moe.h.
//   kMaxRanks     ranks of a communicator, over all its nodes (host tables, the node map)
//   kMaxNvlPeers  ranks of one node (NVLink domain), the rank itself included: the intranode kernels and the
//                 per-peer words of the HT and LL regions are sized by it, and their 32-bit rank masks hold it
//   kMaxTopk      top-k slots of a token
//   kMaxExperts   experts of a communicator (shared-memory counters of the layout and notify kernels)
#pragma once

#include "nccl_moe.h"

namespace nccl_moe {

constexpr int kMaxRanks = NCCL_MOE_MAX_RANKS;
constexpr int kMaxNvlPeers = NCCL_MOE_MAX_NVL_PEERS;
constexpr int kMaxTopk = NCCL_MOE_MAX_TOPK;
constexpr int kMaxExperts = NCCL_MOE_MAX_EXPERTS;

static_assert(kMaxNvlPeers <= 32, "intranode kernels keep one bit per node-local rank in 32-bit masks");
static_assert(kMaxNvlPeers <= kMaxRanks, "a node is part of a communicator");
static_assert(kMaxTopk <= 16, "the LL message header holds 16 slots");
static_assert(kMaxExperts <= 32767, "LL headers carry local expert ids as int16");

}  // namespace nccl_moe
