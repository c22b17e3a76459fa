// Kernel arguments of the internode high-throughput kernels (notify.cu, dispatch.cu, combine.cu in this folder) and
// their launch functions: ncclMoeDispatchNotify / ncclMoeDispatch / ncclMoeCombine on a communicator of several
// nodes. Plain, trivially copyable structs passed by value (__grid_constant__); the host operations
// (src/ops/ht_net.cc) fill them from the communicator, the handle's routing and the validated call arguments.
//
// Results: dispatch bit for bit as the intranode HT dispatch (docs/reference.md; ref::ht_dispatch), combine bit for
// bit as the two-level sum of several nodes (ref::ht_combine_nodes). Protocol: docs/kernels-ht-internode.md.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "device/device_comm.h"
#include "device/limits.h"
#include "mem/ht_layout.h"
#include "mem/ht_net_layout.h"

namespace nccl_moe {

// Threads per block and grid cap of every internode HT kernel. Every phase is its own launch and no block waits for
// another block of its grid, so any number of resident blocks completes; the cap leaves the rest of the GPU to the
// other ranks' kernels and to a software NIC's copies (virtual nodes share one GPU).
constexpr int kHtNetThreads = 512;
constexpr int kHtNetMaxBlocks = 16;

// What every internode HT kernel needs of the communicator.
struct HtNetComm {
  DeviceComm comm;
  HtLayout ht;         // the NVLink leg: the intranode HT region of every rank of this node
  HtNetLayout net;     // the RDMA windows
  size_t ht_offset;    // HT region inside every rank's buffer
  size_t net_offset;   // HT net region inside every rank's buffer
  int num_nodes;       // N
  int ranks_per_node;  // G (equal on every node)
  int node, local;     // this rank's node and local index
  int num_local_experts;
  int num_blocks;               // grid of every kernel (<= kHtNetMaxBlocks)
  int16_t rank_at[kMaxRanks];   // [node * G + local index] rank
  int16_t node_of[kMaxRanks];   // [rank] node
  int16_t local_of[kMaxRanks];  // [rank] local index on its node
  uint64_t own_base;            // this rank's buffer as its QPs' lkey window addresses it (the iova)
};

// The handle's routing arrays (src/core/routing.h), filled by notify, read by dispatch and combine.
struct HtNetRouting {
  int* send_count;   // [R] tokens of this rank sent to each rank
  int* recv_prefix;  // [R + 1] rows from source s are [recv_prefix[s], recv_prefix[s + 1])
  int* send_list;    // [R, C] send_list[d][i]: i-th token sent to d
  int* send_pos;     // [C, R] send_pos[t][d]: index of t among the tokens sent to d, -1
  int* topk_idx32;   // [C, max_topk] int32 copy of the notify's ids
  int* node_count;   // [N] tokens of this rank with a holder on node m (records for m's forwarder)
  int* node_list;    // [N, C] node_list[m][q]: q-th of them
  int* node_pos;     // [C, N] node_pos[t][m]: q of t in node_list[m], -1
  int* fwd_count;    // [N - 1] records the rail source on slot j sends this rank per dispatch
  int* fwd_pos;      // [N - 1, C, G] row position of record q at local rank g of this node (-1 = not a holder)
  int capacity;      // C
};

struct HtNetNotifyArgs {
  HtNetComm net;
  HtNetRouting route;
  const void* topk_idx;
  int topk_idx_is_int64;
  int num_tokens, topk, expert_alignment;
  int* recv_count;             // [1] N_recv
  int* recv_count_per_expert;  // [E_l] aligned
  int* recv_src_info;          // [R * C] pack_src_info per received row
  int* host_scratch;           // host-count mode: device view of the host-mapped ints; nullptr in worst-case mode
  int host_seq;
};

struct HtNetDispatchArgs {
  HtNetComm net;
  HtNetRouting route;
  int num_tokens, topk;
  int out_rows;      // rows the caller's outputs hold: recv_capacity (worst-case mode) or N_recv
  int worst_case;    // 1: fill rows [N_recv, out_rows), report N_recv > out_rows
  const uint8_t* x;  // [T, row_bytes]
  int row_bytes;     // 2H (bf16) or H (fp8), a multiple of 16
  int fp8;
  const int* x_scales;  // fp8: scale words at caller strides; nullptr for bf16
  int num_scale_words;  // 0 for bf16
  long long scale_token_stride, scale_word_stride;
  const float* topk_weights;  // [T, K] or nullptr
  uint8_t* recv_x;            // [out_rows, row_bytes]
  int* recv_x_scales;         // [out_rows, num_scale_words]
  void* recv_topk_idx;        // [out_rows, K] int64 or int32, or nullptr
  int recv_idx_int64;
  float* recv_topk_weights;  // [out_rows, K] or nullptr
};

struct HtNetCombineArgs {
  HtNetComm net;
  HtNetRouting route;
  int num_tokens, topk;
  int hidden;
  int in_rows;                // rows of the combine input (never read past)
  const uint8_t* x;           // [in_rows, 2H] bf16 in dispatch order
  const float* topk_weights;  // [in_rows, K] or nullptr (nullptr also when no combined weights are wanted)
  const uint8_t* bias0;       // [T, 2H] bf16 or nullptr
  const uint8_t* bias1;
  uint8_t* out;        // [T, 2H] bf16
  float* out_weights;  // [T, K] or nullptr
};

// Launches on `stream` and returns cudaGetLastError().
cudaError_t launchHtNetNotify(const HtNetNotifyArgs& a, cudaStream_t stream);
// Dispatch: send (stage and WRITE the records, NVLink rows to this node), forward (rail records to this node's
// holders), receive (rows into the caller's outputs).
cudaError_t launchHtNetDispatch(const HtNetDispatchArgs& a, cudaStream_t stream);
// Combine: return (rows to each token's forwarder), reduce (node partials WRITTEN back to the rail sources), home
// (the sum over nodes).
cudaError_t launchHtNetCombine(const HtNetCombineArgs& a, cudaStream_t stream);

// Load the kernels of each file on the current device (src/ops/load.cc).
cudaError_t loadHtNetNotifyKernels();
cudaError_t loadHtNetDispatchKernels();
cudaError_t loadHtNetCombineKernels();

}  // namespace nccl_moe
