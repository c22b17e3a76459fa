// Launch knobs of the high-throughput kernels that are not part of the public API: how the warps of each
// block are split between roles. 0 = the built-in default (chosen from the rank count). Process-wide; the
// GPU timing test sweeps them to pick the defaults (docs/kernels-ht.md records the measurements).
#pragma once

namespace nccl_moe {

struct HtTuning {
  int dispatch_send_warps = 0;  // warps per dispatch block that push rows to peers (of kHtThreads / 32)
  int combine_send_warps = 0;   // warps per combine block that push rows back to their home ranks
  // > 0: split by blocks instead of warps: blocks [0, send_blocks) only send, the others only do local
  // work (used when 0 < send_blocks < num_sms, else the warp split applies). Dispatch with all knobs 0
  // uses a block split of num_sms / 2; combine uses the warp split unless combine_send_blocks is set.
  int dispatch_send_blocks = 0;
  int combine_send_blocks = 0;
};

// The process-wide knobs (not thread-safe to modify while HT calls are being enqueued).
HtTuning& htTuning();

// Resolved values for `num_ranks` ranks (what a launch uses).
int htDispatchSendWarps(int num_ranks);
int htCombineSendWarps(int num_ranks);
// Block split for a grid of num_sms blocks: 0 (warp split) or the number of sender blocks.
int htDispatchSendBlocks(int num_ranks, int num_sms);
int htCombineSendBlocks(int num_ranks, int num_sms);

}  // namespace nccl_moe
