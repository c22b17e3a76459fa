// Internode high-throughput dispatch (ncclMoeDispatch on a communicator of several nodes, fresh or cached).
//
// Results: the intranode HT dispatch's, bit for bit (docs/reference.md; ref::ht_dispatch): row of (s, t) at holder
// d = recv_prefix_d[s] + send_pos_s[t][d], rows by source rank then source token, ids re-based to d (-1 elsewhere),
// weights where the id is local (0 elsewhere), fp8 rows and scale words copied bitwise.
//
// Three launches, e = the call's HT epoch, tag = dispatch count + 1 (common.cuh); rank r = (node a, local index i):
//   send     block 0 announces arrive = e at the node's ranks. Records: every block first waits, for every other
//            node (slot j), for the rail peer's DispAck >= tag - 1 (it read r's previous records, so r's send[j]
//            and the peer's recv window are free). Then warps take chunks of kHtNetChunk records by ticket
//            (common.cuh, "Chunked RDMA WRITEs"): for each record q of the chunk (q-th token of node_list[m]):
//            header (token, tag, pos[g] = send_pos[t][rank (m, g)]), K weights, K global ids (int16), payload (row
//            bytes, then the caller's scale words) into send[j] at this call's stride; then the chunk is WRITTEN to
//            the rail peer's recv window with +n on its DispTail (one put_signal; RC order places the add after the
//            records), after the slot's earlier chunks. Nothing here waits for a rank of this node, so the records
//            leave as early as they can, and a rank that never arrives stalls only its own node and its rail,
//            which then name it.
//   forward  own node first: warp per (local rank g, position): once g arrived, the row and its metadata (ids
//            re-based to g, weights, scale words) into g's HT slot [r][pos], then row_flag = e -- while the first
//            chunks cross the network. Then warp per received record q of slot j: wait DispTail >= DispBase + q + 1
//            (acquire: chunks land whole and in order, so the record is complete; nothing is read below a tail
//            not waited for), fwd_pos[j][q][g] = pos[g] (the combine's holder map) and, for each holder g of this
//            node (pos[g] >= 0), once g arrived, the row and its metadata into g's HT slot [source][pos[g]], then
//            row_flag = e. The last block adds fwd_count to DispBase and +1 to each rail source's DispAck.
//   receive  warp per (source s, position p < count from s): wait own row_flag[s][p] >= e, copy the row and
//            metadata to output row recv_prefix[s] + p (rows past the capacity are dropped, never written).
//            Worst-case mode: ids -1 and weights 0 into rows [N_recv, recv_capacity). The last block
//            records kErrCapacity when N_recv exceeds the capacity and stores epoch and dispatch count.
// No kernel waits for a block of its own grid that may not have started (a chunk waits only for the chunks of earlier
// tickets, whose warps are running); every wait is bounded and names phase, peer and QP.
#include <cuda_runtime.h>

#include "kernels/ht_net/common.cuh"

