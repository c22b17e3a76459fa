// Low-latency host operations on a communicator of several nodes: the internode LL kernels
// (src/kernels/low_latency_net/) in place of the intranode ones. src/ops/ll.cc owns the handle's state (half
// alternation, pending halves) and calls these once it has updated it; the results and the API are the same.
//
// Every call runs as two launches per phase, send then receive (phase Both launches both): the internode kernels
// never wait for another block of their own grid, so they complete however few blocks are resident, and no kernel
// stays resident between a send half and its receive half while the network moves the bytes.
#include "ops/ll_net.h"

#include <cstring>

#include "core/device_guard.h"
#include "core/error.h"
#include "kernels/low_latency_net/args.h"

namespace nccl_moe {
namespace {

LlNetComm netComm(const ncclMoeComm* comm, int half) {
  LlNetComm n{};
  n.comm = comm->deviceComm();
  n.layout = comm->layout.ll_net;
  n.half_offset = comm->layout.ll_net_half(half);
  n.num_local_experts = comm->layout.ll.num_local_experts;
  n.num_blocks = comm->ll_sms < kLlNetMaxBlocks ? comm->ll_sms : kLlNetMaxBlocks;
  std::memcpy(n.local_index, comm->same_node_index, sizeof(n.local_index));
  // Pure RDMA (NCCL_MOE_NET_PURE_RDMA): every other rank through its QP, this node's too; only this rank stays local.
  if (comm->net.pure_rdma)
    for (int r = 0; r < comm->num_ranks; ++r)
      if (r != comm->rank) n.local_index[r] = -1;
  n.own_base = comm->net_transport ? comm->net_transport->window().addr : reinterpret_cast<uint64_t>(comm->buffer);
  return n;
}

}  // namespace

ncclResult_t llNetDispatch(ncclMoeComm* comm, const LlRouting& r, const ncclMoeLLDispatchArgs_t& args, bool do_send,
                           bool do_recv, cudaStream_t stream) {
  LlNetDispatchArgs a{};
  a.net = netComm(comm, r.half);
  a.x = args.x;
  a.topk_idx = args.topk_idx;
  a.idx_int32 = r.idx_int32;
  a.topk_weights = args.topk_weights;
  a.num_tokens = r.num_tokens;
  a.hidden = r.hidden;
  a.topk = r.topk;
  a.num_experts = comm->params.num_experts;
  a.use_fp8 = r.use_fp8;
  a.scale_format = r.scale_format;
  a.recv_x = args.recv_x;
  a.recv_scales = args.recv_x_scales;
  a.recv_count = args.recv_count;
  a.cumulative_stats = args.cumulative_recv_stats;
  a.recv_src_info = r.recv_src_info;
  a.recv_row = r.recv_row;
  a.slab_rows = comm->layout.ll.slab_rows();
  if (do_send) MOE_CUDA_CHECK(launchLlNetDispatchSend(a, stream));
  if (do_recv) MOE_CUDA_CHECK(launchLlNetDispatchRecv(a, stream));
  return ncclSuccess;
}

ncclResult_t llNetCombine(ncclMoeComm* comm, const LlRouting& r, const ncclMoeLLCombineArgs_t& args, const void* y,
                          bool do_send, bool do_recv, cudaStream_t stream) {
  LlNetCombineArgs a{};
  a.net = netComm(comm, r.half);
  a.y = static_cast<const uint16_t*>(y);
  a.topk_idx = args.topk_idx;
  a.idx_int32 = r.idx_int32;
  a.topk_weights = args.topk_weights;
  a.num_tokens = args.num_tokens;
  a.hidden = args.hidden;
  a.topk = args.topk;
  a.out = static_cast<uint16_t*>(args.out);
  a.recv_row = r.recv_row;
  a.slab_rows = comm->layout.ll.slab_rows();
  if (do_send) MOE_CUDA_CHECK(launchLlNetCombineSend(a, stream));
  if (do_recv) MOE_CUDA_CHECK(launchLlNetCombineRecv(a, stream));
  return ncclSuccess;
}

ncclResult_t llNetReset(ncclMoeComm* comm, cudaStream_t stream) {
  const LlNetComm half0 = netComm(comm, 0);
  const LlNetLayout& L = comm->layout.ll_net;
  // Barrier, zero both halves' control blocks and signal rows (not the barrier row, not the persist block), barrier:
  // no earlier operation of any rank lands after the zeroing (RC order behind the barrier's add), and no later
  // one before it.
  MOE_CUDA_CHECK(launchLlNetBarrier(half0, stream));
  for (int half = 0; half < 2; ++half) {
    uint8_t* base = comm->buffer + comm->layout.ll_net_half(half);
    MOE_CUDA_CHECK(cudaMemsetAsync(base + L.control(), 0, sizeof(LlNetControl), stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(base + L.signal(0, 0), 0, L.signals_bytes(), stream));
  }
  MOE_CUDA_CHECK(launchLlNetBarrier(half0, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe
