// High-throughput host operations: the handle's routing arrays, notify, dispatch and combine. They fill the
// kernels' Args (src/kernels/intranode/args.h) from the communicator, the handle and the validated arguments,
// own the state changes (the handle's routing record, the host-count sequence) and the one documented host
// synchronisation (host-count notify).
#include <atomic>
#include <string>

#include "core/device_guard.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "kernels/intranode/args.h"
#include "ops/ht_net.h"
#include "ops/ops.h"

namespace nccl_moe {
namespace {

// Offsets (in ints) of the handle's arrays inside its one device allocation.
struct RoutingBlock {
  size_t recv_count, recv_count_per_expert, recv_src_info, send_count, recv_prefix, send_list, send_pos, topk_idx,
      node_count, node_list, node_pos, fwd_count, fwd_pos, total;
  static RoutingBlock make(int num_ranks, int capacity, int max_topk, int num_local_experts, int num_nodes,
                           int ranks_per_node) {
    auto up = [](size_t v) { return (v + 63) / 64 * 64; };  // 256-byte aligned arrays
    RoutingBlock b{};
    size_t off = 0;
    b.recv_count = off;
    off = up(off + 1);
    b.recv_count_per_expert = off;
    off = up(off + static_cast<size_t>(num_local_experts));
    b.recv_src_info = off;
    off = up(off + static_cast<size_t>(num_ranks) * capacity);
    const size_t per_rank = static_cast<size_t>(num_ranks > kMaxNvlPeers ? num_ranks : kMaxNvlPeers);
    b.send_count = off;
    off = up(off + per_rank);
    b.recv_prefix = off;
    off = up(off + per_rank + 1);
    b.send_list = off;
    off = up(off + static_cast<size_t>(num_ranks) * capacity);
    b.send_pos = off;
    off = up(off + static_cast<size_t>(num_ranks) * capacity);
    b.topk_idx = off;
    off = up(off + static_cast<size_t>(capacity) * max_topk);
    const size_t N = static_cast<size_t>(num_nodes), C = static_cast<size_t>(capacity);
    b.node_count = off;
    off = up(off + N);
    b.node_list = off;
    off = up(off + N * C);
    b.node_pos = off;
    off = up(off + C * N);
    b.fwd_count = off;
    off = up(off + N);
    b.fwd_pos = off;
    off = up(off + N * C * static_cast<size_t>(ranks_per_node));
    b.total = off;
    return b;
  }
};

// The device view of every rank's HT region (intranode: a rank's local index is its rank).
ht::HtDevice makeHtDevice(const ncclMoeComm* comm) {
  ht::HtDevice d{};
  d.comm = comm->deviceComm();
  d.layout = comm->layout.ht;
  for (int r = 0; r < kMaxNvlPeers; ++r)
    d.region[r] = d.comm.scaleup.buffer[r] != nullptr ? d.comm.scaleup.buffer[r] + comm->layout.ht_region() : nullptr;
  return d;
}

int resolveSms(const ncclMoeComm* comm, int num_sms) {
  int sms = num_sms > 0 ? num_sms : comm->default_num_sms;
  if (sms <= 0) sms = 24;
  if (comm->rank_sms > 0 && sms > comm->rank_sms) sms = comm->rank_sms;
  return sms;
}

// Everything but the role split (the kernel's launch sets it), from the handle (filled by notify) and the
// validated call arguments.
ht::DispatchArgs makeDispatchArgs(const ncclMoeComm* comm, const HtRouting& r, const ncclMoeDispatchArgs_t& args) {
  ht::DispatchArgs a{};
  a.ht = makeHtDevice(comm);
  a.num_sms = resolveSms(comm, args.num_sms);
  a.send_count = r.send_count;
  a.recv_prefix = r.recv_prefix;
  a.send_list = r.send_list;
  a.topk_idx32 = r.topk_idx;
  a.capacity = r.capacity;
  a.num_local_experts = r.num_local_experts;
  fillHtDispatchData(r, args, &a);
  return a;
}

ht::CombineArgs makeCombineArgs(const ncclMoeComm* comm, const HtRouting& r, const ncclMoeCombineArgs_t& args) {
  ht::CombineArgs a{};
  a.ht = makeHtDevice(comm);
  a.num_sms = resolveSms(comm, args.num_sms);
  a.recv_prefix = r.recv_prefix;
  a.send_pos = r.send_pos;
  a.row_bytes = 2 * args.hidden;
  fillHtCombineData(r, args, &a);
  return a;
}

// The intranode notify kernel (single-node communicators).
ncclResult_t launchIntranodeNotify(ncclMoeComm* comm, const HtRouting& r, const ncclMoeNotifyArgs_t& args,
                                   int* host_scratch, int host_seq, cudaStream_t stream) {
  ht::NotifyArgs a{};
  a.ht = makeHtDevice(comm);
  a.topk_idx = args.topk_idx;
  a.topk_idx_is_int64 = args.topk_idx_type == ncclMoeIndexInt64 ? 1 : 0;
  a.num_tokens = args.num_tokens;
  a.topk = args.topk;
  a.num_local_experts = r.num_local_experts;
  a.expert_alignment = args.expert_alignment;
  a.capacity = r.capacity;
  a.send_count = r.send_count;
  a.recv_prefix = r.recv_prefix;
  a.send_list = r.send_list;
  a.send_pos = r.send_pos;
  a.topk_idx32 = r.topk_idx;
  a.recv_count = r.recv_count;
  a.recv_count_per_expert = r.recv_count_per_expert;
  a.recv_src_info = r.recv_src_info;
  a.host_scratch = host_scratch;
  a.host_seq = host_seq;
  MOE_CUDA_CHECK(ht::launchNotify(a, stream));
  return ncclSuccess;
}

}  // namespace

HtScaleWords htScaleWords(const ncclMoeDispatchArgs_t& args) {
  HtScaleWords s;
  if (args.dtype != ncclMoeFp8E4M3) return s;
  const int groups = (args.hidden + 127) / 128;  // one float scale per 128 channels; ue8m0 packs 4 per word
  s.words = args.scale_format == ncclMoeScaleUe8m0 ? (groups + 3) / 4 : groups;
  s.token_stride = args.x_scales_token_stride > 0 ? args.x_scales_token_stride : s.words;
  s.word_stride = args.x_scales_channel_stride > 0 ? args.x_scales_channel_stride : 1;
  return s;
}

bool htUseEducationalKernels() {
  const std::string kind = envString("NCCL_MOE_HT_KERNEL");
  if (kind == "educational") return true;
  if (!kind.empty() && kind != "fast") {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true))
      MOE_WARN("NCCL_MOE_HT_KERNEL=\"%s\" is not \"fast\" or \"educational\"; using the fast kernels", kind.c_str());
  }
  return false;
}

ncclResult_t htRoutingAlloc(ncclMoeComm* comm, HtRouting* routing) {
  const DeviceGuard guard(comm->device);
  HtRouting r{};
  r.num_ranks = comm->num_ranks;
  r.capacity = comm->config.max_tokens_per_rank;
  r.max_topk = comm->config.max_topk;
  r.num_local_experts = comm->config.num_experts / comm->num_ranks;
  const int nodes = comm->nodes.num_nodes > 1 ? comm->nodes.num_nodes : 0;  // one node: no node arrays
  const RoutingBlock b = RoutingBlock::make(r.num_ranks, r.capacity, r.max_topk, r.num_local_experts, nodes,
                                            nodes > 0 ? comm->nodes.maxRanksPerNode() : 0);
  void* block = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&block, b.total * sizeof(int)));
  if (cudaMemset(block, 0, b.total * sizeof(int)) != cudaSuccess) {
    cudaFree(block);
    return setLastError(ncclUnhandledCudaError, "htRoutingAlloc: cudaMemset of %zu bytes failed",
                        b.total * sizeof(int));
  }
  int* base = static_cast<int*>(block);
  r.device_block = block;
  r.recv_count = base + b.recv_count;
  r.recv_count_per_expert = base + b.recv_count_per_expert;
  r.recv_src_info = base + b.recv_src_info;
  r.send_count = base + b.send_count;
  r.recv_prefix = base + b.recv_prefix;
  r.send_list = base + b.send_list;
  r.send_pos = base + b.send_pos;
  r.topk_idx = base + b.topk_idx;
  if (nodes > 0) {
    r.node_count = base + b.node_count;
    r.node_list = base + b.node_list;
    r.node_pos = base + b.node_pos;
    r.fwd_count = base + b.fwd_count;
    r.fwd_pos = base + b.fwd_pos;
  }
  *routing = r;
  return ncclSuccess;
}

void htRoutingFree(HtRouting* routing) {
  if (routing->device_block != nullptr) cudaFree(routing->device_block);
  *routing = HtRouting{};
}

ncclResult_t opHtNotify(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeNotifyArgs_t& args,
                        cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  HtRouting& r = handle->ht;
  const bool host_mode = args.recv_capacity == 0;
  const int host_seq = host_mode ? ++comm->ht_host_seq : 0;
  if (comm->nodes.num_nodes > 1) {
    MOE_CHECK(htNetNotify(comm, r, args, host_mode ? comm->dev_scratch : nullptr, host_seq, stream));
  } else {
    MOE_CHECK(launchIntranodeNotify(comm, r, args, host_mode ? comm->dev_scratch : nullptr, host_seq, stream));
  }
  r.valid = true;
  r.num_tokens = args.num_tokens;
  r.topk = args.topk;
  r.topk_idx_is_int64 = args.topk_idx_type == ncclMoeIndexInt64 ? 1 : 0;
  r.expert_alignment = args.expert_alignment;
  r.recv_capacity = args.recv_capacity;
  r.num_recv_tokens = -1;
  if (!host_mode) return ncclSuccess;

  // The one documented host synchronisation: wait (bounded) for this rank's receive count.
  MOE_CHECK(hostWaitGeq(comm, comm->host_scratch, host_seq, "ncclMoeDispatchNotify (receive count)"));
  const volatile int* scratch = comm->host_scratch;
  r.num_recv_tokens = scratch[1];
  *args.num_recv_tokens = r.num_recv_tokens;
  if (args.num_recv_tokens_per_expert != nullptr) {
    for (int j = 0; j < r.num_local_experts; ++j) args.num_recv_tokens_per_expert[j] = scratch[2 + j];
  }
  return ncclSuccess;
}

ncclResult_t opHtDispatch(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeDispatchArgs_t& args,
                          cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  if (comm->nodes.num_nodes > 1) return htNetDispatch(comm, handle->ht, args, stream);
  const ht::DispatchArgs a = makeDispatchArgs(comm, handle->ht, args);
  MOE_CUDA_CHECK(htUseEducationalKernels() ? ht::launchEducationalDispatch(a, stream) : ht::launchDispatch(a, stream));
  return ncclSuccess;
}

ncclResult_t opHtCombine(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeCombineArgs_t& args,
                         cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  if (comm->nodes.num_nodes > 1) return htNetCombine(comm, handle->ht, args, stream);
  const ht::CombineArgs a = makeCombineArgs(comm, handle->ht, args);
  MOE_CUDA_CHECK(htUseEducationalKernels() ? ht::launchEducationalCombine(a, stream) : ht::launchCombine(a, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe
