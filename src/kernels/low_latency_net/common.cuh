// Device helpers of the internode LL kernels: where a rank's net half is, and the two ways bytes and signals
// reach a peer -- stores and atomics through NVLink pointers for ranks of this node (the rank itself included),
// RDMA WRITE and fetch-add on the peer's QP for ranks of other nodes, in the communicator's mode
// (src/transport/scaleout.cuh), always on the low-latency QP set (kQpSet: its own QPs, service level and traffic
// class, NCCL_MOE_IB_LL_SL / NCCL_MOE_IB_LL_TC). Nothing here dereferences another node's memory: those ranks are
// (QP, buffer offset, rkey) only.
#pragma once

#include <cstdint>

#include "device/ptx.cuh"
#include "device/routing.cuh"
#include "device/wait.cuh"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency_net/args.h"
#include "transport/scaleout.cuh"

namespace nccl_moe {
namespace llnet {

constexpr int kThreads = 256;                   // threads per block of every internode LL kernel
constexpr int kQpSet = rdma::kQpSetLowLatency;  // the QP set every internode LL put and signal goes on

__device__ __forceinline__ bool is_local(const LlNetComm& n, int rank) { return n.local_index[rank] >= 0; }

// This rank's net half, and a same-node rank's, as mapped in this process.
__device__ __forceinline__ uint8_t* own_half(const LlNetComm& n) {
  return n.comm.scaleup.buffer[n.comm.scaleup.local_rank] + n.half_offset;
}
__device__ __forceinline__ uint8_t* local_half(const LlNetComm& n, int rank) {
  return n.comm.scaleup.buffer[n.local_index[rank]] + n.half_offset;
}
__device__ __forceinline__ LlNetControl* control(const LlNetComm& n) {
  return reinterpret_cast<LlNetControl*>(own_half(n) + n.layout.control());
}
// Signal word [kind][src] of this rank.
__device__ __forceinline__ long long* own_signal(const LlNetComm& n, int kind, int src) {
  return reinterpret_cast<long long*>(own_half(n) + n.layout.signal(kind, src));
}

__device__ __forceinline__ const ScaleoutPeer& remote(const LlNetComm& n, int rank) {
  return n.comm.scaleout.peers[rank];
}
// Buffer offsets a QP uses (src/transport/scaleout.cuh): this rank's byte `p` (a pointer into its own buffer); byte
// `off` of the net half.
__device__ __forceinline__ uint64_t own_offset(const LlNetComm& n, const void* p) {
  return static_cast<uint64_t>(static_cast<const uint8_t*>(p) - n.comm.scaleup.buffer[n.comm.scaleup.local_rank]);
}
__device__ __forceinline__ uint64_t half_off(const LlNetComm& n, size_t off) { return n.half_offset + off; }

// RDMA WRITE of `bytes` from this rank's buffer at `src` to byte `off` of `rank`'s net half (another node). One
// thread. False (error recorded on the QP's rank record) when the QP failed.
__device__ __forceinline__ bool put_remote(const LlNetComm& n, int rank, const void* src, size_t off, uint32_t bytes) {
  if (bytes == 0) return true;
  return net::put(remote(n, rank), n.own_base, own_offset(n, src), half_off(n, off), bytes, kQpSet);
}

// Adds `add` to signal word [kind][this rank] of `rank`, after every earlier write of this rank to it: a release
// atomic through NVLink (the caller fenced its block's stores), or a fetch-add on the QP, which RC orders after the
// QP's earlier WRITEs. One thread.
__device__ __forceinline__ bool signal_peer(const LlNetComm& n, int rank, int kind, long long add) {
  const size_t off = n.layout.signal(kind, n.comm.rank);
  if (is_local(n, rank)) {
    dev::fence_acq_rel_sys();
    dev::red_add_release_sys(reinterpret_cast<long long*>(local_half(n, rank) + off), add);
    return true;
  }
  return net::signal(remote(n, rank), half_off(n, off), static_cast<uint64_t>(add), kQpSet);
}

// WRITE of 8 bytes (`src`, in this rank's buffer) into `rank`'s word `kind`, then +1 on its signal word
// `signal_kind`, on one QP (the count and its signal). Local ranks: a release store then the release add.
__device__ __forceinline__ bool put_word_signal(const LlNetComm& n, int rank, const uint64_t* src, int kind,
                                                int signal_kind) {
  const int me = n.comm.rank;
  if (is_local(n, rank)) {
    long long* word = reinterpret_cast<long long*>(local_half(n, rank) + n.layout.signal(kind, me));
    dev::fence_acq_rel_sys();
    dev::st_release_sys(word, static_cast<long long>(*src));
    dev::red_add_release_sys(reinterpret_cast<long long*>(local_half(n, rank) + n.layout.signal(signal_kind, me)), 1ll);
    return true;
  }
  return net::put_signal(remote(n, rank), n.own_base, own_offset(n, src), half_off(n, n.layout.signal(kind, me)), 8,
                         half_off(n, n.layout.signal(signal_kind, me)), 1, kQpSet);
}

// Waits until this rank's signal [kind][src] >= target. A timeout names the phase, the source and, for a rank of
// another node, the QP the signal travels on (the signal kind in `detail`).
__device__ __forceinline__ bool wait_signal(const LlNetComm& n, int kind, int src, long long target, Phase phase) {
  const int qpn = is_local(n, src) ? -1 : net::qpn(remote(n, src), kQpSet);
  return dev::wait_geq(n.comm, static_cast<const long long*>(own_signal(n, kind, src)), target, phase, src, 0, qpn,
                       kind);
}

// Block-wide copy of `bytes` (a multiple of 16) from src to dst, 16 bytes a thread at a time.
__device__ __forceinline__ void block_copy16(void* dst, const void* src, size_t bytes) {
  const int4* s = static_cast<const int4*>(src);
  int4* d = static_cast<int4*>(dst);
  for (size_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
}

}  // namespace llnet
}  // namespace nccl_moe