namespace nccl_moe {
namespace {

using htnet::lane;

struct Stride {
  size_t header, record;
};

__device__ __forceinline__ Stride record_stride(const HtNetDispatchArgs& a) {
  const int H = a.fp8 ? a.row_bytes : a.row_bytes / 2;
  return {HtNetLayout::header_bytes(a.topk),
          HtNetLayout::dispatch_record_bytes(H, a.topk, a.fp8 != 0, a.num_scale_words)};
}

__device__ __forceinline__ int caller_scale_word(const HtNetDispatchArgs& a, int t, int w) {
  return a.x_scales[t * a.scale_token_stride + w * a.scale_word_stride];
}

// Metadata words of a row for holder rank d (src/mem/ht_layout.h meta: [K ids][K weights][scale words]) from the
// token's global ids, weights and scale words (warp).
__device__ __forceinline__ void write_meta(const HtNetDispatchArgs& a, int* meta, int d, const int16_t* ids,
                                           const float* weights) {
  const int K = a.topk, El = a.net.num_local_experts;
  if (lane() < K) {
    const int id = htnet::local_expert_on(ids[lane()], d, El);
    meta[lane()] = id;
    meta[K + lane()] = (id >= 0 && a.topk_weights != nullptr) ? __float_as_int(weights[lane()]) : 0;
  }
}

__global__ void __launch_bounds__(kHtNetThreads)
    ht_net_dispatch_send_kernel(const __grid_constant__ HtNetDispatchArgs a) {
  __shared__ int s_ok;
  const HtNetComm& n = a.net;
  const HtNetRouting& r = a.route;
  const HtNetLayout& L = n.net;
  const int S = L.num_slots, G = n.ranks_per_node, K = a.topk, R = n.comm.num_ranks, C = r.capacity;
  const long long epoch = htnet::call_epoch(n);
  const long long tag = htnet::control(n)->dispatch_count + 1;
  htnet::announce_arrival(n, epoch);
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  if (threadIdx.x < static_cast<unsigned>(S)) {
    const int j = threadIdx.x;
    if (!htnet::wait_word(n, htnet::own_signal(n, kHtNetDispAck, j), tag - 1, Phase::kHtNetDispatch,
                          htnet::rail_peer(n, j), kHtNetDispAck))
      s_ok = 0;
  }
  __syncthreads();
  if (!s_ok) return;
  const Stride st = record_stride(a);
  uint8_t* net = htnet::own_net(n);

  // Records for the other nodes, a chunk per ticket: staged by the warp, then posted in the slot's chunk order.
  htnet::Chunk c;
  const auto records_of = [&](int j) { return r.node_count[HtNetLayout::slot_node(j, n.node)]; };
  while (htnet::warp_take_chunk(n, records_of, &c)) {
    const int m = HtNetLayout::slot_node(c.slot, n.node);
    for (int q = c.begin; q < c.end; ++q) {
      const int t = r.node_list[static_cast<size_t>(m) * C + q];
      uint8_t* rec = net + L.send_record(c.slot, q, st.record);
      HtNetHeader* hdr = reinterpret_cast<HtNetHeader*>(rec);
      float* weights = reinterpret_cast<float*>(rec + sizeof(HtNetHeader));  // floats first: 4-byte aligned
      int16_t* ids = reinterpret_cast<int16_t*>(weights + K);
      if (lane() == 0) {
        hdr->src_token = t;
        hdr->tag = static_cast<uint32_t>(tag);
      }
      if (lane() < kMaxNvlPeers)
        hdr->pos[lane()] = lane() < G ? r.send_pos[static_cast<size_t>(t) * R + htnet::rank_at(n, m, lane())] : -1;
      if (lane() < K) {
        ids[lane()] = static_cast<int16_t>(r.topk_idx32[t * K + lane()]);
        weights[lane()] = a.topk_weights != nullptr ? a.topk_weights[static_cast<size_t>(t) * K + lane()] : 0.0f;
      }
      uint8_t* payload = rec + st.header;
      htnet::warp_copy(payload, a.x + static_cast<size_t>(t) * a.row_bytes, a.row_bytes);
      int* words = reinterpret_cast<int*>(payload + a.row_bytes);
      for (int w = lane(); w < a.num_scale_words; w += 32) words[w] = caller_scale_word(a, t, w);
    }
    __syncwarp();
    if (lane() == 0) {
      const int at_peer = htnet::slot_at_peer(n, c.slot);
      htnet::post_chunk(n, htnet::own_counter(n, kHtNetDispPosted, c.slot), tag, c, true,
                        net + L.send_record(c.slot, c.begin, st.record), L.recv_record(at_peer, c.begin, st.record),
                        static_cast<size_t>(c.end - c.begin) * st.record, L.signal(kHtNetDispTail, at_peer),
                        Phase::kHtNetDispatch);
    }
    __syncwarp();
  }
  if (htnet::last_block(n) && threadIdx.x == 0) htnet::control(n)->ticket = 0;
}

__global__ void __launch_bounds__(kHtNetThreads)
    ht_net_dispatch_forward_kernel(const __grid_constant__ HtNetDispatchArgs a) {
  const HtNetComm& n = a.net;
  const HtNetRouting& r = a.route;
  const HtNetLayout& L = n.net;
  const int S = L.num_slots, G = n.ranks_per_node, K = a.topk, me = n.comm.rank, C = r.capacity;
  const long long epoch = htnet::call_epoch(n);
  const Stride st = record_stride(a);
  const uint8_t* net = htnet::own_net(n);
  const int warp = htnet::grid_warp(), warps = htnet::grid_warps();
  bool ok = true;
  // Rows for this node's holders (this rank included): NVLink stores into their HT slot [me].
  for (int g = 0; g < G && ok; ++g) {
    const int d = htnet::rank_at(n, n.node, g), count = r.send_count[d];
    if (warp >= count) continue;
    if (!htnet::warp_wait_arrival(n, g, epoch, Phase::kHtNetDispatch)) {
      ok = false;
      break;
    }
    for (int pos = warp; pos < count; pos += warps) {
      const int t = r.send_list[static_cast<size_t>(d) * C + pos];
      htnet::warp_copy(htnet::row_x(n, g, me, pos, a.row_bytes), a.x + static_cast<size_t>(t) * a.row_bytes,
                       a.row_bytes);
      int* meta = htnet::row_meta(n, g, me, pos);
      if (lane() < K) {
        const int id = htnet::local_expert_on(r.topk_idx32[t * K + lane()], d, n.num_local_experts);
        meta[lane()] = id;
        meta[K + lane()] = (id >= 0 && a.topk_weights != nullptr)
                               ? __float_as_int(a.topk_weights[static_cast<size_t>(t) * K + lane()])
                               : 0;
      }
      for (int w = lane(); w < a.num_scale_words; w += 32) meta[2 * K + w] = caller_scale_word(a, t, w);
      htnet::warp_publish(htnet::row_flag(n, g, me, pos), epoch);
    }
  }

  for (int j = 0; j < S && ok; ++j) {
    const int src = htnet::rail_peer(n, j), count = r.fwd_count[j];
    const long long base = *htnet::own_counter(n, kHtNetDispBase, j);
    const long long* tail = htnet::own_signal(n, kHtNetDispTail, j);
    for (int q = warp; q < count && ok; q += warps) {
      // Record q landed once the tail counts it: chunks arrive whole and in order (acquire: nothing of the record
      // is read before).
      if (!htnet::warp_wait(n, tail, base + q + 1, Phase::kHtNetDispatch, src, kHtNetDispTail)) {
        ok = false;
        break;
      }
      const uint8_t* rec = net + L.recv_record(j, q, st.record);
      const HtNetHeader* hdr = reinterpret_cast<const HtNetHeader*>(rec);
      const float* weights = reinterpret_cast<const float*>(rec + sizeof(HtNetHeader));
      const int16_t* ids = reinterpret_cast<const int16_t*>(weights + K);
      const uint8_t* payload = rec + st.header;
      int* fwd_pos = r.fwd_pos + (static_cast<size_t>(j) * C + q) * G;
      for (int g = 0; g < G && ok; ++g) {
        const int pos = hdr->pos[g];
        if (lane() == 0) fwd_pos[g] = pos;
        if (pos < 0) continue;
        if (pos >= C) {  // a header never drives an index past the slot
          if (lane() == 0) dev::record_error(n.comm, kErrCapacity, Phase::kHtNetDispatch, src, pos, C);
          ok = false;
          break;
        }
        if (!htnet::warp_wait_arrival(n, g, epoch, Phase::kHtNetDispatch)) {
          ok = false;
          break;
        }
        const int d = htnet::rank_at(n, n.node, g);
        htnet::warp_copy(htnet::row_x(n, g, src, pos, a.row_bytes), payload, a.row_bytes);
        int* meta = htnet::row_meta(n, g, src, pos);
        write_meta(a, meta, d, ids, weights);
        const int* words = reinterpret_cast<const int*>(payload + a.row_bytes);
        for (int w = lane(); w < a.num_scale_words; w += 32) meta[2 * K + w] = words[w];
        htnet::warp_publish(htnet::row_flag(n, g, src, pos), epoch);
      }
    }
  }
  // A failed wait (this launch's or another's: the rank's record) leaves bases and acks alone: records still in
  // flight were not read, and the rail peers must not be told they were.
  if (!htnet::last_block(n) || dev::error_recorded(n.comm)) return;
  if (threadIdx.x < static_cast<unsigned>(S)) {
    const int j = threadIdx.x;
    *htnet::own_counter(n, kHtNetDispBase, j) += r.fwd_count[j];
    htnet::add_word(n, htnet::rail_peer(n, j), L.signal(kHtNetDispAck, htnet::slot_at_peer(n, j)), 1);
  }
}

__device__ __forceinline__ void write_output_slot(const HtNetDispatchArgs& a, int row, int k, int id, int weight_bits) {
  const size_t i = static_cast<size_t>(row) * a.topk + k;
  if (a.recv_topk_idx != nullptr) {
    if (a.recv_idx_int64)
      static_cast<long long*>(a.recv_topk_idx)[i] = id;
    else
      static_cast<int*>(a.recv_topk_idx)[i] = id;
  }
  if (a.recv_topk_weights != nullptr) a.recv_topk_weights[i] = __int_as_float(weight_bits);
}

__global__ void __launch_bounds__(kHtNetThreads)
    ht_net_dispatch_recv_kernel(const __grid_constant__ HtNetDispatchArgs a) {
  const HtNetComm& n = a.net;
  const HtNetRouting& r = a.route;
  const int R = n.comm.num_ranks, K = a.topk;
  const long long epoch = htnet::call_epoch(n);
  const int warp = htnet::grid_warp(), warps = htnet::grid_warps();
  bool ok = true;
  for (int s = 0; s < R && ok; ++s) {
    // Slot s is written by s itself (this node) or by the forwarder of s's rail on this node.
    const int writer = htnet::rank_at(n, n.node, n.local_of[s]);
    const int base = r.recv_prefix[s], count = r.recv_prefix[s + 1] - base;
    for (int pos = warp; pos < count; pos += warps) {
      if (!htnet::warp_wait(n, htnet::row_flag(n, n.local, s, pos), epoch, Phase::kHtNetDispatch, writer, -1)) {
        ok = false;
        break;
      }
      const int row = base + pos;
      if (row >= a.out_rows) continue;  // capacity overflow (worst-case mode): reported by the last block
      htnet::warp_copy(a.recv_x + static_cast<size_t>(row) * a.row_bytes, htnet::row_x(n, n.local, s, pos, a.row_bytes),
                       a.row_bytes);
      const int* meta = htnet::row_meta(n, n.local, s, pos);
      if (lane() < K) write_output_slot(a, row, lane(), meta[lane()], meta[K + lane()]);
      for (int w = lane(); w < a.num_scale_words; w += 32)
        a.recv_x_scales[static_cast<size_t>(row) * a.num_scale_words + w] = meta[2 * K + w];
    }
  }
  const int num_recv = r.recv_prefix[R];
  if (ok && a.worst_case && lane() < K)
    for (int row = num_recv + warp; row < a.out_rows; row += warps) write_output_slot(a, row, lane(), -1, 0);
  if (!htnet::last_block(n)) return;
  if (threadIdx.x == 0) {
    if (a.worst_case && num_recv > a.out_rows)
      dev::record_error(n.comm, kErrCapacity, Phase::kHtNetDispatch, -1, num_recv, a.out_rows);
    htnet::control(n)->dispatch_count += 1;
    *reinterpret_cast<volatile long long*>(&htnet::sync(n, n.local)->epoch) = epoch;
    __threadfence();
  }
}

int grid(const HtNetComm& n) { return n.num_blocks < 1 ? 1 : n.num_blocks; }

}  // namespace

cudaError_t launchHtNetDispatch(const HtNetDispatchArgs& a, cudaStream_t stream) {
  ht_net_dispatch_send_kernel<<<grid(a.net), kHtNetThreads, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ht_net_dispatch_forward_kernel<<<grid(a.net), kHtNetThreads, 0, stream>>>(a);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ht_net_dispatch_recv_kernel<<<grid(a.net), kHtNetThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadHtNetDispatchKernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, ht_net_dispatch_send_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ht_net_dispatch_forward_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ht_net_dispatch_recv_kernel);
  return e;
}

}  // namespace nccl_moe
