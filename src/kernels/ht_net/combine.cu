// Internode high-throughput combine (ncclMoeCombine on a communicator of several nodes).
//
// Results: the two-level sum of docs/reference.md "High-throughput combine on several nodes", bit for bit
// (ref::ht_combine_nodes): for token t of rank s, per node n ascending with a holder, P_n = bf16(0 + x_d + ...) over
// the node's holders d ascending (FP32, one rounding per add); out = bf16(0 + P_n0 + P_n1 + ... + bias0 + bias1).
// Weights the same way in FP32, never rounded.
//
// Three launches, e = the call's HT epoch, tag = combine count + 1 (common.cuh); rank r = (node m, local index g):
//   return   block 0 announces arrive = e. Warp per received row (source s, position p): the row (2H bytes) and,
//            with weights, its K weights go to the forwarder f = (m, local index of s) -- s itself when s is on
//            this node -- into f's HT slot [node(s) * G + g][p], then row_flag = e (after f arrived).
//   reduce   (forwarder of the rail sources of the other nodes) every block waits, per slot j, for the source's
//            CombAck >= tag - 1 (it read r's previous partials, so r's recv[j] may be rewritten). Warps take chunks
//            of kHtNetChunk records by ticket (common.cuh, "Chunked RDMA WRITEs"): for each record q of the chunk,
//            the holders g from fwd_pos[j][q] (the dispatch's header positions), their row flags, the node partial
//            bf16(0 + sum over g ascending) and the FP32 weight sums into recv[j] record q; then the chunk is
//            WRITTEN back to the source's send window with +n on its CombTail (one put_signal), after the slot's
//            earlier chunks.
//   home     warp per own token t: this node's partial from the rows its holders returned into r's slots
//            [m * G + g][send_pos] (rounded to bf16), each other node's partial from send[j] record q = node_pos[t]
//            once CombTail >= CombBase + q + 1 (acquire: chunks land whole and in order), summed over nodes
//            ascending, then biases; weights likewise. The last block adds node_count to CombBase, +1 on every
//            rail peer's CombAck, and stores epoch and combine count.
// No kernel waits for a block of its own grid that may not have started (a chunk waits only for the chunks of earlier
// tickets, whose warps are running); every wait is bounded and names phase, peer and QP.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/ht_net/common.cuh"

namespace nccl_moe {
namespace {

using htnet::lane;

__device__ __forceinline__ size_t combine_stride(const HtNetCombineArgs& a) {
  return HtNetLayout::combine_record_bytes(a.hidden, a.topk, a.topk_weights != nullptr);
}

__device__ __forceinline__ void add_bf16x8(float* acc, const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = acc[2 * i] + f.x;
    acc[2 * i + 1] = acc[2 * i + 1] + f.y;
  }
}
__device__ __forceinline__ int4 to_bf16x8(const float* acc) {
  int4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return v;
}

__global__ void __launch_bounds__(kHtNetThreads)
    ht_net_combine_return_kernel(const __grid_constant__ HtNetCombineArgs a) {
  const HtNetComm& n = a.net;
  const HtNetRouting& r = a.route;
  const int R = n.comm.num_ranks, K = a.topk, G = n.ranks_per_node;
  const size_t row_bytes = 2 * static_cast<size_t>(a.hidden);
  const long long epoch = htnet::call_epoch(n);
  htnet::announce_arrival(n, epoch);
  const int warp = htnet::grid_warp(), warps = htnet::grid_warps();
  bool ok = true;
  for (int s = 0; s < R && ok; ++s) {
    const int f = n.local_of[s], slot = n.node_of[s] * G + n.local;
    const int base = r.recv_prefix[s], count = r.recv_prefix[s + 1] - base;
    if (warp >= count) continue;
    if (!htnet::warp_wait_arrival(n, f, epoch, Phase::kHtNetCombine)) break;
    for (int pos = warp; pos < count; pos += warps) {
      const int row = base + pos;
      if (row >= a.in_rows) {  // a dispatch past the capacity already failed; never read past the input
        if (lane() == 0) dev::record_error(n.comm, kErrCapacity, Phase::kHtNetCombine, -1, row + 1, a.in_rows);
        ok = false;
        break;
      }
      htnet::warp_copy(htnet::row_x(n, f, slot, pos, row_bytes), a.x + static_cast<size_t>(row) * row_bytes, row_bytes);
      if (a.topk_weights != nullptr && lane() < K)
        htnet::row_meta(n, f, slot, pos)[K + lane()] =
            __float_as_int(a.topk_weights[static_cast<size_t>(row) * K + lane()]);
      htnet::warp_publish(htnet::row_flag(n, f, slot, pos), epoch);
    }
  }
  (void)htnet::last_block(n);
}

// Waits for the row flags of this rank's slots [slot0 + g][pos[g]] with pos[g] >= 0 (warp). `writer(g)` is the
// rank that returns them: this node's rank g.
__device__ __forceinline__ bool wait_holder_rows(const HtNetComm& n, int slot0, const int* pos, long long epoch) {
  for (int g = 0; g < n.ranks_per_node; ++g) {
    if (pos[g] < 0) continue;
    if (!htnet::warp_wait(n, htnet::row_flag(n, n.local, slot0 + g, pos[g]), epoch, Phase::kHtNetCombine,
                          htnet::rank_at(n, n.node, g), -1))
      return false;
  }
  return true;
}

// The node partial of one token from the rows of this rank's slots [slot0 + g][pos[g]] (warp; flags waited):
// channels in bf16 (rounded once at the end) to `out`, weight sums to `out_w` (when weighted).
__device__ void node_partial(const HtNetCombineArgs& a, int slot0, const int* pos, uint8_t* out, float* out_w) {
  const HtNetComm& n = a.net;
  const int G = n.ranks_per_node, K = a.topk;
  const size_t row_bytes = 2 * static_cast<size_t>(a.hidden);
  for (int c = lane(); c < a.hidden / 8; c += 32) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int g = 0; g < G; ++g)
      if (pos[g] >= 0)
        add_bf16x8(
            acc, dev::ld_v4(reinterpret_cast<const int4*>(htnet::row_x(n, n.local, slot0 + g, pos[g], row_bytes)) + c));
    reinterpret_cast<int4*>(out)[c] = to_bf16x8(acc);
  }
  if (out_w != nullptr && lane() < K) {
    float w = 0.0f;
    for (int g = 0; g < G; ++g)
      if (pos[g] >= 0) w = w + __int_as_float(htnet::row_meta(n, n.local, slot0 + g, pos[g])[K + lane()]);
    out_w[lane()] = w;
  }
}

