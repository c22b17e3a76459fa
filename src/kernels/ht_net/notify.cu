// Internode high-throughput notify (ncclMoeDispatchNotify on a communicator of several nodes).
//
// One block. For this rank r (node a, local index i), tokens t < T, tag = notify count + 1:
//   1. ids: checked (outside [-1, E): kErrBadExpertId naming token and slot), copied to the handle as int32, and
//      counted per expert.
//   2. routing (the handle's arrays, src/kernels/ht_net/args.h): per rank d send_count / send_list / send_pos (as
//      the intranode notify), per node m node_count / node_list / node_pos (the tokens with a holder on m: the
//      records m's forwarder gets). Thread d walks the tokens in order, so positions ascend with t.
//   3. records: once rank d acknowledged r's previous record (notify word [ack][d] >= tag - 1), notify_stage[d] =
//      {tag, tokens for d, records for d's node when d is r's rail peer on another node, else 0, (token, slot)
//      pairs naming each of d's experts, the tokens sent to d}; then (only the used bytes) to d: an NVLink copy into
//      d's notify_recv[r] and a release add on d's word [signal][r] (d on this node, r itself included), or WRITE +
//      fetch-add on d's QP (RC order places the add after the record).
//   4. receive: wait word [signal][s] >= tag for every s (acquire), then recv_prefix (source order), N_recv, the
//      aligned per-expert counts, fwd_count[j] = the rail source's record count, recv_src_info from the token
//      lists; then +1 on s's word [ack][r].
// Host-count mode publishes N_recv and the per-expert counts into host-mapped scratch, then the call's sequence
// number (release), as the intranode notify. Every later loop bound lives in the handle's device arrays, so a
// captured notify + dispatch + combine replays with new routing.
#include <cuda_runtime.h>

#include "kernels/ht_net/common.cuh"

namespace nccl_moe {
namespace {

using htnet::own_notify_word;

__global__ void __launch_bounds__(kHtNetThreads, 1) ht_net_notify_kernel(const __grid_constant__ HtNetNotifyArgs a) {
  __shared__ int s_expert_count[kMaxExperts];
  __shared__ int s_ok;
  const HtNetComm& n = a.net;
  const HtNetRouting& r = a.route;
  const HtNetLayout& L = n.net;
  const int R = n.comm.num_ranks, N = n.num_nodes, El = n.num_local_experts, E = R * El, K = a.topk, T = a.num_tokens,
            me = n.comm.rank, C = r.capacity;
  const int tid = threadIdx.x;
  HtNetControl* ctl = htnet::control(n);
  const long long tag = ctl->notify_count + 1;
  for (int e = tid; e < E; e += blockDim.x) s_expert_count[e] = 0;
  if (tid == 0) s_ok = 1;
  __syncthreads();

  // 1. ids.
  for (int i = tid; i < T * K; i += blockDim.x) {
    const int e = dev::load_topk_id_checked(n.comm, Phase::kHtNetNotify, a.topk_idx, !a.topk_idx_is_int64,
                                            static_cast<size_t>(i), K, E);
    r.topk_idx32[i] = e;
    if (e >= 0) atomicAdd(&s_expert_count[e], 1);
  }
  __syncthreads();

  // 2. routing: threads [0, R) number the tokens of rank d, threads [R, R + N) those of node m.
  if (tid < R + N) {
    const bool by_rank = tid < R;
    const int who = by_rank ? tid : tid - R;
    int count = 0;
    for (int t = 0; t < T; ++t) {
      bool here = false;
      for (int k = 0; k < K && !here; ++k) {
        const int e = r.topk_idx32[t * K + k];
        if (e >= 0) here = by_rank ? e / El == who : n.node_of[e / El] == who;
      }
      if (by_rank) {
        r.send_pos[static_cast<size_t>(t) * R + who] = here ? count : -1;
        if (here) r.send_list[static_cast<size_t>(who) * C + count] = t;
      } else {
        r.node_pos[static_cast<size_t>(t) * N + who] = here ? count : -1;
        if (here) r.node_list[static_cast<size_t>(who) * C + count] = t;
      }
      count += here ? 1 : 0;
    }
    if (by_rank)
      r.send_count[who] = count;
    else
      r.node_count[who] = count;
  }
  // 3. records (the stage of d is the source of a WRITE: rewritten only after d read the previous one).
  if (tid < R && !htnet::wait_word(n, own_notify_word(n, kHtNetNotifyAck, tid), tag - 1, Phase::kHtNetNotify, tid,
                                   kHtNetNotifyAck))
    s_ok = 0;
  __syncthreads();
  if (!s_ok) return;
  uint8_t* net = htnet::own_net(n);
  for (int d = 0; d < R; ++d) {
    HtNetNotifyRecord* rec = reinterpret_cast<HtNetNotifyRecord*>(net + L.notify_stage(d));
    for (int j = tid; j < El; j += blockDim.x) rec->expert_count[j] = s_expert_count[d * El + j];
    if (tid == 0) {
      rec->tag = static_cast<int32_t>(tag);
      rec->num_tokens = r.send_count[d];
      const bool rail = n.local_of[d] == n.local && n.node_of[d] != n.node;
      rec->num_records = rail ? r.node_count[n.node_of[d]] : 0;
      rec->reserved = 0;
    }
    int* tokens = rec->expert_count + L.notify_token_word();
    const int* list = r.send_list + static_cast<size_t>(d) * C;
    for (int i = tid; i < r.send_count[d]; i += blockDim.x) tokens[i] = list[i];
  }
  dev::fence_acq_rel_sys();
  __syncthreads();
  if (tid < R) {
    const int d = tid;
    const uint8_t* stage = net + L.notify_stage(d);
    const size_t signal_off = L.notify_word(kHtNetNotifySignal, me);
    const size_t used = L.notify_record_used(r.send_count[d]);
    if (htnet::is_local(n, d)) {
      const int4* src = reinterpret_cast<const int4*>(stage);
      int4* dst = reinterpret_cast<int4*>(htnet::net_region(n, n.local_of[d]) + L.notify_recv(me));
      for (size_t w = 0; w < used / 16; ++w) dst[w] = src[w];
      htnet::add_word(n, d, signal_off, 1);
    } else if (!htnet::put_signal(n, d, stage, L.notify_recv(me), used, signal_off, 1)) {
      s_ok = 0;
    }
  }
  // 4. receive.
  if (tid < R) {
    const int s = tid;
    if (!htnet::wait_word(n, own_notify_word(n, kHtNetNotifySignal, s), tag, Phase::kHtNetNotify, s,
                          kHtNetNotifySignal)) {
      s_ok = 0;
    } else {
      const HtNetNotifyRecord* rec = reinterpret_cast<const HtNetNotifyRecord*>(net + L.notify_recv(s));
      if (rec->tag != static_cast<int32_t>(tag) || rec->num_tokens < 0 || rec->num_tokens > C || rec->num_records < 0 ||
          rec->num_records > C) {
        // Another notify's record behind this one's signal, or counts no source may send: a protocol failure.
        dev::record_error(n.comm, kErrTimeout, Phase::kHtNetNotify, s, rec->tag, tag);
        s_ok = 0;
      }
    }
  }
  __syncthreads();
  if (!s_ok) return;
  if (tid == 0) {
    int sum = 0;
    for (int s = 0; s < R; ++s) {
      const HtNetNotifyRecord* rec = reinterpret_cast<const HtNetNotifyRecord*>(net + L.notify_recv(s));
      r.recv_prefix[s] = sum;
      sum += rec->num_tokens;
      if (n.local_of[s] == n.local && n.node_of[s] != n.node)
        r.fwd_count[HtNetLayout::peer_slot(n.node_of[s], n.node)] = rec->num_records;
    }
    r.recv_prefix[R] = sum;
    a.recv_count[0] = sum;
    if (a.host_scratch != nullptr) a.host_scratch[1] = sum;
  }
  for (int j = tid; j < El; j += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < R; ++s)
      sum += reinterpret_cast<const HtNetNotifyRecord*>(net + L.notify_recv(s))->expert_count[j];
    const int aligned = (sum + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
    a.recv_count_per_expert[j] = aligned;
    if (a.host_scratch != nullptr) a.host_scratch[2 + j] = aligned;
  }
  __syncthreads();  // recv_prefix is complete
  for (int s = 0; s < R; ++s) {
    const HtNetNotifyRecord* rec = reinterpret_cast<const HtNetNotifyRecord*>(net + L.notify_recv(s));
    const int* tokens = rec->expert_count + L.notify_token_word();
    for (int i = tid; i < rec->num_tokens; i += blockDim.x)
      a.recv_src_info[r.recv_prefix[s] + i] = pack_src_info(s, tokens[i]);
  }
  __syncthreads();  // every read of the received records is done: the sources may rewrite them
  if (tid < R) htnet::add_word(n, tid, L.notify_word(kHtNetNotifyAck, me), 1);
  if (tid == 0) {
    ctl->notify_count = tag;
    if (a.host_scratch != nullptr) {
      dev::fence_acq_rel_sys();
      dev::st_release_sys(&a.host_scratch[0], a.host_seq);
    }
  }
}

}  // namespace

cudaError_t launchHtNetNotify(const HtNetNotifyArgs& a, cudaStream_t stream) {
  ht_net_notify_kernel<<<1, kHtNetThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadHtNetNotifyKernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, ht_net_notify_kernel);
}

}  // namespace nccl_moe
