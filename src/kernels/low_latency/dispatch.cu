// Low-latency dispatch (decode): ncclMoeLowLatencyDispatch.
//
// Computes, on every receiving rank d and for every local expert j of d:
//   recv_x[j][i] = row of token t of rank s, for the i-th (s, t, k) in the order (s ascending, t ascending,
//                  k ascending) among the valid slots whose expert is global expert d * E_l + j;
//   recv_count[j] = number of such slots; cumulative_stats[j] += recv_count[j] (optional);
//   with FP8 the row is cast in the kernel: per 128 channels scale = max(amax, 1e-4) / 448 (rounded up to a
//   power of two for pow2 / ue8m0), q = e4m3_satfinite_rne(x * (1 / scale)) -- bit-identical to ref::.
// and records in the handle recv_src_info[j][i] = (s << 24) | t and recv_row[s][t][k] = i (for combine).
//
// Regions (src/mem/ll_layout.h, one LL half chosen by the host (src/ops/ll.cc), alternating per dispatch):
//   sender s writes into each destination d: dispatch message slot (s, t) (header + payload + scales),
//   d.control.dispatch_flag[s] and d.control.dispatch_count[s]; receiver d writes back s.control.dispatch_ack[d]. With
//   args.topk_weights the header also carries the token's K weights (read by the combine's send half: no weight
//   exchange there).
//
// Deduplication: a token is sent ONCE per destination rank (its header lists the local expert of every slot
// that lives there); the receiver expands it into one row per (expert, slot). Bytes over NVLink per token
// and peer: 128 + H (fp8) + 4*H/128, or 128 + 2H (bf16); 128 (the header alone) to a peer holding none of its
// experts.
//
// Roles (grid = kBlocksPerSm blocks on every SM, kThreads per block):
//   send:  block b casts/copies tokens t = b, b + grid, ... (all threads on one row, 16 channels a thread for
//          fp8: 8 lanes = one 128-channel scale group; the row is loaded while warp 0 resolves the routing and
//          warp 1 waits for the peers' acks). Block 0 then stores d.dispatch_flag[s] = (tag << 32) | T into every
//          rank d. The token's header goes to EVERY rank (its slot words name the local experts there, all -1
//          where it has none); its payload and scales go to the ranks holding one of its experts (the header by
//          eight lanes, the fp8 scales staged in shared memory and stored by one warp per destination, in
//          whole 16-byte vectors). Each block with tokens (and block 0) then adds its arrival share to
//          d.dispatch_count[s] of every peer d with a release.
//   recv:  receive index b (receive_index: from the grid's last block in a Both kernel) owns local experts
//          j = b, b + grid, ...: waits for every source's token flag, scans the headers of all R * T_s slots
//          AS THEY ARRIVE (warp per 32-token segment, each lane polling its message's tagged slot words; the
//          slot masks stay in registers), block prefix, which gives every row's position in (s, t, k) order
//          (row -> message index kept in shared memory); only then waits for every source's count shares (the
//          rows complete), and warps copy the rows item by item (a row = its payload units and then its scale
//          units, 16 bytes each, in pieces of 32 x 8 for fp8 / 32 x 7 for bf16; all of a lane's loads in
//          flight) into the caller's slab. With at least two receive indices per local expert, indices
//          j + k * E_l (k < team) help j copy (receive_teams.h). Every receiving block adds its share to every
//          source's s.dispatch_ack[d] (relaxed) and to the half's dispatch epoch.
//
// Signalling: tag = control.dispatch_epoch + 1 of this half, read from device memory (so a captured graph
// stays valid across replays; every rank runs the same sequence of LL calls, so every rank's epoch of a half
// agrees). Every slot word of a header carries the tag and is a single-copy-atomic 64-bit element
// (LlMsgHeader), so a receiver may read a header while it is being written, and slots of earlier dispatches
// are recognised without clearing anything. Before writing into d, a sender waits for d's ack of tag - 1 (d
// finished reading the previous messages of this half). Every wait is bounded (wait.cuh; the header polls
// too); a failed wait leaves the kernel (its block does not arrive, so no later flag is published and peers
// fail in turn).
//
// Files: the send role is dispatch_send.cuh, the receive roles dispatch_recv.cuh (both share dispatch_roles.cuh);
// this file has the kernel (the split between roles, the arrival shares) and its launch.
//
// Launch constraints: H % 128 == 0 with fp8 (H % 8 == 0 for bf16), T <= tokens of the layout (<= 4096),
// K <= 16, E_l <= 32767. Phase split: the send half (do_send) returns after the last block's count-share adds;
// the receive half (do_recv) is a separate launch; phase Both runs both in one kernel.
#include <cuda_runtime.h>

#include "kernels/low_latency/args.h"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency/dispatch_recv.cuh"
#include "kernels/low_latency/dispatch_send.cuh"
#include "kernels/low_latency/receive_teams.h"
#include "kernels/low_latency/trace.h"

namespace nccl_moe {
namespace {

using namespace ll_dispatch;  // the roles (dispatch_send.cuh, dispatch_recv.cuh)

constexpr int kMaxSegments = kMaxNvlPeers * (4096 / 32);  // 32-token segments over all sources

// kMasks: the rank-mask variant (masks.cuh), launched when p.comm.rank_mask is set.
template <bool kFp8, bool kMasks>
__global__ void __launch_bounds__(ll::kThreads, ll::kBlocksPerSm)
    ll_dispatch_kernel(const __grid_constant__ LlDispatchArgs p) {
  __shared__ int s_tokens[kMaxNvlPeers];
  __shared__ int s_seg_first[kMaxNvlPeers + 1];
  __shared__ int s_seg_base[kMaxSegments];
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int me = p.comm.rank, R = p.comm.num_ranks;
  uint8_t* my_half = ll::half_of(p.comm, me, p.half_offset);
  LlControl* ctrl = ll::control(L, my_half);
  trace_at(p, kLlTraceEntry);
  if (p.trace != nullptr && tid == 0) {
    p.trace[static_cast<size_t>(blockIdx.x) * kLlTracePoints + kLlTraceSm] = dev::sm_id();
  }
  // The epoch counts receive blocks' arrival shares; a block of an earlier receive kernel that has not added
  // its share yet leaves it below the next multiple, and a kernel reads it before its own blocks add theirs.
  // Thread 0 loads it for the block: every warp of every block loading the same word queued at one L2 slice
  // (~4000 requests; the trace had the median block's epoch 1 us after the kernel's start).
  __shared__ long long s_epoch;
  __shared__ uint32_t s_live;  // kMasks: the active ranks as this block last read them
  if (tid == 0) {
    s_epoch = *reinterpret_cast<volatile long long*>(&ctrl->dispatch_epoch);
    if constexpr (kMasks) s_live = ll::live_ranks(p.comm);
  }
  __syncthreads();
  const long long epoch_tag = s_epoch / kLlArrivalUnits + 1;
  const int tag = static_cast<int>(epoch_tag);
  trace_at(p, kLlTraceTag);

  if (p.do_send) {
    // Peers must have consumed what this rank sent them in the previous dispatch on this half before it is
    // overwritten: the first token of a block waits for that inside send_token (overlapped with its loads).
    // Only blocks with tokens arrive, and block 0 always (it also rewrites the peers' dispatch_flag[me], so it
    // waits here when it has no token; so do the token-less blocks of a Both kernel, on their way to the
    // receive part). Token-less blocks of a send-only kernel return at once.
    if (static_cast<int>(blockIdx.x) >= p.num_tokens) {
      if (blockIdx.x > 0 && !p.do_recv) return;
      bool ok = true;
      if constexpr (kMasks) {
        if (tid < R && ll::is_live(s_live, tid))
          ok = dev::wait_geq_or_mask(p.comm, &ctrl->dispatch_ack[tid], (epoch_tag - 1) * kLlArrivalUnits,
                                     Phase::kLlDispatchRecv, tid) != dev::kWaitFailed;
        if (__syncthreads_or(!ok)) return;
        if (tid == 0) s_live = ll::live_ranks(p.comm);
        __syncthreads();
      } else {
        if (tid < R)
          ok = dev::wait_geq(p.comm, &ctrl->dispatch_ack[tid], (epoch_tag - 1) * kLlArrivalUnits,
                             Phase::kLlDispatchRecv, tid);
        if (__syncthreads_or(!ok)) return;
      }
    }
    for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
      const bool first = t == static_cast<int>(blockIdx.x);
      if (!send_token<kFp8, kMasks>(p, t, tag, first ? ctrl->dispatch_ack : nullptr, epoch_tag - 1, &s_live)) return;
    }
    // Per-block arrival at every peer: the release add (after the block barrier) publishes this block's
    // stores; no grid-wide counter, no last block. Block 0 without tokens stores the count (0) before its add.
    const int b = blockIdx.x, grid = gridDim.x;
    if (b < p.num_tokens || b == 0) {
      const int senders = p.num_tokens < grid ? (p.num_tokens > 0 ? p.num_tokens : 1) : grid;
      trace_at(p, kLlTraceSendStored);
      __syncthreads();
      if (tid < R && (!kMasks || ll::is_live(s_live, tid))) {
        LlControl* peer_ctrl = ll::control(L, ll::half_of(p.comm, tid, p.half_offset));
        if (b == 0 && p.num_tokens == 0)  // (with tokens, send_token published it before the rows)
          peer_ctrl->dispatch_flag[me] = epoch_tag << 32;
        dev::red_add_release_sys(&peer_ctrl->dispatch_count[me], ll::arrival_share(b, senders));
      }
      trace_at(p, kLlTraceSendArrived);
    }
  }

  if (p.do_recv) {
    const int b = receive_index(p), grid = gridDim.x;
    // Receive indices b (receive_index) with local experts wait, expand and arrive (index 0 arrives even without
    // experts); the others return at once.
    const int E_l = L.num_local_experts;
    // Receive teams (receive_teams.h): on 4 ranks only 72 of 264 blocks received, with up to ~25 rows each.
    const ll::ReceiveTeams rt = ll::receive_teams(E_l, grid);
    const int team = rt.team, receivers = rt.receivers;
    if (b >= receivers) return;
    if (team > 1 && b >= E_l) {
      // A team member: waits for block j's placement, then copies its share of expert j's rows.
      __shared__ int s_rows;
      const int member = b / E_l, j = b - member * E_l;
      if (tid == 0) {
        const long long* word = ll::expert_ready(L, my_half, j);
        // Long by construction (the peers' data, then block j's scan and placement): polls every ~200 ns. With
        // masks, block j may first spend a timeout on each source it ends up masking.
        const bool ok =
            kMasks ? dev::wait_geq_local_scaled(p.comm, word, epoch_tag << 32, Phase::kLlDispatchRecv, 200u, R + 2)
                   : dev::wait_geq(p.comm, word, epoch_tag << 32, Phase::kLlDispatchRecv, -1, 200u);
        s_rows = ok ? static_cast<int>(dev::ld_relaxed_sys(word) & 0xffffffffll) : -1;
      }
      __syncthreads();
      if (s_rows < 0) return;
      copy_rows<kFp8>(p, my_half, j, s_rows, member * ll::kWarps + warp, team * ll::kWarps, nullptr);
    } else if (b < E_l) {
      // Every source's token count (block 0 of the source publishes it before its rows, so it is this
      // dispatch's once its tag is there). recv_expert scans the headers as they arrive and waits for the
      // sources' count shares (the rows complete) only before its copy.
      // Warp 1 meanwhile looks (acquire) whether the rows are complete already, as for a receive-only kernel
      // after its send half: then recv_expert does not wait for them a second time.
      __shared__ int s_rows_here;
      bool ok = true;
      if (warp == 0 && lane < R) {
        if constexpr (kMasks) {
          // A source masked before or during this wait is left out: s_tokens = -1 (no headers, no rows awaited).
          const int w = ll::is_live(s_live, lane) ? dev::wait_geq_or_mask(p.comm, &ctrl->dispatch_flag[lane],
                                                                          epoch_tag << 32, Phase::kLlDispatchRecv, lane)
                                                  : dev::kWaitMasked;
          ok = w != dev::kWaitFailed;
          const int tokens = static_cast<int>(dev::ld_relaxed_sys(&ctrl->dispatch_flag[lane]) & 0xffffffffll);
          s_tokens[lane] = w != dev::kWaitArrived ? -1 : (tokens < L.tokens ? tokens : L.tokens);
        } else {
          ok = dev::wait_geq(p.comm, &ctrl->dispatch_flag[lane], epoch_tag << 32, Phase::kLlDispatchRecv, lane);
          const int tokens = static_cast<int>(dev::ld_relaxed_sys(&ctrl->dispatch_flag[lane]) & 0xffffffffll);
          s_tokens[lane] = tokens < L.tokens ? tokens : L.tokens;
        }
      } else if (warp == 1) {
        const bool here = lane >= R || dev::ld_acquire_sys(&ctrl->dispatch_count[lane]) >= epoch_tag * kLlArrivalUnits;
        const bool all_here = __all_sync(0xffffffffu, here);
        if (lane == 0) s_rows_here = all_here;
      }
      if (__syncthreads_or(!ok)) return;
      // (s_tokens[s] = -1, a masked source, gives (-1 + 31) / 32 = 0 segments.)
      auto segments = [&] {
        if (tid == 0) {
          int first = 0;
          for (int s = 0; s < R; ++s) {
            s_seg_first[s] = first;
            first += (s_tokens[s] + 31) / 32;
          }
          s_seg_first[R] = first;
        }
        __syncthreads();
        return s_seg_first[R];
      };
      int num_segments = segments();
      for (int j = b; j < L.num_local_experts; j += gridDim.x) {
        int got = recv_expert<kFp8, kMasks>(p, my_half, j, tag, team, s_rows_here != 0, s_tokens, s_seg_first,
                                            s_seg_base, num_segments);
        if constexpr (kMasks) {
          // A source was masked while this block waited for it: leave it out (from this expert on) and receive
          // again. Each round leaves out at least one more source (only unmasked sources are waited for), so this
          // ends after at most R - 1 rounds.
          while (got == kRecvRetry) {
            if (tid == 0)
              for (int s = 0; s < R; ++s)
                if (s != me && dev::rank_masked(p.comm, s)) s_tokens[s] = -1;
            __syncthreads();
            num_segments = segments();
            got = recv_expert<kFp8, kMasks>(p, my_half, j, tag, team, s_rows_here != 0, s_tokens, s_seg_first,
                                            s_seg_base, num_segments);
          }
        }
        if (got != kRecvOk) return;
      }
    }
    // Per-block arrival: the adds (after the block barrier) tell every source that this block is done reading
    // its messages. They are relaxed, not release: what they must follow is the block's READS of the messages,
    // and every one of those has returned its value before the barrier (each loaded value was handed to a store
    // issued before it), so a source's later overwrite cannot reach them. A release would also wait for the
    // block's ~50 KB of slab writes to complete at system scope, which nobody on the peers needs (the trace put
    // that wait at ~2-3 us at 128 tokens). The epoch share (local, relaxed) is read by later kernels only (a
    // kernel of this half that reads a partly added epoch still computes the right tag: the shares complete a
    // multiple of kLlArrivalUnits only when every receiving block has added).
    const long long share = ll::arrival_share(b, receivers);
    __syncthreads();
    if (tid < R && (!kMasks || tid == me || !dev::rank_masked(p.comm, tid))) {
      LlControl* peer_ctrl = ll::control(L, ll::half_of(p.comm, tid, p.half_offset));
      dev::red_add_relaxed_sys(&peer_ctrl->dispatch_ack[me], share);
    }
    if (tid == 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&ctrl->dispatch_epoch), static_cast<unsigned long long>(share));
    trace_at(p, kLlTraceExit);
  }
}

template <bool kFp8, bool kMasks>
void launchVariant(const LlDispatchArgs& a, cudaStream_t stream) {
  ll_dispatch_kernel<kFp8, kMasks><<<ll::grid_blocks<ll_dispatch_kernel<kFp8, kMasks>>(a.num_sms, a.max_blocks_per_sm),
                                     dim3(ll::kThreads), 0, stream>>>(a);
}

template <bool kFp8, bool kMasks>
cudaError_t loadVariant() {
  // grid_blocks' occupancy query loads the kernel and fixes its cached blocks per SM.
  (void)ll::grid_blocks<ll_dispatch_kernel<kFp8, kMasks>>(1, 0);
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, ll_dispatch_kernel<kFp8, kMasks>);
}

}  // namespace

cudaError_t launchLlDispatch(const LlDispatchArgs& a, cudaStream_t stream) {
  const bool masks = a.comm.rank_mask != nullptr;
  if (a.use_fp8)
    masks ? launchVariant<true, true>(a, stream) : launchVariant<true, false>(a, stream);
  else
    masks ? launchVariant<false, true>(a, stream) : launchVariant<false, false>(a, stream);
  return cudaGetLastError();
}

cudaError_t loadLlDispatchKernels() {
  cudaError_t e = loadVariant<true, false>();
  if (e == cudaSuccess) e = loadVariant<false, false>();
  if (e == cudaSuccess) e = loadVariant<true, true>();
  if (e == cudaSuccess) e = loadVariant<false, true>();
  return e;
}

}  // namespace nccl_moe
