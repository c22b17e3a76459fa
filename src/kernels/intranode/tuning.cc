// Warp-role defaults of the high-throughput kernels (see tuning.h).
#include "kernels/intranode/tuning.h"

#include "kernels/intranode/args.h"

namespace nccl_moe {

HtTuning& htTuning() {
  static HtTuning tuning;
  return tuning;
}

namespace {
int clampWarps(int warps) {
  constexpr int kWarps = ht::kHtThreads / 32;
  return warps < 1 ? 1 : (warps > kWarps - 1 ? kWarps - 1 : warps);
}
}  // namespace

// Warp split default: half of the warps of every block push to peers (used by combine, and by dispatch when
// the grid has a single block). Measured on 2 ranks only; other rank counts use the same split.
int htDispatchSendWarps(int num_ranks) {
  (void)num_ranks;
  const int tuned = htTuning().dispatch_send_warps;
  return clampWarps(tuned > 0 ? tuned : 16);
}

int htCombineSendWarps(int num_ranks) {
  (void)num_ranks;
  const int tuned = htTuning().combine_send_warps;
  return clampWarps(tuned > 0 ? tuned : 16);
}

namespace {
int clampBlocks(int blocks, int num_sms) { return blocks > 0 && blocks < num_sms ? blocks : 0; }
}  // namespace

// Dispatch default: half of the blocks send, half do the local copies (the best split measured on 2 H200s at
// 24 and 48 SMs, docs/kernels-ht.md); an explicit warp split in the knobs turns the block split off.
int htDispatchSendBlocks(int num_ranks, int num_sms) {
  (void)num_ranks;
  const HtTuning& t = htTuning();
  if (t.dispatch_send_blocks > 0) return clampBlocks(t.dispatch_send_blocks, num_sms);
  if (t.dispatch_send_warps > 0) return 0;
  return clampBlocks(num_sms / 2, num_sms);
}

int htCombineSendBlocks(int num_ranks, int num_sms) {
  (void)num_ranks;
  return clampBlocks(htTuning().combine_send_blocks, num_sms);
}

}  // namespace nccl_moe
