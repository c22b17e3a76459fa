// What a kernel calls to reach a rank of another node: one entry of the scale-out table (scaleout_table.h) and
// byte offsets into this rank's and the peer's communication buffers (BufferLayout offsets), whatever the
// communicator's mode -- ibgda (the GPU writes the WQE and rings the doorbell: rdma/ibgda/ibgda.cuh) or proxy (the
// GPU writes a descriptor a CPU thread turns into WQEs: rdma/proxy/proxy.cuh). Both give the same guarantees: a
// put_signal's add is performed after its data is placed (RC order on the QP), operations of one QP are performed in
// posting order, and each call is made by ONE thread, any number of them concurrently. Each returns false on failure
// (recorded in the rank's ErrorRecord with the QP).
//
// QP sets: every call names the QP set it posts on (scaleout_table.h), last and required: the HT kernels pass
// rdma::kQpSetHighThroughput, the LL kernels rdma::kQpSetLowLatency (a forgotten set would put data and its signal on
// different QPs, which RC does not order). Operations of different sets are not ordered against each other
// (different QPs), even to one peer.
//
// Addresses: ibgda names memory by address in the registration (this rank's window starts at `own_base`, the peer's
// at entry.remote_base); proxy by (key, offset into the window). Data goes to entry.rkey, signals (fetch-adds) to
// entry.signal_rkey: on hardware the same bytes registered twice, relaxed ordering for data only. Both windows are
// whole communication buffers, so a buffer offset is a window offset.
#pragma once

#include <cstdint>

#include "transport/rdma/ibgda/ibgda.cuh"
#include "transport/rdma/proxy/proxy.cuh"
#include "transport/scaleout_table.h"

namespace nccl_moe::net {

// RDMA WRITE of `bytes` from byte `local_off` of this rank's buffer to byte `remote_off` of the peer's.
__device__ __forceinline__ bool put(const ScaleoutPeer& p, uint64_t own_base, uint64_t local_off, uint64_t remote_off,
                                    uint32_t bytes, int set) {
  if (p.via_proxy) return proxy::put(p.proxy[set], local_off, remote_off, p.rkey, bytes);
  return ibgda::put(p.qp[set], own_base + local_off, p.remote_base + remote_off, p.rkey, bytes);
}

// The peer's 64-bit word at byte `signal_off` of its buffer += add.
__device__ __forceinline__ bool signal(const ScaleoutPeer& p, uint64_t signal_off, uint64_t add, int set) {
  if (p.via_proxy) return proxy::signal(p.proxy[set], signal_off, p.signal_rkey, add);
  return ibgda::signal(p.qp[set], p.remote_base + signal_off, p.signal_rkey, add);
}

// put, then signal, on one QP: the add is performed after the data is placed.
__device__ __forceinline__ bool put_signal(const ScaleoutPeer& p, uint64_t own_base, uint64_t local_off,
                                           uint64_t remote_off, uint32_t bytes, uint64_t signal_off, uint64_t add,
                                           int set) {
  if (p.via_proxy)
    return proxy::put_signal(p.proxy[set], local_off, remote_off, p.rkey, bytes, signal_off, p.signal_rkey, add);
  return ibgda::put_signal(p.qp[set], own_base + local_off, p.remote_base + remote_off, p.rkey, bytes,
                           p.remote_base + signal_off, p.signal_rkey, add);
}

// The number of the set's QP, for the error records of waits on a signal this QP carries.
__device__ __forceinline__ int qpn(const ScaleoutPeer& p, int set) {
  return static_cast<int>(p.via_proxy ? p.proxy[set].qpn : p.qp[set].qpn);
}

}  // namespace nccl_moe::net
