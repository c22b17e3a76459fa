// The small, trivially copyable view of a communicator that kernels receive by value. Host objects
// (src/core/comm.h) own the resources; kernels see only this.
//
// Peers come in two parts:
//   scaleup   the ranks of this rank's own node, by local index: their communication buffers as mapped here
//             (NVLink peer access, CUDA IPC, or the same GPU). Kernels store into them directly.
//   scaleout  the ranks of other nodes: reachable only through the scale-out transport, as QP handles plus the
//             peer's window key and base (src/transport/scaleout_table.h), never by pointer. Filled at init when
//             the communicator spans several nodes and NCCL_MOE_NET=emulated (the only backend so far;
//             src/transport/emulated/comm_transport.h); null otherwise.
// The intranode kernels (src/kernels/{intranode,low_latency}) run on single-node communicators, where the local
// index of a rank is its rank.
#pragma once

#include <cstdint>

#include "device/limits.h"

namespace nccl_moe {

struct ScaleoutPeer;  // src/transport/scaleout_table.h

// Where a bounded device wait was stuck when it expired. Stable numbers: they appear in error messages.
enum class Phase : int {
  kNone = 0,
  kBarrier = 1,
  kHtNotify = 2,
  kHtDispatch = 3,
  kHtCombine = 4,
  kLlDispatchRecv = 5,
  kLlCombineRecv = 6,
  // Scale-out transport (src/transport/rdma/ibgda/ibgda.cuh); the record's qpn names the QP.
  kNetReserve = 7,       // waiting for send-queue room (completions of older WQEs)
  kNetReady = 8,         // waiting for older reservations of the QP to be written (in-order ready index)
  kNetDoorbell = 9,      // waiting for the QP's doorbell / CQ lock
  kNetQuiet = 10,        // waiting for every submitted WQE to complete
  kNetCqe = 11,          // an error CQE was polled (code kErrNetCqe)
  kLayout = 12,          // the dispatch-layout kernel (an id outside [-1, E): kErrBadExpertId)
  kLlDispatchSend = 13,  // the LL dispatch send half (likewise)
  // Scale-out request proxy (src/transport/rdma/proxy/proxy.cuh); qpn names the QP the descriptor was for.
  kNetProxyCredit = 14,  // waiting for a ring slot (the proxy thread's consumed index)
  kNetProxyQuiet = 15,   // waiting for the proxy's completed index to pass a quiet
  // Internode high-throughput kernels (src/kernels/ht_net/); qpn names the rail QP where a signal travels on one.
  kHtNetNotify = 16,
  kHtNetDispatch = 17,
  kHtNetCombine = 18,
};
const char* phaseName(Phase phase);

// First device-side failure of a communicator, in host-mapped memory (written by the GPU with system-scope
// atomics, read by the host without synchronising). `code` goes 0 -> non-zero once; the other fields are
// written by the winner before it publishes `code` with release ordering.
struct ErrorRecord {
  int code;            // 0 none, 1 wait timeout, 3 capacity exceeded, 4 error CQE, 5 bad top-k id, 6 proxy (ErrorCode)
  int phase;           // Phase
  int rank;            // rank that observed the failure
  int peer;            // peer it was waiting for (-1 = none/local)
  long long counter;   // value seen last
  long long expected;  // value waited for
  int qpn;             // scale-out phases: the QP's number (-1 = not a QP wait)
  int detail;          // kNetQuiet: the announced index; kErrNetCqe: syndrome | vendor syndrome << 8 | opcode << 16;
                       // kErrNetProxy: the ring's ProxyError; kNetProxyQuiet timeouts: the consumed index
  long long value;     // kErrBadExpertId: the id found (counter: its token, expected: its slot)
};

// kErrNetProxy: the request proxy's ring reported a failure (its error word, a ProxyError, in `detail`).
enum ErrorCode : int {
  kErrNone = 0,
  kErrTimeout = 1,
  kErrCapacity = 3,
  kErrNetCqe = 4,
  kErrBadExpertId = 5,
  kErrNetProxy = 6,
};

// The ranks of this rank's node.
struct ScaleupPeers {
  int local_rank;       // this rank's index on its node
  int num_local_ranks;  // ranks of the node
  // Base of every local rank's communication buffer as mapped in this process (own included). Offsets inside
  // come from BufferLayout (src/mem/buffer_layout.h) only.
  uint8_t* buffer[kMaxNvlPeers];
};

// The ranks of other nodes (the scale-out transport's part).
struct ScaleoutPeers {
  int node;                   // this rank's node
  int num_nodes;              // nodes of the communicator
  const ScaleoutPeer* peers;  // device memory, [num_ranks] by peer rank (valid entries: other nodes); null when
                              // the communicator has one node
};

struct DeviceComm {
  int rank;
  int num_ranks;
  ScaleupPeers scaleup;
  ScaleoutPeers scaleout;
  ErrorRecord* error;   // host-mapped, this rank's record
  uint64_t timeout_ns;  // bound of every device wait (NCCL_MOE_TIMEOUT_S)
  // Rank masks (config.enable_rank_masks): [num_ranks] int32 in this rank's device memory, 1 = the rank is masked
  // (an LL wait on it timed out, or ncclMoeSetRankMask). Null when masks are off: the LL kernels then run their
  // variant without any mask code (src/kernels/low_latency/masks.cuh).
  int* rank_mask;
};

}  // namespace nccl_moe
