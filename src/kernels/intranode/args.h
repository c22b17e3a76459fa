// Kernel arguments of the high-throughput intranode kernels (notify.cu, dispatch.cu, combine.cu and the
// educational twins in educational.cu) and their launch functions. Plain, trivially copyable structs passed by
// value (__grid_constant__); the host operations (src/ops/ht.cc) fill them from the communicator, the handle's
// routing and the validated call arguments. Nothing here knows a host object.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/device_comm.h"
#include "mem/ht_layout.h"

namespace nccl_moe {
namespace ht {

// Threads per block of the dispatch and combine kernels.
constexpr int kHtThreads = 1024;

// Every rank's HT region as mapped in this process, plus the layout: the device handle of HT kernels.
struct HtDevice {
  DeviceComm comm;
  HtLayout layout;
  uint8_t* region[kMaxNvlPeers];  // region[p] = scaleup.buffer[p] + ht offset (intranode: local index = rank)

  __device__ __forceinline__ HtSync* sync(int rank) const {
    return reinterpret_cast<HtSync*>(region[rank] + layout.sync());
  }
  __device__ __forceinline__ long long* row_flag(int rank, int src, int pos) const {
    return reinterpret_cast<long long*>(region[rank] + layout.row_flag(src, pos));
  }
  __device__ __forceinline__ uint8_t* x(int rank, int src, int pos, size_t row_bytes) const {
    return region[rank] + layout.x(src, pos, row_bytes);
  }
  __device__ __forceinline__ int* meta(int rank, int src, int pos) const {
    return reinterpret_cast<int*>(region[rank] + layout.meta(src, pos));
  }
  __device__ __forceinline__ HtNotifySlot* notify(int rank, int src) const {
    return reinterpret_cast<HtNotifySlot*>(region[rank] + layout.notify(src));
  }
  __device__ __forceinline__ int* src_idx(int rank, int src, int pos) const {
    return reinterpret_cast<int*>(region[rank] + layout.src_idx(src, pos));
  }
};

struct NotifyArgs {
  HtDevice ht;
  const void* topk_idx;
  int topk_idx_is_int64;
  int num_tokens;
  int topk;
  int num_local_experts;
  int expert_alignment;
  int capacity;  // handle array capacity (max_tokens_per_rank)
  int* send_count;
  int* recv_prefix;
  int* send_list;
  int* send_pos;
  int* topk_idx32;
  int* recv_count;
  int* recv_count_per_expert;
  int* recv_src_info;
  int* host_scratch;  // host-count mode: device view of the host-mapped ints; nullptr in worst-case mode
  int host_seq;
};

struct DispatchArgs {
  HtDevice ht;
  int num_sms;  // grid: one block of kHtThreads per SM
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
  const float* topk_weights;                        // [T, K] or nullptr
  uint8_t* recv_x;                                  // [out_rows, row_bytes]
  int* recv_x_scales;                               // [out_rows, num_scale_words]
  void* recv_topk_idx;                              // [out_rows, K] int64 or int32, or nullptr
  int recv_idx_int64;
  float* recv_topk_weights;  // [out_rows, K], nullptr when topk_weights is
  // role split of the fast kernel (set by launchDispatch from tuning.h; the educational kernel has none)
  int send_warps;   // warp split: sender warps per block
  int send_blocks;  // > 0: block split: blocks [0, send_blocks) send, the others do the local work
};

struct CombineArgs {
  HtDevice ht;
  int num_sms;  // grid: one block of kHtThreads per SM
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
  // role split of the fast kernel (set by launchCombine from tuning.h)
  int send_warps;   // warp split: sender warps per block
  int send_blocks;  // > 0: block split: blocks [0, send_blocks) send, the others do the local work
};

// Launches on `stream` and returns cudaGetLastError(). Grids: notify one block; dispatch and combine num_sms
// blocks of kHtThreads (every block of a call must be resident at once: the caller keeps num_sms within the SMs
// this rank may occupy).
cudaError_t launchNotify(const NotifyArgs& a, cudaStream_t stream);
cudaError_t launchDispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t launchCombine(const CombineArgs& a, cudaStream_t stream);
cudaError_t launchEducationalDispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t launchEducationalCombine(const CombineArgs& a, cudaStream_t stream);

// Load the kernels of each file on the current device (src/ops/load.cc: at communicator init, so that no first
// launch has to load a module while a peer's kernel spins on this GPU).
cudaError_t loadNotifyKernels();
cudaError_t loadDispatchKernels();
cudaError_t loadCombineKernels();
cudaError_t loadEducationalKernels();

}  // namespace ht
}  // namespace nccl_moe
