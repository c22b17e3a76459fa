// The software NIC: executes the mlx5 send WQEs a producer (GPU IBGDA code, the CPU proxy, a test) wrote into a
// send queue, with the semantics of an RC QP on a real NIC and, in chaos mode, the most adversarial behaviour those
// semantics allow. One SoftNic stands for one rank's NIC; memory moves through a MemoryBackend (memory_backend.h).
//
// Queues live in caller-provided memory, exactly as the producer sees a real QP (design notes §2.1-§2.4):
//   SQ        wqe_cnt WQEBBs; WQE at producer index pi sits at slot pi & (wqe_cnt - 1) (mlx5/ring.h)
//   DBR       dbrec[kSendDbrIndex] = BE32(pi & 0xffff) (written by the producer; reported, not trusted)
//   doorbell  the "UAR register": one 64-bit word the producer stores sq_doorbell_word(pi, qpn) to. The NIC
//             executes WQEs < the largest producer index a doorbell announced, and never reads a slot beyond it.
//   CQ        cqe_cnt 64-byte CQEs (mlx5/cqe.h), owner bit per lap, written with op_own last (release); the
//             consumer's dbrec[kCqSetCiDbrIndex] = BE32(ci) is read to detect a CQ overrun.
//
// RDMA semantics enforced (design notes §4.2; docs/transport.md "Software NIC"):
//   - in order within a QP: a WQE's effects never precede those of an earlier atomic, fenced or failed WQE; an
//     atomic executes only after every earlier WRITE of its QP is complete (backend complete()); a CQE is written
//     only when its WQE and every earlier one are complete, in WQE order.
//   - WRITEs between two such ordering points have no placement order, inside or between them (chaos: chunks in
//     random order, sometimes the last bytes first; each chunk's source read at a random earlier moment).
//   - no order across QPs, even to the same peer (chaos: random QP choice and stalls).
//   - unsignaled WQEs produce no CQE on success; the fence bit makes a WQE wait for all earlier ones.
//   - errors: the failing WQE gets an error CQE (signaled or not), the QP enters the error state and every later
//     WQE, already posted or posted afterwards, completes with a flush CQE (syndrome 0x05) and does nothing.
//     Causes: bad key, range outside the window, missing rights, misaligned atomic (window.h
//     check_window_access), a WQE whose index or QPN is not the slot's (stale slot: the producer index passed an
//     unwritten WQE), a malformed or unsupported WQE (mlx5/wqe_parse.h WqeDefect), an SQ overrun (a doorbell
//     announcing more than wqe_cnt WQEBBs beyond the oldest incomplete one), an unconnected QP.
//     The error CQE's vendor_err_synd byte is an EmuFault (below), so a test can tell the causes apart; the
//     full message (NIC, QP, WQE, cause, WQE bytes, chaos seed) is qpError().
//
// Execution: step() is one scheduling decision (deterministic: tests), start()/stop() run an executor thread
// that calls it with backoff when idle. Keys are checked when a WQE is fetched (right after its doorbell).
#pragma once

#include <nccl.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transport/emulated/chaos.h"
#include "transport/emulated/memory_backend.h"
#include "transport/rdma/mlx5/wqe_parse.h"
#include "transport/rdma/window.h"

