// Internode low-latency combine: ncclMoeLowLatencyCombine on a communicator of several nodes, and the reset's
// barrier over every rank.
//
// Results: those of the intranode LL combine (docs/reference.md "Low-latency combine"), bit for bit: expert rank d
// reduces the rows of (s, t) it holds, k ascending, with explicit fmaf into one bf16 partial per (s, t); owner s
// adds the partials of the ranks holding a slot of t, rank ascending, in FP32 (__fadd_rn), rounds to bf16.
//
// Protocol (regions: src/mem/ll_net_layout.h), tag = the half's combine epoch + 1:
//   weights (1 block)  owner s tells every rank d whether this combine was given weights: when it was, the WRITE
//                      of its [T, K] weights into d.weights[s] first; then the flag word (tag << 32 | given) and +1
//                      on d.weight_signal[s] (same QP, after the weights).
//   send (grid)        expert rank d waits, for every source s, for s's weight signal (acquire) and for s's ack of
//                      this half's previous partials (tag - 1). Blocks take the received messages (s, i) in turn
//                      (g = b, b + grid, ... over all sources): the header gives the token and its slots; every
//                      thread reduces 8 channels over the token's rows here and stores the bf16 partial -- into
//                      s.comb_recv[d][t] through NVLink for ranks of this node, else into cstage[s][t] and then one
//                      WRITE of the row to s.comb_recv[d][t]. The last block adds 1 to every s.comb_signal[d] (on the
//                      QP after the WRITEs).
//   recv (grid)        owner s waits for comb_signal[d] >= tag of every rank (acquire), then block b sums the
//                      partials of tokens t = b, b + grid, ... over the ranks holding a valid slot, ascending, and
//                      writes out[t]. The last block bumps the half's combine epoch and acks every rank (+1 on
//                      d.comb_ack[s]).
#include <cuda_runtime.h>

#include "device/numerics.cuh"
#include "kernels/low_latency_net/common.cuh"