__global__ void __launch_bounds__(kHtNetThreads)
    ht_net_combine_reduce_kernel(const __grid_constant__ HtNetCombineArgs a) {
  __shared__ int s_ok;
  const HtNetComm& n = a.net;
  const HtNetRouting& r = a.route;
  const HtNetLayout& L = n.net;
  const int S = L.num_slots, G = n.ranks_per_node, C = r.capacity;
  const long long epoch = htnet::call_epoch(n);
  const long long tag = htnet::control(n)->combine_count + 1;
  if (threadIdx.x == 0) s_ok = 1;
  __syncthreads();
  if (threadIdx.x < static_cast<unsigned>(S)) {
    const int j = threadIdx.x;
    if (!htnet::wait_word(n, htnet::own_signal(n, kHtNetCombAck, j), tag - 1, Phase::kHtNetCombine,
                          htnet::rail_peer(n, j), kHtNetCombAck))
      s_ok = 0;
  }
  __syncthreads();
  if (!s_ok) return;
  const size_t stride = combine_stride(a);
  uint8_t* net = htnet::own_net(n);
  htnet::Chunk c;
  const auto records_of = [&](int j) { return r.fwd_count[j]; };
  while (htnet::warp_take_chunk(n, records_of, &c)) {
    const int slot0 = HtNetLayout::slot_node(c.slot, n.node) * G;
    bool staged = true;
    for (int q = c.begin; q < c.end && staged; ++q) {
      const int* pos = r.fwd_pos + (static_cast<size_t>(c.slot) * C + q) * G;
      if (!wait_holder_rows(n, slot0, pos, epoch)) {
        staged = false;
        break;
      }
      uint8_t* rec = net + L.recv_record(c.slot, q, stride);
      node_partial(
          a, slot0, pos, rec,
          a.topk_weights != nullptr ? reinterpret_cast<float*>(rec + 2 * static_cast<size_t>(a.hidden)) : nullptr);
    }
    __syncwarp();
    if (lane() == 0) {
      const int at_peer = htnet::slot_at_peer(n, c.slot);
      htnet::post_chunk(n, htnet::own_counter(n, kHtNetCombPosted, c.slot), tag, c, staged,
                        net + L.recv_record(c.slot, c.begin, stride), L.send_record(at_peer, c.begin, stride),
                        static_cast<size_t>(c.end - c.begin) * stride, L.signal(kHtNetCombTail, at_peer),
                        Phase::kHtNetCombine);
    }
    __syncwarp();
  }
  if (htnet::last_block(n) && threadIdx.x == 0) htnet::control(n)->ticket = 0;
}

__global__ void __launch_bounds__(kHtNetThreads)
    ht_net_combine_home_kernel(const __grid_constant__ HtNetCombineArgs a) {
  const HtNetComm& n = a.net;
  const HtNetRouting& r = a.route;
  const HtNetLayout& L = n.net;
  const int S = L.num_slots, G = n.ranks_per_node, N = n.num_nodes, R = n.comm.num_ranks, K = a.topk;
  const long long epoch = htnet::call_epoch(n);
  const size_t stride = combine_stride(a);
  const size_t row_bytes = 2 * static_cast<size_t>(a.hidden);
  const uint8_t* net = htnet::own_net(n);
  const bool weighted = a.topk_weights != nullptr;
  const int warp = htnet::grid_warp(), warps = htnet::grid_warps();
  for (int t = warp; t < a.num_tokens; t += warps) {
    // Own node: holder positions, their rows' flags.
    int pos[kMaxNvlPeers];
    bool own_any = false;
    for (int g = 0; g < G; ++g) {
      pos[g] = r.send_pos[static_cast<size_t>(t) * R + htnet::rank_at(n, n.node, g)];
      own_any |= pos[g] >= 0;
    }
    if (!wait_holder_rows(n, n.node * G, pos, epoch)) break;
    // Other nodes: their partial of t (record q of that node's slot) landed once the slot's tail counts it.
    bool landed = true;
    for (int m = 0; m < N && landed; ++m) {
      const int q = m == n.node ? -1 : r.node_pos[static_cast<size_t>(t) * N + m];
      if (q < 0) continue;
      const int j = HtNetLayout::peer_slot(m, n.node);
      landed = htnet::warp_wait(n, htnet::own_signal(n, kHtNetCombTail, j),
                                *htnet::own_counter(n, kHtNetCombBase, j) + q + 1, Phase::kHtNetCombine,
                                htnet::rail_peer(n, j), kHtNetCombTail);
    }
    if (!landed) break;
    for (int c = lane(); c < a.hidden / 8; c += 32) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int m = 0; m < N; ++m) {
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (m == n.node) {
          if (!own_any) continue;
          for (int g = 0; g < G; ++g)
            if (pos[g] >= 0)
              add_bf16x8(part, dev::ld_v4(reinterpret_cast<const int4*>(
                                              htnet::row_x(n, n.local, n.node * G + g, pos[g], row_bytes)) +
                                          c));
          add_bf16x8(acc, to_bf16x8(part));  // the node partial, rounded to bf16 as a forwarder's is
        } else {
          const int q = r.node_pos[static_cast<size_t>(t) * N + m];
          if (q < 0) continue;
          const int4* rec =
              reinterpret_cast<const int4*>(net + L.send_record(HtNetLayout::peer_slot(m, n.node), q, stride));
          add_bf16x8(acc, dev::ld_v4(rec + c));
        }
      }
      if (a.bias0 != nullptr) add_bf16x8(acc, dev::ld_v4(reinterpret_cast<const int4*>(a.bias0 + t * row_bytes) + c));
      if (a.bias1 != nullptr) add_bf16x8(acc, dev::ld_v4(reinterpret_cast<const int4*>(a.bias1 + t * row_bytes) + c));
      reinterpret_cast<int4*>(a.out + t * row_bytes)[c] = to_bf16x8(acc);
    }
    if (weighted && a.out_weights != nullptr && lane() < K) {
      float w = 0.0f;
      for (int m = 0; m < N; ++m) {
        float part = 0.0f;
        if (m == n.node) {
          if (!own_any) continue;
          for (int g = 0; g < G; ++g)
            if (pos[g] >= 0)
              part = part + __int_as_float(htnet::row_meta(n, n.local, n.node * G + g, pos[g])[K + lane()]);
        } else {
          const int q = r.node_pos[static_cast<size_t>(t) * N + m];
          if (q < 0) continue;
          part = reinterpret_cast<const float*>(net + L.send_record(HtNetLayout::peer_slot(m, n.node), q, stride) +
                                                row_bytes)[lane()];
        }
        w = w + part;
      }
      a.out_weights[static_cast<size_t>(t) * K + lane()] = w;
    }
  }
  // A failed wait (the rank's record) leaves bases, acks and the epoch alone: partials still in flight were not read.
  if (!htnet::last_block(n) || dev::error_recorded(n.comm)) return;
  if (threadIdx.x < static_cast<unsigned>(S)) {
    const int j = threadIdx.x;
    *htnet::own_counter(n, kHtNetCombBase, j) += r.node_count[HtNetLayout::slot_node(j, n.node)];
    htnet::add_word(n, htnet::rail_peer(n, j), L.signal(kHtNetCombAck, htnet::slot_at_peer(n, j)), 1);
  }
  if (threadIdx.x == 0) {
    htnet::control(n)->combine_count += 1;
    *reinterpret_cast<volatile long long*>(&htnet::sync(n, n.local)->epoch) = epoch;
    __threadfence();
  }
}

int grid(const HtNetComm& n) { return n.num_blocks < 1 ? 1 : n.num_blocks; }

}  // namespace

cudaError_t launchHtNetCombine(const HtNetCombineArgs& a, cudaStream_t stream) {
  ht_net_combine_return_kernel<<<grid(a.net), kHtNetThreads, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ht_net_combine_reduce_kernel<<<grid(a.net), kHtNetThreads, 0, stream>>>(a);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ht_net_combine_home_kernel<<<grid(a.net), kHtNetThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadHtNetCombineKernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, ht_net_combine_return_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ht_net_combine_reduce_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ht_net_combine_home_kernel);
  return e;
}

}  // namespace nccl_moe