namespace nccl_moe::emulated {

// vendor_err_synd of the software NIC's error CQEs (its own codes; a real NIC's vendor syndromes differ).
enum class EmuFault : uint8_t {
  kNone = 0,
  kBadLocalKey = 0x01,  // syndrome 0x04
  kLocalOutOfWindow,    // 0x04
  kLocalNoRights,       // 0x04
  kBadRemoteKey,        // 0x13
  kRemoteOutOfWindow,   // 0x13
  kRemoteNoRights,      // 0x13
  kMisalignedAtomic,    // 0x12
  kStaleWqe = 0x10,     // 0x02: the slot's WQE index is not the producer index (unwritten or old WQE)
  kWrongQpn,            // 0x02
  kMalformedWqe,        // 0x02
  kUnsupportedWqe,      // 0x02
  kSqOverrun,           // 0x02
  kNotConnected,        // 0x02
  kWqePastDoorbell,     // 0x02: a multi-WQEBB WQE reaches past the announced producer index
  kFlushed = 0x20,      // 0x05 flush CQEs
};
const char* emuFaultName(EmuFault f);

enum class QpState : uint8_t { kReady, kError };

struct CqConfig {
  uint8_t* buf = nullptr;  // cqe_cnt * 64 bytes, every op_own initialised to mlx5::kCqeInitialOpOwn
  uint32_t cqe_cnt = 0;
  const uint32_t* dbrec = nullptr;  // consumer's doorbell record (CI at kCqSetCiDbrIndex); null: no overrun check
  bool overrun_ignore = false;      // never check for overrun (collapsed CQ: cqe_cnt 1)
};

struct QpConfig {
  uint8_t* sq_buf = nullptr;  // wqe_cnt * 64 bytes
  uint32_t wqe_cnt = 0;
  const uint32_t* dbrec = nullptr;     // the QP's doorbell record (2 words)
  const uint64_t* doorbell = nullptr;  // the doorbell register mailbox
  uint32_t cq = 0;                     // index returned by createCq
};

// The other end of an RC connection. `windows` are the responder's registrations (checked by rkey); `peer` is
// passed to the backend to find the responder's memory.
struct Responder {
  const rdma::WindowRegistry* windows = nullptr;
  int peer = -1;
  uint32_t remote_qpn = 0;
};

struct NicConfig {
  int rank = 0;
  ChaosOptions chaos;  // chaos.seed 0 = off
  bool atomic_result_big_endian = false;
  bool trace = false;  // record TraceEvents (tests)
  uint32_t max_trace_events = 1u << 20;
  uint64_t max_chunk_bytes = 1u << 20;  // staging cap per chunk (a larger WRITE is always split)
};

enum class TraceKind : uint8_t { kDoorbell, kFetch, kRead, kPlace, kAtomic, kCqe, kErrorCqe, kFlushCqe, kStall };
const char* traceKindName(TraceKind k);

struct TraceEvent {
  TraceKind kind;
  uint32_t qp;
  uint32_t pi;  // the WQE's producer index (kDoorbell: the announced index)
  uint64_t offset;
  uint64_t bytes;
  bool operator==(const TraceEvent& o) const {
    return kind == o.kind && qp == o.qp && pi == o.pi && offset == o.offset && bytes == o.bytes;
  }
};

struct NicCounters {
  uint64_t steps = 0;
  uint64_t doorbells = 0;
  uint64_t stale_doorbells = 0;    // announced an index behind the one already seen (ignored)
  uint64_t foreign_doorbells = 0;  // named another QPN (ignored)
  uint64_t wqes = 0;               // fetched
  uint64_t bytes_placed = 0;
  uint64_t atomics = 0;
  uint64_t cqes = 0;
  uint64_t error_cqes = 0;
  uint64_t flush_cqes = 0;
  uint64_t lost_cqes = 0;  // could not be written: CQ overrun
};

class SoftNic {
 public:
  // `backend` and `local_windows` (this rank's registrations, checked by lkey) must outlive the NIC.
  SoftNic(const NicConfig& config, MemoryBackend* backend, const rdma::WindowRegistry* local_windows);
  ~SoftNic();
  SoftNic(const SoftNic&) = delete;
  SoftNic& operator=(const SoftNic&) = delete;

  ncclResult_t createCq(const CqConfig& config, uint32_t* cq);
  // QPNs are synthetic 24-bit numbers, distinct per rank. The QP starts unconnected: its WQEs fail until connect().
  ncclResult_t createQp(const QpConfig& config, uint32_t* qp, uint32_t* qpn);
  ncclResult_t connect(uint32_t qp, const Responder& responder);

  // One scheduling decision: polls every doorbell, then performs at most one action. Returns false when there
  // was nothing to do. Fails (returns false) while the executor thread runs.
  bool step();
  // step() until it returns false or `max_steps` were taken; returns the number of steps taken.
  uint64_t runUntilIdle(uint64_t max_steps = ~0ull);

  ncclResult_t start();
  void stop();  // returns within about a millisecond plus one action
  bool running() const { return running_.load(std::memory_order_acquire); }

  // Observations (thread-safe).
  QpState qpState(uint32_t qp) const;
  std::string qpError(uint32_t qp) const;      // "" while the QP is fine
  uint32_t qpRetired(uint32_t qp) const;       // WQEBBs < this are complete (the NIC's SQ consumer index)
  uint32_t qpAnnounced(uint32_t qp) const;     // the largest producer index a doorbell announced
  uint32_t qpDbrValue(uint32_t qp) const;      // the doorbell record as the producer last wrote it (host order)
  std::vector<std::string> nicErrors() const;  // doorbells naming other QPNs, CQ overruns
  NicCounters counters() const;
  std::vector<TraceEvent> trace() const;
  uint64_t traceHash() const;  // FNV-1a over the trace events
  uint64_t chaosSeed() const { return config_.chaos.seed; }
  std::string describe() const;  // "emulated NIC of rank r (chaos seed s)"

 private:
  struct Chunk;
  struct Op;
  struct Qp;
  struct Cq;
  struct Action;

  bool stepLocked();
  void pollDoorbell(uint32_t qp_idx);
  void fetch(uint32_t qp_idx);
  void pushError(Qp& qp, uint32_t pi, uint8_t wqe_opcode, uint8_t syndrome, EmuFault fault, const std::string& why,
                 const uint8_t* wqe_bytes, uint32_t num_bytes);
  void planChunks(Op& op);
  void collectActions(uint32_t qp_idx, std::vector<Action>* out, uint32_t max_ops);
  void perform(const Action& action);
  void performInOrder(uint32_t qp_idx);
  void readChunk(Qp& qp, Op& op, Chunk& chunk);
  void placeChunk(Qp& qp, Op& op, Chunk& chunk);
  void executeAtomic(Qp& qp, Op& op);
  void retireHead(Qp& qp);
  void failHead(Qp& qp);
  void flushFrom(Qp& qp);
  bool writeCqe(Qp& qp, uint32_t pi, uint8_t wqe_opcode, uint32_t byte_cnt, bool error, uint8_t syndrome,
                uint8_t vendor);
  void freeStaging(Qp& qp);
  void record(TraceKind kind, uint32_t qp, uint32_t pi, uint64_t offset, uint64_t bytes);
  void run();

  NicConfig config_;
  MemoryBackend* backend_;
  const rdma::WindowRegistry* local_windows_;
  ChaosRng rng_;
  bool chaos_;

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Qp>> qps_;
  std::vector<std::unique_ptr<Cq>> cqs_;
  std::vector<std::string> nic_errors_;
  std::vector<TraceEvent> trace_;
  NicCounters counters_;
  uint32_t rr_next_ = 0;           // round-robin position (chaos off)
  uint32_t pending_sleep_us_ = 0;  // a stall the executor thread sleeps off outside the lock

  std::atomic<bool> running_{false};
  std::atomic<bool> stop_requested_{false};
  std::thread thread_;
};

// Host memory for one QP and its CQ, laid out and initialised as a producer and the NIC expect (tests, CPU
// proxy over the software NIC). gpu_queues.h allocates the same in mapped pinned memory for a GPU producer.
struct HostQueueMemory {
  HostQueueMemory(uint32_t wqe_cnt, uint32_t cqe_cnt);
  ~HostQueueMemory();
  HostQueueMemory(const HostQueueMemory&) = delete;
  HostQueueMemory& operator=(const HostQueueMemory&) = delete;

  uint8_t* sq = nullptr;
  uint32_t wqe_cnt;
  uint32_t* sq_dbrec = nullptr;  // 2 words
  uint64_t* doorbell = nullptr;
  uint8_t* cq = nullptr;
  uint32_t cqe_cnt;
  uint32_t* cq_dbrec = nullptr;  // 2 words

  QpConfig qpConfig(uint32_t cq_idx) const;
  CqConfig cqConfig() const;
};

}  // namespace nccl_moe::emulated
