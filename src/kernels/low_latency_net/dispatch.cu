// Internode low-latency dispatch: ncclMoeLowLatencyDispatch on a communicator of several nodes.
//
// Results: those of the intranode LL dispatch (src/kernels/low_latency/dispatch.cu; docs/reference.md
// "Low-latency dispatch"), bit for bit: slab j of rank d holds the rows of (s, t, k) with expert d * E_l + j in the
// order s, t, k ascending; recv_count, cumulative stats, recv_src_info and recv_row as there; FP8 cast per 128
// channels with the same numerics (device/numerics.cuh).
//
// Protocol (docs/reference.md "over RDMA"; regions: src/mem/ll_net_layout.h), tag = the half's dispatch epoch + 1:
//   plan (1 block)  validates every id (outside [-1, E): a kErrBadExpertId error naming token and slot; the slot
//                   is then unused), and for each destination rank d numbers the tokens with a slot on d
//                   (ascending t): plan[t][k] = that position for the slots on d; counts[d] = n_d.
//   send (grid)     every block first waits for every destination's ack of tag - 1 (d finished reading this
//                   half's previous messages). Block b stages tokens t = b, b + grid, ...: header (token, global
//                   expert ids, weights) and payload (bf16 copy or FP8 cast), ONE message per token whatever its
//                   destinations; then sends it once per destination rank holding one of its slots, to message
//                   slot (this rank, position): through NVLink stores for ranks of this node, as one RDMA WRITE on
//                   the destination's QP otherwise. The last block to finish then sends every rank its count:
//                   WRITE of count_stage[d] into d.disp_count[me], then +1 on d.disp_signal[me] -- on the QP that
//                   carried the messages, posted after all of them, so RC order places the count after them
//                   (count_stage[d] = (tag << 32) | n_d is written there, after the acks: it is a WRITE's source).
//   recv (grid)     waits for disp_signal[s] >= tag of every source (acquire), THEN reads disp_count[s] and only
//                   the n_s messages it covers (no header scanning while data moves). Block b owns local experts
//                   j = b, b + grid, ...: for s ascending, messages in order, a block scan of the slots naming
//                   expert j gives every row's position; the block copies the rows (and the FP8 scales). The last
//                   block bumps the half's epoch and acks every source (+1 on s.disp_ack[me]).
// Every wait is bounded (timeouts name the phase, the peer and, across nodes, the QP). No kernel waits for another
// block of its own grid, and no kernel is resident while the bytes of a finished send half move.
#include <cuda_runtime.h>

#include "device/numerics.cuh"
#include "kernels/low_latency_net/common.cuh"

namespace nccl_moe {
namespace {

using llnet::kThreads;

// Global expert of slot i of the caller's top-k ids, -1 when unused; a bad id is recorded (dev::load_topk_id_checked).
__device__ __forceinline__ int expert_of(const LlNetDispatchArgs& p, size_t i) {
  return dev::load_topk_id_checked(p.net.comm, Phase::kLlDispatchSend, p.topk_idx, p.idx_int32, i, p.topk,
                                   p.num_experts);
}

__global__ void __launch_bounds__(kThreads) ll_net_dispatch_plan_kernel(const __grid_constant__ LlNetDispatchArgs p) {
  const LlNetComm& n = p.net;
  const LlNetLayout& L = n.layout;
  const int T = p.num_tokens, K = p.topk, R = n.comm.num_ranks, El = n.num_local_experts;
  uint8_t* half = llnet::own_half(n);
  int* plan = reinterpret_cast<int*>(half + L.plan());
  const long long tag = llnet::control(n)->dispatch_epoch + 1;
  for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
    (void)expert_of(p, static_cast<size_t>(i));  // records a bad id (token, slot) once, here, before anything moves
    plan[i] = -1;
  }
  __syncthreads();
  int* counts = plan + T * K;  // [R], after the positions; count_stage is written by the send kernel's last block
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    int count = 0;
    for (int t = 0; t < T; ++t) {
      bool here = false;
      for (int k = 0; k < K; ++k) {
        const int e = expert_of(p, static_cast<size_t>(t) * K + k);
        if (e >= 0 && e / El == d) {
          plan[t * K + k] = count;
          here = true;
        }
      }
      if (here) ++count;
    }
    counts[d] = count;
  }
}