namespace nccl_moe {
namespace {

using llnet::kThreads;

__global__ void __launch_bounds__(kThreads) ll_net_combine_weights_kernel(const __grid_constant__ LlNetCombineArgs p) {
  const LlNetComm& n = p.net;
  const LlNetLayout& L = n.layout;
  const int R = n.comm.num_ranks, TK = p.num_tokens * p.topk;
  uint8_t* half = llnet::own_half(n);
  const long long tag = llnet::control(n)->combine_epoch + 1;
  const bool given = p.topk_weights != nullptr;
  float* stage = reinterpret_cast<float*>(half + L.wstage());
  uint64_t* flags = reinterpret_cast<uint64_t*>(half + L.flag_stage(0));
  if (given)
    for (int i = threadIdx.x; i < TK; i += blockDim.x) stage[i] = p.topk_weights[i];
  for (int d = threadIdx.x; d < R; d += blockDim.x) flags[d] = (static_cast<uint64_t>(tag) << 32) | (given ? 1u : 0u);
  dev::fence_acq_rel_sys();
  __syncthreads();
  __shared__ int s_fail;
  if (threadIdx.x == 0) s_fail = 0;
  for (int d = 0; d < R; ++d) {
    if (given && llnet::is_local(n, d)) {
      float* dst = reinterpret_cast<float*>(llnet::local_half(n, d) + L.weights(n.comm.rank));
      for (int i = threadIdx.x; i < TK; i += blockDim.x) dst[i] = stage[i];
      dev::fence_acq_rel_sys();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const bool ok =
          (!given || llnet::is_local(n, d) ||
           llnet::put_remote(n, d, stage, L.weights(n.comm.rank), static_cast<uint32_t>(TK * sizeof(float)))) &&
          llnet::put_word_signal(n, d, flags + d, kNetWeightFlag, kNetWeightSignal);
      if (!ok) s_fail = 1;
    }
    __syncthreads();
    if (s_fail) return;
  }
}

__global__ void __launch_bounds__(kThreads) ll_net_combine_send_kernel(const __grid_constant__ LlNetCombineArgs p) {
  __shared__ int s_fail;
  __shared__ int s_first[kMaxRanks + 1];  // messages of sources < s (prefix over disp_count)
  __shared__ unsigned char s_given[kMaxRanks];
  const LlNetComm& n = p.net;
  const LlNetLayout& L = n.layout;
  const int R = n.comm.num_ranks, El = n.num_local_experts, me = n.comm.rank, H = p.hidden;
  uint8_t* half = llnet::own_half(n);
  const long long tag = llnet::control(n)->combine_epoch + 1;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    if (!llnet::wait_signal(n, kNetWeightSignal, s, tag, Phase::kLlCombineRecv) ||
        !llnet::wait_signal(n, kNetCombAck, s, tag - 1, Phase::kLlCombineRecv)) {
      s_fail = 1;
      continue;
    }
    const uint64_t flag = static_cast<uint64_t>(dev::ld_acquire_sys(llnet::own_signal(n, kNetWeightFlag, s)));
    s_given[s] = static_cast<unsigned char>(flag & 1u);
  }
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int s = 0; s < R; ++s) {
      s_first[s] = sum;
      sum += static_cast<int>(static_cast<uint64_t>(*llnet::own_signal(n, kNetDispCount, s)) & 0xffffffffu);
    }
    s_first[R] = sum;
  }
  __syncthreads();
  if (s_fail) return;
  const int total = s_first[R];
  for (int g = blockIdx.x; g < total; g += gridDim.x) {
    int s = 0;
    while (s_first[s + 1] <= g) ++s;
    const int i = g - s_first[s];
    const LlNetHeader* hdr = reinterpret_cast<const LlNetHeader*>(half + L.dispatch_msg(s, i));
    const int t = hdr->token, K = p.topk;  // the call's K; a header never drives an index
    if (static_cast<unsigned>(t) >= static_cast<unsigned>(L.tokens)) continue;
    const float* pushed = reinterpret_cast<const float*>(half + L.weights(s)) + static_cast<size_t>(t) * p.topk;
    const bool local = llnet::is_local(n, s);
    uint8_t* dst = local ? llnet::local_half(n, s) + L.comb_recv_row(me, t) : half + L.cstage_row(s, t);
    for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
      float acc[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
      for (int k = 0; k < K; ++k) {
        const int expert = hdr->expert[k];
        if (expert < 0 || expert / El != me) continue;
        const int j = expert % El;
        const int row = p.recv_row[(static_cast<size_t>(s) * L.tokens + t) * L.topk + k];
        const float w = s_given[s] ? pushed[k] : hdr->weight[k];
        float f[8];
        dev::bf16x8_to_float(
            dev::ld_nc_v4(reinterpret_cast<const int4*>(p.y + (static_cast<size_t>(j) * p.slab_rows + row) * H) + c),
            f);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = __fmaf_rn(w, f[e], acc[e]);
      }
      reinterpret_cast<int4*>(dst)[c] = dev::float8_to_bf16x8(acc);
    }
    if (!local) {
      dev::fence_acq_rel_sys();  // the staged row before the WRITE that reads it
      __syncthreads();
      if (threadIdx.x == 0 && !llnet::put_remote(n, s, dst, L.comb_recv_row(me, t), static_cast<uint32_t>(2 * H)))
        s_fail = 1;
      __syncthreads();
      if (s_fail) return;
    }
  }
  if (!ll::arrive_last_block(&llnet::control(n)->comb_send_done, true)) return;
  for (int s = threadIdx.x; s < R; s += blockDim.x) llnet::signal_peer(n, s, kNetCombSignal, 1);
}

