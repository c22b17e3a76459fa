// Internode high-throughput host operations: the kernels' arguments (src/kernels/ht_net/args.h) from the
// communicator (node map, regions, QP window), the handle's routing arrays and the validated call arguments.
#include "ops/ht_net.h"

#include "core/device_guard.h"
#include "core/error.h"
#include "kernels/ht_net/args.h"
#include "ops/ops.h"

namespace nccl_moe {
namespace {

HtNetComm netComm(const ncclMoeComm* comm) {
  HtNetComm n{};
  n.comm = comm->deviceComm();
  n.ht = comm->layout.ht;
  n.net = comm->layout.ht_net;
  n.ht_offset = comm->layout.ht_region();
  n.net_offset = comm->layout.ht_net_region();
  n.num_nodes = comm->nodes.num_nodes;
  n.ranks_per_node = comm->nodes.maxRanksPerNode();
  n.node = comm->node();
  n.local = comm->localRank();
  n.num_local_experts = comm->layout.ht.num_local_experts;
  const int budget = comm->rank_sms > 0 ? comm->rank_sms : kHtNetMaxBlocks;
  n.num_blocks = budget < kHtNetMaxBlocks ? budget : kHtNetMaxBlocks;
  for (int rank = 0; rank < comm->num_ranks; ++rank) {
    const int node = comm->nodes.node_of[rank], local = comm->nodes.local_of[rank];
    n.node_of[rank] = static_cast<int16_t>(node);
    n.local_of[rank] = static_cast<int16_t>(local);
    n.rank_at[node * n.ranks_per_node + local] = static_cast<int16_t>(rank);
  }
  n.own_base = comm->net_transport ? comm->net_transport->window().addr : reinterpret_cast<uint64_t>(comm->buffer);
  return n;
}

HtNetRouting netRouting(const HtRouting& r) {
  HtNetRouting a{};
  a.send_count = r.send_count;
  a.recv_prefix = r.recv_prefix;
  a.send_list = r.send_list;
  a.send_pos = r.send_pos;
  a.topk_idx32 = r.topk_idx;
  a.node_count = r.node_count;
  a.node_list = r.node_list;
  a.node_pos = r.node_pos;
  a.fwd_count = r.fwd_count;
  a.fwd_pos = r.fwd_pos;
  a.capacity = r.capacity;
  return a;
}

}  // namespace

ncclResult_t htNetNotify(ncclMoeComm* comm, const HtRouting& r, const ncclMoeNotifyArgs_t& args, int* host_scratch,
                         int host_seq, cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  HtNetNotifyArgs a{};
  a.net = netComm(comm);
  a.route = netRouting(r);
  a.topk_idx = args.topk_idx;
  a.topk_idx_is_int64 = args.topk_idx_type == ncclMoeIndexInt64 ? 1 : 0;
  a.num_tokens = args.num_tokens;
  a.topk = args.topk;
  a.expert_alignment = args.expert_alignment;
  a.recv_count = r.recv_count;
  a.recv_count_per_expert = r.recv_count_per_expert;
  a.recv_src_info = r.recv_src_info;
  a.host_scratch = host_scratch;
  a.host_seq = host_seq;
  MOE_CUDA_CHECK(launchHtNetNotify(a, stream));
  return ncclSuccess;
}

ncclResult_t htNetDispatch(ncclMoeComm* comm, const HtRouting& r, const ncclMoeDispatchArgs_t& args,
                           cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  HtNetDispatchArgs a{};
  a.net = netComm(comm);
  a.route = netRouting(r);
  a.num_tokens = r.num_tokens;
  a.topk = r.topk;
  a.worst_case = r.recv_capacity > 0 ? 1 : 0;
  a.out_rows = r.recv_capacity > 0 ? r.recv_capacity : r.num_recv_tokens;
  const bool fp8 = args.dtype == ncclMoeFp8E4M3;
  a.fp8 = fp8 ? 1 : 0;
  a.x = static_cast<const uint8_t*>(args.x);
  a.row_bytes = fp8 ? args.hidden : 2 * args.hidden;
  if (fp8) {
    const HtScaleWords sw = htScaleWords(args);
    a.num_scale_words = sw.words;
    a.x_scales = static_cast<const int*>(args.x_scales);
    a.scale_token_stride = sw.token_stride;
    a.scale_word_stride = sw.word_stride;
    a.recv_x_scales = static_cast<int*>(args.recv_x_scales);
  }
  a.topk_weights = args.topk_weights;
  a.recv_x = static_cast<uint8_t*>(args.recv_x);
  a.recv_topk_idx = args.recv_topk_idx;
  a.recv_idx_int64 = r.topk_idx_is_int64;
  a.recv_topk_weights = args.topk_weights != nullptr ? args.recv_topk_weights : nullptr;
  MOE_CUDA_CHECK(launchHtNetDispatch(a, stream));
  return ncclSuccess;
}

ncclResult_t htNetCombine(ncclMoeComm* comm, const HtRouting& r, const ncclMoeCombineArgs_t& args,
                          cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  HtNetCombineArgs a{};
  a.net = netComm(comm);
  a.route = netRouting(r);
  a.num_tokens = r.num_tokens;
  a.topk = r.topk;
  a.hidden = args.hidden;
  a.in_rows = r.recv_capacity > 0 ? r.recv_capacity : r.num_recv_tokens;
  a.x = static_cast<const uint8_t*>(args.x);
  a.topk_weights = args.combined_topk_weights != nullptr ? args.topk_weights : nullptr;
  a.bias0 = static_cast<const uint8_t*>(args.bias_0);
  a.bias1 = static_cast<const uint8_t*>(args.bias_1);
  a.out = static_cast<uint8_t*>(args.combined_x);
  a.out_weights = a.topk_weights != nullptr ? args.combined_topk_weights : nullptr;
  MOE_CUDA_CHECK(launchHtNetCombine(a, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe
