// High-throughput notify (ncclMoeDispatchNotify) and the handle's routing arrays.
//
// Computes, for this rank r's tokens t (topk_idx [T, K]) and every rank d (E_l = E / R):
//   send_pos[t][d]  = #{t' < t : t' has an expert on d} if t has one, else -1      (the dispatch slot index)
//   send_list[d][i] = the i-th token of r sent to d (ascending),  send_count[d] = #tokens of r sent to d
// then exchanges with every rank d through d's HT region (src/mem/ht_layout.h):
//   notify[r] at d: send_count[d], per-local-expert (token, slot) counts of d's experts, epoch flag
//   src_idx[r][i] at d: send_list[d][i]
// and, once every rank's slot at r is there, builds r's receive side:
//   recv_prefix[s] = sum_{s' < s} count(s' -> r),  N_recv = recv_prefix[R],
//   recv_count_per_expert[j] = roundup(sum_s count_s(j), expert_alignment),
//   recv_src_info[recv_prefix[s] + i] = (s << 24) | src_idx[s][i].
// Host-count mode also publishes N_recv and the per-expert counts into host-mapped scratch
// (host_scratch[1], host_scratch[2 ..]) and then the call's host sequence number in host_scratch[0]
// (release, system scope); the host waits for it with hostWaitGeq. Worst-case mode never involves the host.
//
// Launch: one block of kNotifyThreads threads (a token range per thread, block-wide scans in shared memory).
// Signalling: begin_call/end_call epoch protocol (common.cuh); thread d waits arrive[d] >= epoch before the
// block writes into d's region, then stores d's notify flag = epoch with release after a block barrier; thread
// s waits for its own notify[s] flag >= epoch. A failed wait skips the rest (nothing is consumed).
#include <cuda_runtime.h>

#include "device/routing.cuh"
#include "kernels/intranode/args.h"
#include "kernels/intranode/common.cuh"

namespace nccl_moe {
namespace ht {
namespace {

constexpr int kNotifyThreads = 1024;

__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(const __grid_constant__ NotifyArgs a) {
  __shared__ int s_expert_count[kMaxExperts];
  __shared__ int s_warp_total[kNotifyThreads / 32][kMaxNvlPeers];
  __shared__ int s_total[kMaxNvlPeers];
  __shared__ int s_prefix[kMaxNvlPeers + 1];
  __shared__ int s_ok;

  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank;
  const int El = a.num_local_experts, E = R * El, K = a.topk, T = a.num_tokens;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long epoch = begin_call(ht);

  for (int i = tid; i < E; i += kNotifyThreads) s_expert_count[i] = 0;
  if (tid == 0) s_ok = 1;
  __syncthreads();

  // Pass 1: a contiguous token range per thread; per-rank token counts and per-expert slot counts.
  const int per_thread = (T + kNotifyThreads - 1) / kNotifyThreads;
  const int t0 = min(T, tid * per_thread), t1 = min(T, t0 + per_thread);
  int count[kMaxNvlPeers];
#pragma unroll
  for (int d = 0; d < kMaxNvlPeers; ++d) count[d] = 0;
  for (int t = t0; t < t1; ++t) {
    unsigned mask = 0;
    for (int k = 0; k < K; ++k) {
      const int e = dev::load_topk_id_checked(a.ht.comm, Phase::kHtNotify, a.topk_idx, !a.topk_idx_is_int64,
                                              static_cast<size_t>(t) * K + k, K, E);
      a.topk_idx32[static_cast<size_t>(t) * K + k] = e;
      if (e >= 0) {
        mask |= 1u << (e / El);
        atomicAdd(&s_expert_count[e], 1);
      }
    }
#pragma unroll
    for (int d = 0; d < kMaxNvlPeers; ++d) count[d] += (mask >> d) & 1u;
  }

  // Block-wide exclusive scan of count[d] in thread order (= token order).
  int inclusive[kMaxNvlPeers];
#pragma unroll
  for (int d = 0; d < kMaxNvlPeers; ++d) {
    int v = count[d];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int n = __shfl_up_sync(kFullMask, v, off);
      if (lane >= off) v += n;
    }
    inclusive[d] = v;
    if (lane == 31) s_warp_total[warp][d] = v;
  }
  __syncthreads();
  if (tid < kMaxNvlPeers) {
    int running = 0;
    for (int w = 0; w < kNotifyThreads / 32; ++w) {
      const int v = s_warp_total[w][tid];
      s_warp_total[w][tid] = running;
      running += v;
    }
    s_total[tid] = running;
  }
  __syncthreads();

  // Pass 2: positions. The thread re-reads the int32 copy it wrote itself in pass 1.
  int next[kMaxNvlPeers];
#pragma unroll
  for (int d = 0; d < kMaxNvlPeers; ++d) next[d] = s_warp_total[warp][d] + inclusive[d] - count[d];
  for (int t = t0; t < t1; ++t) {
    unsigned mask = 0;
    for (int k = 0; k < K; ++k) {
      const int e = a.topk_idx32[static_cast<size_t>(t) * K + k];
      if (e >= 0) mask |= 1u << (e / El);
    }
#pragma unroll
    for (int d = 0; d < kMaxNvlPeers; ++d) {
      if (d >= R) break;
      int pos = -1;
      if ((mask >> d) & 1u) {
        pos = next[d]++;
        a.send_list[static_cast<size_t>(d) * a.capacity + pos] = t;
      }
      a.send_pos[static_cast<size_t>(t) * R + d] = pos;
    }
  }
  if (tid < R) a.send_count[tid] = s_total[tid];
  __syncthreads();  // after this barrier send_list is complete and visible to the whole block

  // Exchange: wait until rank d entered this call (it no longer reads its notify slots), then write.
  if (tid < R && !dev::wait_geq(ht.comm, &ht.sync(rank)->arrive[tid], epoch, Phase::kHtNotify, tid)) s_ok = 0;
  __syncthreads();
  if (s_ok) {
    for (int d = 0; d < R; ++d) {
      const int n = s_total[d];
      int* dst = ht.src_idx(d, rank, 0);
      const int* src = a.send_list + static_cast<size_t>(d) * a.capacity;
      for (int i = tid; i < n; i += kNotifyThreads) dst[i] = src[i];
      HtNotifySlot* slot = ht.notify(d, rank);
      for (int j = tid; j < El; j += kNotifyThreads) slot->expert_count[j] = s_expert_count[d * El + j];
      if (tid == 0) slot->num_tokens = n;
    }
    __syncthreads();
    if (tid < R) dev::st_release_sys(&ht.notify(tid, rank)->flag, epoch);
    if (tid < R && !dev::wait_geq(ht.comm, &ht.notify(rank, tid)->flag, epoch, Phase::kHtNotify, tid)) s_ok = 0;
  }
  __syncthreads();

  if (s_ok) {
    // Receive side: every source's slot in this rank's region is complete (acquired by thread s above).
    if (tid == 0) {
      s_prefix[0] = 0;
      for (int s = 0; s < R; ++s) {
        s_prefix[s + 1] = s_prefix[s] + ld_volatile(&ht.notify(rank, s)->num_tokens);
        a.recv_prefix[s] = s_prefix[s];
      }
      a.recv_prefix[R] = s_prefix[R];
      a.recv_count[0] = s_prefix[R];
      if (a.host_scratch != nullptr) a.host_scratch[1] = s_prefix[R];
    }
    __syncthreads();
    for (int j = tid; j < El; j += kNotifyThreads) {
      int sum = 0;
      for (int s = 0; s < R; ++s) sum += ld_volatile(&ht.notify(rank, s)->expert_count[j]);
      const int aligned = (sum + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
      a.recv_count_per_expert[j] = aligned;
      if (a.host_scratch != nullptr) a.host_scratch[2 + j] = aligned;
    }
    for (int s = 0; s < R; ++s) {
      const int base = s_prefix[s], n = s_prefix[s + 1] - s_prefix[s];
      const int* src = ht.src_idx(rank, s, 0);
      for (int i = tid; i < n; i += kNotifyThreads) a.recv_src_info[base + i] = pack_src_info(s, ld_volatile(src + i));
    }
    __syncthreads();
    if (a.host_scratch != nullptr && tid == 0) {
      dev::fence_acq_rel_sys();
      dev::st_release_sys(&a.host_scratch[0], a.host_seq);
    }
  }
  end_call(ht, epoch);
}

}  // namespace

cudaError_t launchNotify(const NotifyArgs& a, cudaStream_t stream) {
  notify_kernel<<<1, kNotifyThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadNotifyKernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, notify_kernel);
}

}  // namespace ht
}  // namespace nccl_moe