// Stages token t's message at `msg`: header, then the bf16 row or its FP8 cast and scales. Whole block.
__device__ void stage_message(const LlNetDispatchArgs& p, int t, uint32_t tag, uint8_t* msg) {
  const int H = p.hidden, K = p.topk;
  LlNetHeader* hdr = reinterpret_cast<LlNetHeader*>(msg);
  if (threadIdx.x == 0) {
    hdr->tag = tag;
    hdr->token = t;
    hdr->topk = K;
    hdr->pad = 0;
  }
  if (threadIdx.x < kMaxTopk) {
    const int k = threadIdx.x;
    hdr->expert[k] = static_cast<int16_t>(k < K ? expert_of(p, static_cast<size_t>(t) * K + k) : -1);
    hdr->weight[k] = (k < K && p.topk_weights != nullptr) ? p.topk_weights[static_cast<size_t>(t) * K + k] : 0.0f;
  }
  const int4* xrow = reinterpret_cast<const int4*>(static_cast<const uint16_t*>(p.x) + static_cast<size_t>(t) * H);
  uint8_t* payload = msg + sizeof(LlNetHeader);
  if (!p.use_fp8) {
    int4* dst = reinterpret_cast<int4*>(payload);
    for (int c = threadIdx.x; c < H / 8; c += blockDim.x) dst[c] = dev::ld_nc_v4(xrow + c);
    return;
  }
  // FP8: 16 channels a lane, 8 lanes = one 128-channel group (warp-aligned chunks, so the group's lanes share a
  // warp for the amax shuffles).
  float* scales = reinterpret_cast<float*>(payload + H);
  const int n16 = H / 16, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int c0 = warp * 32; c0 < n16; c0 += blockDim.x) {
    const int c = c0 + lane;
    const bool active = c < n16;
    float f[16];
    float amax = 0.0f;
    if (active) {
      float fa[8], fb[8];
      dev::bf16x8_to_float(dev::ld_nc_v4(xrow + 2 * c), fa);
      dev::bf16x8_to_float(dev::ld_nc_v4(xrow + 2 * c + 1), fb);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        f[i] = fa[i];
        f[8 + i] = fb[i];
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    if (active) {
      const float scale = dev::fp8_group_scale(amax, p.scale_format);
      reinterpret_cast<int4*>(payload)[c] = dev::cast16_to_fp8(f, dev::fp8_inv_scale(scale));
      if ((lane & 7) == 0) scales[c / 8] = scale;
    }
  }
}

__global__ void __launch_bounds__(kThreads) ll_net_dispatch_send_kernel(const __grid_constant__ LlNetDispatchArgs p) {
  __shared__ int s_fail;
  __shared__ int s_dest[kMaxTopk];  // destination rank of slot k, -1 when unused or a repeat of an earlier slot's
  __shared__ int s_pos[kMaxTopk];
  const LlNetComm& n = p.net;
  const LlNetLayout& L = n.layout;
  const int T = p.num_tokens, K = p.topk, R = n.comm.num_ranks, El = n.num_local_experts, me = n.comm.rank;
  uint8_t* half = llnet::own_half(n);
  const long long tag = llnet::control(n)->dispatch_epoch + 1;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (!llnet::wait_signal(n, kNetDispAck, d, tag - 1, Phase::kLlDispatchSend)) s_fail = 1;
  __syncthreads();
  if (s_fail) return;
  const int* plan = reinterpret_cast<const int*>(half + L.plan());
  const size_t bytes = L.msg_used_bytes(p.use_fp8 != 0);
  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    uint8_t* msg = half + L.send_msg(t);
    stage_message(p, t, static_cast<uint32_t>(tag), msg);
    if (threadIdx.x < kMaxTopk) {
      const int k = threadIdx.x;
      int dest = -1, pos = -1;
      if (k < K && plan[t * K + k] >= 0) {
        pos = plan[t * K + k];
        dest = expert_of(p, static_cast<size_t>(t) * K + k) / El;
        for (int k2 = 0; k2 < k; ++k2)  // a rank gets the token once: the first slot on it sends
          if (plan[t * K + k2] >= 0 && expert_of(p, static_cast<size_t>(t) * K + k2) / El == dest) dest = -1;
      }
      s_dest[k] = dest;
      s_pos[k] = pos;
    }
    dev::fence_acq_rel_sys();  // the staged bytes before the WRITEs that read them
    __syncthreads();
    for (int k = 0; k < K; ++k) {
      const int d = s_dest[k];
      if (d < 0) continue;
      const size_t off = L.dispatch_msg(me, s_pos[k]);
      if (llnet::is_local(n, d)) {
        llnet::block_copy16(llnet::local_half(n, d) + off, msg, bytes);
      } else if (threadIdx.x == 0) {
        if (!llnet::put_remote(n, d, msg, off, static_cast<uint32_t>(bytes))) s_fail = 1;
      }
    }
    __syncthreads();
    if (s_fail) return;
  }
  if (!ll::arrive_last_block(&llnet::control(n)->send_done, true)) return;
  // count_stage[d] is the source of a WRITE: rewritten only here, after every block waited for d's ack of this
  // half's previous dispatch (so that dispatch's count WRITE was placed, its source read).
  uint64_t* count_stage = reinterpret_cast<uint64_t*>(half + L.count_stage(0));
  const int* counts = plan + T * K;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    count_stage[d] = (static_cast<uint64_t>(tag) << 32) | static_cast<uint32_t>(counts[d]);
    llnet::put_word_signal(n, d, count_stage + d, kNetDispCount, kNetDispSignal);
  }
}

// Block-wide exclusive scan of v (blockDim.x == kThreads); *total = the sum.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int s_warp[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int inc = ll::warp_inclusive_scan(v);
  if (lane == 31) s_warp[warp] = inc;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    if (w < warp) before += s_warp[w];
    sum += s_warp[w];
  }
  __syncthreads();
  *total = sum;
  return before + inc - v;
}

// Copies message `msg`'s payload into row `row` of expert j's slab (and its scales).
__device__ void copy_row(const LlNetDispatchArgs& p, int j, int row, const uint8_t* msg) {
  const int H = p.hidden;
  const size_t slab_row = static_cast<size_t>(j) * p.slab_rows + row;
  const uint8_t* payload = msg + sizeof(LlNetHeader);
  if (!p.use_fp8) {
    llnet::block_copy16(static_cast<uint8_t*>(p.recv_x) + slab_row * 2 * H, payload, 2 * static_cast<size_t>(H));
    return;
  }
  llnet::block_copy16(static_cast<uint8_t*>(p.recv_x) + slab_row * H, payload, static_cast<size_t>(H));
  const float* scales = reinterpret_cast<const float*>(payload + H);
  const int G = H / kScaleGroupElems;
  if (p.scale_format == 2) {  // packed UE8M0: word q = exponent bytes of groups 4q..4q+3 (absent groups: 0)
    const int P = (G + 3) / 4;
    uint32_t* srow = static_cast<uint32_t*>(p.recv_scales) + slab_row * P;
    for (int q = threadIdx.x; q < P; q += blockDim.x) {
      uint32_t e = 0;
      for (int b = 0; b < 4 && 4 * q + b < G; ++b) e |= dev::ue8m0_byte(scales[4 * q + b]) << (8 * b);
      srow[q] = e;
    }
  } else {
    float* srow = static_cast<float*>(p.recv_scales) + slab_row * G;
    for (int g = threadIdx.x; g < G; g += blockDim.x) srow[g] = scales[g];
  }
}

