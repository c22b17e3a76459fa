// Low-latency host operations: the handle's routing arrays, dispatch and combine (send/receive halves), the
// zero-copy combine buffer and the reset. They own the LL state changes: the alternation of the two buffer halves
// (one per dispatch) and the handle's record of its dispatch and of the halves in flight. The API has validated
// the phase state (src/core/api.cc) before any of these runs.
#include "core/device_guard.h"
#include "core/error.h"
#include "kernels/low_latency/args.h"
#include "ops/ll_net.h"
#include "ops/ops.h"

namespace nccl_moe {
namespace {

// The zero-copy combine input of the dispatch that used LL half `half` (ncclMoeLowLatencyCombineBuffer).
uint8_t* combineBuffer(const ncclMoeComm* comm, int half) {
  return comm->buffer + comm->layout.ll_half(half) + comm->layout.ll.combine_buffer();
}

}  // namespace

ncclResult_t llRoutingAlloc(ncclMoeComm* comm, LlRouting* routing) {
  const DeviceGuard guard(comm->device);
  const LlLayout& L = comm->layout.ll;
  const size_t src_info = static_cast<size_t>(L.num_local_experts) * L.slab_rows();
  const size_t rows = static_cast<size_t>(L.slab_rows()) * L.topk;
  MOE_CUDA_CHECK(cudaMalloc(&routing->recv_src_info, src_info * sizeof(int)));
  MOE_CUDA_CHECK(cudaMalloc(&routing->recv_row, rows * sizeof(int)));
  MOE_CUDA_CHECK(cudaMemset(routing->recv_src_info, 0xff, src_info * sizeof(int)));
  MOE_CUDA_CHECK(cudaMemset(routing->recv_row, 0xff, rows * sizeof(int)));
  return ncclSuccess;
}

void llRoutingFree(LlRouting* routing) {
  if (routing->recv_src_info != nullptr) cudaFree(routing->recv_src_info);
  if (routing->recv_row != nullptr) cudaFree(routing->recv_row);
  routing->recv_src_info = nullptr;
  routing->recv_row = nullptr;
  routing->valid = false;
}

ncclResult_t opLlDispatch(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLDispatchArgs_t& args,
                          cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  LlRouting& r = handle->ll;
  const bool do_send = (args.phase & ncclMoePhaseSend) != 0;
  const bool do_recv = (args.phase & ncclMoePhaseRecv) != 0;
  if (do_send) {
    // A new dispatch: the next half, and the record the receive half and the combine follow.
    r.half = comm->ll_next_half;
    comm->ll_next_half ^= 1;
    r.num_tokens = args.num_tokens;
    r.topk = args.topk;
    r.hidden = args.hidden;
    r.use_fp8 = args.use_fp8;
    r.scale_format = static_cast<int>(args.scale_format);
    r.idx_int32 = args.topk_idx_type == ncclMoeIndexInt32;
    r.dispatch_weights = args.topk_weights != nullptr;
    r.valid = true;
  }
  if (comm->nodes.num_nodes > 1) {
    MOE_CHECK(llNetDispatch(comm, r, args, do_send, do_recv, stream));
    r.recv_pending = do_send && !do_recv;
    return ncclSuccess;
  }
  LlDispatchArgs a{};
  a.comm = comm->deviceComm();
  a.layout = comm->layout.ll;
  a.half_offset = comm->layout.ll_half(r.half);
  a.num_sms = comm->ll_sms;
  a.max_blocks_per_sm = comm->ranks_on_device > 1 ? 1 : 0;
  a.x = args.x;
  a.topk_idx = args.topk_idx;
  a.idx_int32 = args.topk_idx_type == ncclMoeIndexInt32;
  a.num_tokens = r.num_tokens;
  a.hidden = r.hidden;
  a.topk = r.topk;
  a.use_fp8 = r.use_fp8;
  a.scale_format = r.scale_format;
  a.recv_x = args.recv_x;
  a.recv_scales = args.recv_x_scales;
  a.recv_count = args.recv_count;
  a.cumulative_stats = args.cumulative_recv_stats;
  a.recv_src_info = r.recv_src_info;
  a.recv_row = r.recv_row;
  a.topk_weights = do_send ? args.topk_weights : nullptr;
  a.do_send = do_send;
  a.do_recv = do_recv;
  a.trace = comm->ll_dispatch_trace;
  if (do_send && do_recv && comm->ll_split_launch) {
    // Two kernels, as a send call then a receive call would make them: the send kernel waits for no other
    // block of its grid and the receive kernel only for the peers' sends, so the call completes however few of
    // its blocks are resident at once (ranks sharing a GPU, or compute kernels on other streams).
    a.do_recv = 0;
    MOE_CUDA_CHECK(launchLlDispatch(a, stream));
    a.do_send = 0;
    a.do_recv = 1;
    a.topk_weights = nullptr;
  }
  MOE_CUDA_CHECK(launchLlDispatch(a, stream));
  r.recv_pending = do_send && !do_recv;
  return ncclSuccess;
}

ncclResult_t opLlCombine(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLCombineArgs_t& args,
                         cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  LlRouting& r = handle->ll;
  const bool do_send = (args.phase & ncclMoePhaseSend) != 0;
  const bool do_recv = (args.phase & ncclMoePhaseRecv) != 0;
  const LlLayout& L = comm->layout.ll;
  if (comm->nodes.num_nodes > 1) {
    MOE_CHECK(
        llNetCombine(comm, r, args, args.zero_copy ? combineBuffer(comm, r.half) : args.x, do_send, do_recv, stream));
    r.combine_recv_pending = do_send && !do_recv;
    return ncclSuccess;
  }
  LlCombineArgs a{};
  a.comm = comm->deviceComm();
  a.layout = L;
  a.half_offset = comm->layout.ll_half(r.half);
  a.num_sms = comm->ll_sms;
  a.max_blocks_per_sm = comm->ranks_on_device > 1 ? 1 : 0;
  a.y = static_cast<const uint16_t*>(args.zero_copy ? static_cast<const void*>(combineBuffer(comm, r.half)) : args.x);
  a.topk_idx = args.topk_idx;
  // The index type is not part of the combine args: the dispatch's is used (recorded in the handle).
  a.idx_int32 = r.idx_int32;
  // Weights given here win; otherwise the dispatch's (in its message headers: no weight exchange).
  a.topk_weights = args.topk_weights;
  a.num_tokens = args.num_tokens;
  a.hidden = args.hidden;
  a.topk = args.topk;
  a.out = static_cast<uint16_t*>(args.out);
  a.recv_row = r.recv_row;
  a.do_send = do_send;
  a.do_recv = do_recv;
  if (do_send && do_recv && comm->ll_split_launch) {  // two kernels, as in opLlDispatch
    a.do_recv = 0;
    MOE_CUDA_CHECK(launchLlCombine(a, stream));
    a.do_send = 0;
    a.do_recv = 1;
  }
  MOE_CUDA_CHECK(launchLlCombine(a, stream));
  r.combine_recv_pending = do_send && !do_recv;
  return ncclSuccess;
}

ncclResult_t opLlCombineBuffer(ncclMoeComm* comm, ncclMoeHandle* handle, void** buffer) {
  *buffer = combineBuffer(comm, handle->ll.half);
  return ncclSuccess;
}

namespace {

// Barrier, zeroing, barrier (ncclMoeLowLatencyReset, ncclMoeSetRankMask). With write_mask the first barrier kernel
// stores the new mask before it meets the ranks that mask holds active.
ncclResult_t resetLlState(ncclMoeComm* comm, bool write_mask, uint32_t masked_bits, cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  if (comm->nodes.num_nodes > 1) {
    MOE_CHECK(llNetReset(comm, stream));
    comm->ll_next_half = 0;
    return ncclSuccess;
  }
  const LlLayout& L = comm->layout.ll;
  LlResetArgs a{comm->deviceComm(), L, comm->layout.ll_half(0), write_mask ? 1 : 0, masked_bits};
  // Barrier first: every rank's earlier LL kernels have ended (and with them any ack or flag they add to this
  // rank's control region) before the zeroing; without it a peer's late receive ack could land after the
  // memset and survive the reset. (A masked rank left out of the barrier writes late only into the slots indexed
  // by itself, which nobody reads until a later barrier that includes it, and the zeroing after it.)
  MOE_CUDA_CHECK(launchLlResetBarrier(a, stream));
  for (int half = 0; half < 2; ++half)
    MOE_CUDA_CHECK(
        cudaMemsetAsync(comm->buffer + comm->layout.ll_half(half) + L.control(), 0, L.reset_bytes(), stream));
  // Second barrier: no peer writes into this rank's LL region before its zeroing is complete.
  a.write_mask = 0;
  MOE_CUDA_CHECK(launchLlResetBarrier(a, stream));
  comm->ll_next_half = 0;
  return ncclSuccess;
}

}  // namespace

ncclResult_t opLlReset(ncclMoeComm* comm, cudaStream_t stream) { return resetLlState(comm, false, 0, stream); }

ncclResult_t opLlSetMask(ncclMoeComm* comm, uint32_t masked_bits, cudaStream_t stream) {
  return resetLlState(comm, true, masked_bits, stream);
}

ncclResult_t opLlQueryMask(ncclMoeComm* comm, int* mask, bool on_device, cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  const size_t bytes = sizeof(int) * comm->num_ranks;
  MOE_CUDA_CHECK(cudaMemcpyAsync(mask, comm->rank_mask, bytes,
                                 on_device ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost, stream));
  if (!on_device) MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return ncclSuccess;
}

}  // namespace nccl_moe
