// SM co-scheduling arithmetic of the tuner: how many NCCL channels a collective may use while NCCL-MoE
// kernels hold some SMs of the same GPU, and what to write into getCollInfo's *nChannels. Pure integer
// logic, header-only so that tests/unit/plugin_test.cc checks it directly.
//
// The rule (plugin/README.md explains it):
//   One NCCL channel = one CTA = one SM for the whole collective. NCCL-MoE kernels are persistent: their
//   CTAs spin on flags written by peers. If an NCCL collective and an NCCL-MoE kernel that run concurrently
//   need more SMs than the GPU has, part of one waits for SMs held by the other, whose progress may depend on
//   a peer GPU stuck the same way: a cross-rank deadlock. So
//       cap = device_sms - reserve_sms, at least 1,
//   and no cap at all when the cap is >= kNcclMaxChannels (NCCL never uses more channels than that), when
//   nothing is reserved, or when the SM count is unknown.
//
//   NCCL replaces its own size-based channel count by any non-zero value the tuner writes, so writing the
//   cap for a small message would *raise* NCCL's count. For Ring and Tree NCCL's count is
//   min(comm channels, max(1, nBytes / (threads * threshold))), and with NCCL's default thread counts and
//   thresholds threads * threshold >= 4096 bytes (LL: 512 threads x 8 B; Ring LL, LL128, Simple are larger).
//   So when max(1, nBytes / 4096) <= cap, NCCL's own choice already fits and the tuner writes nothing.
//   NVLS, CollNet and PAT do not shrink with the size: for them (and whenever NCCL_NTHREADS,
//   NCCL_LL128_NTHREADS or NCCL_THREAD_THRESHOLDS change the defaults) a binding cap is always written.
#pragma once

#include <stddef.h>

#include "nccl_tuner_abi.h"

namespace nccl_moe {
namespace tuner {

constexpr int kNcclMaxChannels = 64;              // MAXCHANNELS in NCCL 2.28 ... 2.30
constexpr size_t kMinNcclBytesPerChannel = 4096;  // smallest default threads * threadThreshold (see above)

// Channels NCCL may use beside `reserve_sms` reserved SMs on a `device_sms`-SM GPU; 0 = no cap.
inline int channelCap(int reserve_sms, int device_sms) {
  if (reserve_sms <= 0 || device_sms <= 0) return 0;
  const int free_sms = device_sms - reserve_sms;
  if (free_sms >= kNcclMaxChannels) return 0;
  return free_sms < 1 ? 1 : free_sms;
}

// The algorithm NCCL will pick from the cost table: the cheapest entry that is not ignored (NCCL's own
// selection, as the tuner leaves the table untouched). -1 when none is allowed or the table is unusable.
// `table` points at float[num_algo][num_proto].
inline int cheapestAlgorithm(const float* table, int num_algo, int num_proto) {
  if (table == nullptr || num_algo <= 0 || num_proto <= 0) return -1;
  int best_algo = -1;
  float best_cost = 0.0f;
  for (int a = 0; a < num_algo; ++a) {
    for (int p = 0; p < num_proto; ++p) {
      const float cost = table[a * num_proto + p];
      if (cost < 0.0f) continue;  // NCCL_ALGO_PROTO_IGNORE (-1) or otherwise disallowed
      if (best_algo < 0 || cost < best_cost) {
        best_algo = a;
        best_cost = cost;
      }
    }
  }
  return best_algo;
}

// Value for getCollInfo's *nChannels given the cap, NCCL's algorithm, the message size and what is already
// there (NCCL passes 0). `size_rule_valid`: NCCL's thread counts and thresholds are the defaults.
inline int channelsToWrite(int cap, int algo, size_t nbytes, bool size_rule_valid, int current) {
  if (cap <= 0) return current;
  if (current > 0) return current < cap ? current : cap;
  const bool shrinks_with_size = algo == NCCL_MOE_ABI_ALGO_RING || algo == NCCL_MOE_ABI_ALGO_TREE;
  if (shrinks_with_size && size_rule_valid) {
    const size_t upper = nbytes / kMinNcclBytesPerChannel;  // NCCL's size-based count is <= max(1, upper)
    if (upper <= static_cast<size_t>(cap)) return 0;
  }
  return cap;
}

}  // namespace tuner
}  // namespace nccl_moe