__global__ void __launch_bounds__(kThreads) ll_net_dispatch_recv_kernel(const __grid_constant__ LlNetDispatchArgs p) {
  __shared__ int s_fail;
  __shared__ int s_count[kMaxRanks];
  __shared__ int s_first[kThreads];
  __shared__ int s_rows[kThreads];
  const LlNetComm& n = p.net;
  const LlNetLayout& L = n.layout;
  const int R = n.comm.num_ranks, El = n.num_local_experts, me = n.comm.rank;
  uint8_t* half = llnet::own_half(n);
  LlNetControl* ctl = llnet::control(n);
  const long long tag = ctl->dispatch_epoch + 1;
  if (threadIdx.x == 0) s_fail = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    if (!llnet::wait_signal(n, kNetDispSignal, s, tag, Phase::kLlDispatchRecv)) {
      s_fail = 1;
      continue;
    }
    const uint64_t word = static_cast<uint64_t>(dev::ld_acquire_sys(llnet::own_signal(n, kNetDispCount, s)));
    const int count = static_cast<int>(word & 0xffffffffu);
    if ((word >> 32) != (static_cast<uint64_t>(tag) & 0xffffffffu)) {
      // The count of another dispatch arrived behind this one's signal: a protocol failure, never a guess.
      dev::record_error(n.comm, kErrTimeout, Phase::kLlDispatchRecv, s, static_cast<long long>(word >> 32), tag);
      s_fail = 1;
    } else if (count > L.tokens) {  // more messages than a source may send: never read past the region
      dev::record_error(n.comm, kErrCapacity, Phase::kLlDispatchRecv, s, count, L.tokens);
      s_fail = 1;
    }
    s_count[s] = count;
  }
  __syncthreads();
  if (s_fail) return;
  for (int j = blockIdx.x; j < El; j += gridDim.x) {
    const int expert = me * El + j;
    int base = 0;
    for (int s = 0; s < R; ++s) {
      const int count = s_count[s];
      for (int i0 = 0; i0 < count; i0 += kThreads) {
        const int i = i0 + threadIdx.x;
        const LlNetHeader* hdr =
            i < count ? reinterpret_cast<const LlNetHeader*>(half + L.dispatch_msg(s, i)) : nullptr;
        int rows = 0;
        // The call's K (every rank's call has the same), not the header's: a header never drives an index.
        if (hdr != nullptr && static_cast<unsigned>(hdr->token) < static_cast<unsigned>(L.tokens))
          for (int k = 0; k < p.topk; ++k) rows += hdr->expert[k] == expert;
        int total;
        const int first = base + block_exclusive_scan(rows, &total);
        if (rows > 0) {
          const int t = hdr->token;
          int r = first;
          for (int k = 0; k < p.topk; ++k) {
            if (hdr->expert[k] != expert) continue;
            p.recv_src_info[static_cast<size_t>(j) * p.slab_rows + r] = pack_src_info(s, t);
            p.recv_row[(static_cast<size_t>(s) * L.tokens + t) * L.topk + k] = r;
            ++r;
          }
        }
        s_first[threadIdx.x] = first;
        s_rows[threadIdx.x] = rows;
        __syncthreads();
        const int in_chunk = min(kThreads, count - i0);
        for (int m = 0; m < in_chunk; ++m) {
          const uint8_t* msg = half + L.dispatch_msg(s, i0 + m);
          for (int q = 0; q < s_rows[m]; ++q) copy_row(p, j, s_first[m] + q, msg);
        }
        __syncthreads();
        base += total;
      }
    }
    if (threadIdx.x == 0) {
      p.recv_count[j] = base;
      if (p.cumulative_stats != nullptr) p.cumulative_stats[j] += base;
    }
  }
  if (!ll::arrive_last_block(&ctl->recv_done, false)) return;
  if (threadIdx.x == 0) ctl->dispatch_epoch = tag;
  for (int s = threadIdx.x; s < R; s += blockDim.x) llnet::signal_peer(n, s, kNetDispAck, 1);
}

int grid(const LlNetComm& n) { return n.num_blocks < 1 ? 1 : n.num_blocks; }

}  // namespace

cudaError_t launchLlNetDispatchSend(const LlNetDispatchArgs& a, cudaStream_t stream) {
  ll_net_dispatch_plan_kernel<<<1, kThreads, 0, stream>>>(a);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  ll_net_dispatch_send_kernel<<<grid(a.net), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launchLlNetDispatchRecv(const LlNetDispatchArgs& a, cudaStream_t stream) {
  ll_net_dispatch_recv_kernel<<<grid(a.net), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadLlNetDispatchKernels() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, ll_net_dispatch_plan_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_net_dispatch_send_kernel);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, ll_net_dispatch_recv_kernel);
  return e;
}

}  // namespace nccl_moe