__global__ void __launch_bounds__(kThreads) ll_net_combine_recv_kernel(const __grid_constant__ LlNetCombineArgs p) {
  __shared__ int s_fail;
  const LlNetComm& n = p.net;
  const LlNetLayout& L = n.layout;
  const int R = n.comm.num_ranks, El = n.num_local_experts, H = p.hidden, K = p.topk;
  const int E = El * R;
  uint8_t* half = llnet::own_half(n);
  LlNetControl* ctl = llnet::control(n);
  const long long tag = ctl->combine_epoch + 1;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (!llnet::wait_signal(n, kNetCombSignal, d, tag, Phase::kLlCombineRecv)) s_fail = 1;
  __syncthreads();
  if (s_fail) return;
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    // The ranks holding a valid slot of t, ascending (every thread computes the same short list).
    int ranks[kMaxTopk];
    int nr = 0;
    for (int k = 0; k < K; ++k) {
      const int e = dev::load_topk_id_checked(n.comm, Phase::kLlCombineRecv, p.topk_idx, p.idx_int32,
                                              static_cast<size_t>(t) * K + k, K, E);
      if (e < 0) continue;
      const int d = e / El;
      int pos = nr;
      bool seen = false;
      for (int q = 0; q < nr; ++q) seen |= ranks[q] == d;
      if (seen) continue;
      while (pos > 0 && ranks[pos - 1] > d) {
        ranks[pos] = ranks[pos - 1];
        --pos;
      }
      ranks[pos] = d;
      ++nr;
    }
    for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
      float sum[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] = 0.0f;
      for (int q = 0; q < nr; ++q) {
        float f[8];
        dev::bf16x8_to_float(reinterpret_cast<const int4*>(half + L.comb_recv_row(ranks[q], t))[c], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum[e] = __fadd_rn(sum[e], f[e]);
      }
      reinterpret_cast<int4*>(p.out + static_cast<size_t>(t) * H)[c] = dev::float8_to_bf16x8(sum);
    }
  }
  if (!ll::arrive_last_block(&ctl->comb_recv_done, false)) return;
  if (threadIdx.x == 0) ctl->combine_epoch = tag;
  for (int d = threadIdx.x; d < R; d += blockDim.x) llnet::signal_peer(n, d, kNetCombAck, 1);
}

// Barrier over every rank (half 0's words): +1 on every rank's barrier[me], then wait for barrier[s] to reach this
// rank's pass count from every s. RC order on each QP puts the barrier's add after every earlier operation of the
// same pair, so no operation of an earlier call lands after the barrier.
__global__ void __launch_bounds__(kThreads) ll_net_barrier_kernel(const __grid_constant__ LlNetComm n) {
  __shared__ int s_fail;
  LlNetPersist* persist = reinterpret_cast<LlNetPersist*>(llnet::own_half(n) + n.layout.persist());
  const long long pass = persist->barrier_passes + 1;
  const int R = n.comm.num_ranks;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (!llnet::signal_peer(n, d, kNetBarrier, 1)) s_fail = 1;
  __syncthreads();
  if (s_fail) return;
  for (int s = threadIdx.x; s < R; s += blockDim.x) llnet::wait_signal(n, kNetBarrier, s, pass, Phase::kBarrier);
  __syncthreads();
  if (threadIdx.x == 0) persist->barrier_passes = pass;
}

int grid(const LlNetComm& n) { return n.num_blocks < 1 ? 1 : n.num_blocks; }

}  // namespace

cudaError_t launchLlNetCombineSend(const LlNetCombineArgs& a, cudaStream_t stream) {
  ll_net_combine_weights_kernel<<<1, kThreads, 0, stream>>>(a);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ll_net_combine_send_kernel<<<grid(a.net), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launchLlNetCombineRecv(const LlNetCombineArgs& a, cudaStream_t stream) {
  ll_net_combine_recv_kernel<<<grid(a.net), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launchLlNetBarrier(const LlNetComm& net, cudaStream_t stream) {
  ll_net_barrier_kernel<<<1, kThreads, 0, stream>>>(net);
  return cudaGetLastError();
}

cudaError_t loadLlNetCombineKernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, ll_net_combine_weights_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_net_combine_send_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_net_combine_recv_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_net_barrier_kernel);
  return e;
}

}  // namespace nccl_moe
