// The peer side of the transport's failure tests (transport_litmus_test.cu: SQ overrun, transport_proxy_test.cu: ring
// overrun): a one-thread kernel that waits, bounded by a short timeout, for a signal the failed QP (or ring) would
// have carried and, when it does not come, records a timeout naming the sender and the QP in its own rank's record,
// as a library kernel waiting on a rank of another node does (nothing in the transport tells the peer: RC has no
// such message). What the tests can assert of it is that the timeout happened and the signal never moved; the
// naming fields are the arguments given here.
#pragma once

#include <cstdint>

#include "device/device_comm.h"
#include "device/ptx.cuh"
#include "device/wait.cuh"

namespace nccl_moe::transport_test {

struct PeerWaitArgs {
  const uint64_t* sig;  // the signal word of the waiting rank
  uint64_t target;      // what the signal would reach
  uint64_t timeout_ns;
  ErrorRecord* rec;  // the waiting rank's record
  int rank;          // the waiting rank
  int peer;          // the sender
  int qpn;           // the QP the signal would travel on
};

static __global__ void peerWaitKernel(PeerWaitArgs a) {
  const uint64_t start = dev::globaltimer_ns();
  for (uint32_t spins = 0;; ++spins) {
    const uint64_t seen = dev::ld_acquire_sys(a.sig);
    if (seen >= a.target) return;
    if ((spins & 255u) == 255u && dev::globaltimer_ns() - start > a.timeout_ns) {
      dev::record_error_at(a.rec, a.rank, kErrTimeout, Phase::kNone, a.peer, static_cast<long long>(seen),
                           static_cast<long long>(a.target), a.qpn);
      return;
    }
  }
}

}  // namespace nccl_moe::transport_test
