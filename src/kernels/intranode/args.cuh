// Kernel arguments of the high-throughput dispatch and combine, shared by the fast kernels (dispatch.cu,
// combine.cu) and the educational ones (educational.cu), and the one place that fills them from the handle's
// routing and the caller's arguments. The fast kernels additionally read their role split (send_warps,
// send_blocks), which the launcher sets from tuning.h; the educational kernels ignore it.
#pragma once

#include <cuda_runtime.h>

#include "core/handle.h"
#include "kernels/intranode/host.cuh"
#include "nccl_moe.h"

namespace nccl_moe {
namespace ht {

struct DispatchArgs {
  HtDevice ht;
  // routing, from the handle (notify.cu)
  const int* send_count;   // [R]
  const int* recv_prefix;  // [R + 1]
  const int* send_list;    // [R, capacity]
  const int* topk_idx32;   // [T, K] int32
  int capacity;            // row stride of send_list
  int num_tokens;          // T of this rank
  int topk;
  int num_local_experts;
  int out_rows;    // rows the caller's outputs hold: recv_capacity (worst-case mode) or N_recv
  int worst_case;  // 1: fill rows [N_recv, out_rows), report N_recv > out_rows
  // data
  const uint8_t* x;     // [T, row_bytes]
  int row_bytes;        // 2H (bf16) or H (fp8), a multiple of 16
  const int* x_scales;  // fp8: scale words (float bits or packed ue8m0) at caller strides; nullptr for bf16
  int num_scale_words;  // 0 for bf16
  long long scale_token_stride, scale_word_stride;  // in 4-byte words
  const float* topk_weights;  // [T, K] or nullptr
  uint8_t* recv_x;            // [out_rows, row_bytes]
  int* recv_x_scales;         // [out_rows, num_scale_words]
  void* recv_topk_idx;        // [out_rows, K] int64 or int32, or nullptr
  int recv_idx_int64;
  float* recv_topk_weights;  // [out_rows, K], nullptr when topk_weights is
  // fast kernels only (tuning.h)
  int send_warps;   // warp split: sender warps per block
  int send_blocks;  // > 0: block split: blocks [0, send_blocks) send, the others do the local work
};

struct CombineArgs {
  HtDevice ht;
  // routing, from the handle (notify.cu)
  const int* recv_prefix;  // [R + 1]
  const int* send_pos;     // [T, R]
  int num_tokens;          // T of this rank (the home rank of its tokens)
  int topk;
  int row_bytes;  // 2H
  int in_rows;    // rows of the combine input: recv_capacity (worst-case mode) or N_recv; never read past it
  // data
  const uint8_t* x;           // [in_rows, 2H] bf16: expert outputs in dispatch order
  const float* topk_weights;  // [in_rows, K] or nullptr (nullptr also when no combined weights are wanted)
  const uint8_t* bias0;       // [T, 2H] bf16 or nullptr
  const uint8_t* bias1;
  uint8_t* out;        // [T, 2H] bf16
  float* out_weights;  // [T, K] or nullptr
  // fast kernels only (tuning.h)
  int send_warps;   // warp split: sender warps per block
  int send_blocks;  // > 0: block split: blocks [0, send_blocks) send, the others do the local work
};

// Everything but the role split, from the handle (filled by notify.cu) and the validated call arguments.
inline DispatchArgs makeDispatchArgs(const ncclMoeComm* comm, const HtRouting& r, const ncclMoeDispatchArgs_t& args) {
  DispatchArgs a{};
  a.ht = makeHtDevice(comm);
  a.send_count = r.send_count;
  a.recv_prefix = r.recv_prefix;
  a.send_list = r.send_list;
  a.topk_idx32 = r.topk_idx;
  a.capacity = r.capacity;
  a.num_tokens = r.num_tokens;
  a.topk = r.topk;
  a.num_local_experts = r.num_local_experts;
  a.worst_case = r.recv_capacity > 0 ? 1 : 0;
  a.out_rows = r.recv_capacity > 0 ? r.recv_capacity : r.num_recv_tokens;
  const bool fp8 = args.dtype == ncclMoeFp8E4M3;
  a.x = static_cast<const uint8_t*>(args.x);
  a.row_bytes = fp8 ? args.hidden : 2 * args.hidden;
  if (fp8) {
    const int groups = (args.hidden + 127) / 128;  // one float scale per 128 channels; ue8m0 packs 4 per word
    a.num_scale_words = args.scale_format == ncclMoeScaleUe8m0 ? (groups + 3) / 4 : groups;
    a.x_scales = static_cast<const int*>(args.x_scales);
    a.scale_token_stride = args.x_scales_token_stride > 0 ? args.x_scales_token_stride : a.num_scale_words;
    a.scale_word_stride = args.x_scales_channel_stride > 0 ? args.x_scales_channel_stride : 1;
    a.recv_x_scales = static_cast<int*>(args.recv_x_scales);
  }
  a.topk_weights = args.topk_weights;
  a.recv_x = static_cast<uint8_t*>(args.recv_x);
  a.recv_topk_idx = args.recv_topk_idx;
  a.recv_idx_int64 = r.topk_idx_is_int64;
  a.recv_topk_weights = args.topk_weights != nullptr ? args.recv_topk_weights : nullptr;
  return a;
}

inline CombineArgs makeCombineArgs(const ncclMoeComm* comm, const HtRouting& r, const ncclMoeCombineArgs_t& args) {
  CombineArgs a{};
  a.ht = makeHtDevice(comm);
  a.recv_prefix = r.recv_prefix;
  a.send_pos = r.send_pos;
  a.num_tokens = r.num_tokens;
  a.topk = r.topk;
  a.row_bytes = 2 * args.hidden;
  a.in_rows = r.recv_capacity > 0 ? r.recv_capacity : r.num_recv_tokens;
  a.x = static_cast<const uint8_t*>(args.x);
  a.topk_weights = args.combined_topk_weights != nullptr ? args.topk_weights : nullptr;
  a.bias0 = static_cast<const uint8_t*>(args.bias_0);
  a.bias1 = static_cast<const uint8_t*>(args.bias_1);
  a.out = static_cast<uint8_t*>(args.combined_x);
  a.out_weights = a.topk_weights != nullptr ? args.combined_topk_weights : nullptr;
  return a;
}

}  // namespace ht
}  // namespace nccl_moe
