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

#include <cstring>

#include "core/ops.h"
#include "kernels/intranode/host.cuh"

namespace nccl_moe {
namespace ht {
namespace {

constexpr int kNotifyThreads = 1024;
constexpr int kMaxExpertsInNotify = 4096;  // ncclMoeConfig_t num_experts limit (api.cc)

struct NotifyArgs {
  HtDevice ht;
  const void* topk_idx;
  int topk_idx_is_int64;
  int num_tokens;
  int topk;
  int num_local_experts;
  int expert_alignment;
  int capacity;  // handle array capacity (max_tokens_per_rank)
  int* send_count;
  int* recv_prefix;
  int* send_list;
  int* send_pos;
  int* topk_idx32;
  int* recv_count;
  int* recv_count_per_expert;
  int* recv_src_info;
  int* host_scratch;  // host-count mode: device view of the host-mapped ints; nullptr in worst-case mode
  int host_seq;
};

__device__ __forceinline__ int load_expert(const NotifyArgs& a, size_t i) {
  if (a.topk_idx_is_int64) return static_cast<int>(static_cast<const long long*>(a.topk_idx)[i]);
  return static_cast<const int*>(a.topk_idx)[i];
}

__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(const __grid_constant__ NotifyArgs a) {
  __shared__ int s_expert_count[kMaxExpertsInNotify];
  __shared__ int s_warp_total[kNotifyThreads / 32][kMaxRanks];
  __shared__ int s_total[kMaxRanks];
  __shared__ int s_prefix[kMaxRanks + 1];
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
  int count[kMaxRanks];
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) count[d] = 0;
  for (int t = t0; t < t1; ++t) {
    unsigned mask = 0;
    for (int k = 0; k < K; ++k) {
      int e = load_expert(a, static_cast<size_t>(t) * K + k);
      if (e < 0 || e >= E) e = -1;
      a.topk_idx32[static_cast<size_t>(t) * K + k] = e;
      if (e >= 0) {
        mask |= 1u << (e / El);
        atomicAdd(&s_expert_count[e], 1);
      }
    }
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) count[d] += (mask >> d) & 1u;
  }

  // Block-wide exclusive scan of count[d] in thread order (= token order).
  int inclusive[kMaxRanks];
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) {
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
  if (tid < kMaxRanks) {
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
  int next[kMaxRanks];
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) next[d] = s_warp_total[warp][d] + inclusive[d] - count[d];
  for (int t = t0; t < t1; ++t) {
    unsigned mask = 0;
    for (int k = 0; k < K; ++k) {
      const int e = a.topk_idx32[static_cast<size_t>(t) * K + k];
      if (e >= 0) mask |= 1u << (e / El);
    }
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
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
      for (int i = tid; i < n; i += kNotifyThreads)
        a.recv_src_info[base + i] = static_cast<int>((static_cast<unsigned>(s) << 24) | ld_volatile(src + i));
    }
    __syncthreads();
    if (a.host_scratch != nullptr && tid == 0) {
      dev::fence_acq_rel_sys();
      dev::st_release_sys(&a.host_scratch[0], a.host_seq);
    }
  }
  end_call(ht, epoch);
}

// Offsets (in ints) of the handle's arrays inside its one device allocation.
struct RoutingBlock {
  size_t recv_count, recv_count_per_expert, recv_src_info, send_count, recv_prefix, send_list, send_pos, topk_idx,
      total;
  static RoutingBlock make(int num_ranks, int capacity, int max_topk, int num_local_experts) {
    auto up = [](size_t v) { return (v + 63) / 64 * 64; };  // 256-byte aligned arrays
    RoutingBlock b{};
    size_t off = 0;
    b.recv_count = off;
    off = up(off + 1);
    b.recv_count_per_expert = off;
    off = up(off + static_cast<size_t>(num_local_experts));
    b.recv_src_info = off;
    off = up(off + static_cast<size_t>(num_ranks) * capacity);
    b.send_count = off;
    off = up(off + kMaxRanks);
    b.recv_prefix = off;
    off = up(off + kMaxRanks + 1);
    b.send_list = off;
    off = up(off + static_cast<size_t>(num_ranks) * capacity);
    b.send_pos = off;
    off = up(off + static_cast<size_t>(num_ranks) * capacity);
    b.topk_idx = off;
    off = up(off + static_cast<size_t>(capacity) * max_topk);
    b.total = off;
    return b;
  }
};

}  // namespace
}  // namespace ht

ncclResult_t htRoutingAlloc(ncclMoeComm* comm, HtRouting* routing) {
  ht::DeviceGuard guard(comm->device);
  HtRouting r{};
  r.num_ranks = comm->num_ranks;
  r.capacity = comm->config.max_tokens_per_rank;
  r.max_topk = comm->config.max_topk;
  r.num_local_experts = comm->config.num_experts / comm->num_ranks;
  const ht::RoutingBlock b = ht::RoutingBlock::make(r.num_ranks, r.capacity, r.max_topk, r.num_local_experts);
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
  *routing = r;
  return ncclSuccess;
}

void htRoutingFree(HtRouting* routing) {
  if (routing->device_block != nullptr) cudaFree(routing->device_block);
  *routing = HtRouting{};
}

ncclResult_t opHtNotify(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeNotifyArgs_t& args,
                        cudaStream_t stream) {
  ht::DeviceGuard guard(comm->device);
  HtRouting& r = handle->ht;
  const bool host_mode = args.recv_capacity == 0;
  ht::NotifyArgs a{};
  a.ht = ht::makeHtDevice(comm);
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
  if (host_mode) {
    a.host_scratch = comm->dev_scratch;
    a.host_seq = ++comm->ht_host_seq;
  }
  ht::notify_kernel<<<1, ht::kNotifyThreads, 0, stream>>>(a);
  MOE_CUDA_CHECK(cudaGetLastError());

  r.valid = true;
  r.num_tokens = args.num_tokens;
  r.topk = args.topk;
  r.topk_idx_is_int64 = a.topk_idx_is_int64;
  r.expert_alignment = args.expert_alignment;
  r.recv_capacity = args.recv_capacity;
  r.num_recv_tokens = -1;
  if (!host_mode) return ncclSuccess;

  // The one documented host synchronisation: wait (bounded) for this rank's receive count.
  MOE_CHECK(hostWaitGeq(comm, comm->host_scratch, a.host_seq, "ncclMoeDispatchNotify (receive count)"));
  const volatile int* scratch = comm->host_scratch;
  r.num_recv_tokens = scratch[1];
  *args.num_recv_tokens = r.num_recv_tokens;
  if (args.num_recv_tokens_per_expert != nullptr) {
    for (int j = 0; j < r.num_local_experts; ++j) args.num_recv_tokens_per_expert[j] = scratch[2 + j];
  }
  return ncclSuccess;
}

}  // namespace nccl_moe
