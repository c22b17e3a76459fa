// One RC QP as the GPU drives it (IBGDA, design notes §2.3-§2.4): a trivially copyable view kernels receive by
// value, and the host code that builds and checks it. The device functions that post on it are ibgda.cuh.
//
// Where things live:
//   sq, cq          the send queue (wqe_cnt WQEBBs) and its CQ (cqe_cnt CQEs). Software NIC: pinned host memory
//                   mapped into the GPU (src/transport/emulated/gpu_queues.h); hardware: GPU or host memory the
//                   verbs layer exports.
//   sq_dbrec        the QP's doorbell record (word kSendDbrIndex = BE32(pi & 0xffff))
//   doorbell        the 8-byte doorbell register: the software NIC's mailbox word, or the UAR on hardware
//   cq_dbrec        the CQ's doorbell record (word kCqSetCiDbrIndex = BE32(ci))
//   state           device memory owned by the GPU side only (GpuQpState): the producer indices, the CQ consumer
//                   index, a lock, and the 8-byte word that receives fetch-add results (registered, result_lkey).
//
// Every WQE the GPU posts asks for a CQE (the last WQEBB of each operation is signaled), so a CQ of at least
// wqe_cnt entries never overruns and completed() advances without an extra NOP; quiet waits for the CQE of the
// last submitted WQE.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "device/device_comm.h"

namespace nccl_moe::ibgda {

// Free-running 32-bit WQEBB indices (mlx5/ring.h). Invariants: completed <= announced <= ready <= reserved
// (mod 2^32, within wqe_cnt of each other).
struct GpuQpState {
  uint32_t reserved;   // next WQEBB to hand out (atomicAdd)
  uint32_t ready;      // WQEBBs < ready are written (advanced in reservation order, CAS)
  uint32_t announced;  // WQEBBs < announced were published by a doorbell (under lock)
  uint32_t completed;  // WQEBBs < completed are complete (CQ poll, under lock)
  uint32_t cq_ci;      // CQ consumer index (under lock)
  uint32_t lock;       // 0 free, 1 held: doorbell and CQ poll
  uint32_t failed;     // 1 once an error CQE or a timeout was seen on this QP: later calls fail at once
  uint32_t pad;
  uint64_t atomic_result;  // receives the previous value of every fetch-add posted on this QP (never read)
};
static_assert(offsetof(GpuQpState, atomic_result) % 8 == 0, "the fetch-add result word must be 8-byte aligned");

struct GpuQp {
  uint8_t* sq;
  uint32_t wqe_cnt;
  uint32_t qpn;
  uint32_t* sq_dbrec;
  uint64_t* doorbell;
  uint8_t* cq;
  uint32_t cqe_cnt;
  uint32_t lkey;  // the source window every put gathers from
  uint32_t* cq_dbrec;
  GpuQpState* state;     // device memory, zeroed at creation
  uint32_t result_lkey;  // lkey of a window containing state->atomic_result (local write)
  int rank;              // this rank and the QP's peer: what an error record names
  int peer;
  uint64_t timeout_ns;  // bound of every wait on this QP
  ErrorRecord* error;   // host-mapped record the device writes on failure (device_comm.h)
};

// What the host gathers to build a view: the queue memory as the GPU addresses it, and the connection.
struct GpuQpQueues {
  uint8_t* sq = nullptr;
  uint32_t wqe_cnt = 0;
  uint32_t* sq_dbrec = nullptr;
  uint64_t* doorbell = nullptr;
  uint8_t* cq = nullptr;
  uint32_t cqe_cnt = 0;
  uint32_t* cq_dbrec = nullptr;
  GpuQpState* state = nullptr;
};
struct GpuQpBinding {
  uint32_t qpn = 0;
  uint32_t src_lkey = 0;
  uint32_t result_lkey = 0;
  int rank = -1;
  int peer = -1;
  uint64_t timeout_ns = 0;
  ErrorRecord* error = nullptr;  // device address of the record
};

// Builds the view; returns "" or what is wrong (null pointers, wqe_cnt or cqe_cnt not a power of two in range,
// cqe_cnt < wqe_cnt (the CQ could overrun: every WQE is signaled), a QPN beyond 24 bits, a zero timeout).
std::string buildGpuQp(const GpuQpQueues& queues, const GpuQpBinding& binding, GpuQp* out);

// The message of a scale-out ErrorRecord (phases kNet*; other phases get a generic line): phase, rank, peer, QP,
// the indices or the CQE syndrome. `timeout_ns` is the bound the waits used (for the message only).
std::string describeNetError(const ErrorRecord& record, uint64_t timeout_ns);

}  // namespace nccl_moe::ibgda
