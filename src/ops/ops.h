// Host operations behind the public entry points. src/core/api.cc validates every argument and the handle's
// phase state (once, at the API boundary) and then calls these; they assume valid input. An operation owns
// every change of communicator or handle state (routing records, LL half alternation, HT host sequence),
// decides which kernels run (intranode today; the transport choice is made per peer at init), fills the
// kernels' Args and launches them. Kernels never see a host object.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/comm.h"
#include "core/handle.h"
#include "nccl_moe.h"

namespace nccl_moe {

// load.cc: every kernel of the library (and the runtime's memset kernels) loaded on `device`, once per process and
// device; called by communicator init before any rank can launch a kernel that waits for a peer.
ncclResult_t loadKernels(int device);

// layout.cc
ncclResult_t opDispatchLayout(ncclMoeComm* comm, const ncclMoeLayoutArgs_t& args, cudaStream_t stream);

// ht.cc: the handle's HT routing arrays, notify (with the documented host wait in host-count mode), dispatch and
// combine (fast kernels, or the educational ones with NCCL_MOE_HT_KERNEL=educational).
ncclResult_t htRoutingAlloc(ncclMoeComm* comm, HtRouting* routing);
void htRoutingFree(HtRouting* routing);
ncclResult_t opHtNotify(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeNotifyArgs_t& args, cudaStream_t stream);
ncclResult_t opHtDispatch(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeDispatchArgs_t& args,
                          cudaStream_t stream);
ncclResult_t opHtCombine(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeCombineArgs_t& args,
                         cudaStream_t stream);
// The scale words of an HT dispatch's fp8 rows as the kernels read them (0 words for bf16): one float per 128
// channels, or packed UE8M0 (4 per word); the caller's strides in 4-byte words, 0 meaning packed (ht.cc, ht_net.cc).
struct HtScaleWords {
  int words = 0;
  long long token_stride = 0, word_stride = 0;
};
HtScaleWords htScaleWords(const ncclMoeDispatchArgs_t& args);

// The call's data fields of an HT dispatch's kernel arguments, which the intranode (ht::DispatchArgs) and the
// internode (HtNetDispatchArgs) kernels name alike: shape and output rows from the handle (filled by notify), rows,
// scale words, weights and outputs from the validated call arguments (ht.cc, ht_net.cc).
template <typename Args>
void fillHtDispatchData(const HtRouting& r, const ncclMoeDispatchArgs_t& args, Args* a) {
  a->num_tokens = r.num_tokens;
  a->topk = r.topk;
  a->worst_case = r.recv_capacity > 0 ? 1 : 0;
  a->out_rows = r.recv_capacity > 0 ? r.recv_capacity : r.num_recv_tokens;
  const bool fp8 = args.dtype == ncclMoeFp8E4M3;
  a->x = static_cast<const uint8_t*>(args.x);
  a->row_bytes = fp8 ? args.hidden : 2 * args.hidden;
  if (fp8) {
    const HtScaleWords sw = htScaleWords(args);
    a->num_scale_words = sw.words;
    a->x_scales = static_cast<const int*>(args.x_scales);
    a->scale_token_stride = sw.token_stride;
    a->scale_word_stride = sw.word_stride;
    a->recv_x_scales = static_cast<int*>(args.recv_x_scales);
  }
  a->topk_weights = args.topk_weights;
  a->recv_x = static_cast<uint8_t*>(args.recv_x);
  a->recv_topk_idx = args.recv_topk_idx;
  a->recv_idx_int64 = r.topk_idx_is_int64;
  a->recv_topk_weights = args.topk_weights != nullptr ? args.recv_topk_weights : nullptr;
}

// The same for an HT combine (ht::CombineArgs, HtNetCombineArgs): input rows, weights (only when combined weights
// are wanted), biases and outputs.
template <typename Args>
void fillHtCombineData(const HtRouting& r, const ncclMoeCombineArgs_t& args, Args* a) {
  a->num_tokens = r.num_tokens;
  a->topk = r.topk;
  a->in_rows = r.recv_capacity > 0 ? r.recv_capacity : r.num_recv_tokens;
  a->x = static_cast<const uint8_t*>(args.x);
  a->topk_weights = args.combined_topk_weights != nullptr ? args.topk_weights : nullptr;
  a->bias0 = static_cast<const uint8_t*>(args.bias_0);
  a->bias1 = static_cast<const uint8_t*>(args.bias_1);
  a->out = static_cast<uint8_t*>(args.combined_x);
  a->out_weights = a->topk_weights != nullptr ? args.combined_topk_weights : nullptr;
}
// True when NCCL_MOE_HT_KERNEL is "educational"; "fast" (the default) or empty selects the fast kernels; any
// other value warns once and selects them too. Read from the environment on every call.
bool htUseEducationalKernels();

// ll.cc
ncclResult_t llRoutingAlloc(ncclMoeComm* comm, LlRouting* routing);
void llRoutingFree(LlRouting* routing);
ncclResult_t opLlDispatch(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLDispatchArgs_t& args,
                          cudaStream_t stream);
ncclResult_t opLlCombine(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLCombineArgs_t& args,
                         cudaStream_t stream);
ncclResult_t opLlCombineBuffer(ncclMoeComm* comm, ncclMoeHandle* handle, void** buffer);
ncclResult_t opLlReset(ncclMoeComm* comm, cudaStream_t stream);
// Rank masks (config.enable_rank_masks): the mask into `mask` ([R] int32, device or host memory; host: waits for
// `stream`), and the collective set (reset of the LL state of the ranks active in `masked_bits`, bit r = rank r
// masked, then the new mask; see ncclMoeSetRankMask).
ncclResult_t opLlQueryMask(ncclMoeComm* comm, int* mask, bool on_device, cudaStream_t stream);
ncclResult_t opLlSetMask(ncclMoeComm* comm, uint32_t masked_bits, cudaStream_t stream);

// cast.cc
ncclResult_t opCastToFp8(const void* x, int num_tokens, int hidden, ncclMoeScaleFormat_t format, void* out_fp8,
                         void* out_scales, cudaStream_t stream);

}  // namespace nccl_moe
