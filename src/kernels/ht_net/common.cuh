// Device helpers of the internode HT kernels: where this rank's and its node's regions are, how bytes and signals
// reach a rank of this node (stores and release atomics through NVLink pointers) or of another node (RDMA WRITE and
// fetch-add on that rank's QP, in the communicator's mode: src/transport/scaleout.cuh), bounded waits that name phase,
// peer and QP, and the per-kernel bookkeeping (epochs, tags, the last block). Nothing here dereferences another node's
// memory.
//
// Epochs and tags (nothing is ever reset, so CUDA-graph replays and back-to-back calls need no host state):
//   e      the HT epoch of a dispatch or combine: HtSync.epoch of this rank + 1 in every kernel of the call; the
//          call's first kernel announces arrive[this local index] = e at every rank of the node, its last kernel
//          stores epoch = e. A kernel writes into local rank g's HT slots only after arrive[g] >= e (g finished
//          its previous call, which read them), and publishes each row with row_flag = e (release).
//   tag    the call count of its kind + 1 (HtNetControl): notify, dispatch and combine signals are cumulative.
#pragma once

#include <cstdint>

#include "device/ptx.cuh"
#include "device/routing.cuh"
#include "device/wait.cuh"
#include "kernels/ht_net/args.h"
#include "transport/scaleout.cuh"

namespace nccl_moe {
namespace htnet {

constexpr int kWarps = kHtNetThreads / 32;
constexpr int kSet = rdma::kQpSetHighThroughput;  // the QP set every internode HT put and signal goes on
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ int warp_index() { return static_cast<int>(threadIdx.x) / 32; }
__device__ __forceinline__ int lane() { return static_cast<int>(threadIdx.x) % 32; }
// Work items are dealt round-robin over every warp of the grid.
__device__ __forceinline__ int grid_warp() { return static_cast<int>(blockIdx.x) * kWarps + warp_index(); }
__device__ __forceinline__ int grid_warps() { return static_cast<int>(gridDim.x) * kWarps; }

__device__ __forceinline__ bool is_local(const HtNetComm& n, int rank) { return n.node_of[rank] == n.node; }
__device__ __forceinline__ int rank_at(const HtNetComm& n, int node, int local) {
  return n.rank_at[node * n.ranks_per_node + local];
}
// The rail peer of slot j (same local index on node slot_node(j)), and this rank's slot as that peer sees it.
__device__ __forceinline__ int rail_peer(const HtNetComm& n, int slot) {
  return rank_at(n, HtNetLayout::slot_node(slot, n.node), n.local);
}
__device__ __forceinline__ int slot_at_peer(const HtNetComm& n, int slot) {
  return HtNetLayout::peer_slot(n.node, HtNetLayout::slot_node(slot, n.node));
}

// Regions as mapped in this process: local rank g's HT region and HT net region (g = n.local: this rank's).
__device__ __forceinline__ uint8_t* ht_region(const HtNetComm& n, int g) {
  return n.comm.scaleup.buffer[g] + n.ht_offset;
}
__device__ __forceinline__ uint8_t* net_region(const HtNetComm& n, int g) {
  return n.comm.scaleup.buffer[g] + n.net_offset;
}
__device__ __forceinline__ uint8_t* own_net(const HtNetComm& n) { return net_region(n, n.local); }
__device__ __forceinline__ HtSync* sync(const HtNetComm& n, int g) {
  return reinterpret_cast<HtSync*>(ht_region(n, g) + n.ht.sync());
}
__device__ __forceinline__ HtNetControl* control(const HtNetComm& n) {
  return reinterpret_cast<HtNetControl*>(own_net(n) + n.net.control());
}
__device__ __forceinline__ long long* own_signal(const HtNetComm& n, int kind, int slot) {
  return reinterpret_cast<long long*>(own_net(n) + n.net.signal(kind, slot));
}
__device__ __forceinline__ long long* own_counter(const HtNetComm& n, int kind, int slot) {
  return reinterpret_cast<long long*>(own_net(n) + n.net.counter(kind, slot));
}
__device__ __forceinline__ long long* own_notify_word(const HtNetComm& n, int kind, int rank) {
  return reinterpret_cast<long long*>(own_net(n) + n.net.notify_word(kind, rank));
}
// Row slot helpers of local rank g's HT region (src/mem/ht_layout.h): slot `src` (a source rank in dispatch, a
// combine slot node * G + holder in combine), row `pos`.
__device__ __forceinline__ long long* row_flag(const HtNetComm& n, int g, int src, int pos) {
  return reinterpret_cast<long long*>(ht_region(n, g) + n.ht.row_flag(src, pos));
}
__device__ __forceinline__ uint8_t* row_x(const HtNetComm& n, int g, int src, int pos, size_t row_bytes) {
  return ht_region(n, g) + n.ht.x(src, pos, row_bytes);
}
__device__ __forceinline__ int* row_meta(const HtNetComm& n, int g, int src, int pos) {
  return reinterpret_cast<int*>(ht_region(n, g) + n.ht.meta(src, pos));
}

// Buffer offsets a QP uses (src/transport/scaleout.cuh): this rank's byte p (inside its own buffer); byte `off` of
// the HT net region.
__device__ __forceinline__ uint64_t own_offset(const HtNetComm& n, const void* p) {
  return static_cast<uint64_t>(static_cast<const uint8_t*>(p) - n.comm.scaleup.buffer[n.comm.scaleup.local_rank]);
}
__device__ __forceinline__ uint64_t net_off(const HtNetComm& n, size_t off) { return n.net_offset + off; }
__device__ __forceinline__ const ScaleoutPeer& remote(const HtNetComm& n, int rank) {
  return n.comm.scaleout.peers[rank];
}
__device__ __forceinline__ int qpn_of(const HtNetComm& n, int rank) {
  return is_local(n, rank) ? -1 : net::qpn(remote(n, rank), kSet);
}

// One thread: WRITE `bytes` from this rank's `src` to byte `off` of the HT net region of `rank` (another node),
// then `add` on that rank's word at `signal_off`, on one QP (RC order: the add is performed after the data is
// placed). False when the QP failed (recorded).
__device__ __forceinline__ bool put_signal(const HtNetComm& n, int rank, const void* src, size_t off, size_t bytes,
                                           size_t signal_off, long long add) {
  const ScaleoutPeer& p = remote(n, rank);
  if (bytes == 0) return net::signal(p, net_off(n, signal_off), static_cast<uint64_t>(add), kSet);
  return net::put_signal(p, n.own_base, own_offset(n, src), net_off(n, off), static_cast<uint32_t>(bytes),
                         net_off(n, signal_off), static_cast<uint64_t>(add), kSet);
}

// One thread: `add` on the word at byte `off` of `rank`'s HT net region, after this rank's earlier writes to it (the
// caller fenced its block's stores): a release atomic through NVLink, or a fetch-add on the QP.
__device__ __forceinline__ bool add_word(const HtNetComm& n, int rank, size_t off, long long add) {
  if (is_local(n, rank)) {
    dev::fence_acq_rel_sys();
    dev::red_add_release_sys(reinterpret_cast<long long*>(net_region(n, n.local_of[rank]) + off), add);
    return true;
  }
  return net::signal(remote(n, rank), net_off(n, off), static_cast<uint64_t>(add), kSet);
}

// One thread: waits (bounded, acquire) until *word >= target; a timeout names the phase, the peer that writes the
// word and, when it is on another node, the QP (the word kind in `detail`).
__device__ __forceinline__ bool wait_word(const HtNetComm& n, const long long* word, long long target, Phase phase,
                                          int peer, int kind) {
  return dev::wait_geq(n.comm, word, target, phase, peer, 0, peer >= 0 ? qpn_of(n, peer) : -1, kind);
}

// Lane 0 waits, the warp gets the result; the warp barrier orders every lane's later loads after the acquire.
__device__ __forceinline__ bool warp_wait(const HtNetComm& n, const long long* word, long long target, Phase phase,
                                          int peer, int kind) {
  int ok = 1;
  if (lane() == 0) ok = wait_word(n, word, target, phase, peer, kind) ? 1 : 0;
  ok = __shfl_sync(kFull, ok, 0);
  __syncwarp();
  return ok != 0;
}
// Publishes a row: the warp's stores above, then lane 0's release store of the flag.
__device__ __forceinline__ void warp_publish(long long* flag, long long epoch) {
  __syncwarp();
  if (lane() == 0) dev::st_release_sys(flag, epoch);
}
// Warp copy of `bytes` (a multiple of 16).
__device__ __forceinline__ void warp_copy(void* dst, const void* src, size_t bytes) {
  const int4* s = static_cast<const int4*>(src);
  int4* d = static_cast<int4*>(dst);
  for (size_t i = lane(); i < bytes / 16; i += 32) dev::st_na_v4(d + i, dev::ld_v4(s + i));
}

// Block-wide: the call's HT epoch (this rank's last + 1).
__device__ __forceinline__ long long call_epoch(const HtNetComm& n) {
  __shared__ long long s_epoch;
  if (threadIdx.x == 0) s_epoch = *reinterpret_cast<volatile long long*>(&sync(n, n.local)->epoch) + 1;
  __syncthreads();
  return s_epoch;
}
// Block 0 of a call's first kernel: announce arrival at every rank of the node.
__device__ __forceinline__ void announce_arrival(const HtNetComm& n, long long epoch) {
  if (blockIdx.x == 0 && threadIdx.x < static_cast<unsigned>(n.ranks_per_node))
    dev::st_release_sys(&sync(n, threadIdx.x)->arrive[n.local], epoch);
}
// Local rank g entered the call (its previous call, which read its slots, is over).
__device__ __forceinline__ bool warp_wait_arrival(const HtNetComm& n, int g, long long epoch, Phase phase) {
  return warp_wait(n, &sync(n, n.local)->arrive[g], epoch, phase, rank_at(n, n.node, g), -1);
}

// Block-wide, at the very end of a kernel: true in every thread of the last block to finish (its earlier blocks'
// writes are visible to it).
__device__ __forceinline__ bool last_block(const HtNetComm& n) {
  __shared__ int s_last;
  dev::fence_acq_rel_sys();
  __syncthreads();
  if (threadIdx.x == 0) {
    HtNetControl* c = control(n);
    const int done = atomicAdd(&c->blocks_done, 1);
    s_last = done == static_cast<int>(gridDim.x) - 1;
    if (s_last) {
      c->blocks_done = 0;
      __threadfence();
    }
  }
  __syncthreads();
  return s_last != 0;
}

// ---- Chunked RDMA WRITEs (docs/kernels-ht-internode.md §4.3) ----
//
// A send or reduce kernel moves each slot's records as chunks of kHtNetChunk records: one put_signal per chunk
// (the WRITE of its records, then +n on the peer's cumulative tail), so the peer starts on the first chunk while
// the rest are staged and in flight. Chunks are handed out with tickets (HtNetControl::ticket, in increasing order
// over slot, then chunk), so every chunk a warp waits behind belongs to a warp that is already running: the chain
// progresses however few blocks of the grid are resident. A tail is a count, so a slot's chunks must reach its QP in
// order: the warp of chunk c > 0 posts only once the counter `posted` of the slot reads (tag << 32) | c, then
// stores (tag << 32) | (c + 1). A chunk that could not be staged (a failed wait) sets kChunkFailed instead of posting;
// no later chunk of the call is posted then, so the peer never counts records that did not arrive (it times out
// naming this rank, whose error is recorded).
constexpr int kHtNetChunk = 16;
constexpr long long kChunkFailed = 1ll << 31;

struct Chunk {
  int slot, index, begin, end;  // records [begin, end) of `slot`
};

// Warp: takes the next ticket and finds its chunk over the slots' record counts (count_of(j)); false when every
// chunk is taken.
template <typename CountOf>
__device__ __forceinline__ bool warp_take_chunk(const HtNetComm& n, CountOf count_of, Chunk* out) {
  int t = 0;
  if (lane() == 0) t = atomicAdd(&control(n)->ticket, 1);
  t = __shfl_sync(kFull, t, 0);
  for (int j = 0; j < n.net.num_slots; ++j) {
    const int count = count_of(j), chunks = (count + kHtNetChunk - 1) / kHtNetChunk;
    if (t < chunks) {
      out->slot = j;
      out->index = t;
      out->begin = t * kHtNetChunk;
      out->end = min(count, (t + 1) * kHtNetChunk);
      return true;
    }
    t -= chunks;
  }
  return false;
}

// Waits until the slot's counter `posted` reaches `mine` (its earlier chunks posted or failed). The chain ahead may be
// long behind a slow QP, so the bound restarts whenever the counter moves: it expires only after a whole timeout
// without progress, and then names the rail peer the slot posts to, its QP, and the chunk (detail).
__device__ inline bool wait_posted(const HtNetComm& n, const long long* posted, long long mine, Phase phase, int peer,
                                   int chunk) {
  long long seen = dev::ld_acquire_sys(posted);
  if (seen >= mine) return true;
  uint64_t start = dev::globaltimer_ns();
  uint32_t spins = 0;
  for (;;) {
    const long long now = dev::ld_acquire_sys(posted);
    if (now >= mine) return true;
    if (now != seen) {
      seen = now;
      start = dev::globaltimer_ns();
    }
    if ((++spins & 255u) == 0) {
      if (dev::error_recorded(n.comm)) return false;
      if (dev::globaltimer_ns() - start > n.comm.timeout_ns) {
        dev::record_error_at(n.comm.error, n.comm.rank, kErrTimeout, phase, peer, seen, mine, qpn_of(n, peer), chunk);
        return false;
      }
    }
  }
}

// Lane 0 of the warp that staged chunk `c` (its lanes' stores done; `staged` false when it could not be): waits for
// the slot's earlier chunks to be posted, then WRITEs the chunk's `bytes` from `src` to byte `dst_off` of the rail
// peer's HT net region and adds `count` to the peer's word `tail_off` (one put_signal), and advances `posted`.
__device__ __forceinline__ void post_chunk(const HtNetComm& n, long long* posted, long long tag, const Chunk& c,
                                           bool staged, const void* src, size_t dst_off, size_t bytes, size_t tail_off,
                                           Phase phase) {
  const int peer = rail_peer(n, c.slot);
  const long long mine = (tag << 32) | c.index;
  bool ok = staged;
  if (c.index > 0) {
    // The chunk before is posted (or failed: a failed chunk's value, (tag << 32) | kChunkFailed | its index, passes
    // this wait too); a wait that times out is recorded and fails the chain from here.
    if (!wait_posted(n, posted, mine, phase, peer, c.index))
      ok = false;
    else if ((dev::ld_acquire_sys(posted) & kChunkFailed) != 0)
      ok = false;
  }
  if (ok) {
    dev::fence_acq_rel_sys();  // the warp's staged stores (ordered before lane 0 by the caller's __syncwarp)
    ok = put_signal(n, peer, src, dst_off, bytes, tail_off, c.end - c.begin);
  }
  dev::st_release_sys(posted, ok ? mine + 1 : (mine | kChunkFailed));
}

// Local id on rank d of global expert e, or -1.
__device__ __forceinline__ int local_expert_on(int e, int d, int num_local_experts) {
  const int local = e - d * num_local_experts;
  return (e >= 0 && local >= 0 && local < num_local_experts) ? local : -1;
}

}  // namespace htnet
}  // namespace nccl_moe
