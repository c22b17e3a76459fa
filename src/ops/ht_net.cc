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
  a.fp8 = args.dtype == ncclMoeFp8E4M3 ? 1 : 0;
  fillHtDispatchData(r, args, &a);
  MOE_CUDA_CHECK(launchHtNetDispatch(a, stream));
  return ncclSuccess;
}

ncclResult_t htNetCombine(ncclMoeComm* comm, const HtRouting& r, const ncclMoeCombineArgs_t& args,
                          cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  HtNetCombineArgs a{};
  a.net = netComm(comm);
  a.route = netRouting(r);
  a.hidden = args.hidden;
  fillHtCombineData(r, args, &a);
  MOE_CUDA_CHECK(launchHtNetCombine(a, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe
