#include "transport/emulated/nic.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/log.h"
#include "transport/rdma/host_wait.h"
#include "transport/rdma/mlx5/cqe.h"
#include "transport/rdma/mlx5/ring.h"

namespace nccl_moe::emulated {

namespace m = nccl_moe::mlx5;
using rdma::AccessFault;
using rdma::AccessKind;

namespace {

// Chaos considers at most this many not-yet-done WQEs of a QP at once: enough to interleave the WRITEs of a
// put+signal batch, and it keeps a step O(1) when a producer has thousands of WQEs in flight.
constexpr uint32_t kChaosLookaheadOps = 8;
// Staging buffers of retired WQEs are released at the next complete(); a long unsignaled run forces one.
constexpr size_t kMaxDeferredStaging = 64;
constexpr uint32_t kMaxTailBytes = 8;

uint8_t syndromeOf(m::CqeSyndrome s) { return static_cast<uint8_t>(s); }

EmuFault emuFaultOf(AccessFault f, AccessKind kind) {
  const bool remote = rdma::is_remote(kind);
  switch (f) {
    case AccessFault::kNone:
      return EmuFault::kNone;
    case AccessFault::kBadKey:
      return remote ? EmuFault::kBadRemoteKey : EmuFault::kBadLocalKey;
    case AccessFault::kOutOfWindow:
      return remote ? EmuFault::kRemoteOutOfWindow : EmuFault::kLocalOutOfWindow;
    case AccessFault::kNoRights:
      return remote ? EmuFault::kRemoteNoRights : EmuFault::kLocalNoRights;
    case AccessFault::kMisalignedAtomic:
      return EmuFault::kMisalignedAtomic;
  }
  return EmuFault::kNone;
}

EmuFault emuFaultOf(m::WqeDefect d) {
  if (d == m::WqeDefect::kIndexMismatch) return EmuFault::kStaleWqe;
  if (d == m::WqeDefect::kQpnMismatch) return EmuFault::kWrongQpn;
  return m::is_unsupported(d) ? EmuFault::kUnsupportedWqe : EmuFault::kMalformedWqe;
}

std::string hexBytes(const uint8_t* p, uint32_t n) {
  std::string s;
  char buf[4];
  for (uint32_t i = 0; i < n; ++i) {
    std::snprintf(buf, sizeof(buf), i == 0 ? "%02x" : " %02x", p[i]);
    s += buf;
  }
  return s;
}

uint8_t* alignedZeroed(size_t bytes) {
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, rounded);
  if (p != nullptr) std::memset(p, 0, rounded);
  return static_cast<uint8_t*>(p);
}

}  // namespace

const char* emuFaultName(EmuFault f) {
  switch (f) {
    case EmuFault::kNone:
      return "none";
    case EmuFault::kBadLocalKey:
      return "bad lkey";
    case EmuFault::kLocalOutOfWindow:
      return "local range outside its window";
    case EmuFault::kLocalNoRights:
      return "local window lacks local-write access";
    case EmuFault::kBadRemoteKey:
      return "bad rkey";
    case EmuFault::kRemoteOutOfWindow:
      return "remote range outside its window";
    case EmuFault::kRemoteNoRights:
      return "remote window lacks the access";
    case EmuFault::kMisalignedAtomic:
      return "misaligned atomic";
    case EmuFault::kStaleWqe:
      return "stale WQE (index is not the producer index)";
    case EmuFault::kWrongQpn:
      return "WQE names another QPN";
    case EmuFault::kMalformedWqe:
      return "malformed WQE";
    case EmuFault::kUnsupportedWqe:
      return "unsupported WQE";
    case EmuFault::kSqOverrun:
      return "SQ overrun";
    case EmuFault::kNotConnected:
      return "QP not connected";
    case EmuFault::kWqePastDoorbell:
      return "WQE reaches past the doorbell's producer index";
    case EmuFault::kFlushed:
      return "flushed";
  }
  return "unknown";
}

const char* traceKindName(TraceKind k) {
  switch (k) {
    case TraceKind::kDoorbell:
      return "doorbell";
    case TraceKind::kFetch:
      return "fetch";
    case TraceKind::kRead:
      return "read";
    case TraceKind::kPlace:
      return "place";
    case TraceKind::kAtomic:
      return "atomic";
    case TraceKind::kCqe:
      return "cqe";
    case TraceKind::kErrorCqe:
      return "error-cqe";
    case TraceKind::kFlushCqe:
      return "flush-cqe";
    case TraceKind::kStall:
      return "stall";
  }
  return "unknown";
}

// ---- Internal state ----

struct SoftNic::Chunk {
  uint64_t offset = 0;  // into the WRITE's payload
  uint64_t bytes = 0;
  void* staging = nullptr;
  bool read = false;
  bool placed = false;
};

struct SoftNic::Op {
  enum class Kind : uint8_t { kNop, kWrite, kAtomic, kError };
  Kind kind = Kind::kNop;
  uint32_t pi = 0;
  uint32_t num_wqebbs = 1;
  m::ParsedWqe wqe{};
  m::WqeBytes bytes;     // the WQE as fetched: inline payload, error dumps
  bool barrier = false;  // atomics, fenced WQEs and errors: nothing after them moves before they are done
  bool done = false;
  std::vector<Chunk> chunks;
  uint32_t num_placed = 0;
  bool tail_first = false;  // the last chunk lands before every other one
  // kError
  uint8_t wqe_opcode = 0;
  uint8_t syndrome = 0;
  EmuFault fault = EmuFault::kNone;
  std::string why;
};

struct SoftNic::Qp {
  QpConfig config;
  uint32_t idx = 0;
  uint32_t qpn = 0;
  Responder responder;
  bool connected = false;
  QpState state = QpState::kReady;
  std::string error;
  uint64_t last_doorbell_word = 0;
  uint32_t announced = 0;      // largest producer index a doorbell announced
  uint32_t fetched = 0;        // next WQEBB to fetch
  uint32_t retired = 0;        // WQEBBs below are complete
  bool fetch_blocked = false;  // an error op is queued: nothing after it is fetched
  std::deque<Op> ops;          // fetched, not yet retired, in WQE order
  std::vector<void*> deferred_staging;
  uint32_t stall = 0;
};

struct SoftNic::Cq {
  CqConfig config;
  uint32_t pi = 0;
  bool broken = false;
};

struct SoftNic::Action {
  enum class Kind : uint8_t { kRetire, kFail, kAtomic, kRead, kPlace };
  Kind kind;
  uint32_t qp;
  uint32_t op_pos;
  uint32_t chunk;
};

// ---- Setup ----

SoftNic::SoftNic(const NicConfig& config, MemoryBackend* backend, const rdma::WindowRegistry* local_windows)
    : config_(config),
      backend_(backend),
      local_windows_(local_windows),
      rng_(config.chaos.seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(config.rank + 1))),
      chaos_(config.chaos.seed != 0) {
  if (config_.chaos.max_chunks == 0) config_.chaos.max_chunks = 1;
  if (config_.chaos.max_stall_steps == 0) config_.chaos.max_stall_steps = 1;
  if (config_.max_chunk_bytes == 0) config_.max_chunk_bytes = 1u << 20;
}

SoftNic::~SoftNic() {
  stop();
  for (auto& qp : qps_) {
    for (void* s : qp->deferred_staging) backend_->freeStaging(s);
    for (Op& op : qp->ops)
      for (Chunk& c : op.chunks)
        if (c.staging != nullptr && !c.placed) backend_->freeStaging(c.staging);
  }
}

std::string SoftNic::describe() const {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "emulated NIC of rank %d (chaos seed %" PRIu64 "%s)", config_.rank,
                config_.chaos.seed, chaos_ ? "" : ": off");
  return buf;
}

ncclResult_t SoftNic::createCq(const CqConfig& config, uint32_t* cq) {
  MOE_ARG_CHECK(config.buf != nullptr, "createCq: buf is NULL");
  MOE_ARG_CHECK(m::is_valid_cqe_cnt(config.cqe_cnt), "createCq: cqe_cnt %u is not a power of two in [1, 2^23]",
                config.cqe_cnt);
  std::lock_guard<std::mutex> lock(mu_);
  auto c = std::make_unique<Cq>();
  c->config = config;
  cqs_.push_back(std::move(c));
  *cq = static_cast<uint32_t>(cqs_.size() - 1);
  return ncclSuccess;
}

ncclResult_t SoftNic::createQp(const QpConfig& config, uint32_t* qp, uint32_t* qpn) {
  MOE_ARG_CHECK(config.sq_buf != nullptr, "createQp: sq_buf is NULL");
  MOE_ARG_CHECK(m::is_valid_wqe_cnt(config.wqe_cnt), "createQp: wqe_cnt %u is not a power of two in [1, 2^15]",
                config.wqe_cnt);
  MOE_ARG_CHECK(config.doorbell != nullptr, "createQp: doorbell is NULL");
  std::lock_guard<std::mutex> lock(mu_);
  MOE_ARG_CHECK(config.cq < cqs_.size(), "createQp: cq %u does not exist (%zu CQs)", config.cq, cqs_.size());
  MOE_ARG_CHECK(qps_.size() < 0x1000, "createQp: at most 4096 QPs per emulated NIC");
  auto q = std::make_unique<Qp>();
  q->config = config;
  q->idx = static_cast<uint32_t>(qps_.size());
  // Synthetic, distinct per rank (24 bits): a WQE or doorbell carrying another rank's QPN is caught.
  q->qpn = ((static_cast<uint32_t>(config_.rank) & 0x7ff) << 13) | 0x1000 | q->idx;
  q->last_doorbell_word = __atomic_load_n(config.doorbell, __ATOMIC_ACQUIRE);
  qps_.push_back(std::move(q));
  *qp = qps_.back()->idx;
  if (qpn != nullptr) *qpn = qps_.back()->qpn;
  return ncclSuccess;
}

ncclResult_t SoftNic::connect(uint32_t qp, const Responder& responder) {
  MOE_ARG_CHECK(responder.windows != nullptr, "connect: the responder's window registry is NULL");
  std::lock_guard<std::mutex> lock(mu_);
  MOE_ARG_CHECK(qp < qps_.size(), "connect: QP %u does not exist", qp);
  qps_[qp]->responder = responder;
  qps_[qp]->connected = true;
  return ncclSuccess;
}

// ---- Observation ----

QpState SoftNic::qpState(uint32_t qp) const {
  std::lock_guard<std::mutex> lock(mu_);
  return qp < qps_.size() ? qps_[qp]->state : QpState::kError;
}
std::string SoftNic::qpError(uint32_t qp) const {
  std::lock_guard<std::mutex> lock(mu_);
  return qp < qps_.size() ? qps_[qp]->error : std::string("no such QP");
}
uint32_t SoftNic::qpRetired(uint32_t qp) const {
  std::lock_guard<std::mutex> lock(mu_);
  return qp < qps_.size() ? qps_[qp]->retired : 0;
}
uint32_t SoftNic::qpAnnounced(uint32_t qp) const {
  std::lock_guard<std::mutex> lock(mu_);
  return qp < qps_.size() ? qps_[qp]->announced : 0;
}
uint32_t SoftNic::qpDbrValue(uint32_t qp) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (qp >= qps_.size() || qps_[qp]->config.dbrec == nullptr) return 0;
  return m::from_be(m::Be32{__atomic_load_n(&qps_[qp]->config.dbrec[m::kSendDbrIndex], __ATOMIC_ACQUIRE)});
}
std::vector<std::string> SoftNic::nicErrors() const {
  std::lock_guard<std::mutex> lock(mu_);
  return nic_errors_;
}
NicCounters SoftNic::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}
std::vector<TraceEvent> SoftNic::trace() const {
  std::lock_guard<std::mutex> lock(mu_);
  return trace_;
}
uint64_t SoftNic::traceHash() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xff;
      h *= 0x100000001b3ull;
    }
  };
  for (const TraceEvent& e : trace_) {
    mix(static_cast<uint64_t>(e.kind) | (static_cast<uint64_t>(e.qp) << 8) | (static_cast<uint64_t>(e.pi) << 32));
    mix(e.offset);
    mix(e.bytes);
  }
  return h;
}

void SoftNic::record(TraceKind kind, uint32_t qp, uint32_t pi, uint64_t offset, uint64_t bytes) {
  if (config_.trace && trace_.size() < config_.max_trace_events) trace_.push_back({kind, qp, pi, offset, bytes});
}

// ---- Doorbells and fetching ----

void SoftNic::pollDoorbell(uint32_t qp_idx) {
  Qp& qp = *qps_[qp_idx];
  // Acquire: the WQE bytes the producer wrote before its doorbell store are visible below.
  const uint64_t word = __atomic_load_n(qp.config.doorbell, __ATOMIC_ACQUIRE);
  if (word == qp.last_doorbell_word) return;
  qp.last_doorbell_word = word;
  ++counters_.doorbells;
  const uint32_t index16 = (m::from_be(m::Be32{static_cast<uint32_t>(word)}) >> 8) & m::kWqeIndexMask;
  const uint32_t qpn = m::from_be(m::Be32{static_cast<uint32_t>(word >> 32)}) >> 8;
  if (qpn != qp.qpn) {
    ++counters_.foreign_doorbells;
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%s: the doorbell of QP %u (QPN 0x%x) names QPN 0x%x; ignored", describe().c_str(),
                  qp.idx, qp.qpn, qpn);
    nic_errors_.push_back(buf);
    return;
  }
  // The doorbell carries 16 bits of the producer index: unwrap it against what was announced before.
  const uint16_t delta = static_cast<uint16_t>(index16 - static_cast<uint16_t>(qp.announced));
  if (delta == 0) return;  // the same index rung again
  if (delta >= 0x8000) {
    ++counters_.stale_doorbells;  // behind what was announced: an older store observed late
    return;
  }
  const uint32_t announced = qp.announced + delta;
  record(TraceKind::kDoorbell, qp.idx, announced, 0, 0);
  qp.announced = announced;
  if (qp.state == QpState::kError) {
    flushFrom(qp);
    return;
  }
  if (!qp.fetch_blocked && announced - qp.retired > qp.config.wqe_cnt) {
    // The producer reused slots of WQEs that are not complete: on hardware the NIC would execute whatever the
    // slots now hold. Everything fetched so far stays valid (it was copied out); the first WQE not yet fetched fails.
    const m::ConstSqRing sq{qp.config.sq_buf, qp.config.wqe_cnt};
    char why[192];
    std::snprintf(why, sizeof(why),
                  "the doorbell announced producer index %u while WQEBBs from %u are incomplete: %u in flight > "
                  "wqe_cnt %u",
                  announced, qp.retired, announced - qp.retired, qp.config.wqe_cnt);
    pushError(qp, qp.fetched, sq.wqebb(qp.fetched)[3], syndromeOf(m::CqeSyndrome::kLocalQpOperation),
              EmuFault::kSqOverrun, why, sq.wqebb(qp.fetched), m::kWqebbBytes);
    return;
  }
  fetch(qp_idx);
}

void SoftNic::pushError(Qp& qp, uint32_t pi, uint8_t wqe_opcode, uint8_t syndrome, EmuFault fault,
                        const std::string& why, const uint8_t* wqe_bytes, uint32_t num_bytes) {
  Op op;
  op.kind = Op::Kind::kError;
  op.pi = pi;
  op.num_wqebbs = 1;
  op.barrier = true;
  op.wqe_opcode = wqe_opcode;
  op.syndrome = syndrome;
  op.fault = fault;
  char head[256];
  std::snprintf(head, sizeof(head),
                "%s, QP %u (QPN 0x%x), WQE %u (slot %u, %s): %s [syndrome 0x%02x, %s]: ", describe().c_str(), qp.idx,
                qp.qpn, pi, m::sq_slot(pi, qp.config.wqe_cnt), m::wqe_opcode_name(wqe_opcode),
                m::cqe_syndrome_text(syndrome), syndrome, emuFaultName(fault));
  op.why = std::string(head) + why + "; WQE bytes: " + hexBytes(wqe_bytes, num_bytes);
  qp.ops.push_back(std::move(op));
  qp.fetch_blocked = true;
  qp.fetched = pi + 1;  // the failed WQE is accounted for; flushing starts after it
}

void SoftNic::fetch(uint32_t qp_idx) {
  Qp& qp = *qps_[qp_idx];
  const m::ConstSqRing sq{qp.config.sq_buf, qp.config.wqe_cnt};
  while (!qp.fetch_blocked && qp.fetched != qp.announced) {
    Op op;
    op.pi = qp.fetched;
    const m::WqeDefect defect = m::read_wqe(sq, op.pi, qp.qpn, &op.bytes, &op.wqe);
    ++counters_.wqes;
    record(TraceKind::kFetch, qp.idx, op.pi, 0, 0);
    const uint8_t local_qp_op = syndromeOf(m::CqeSyndrome::kLocalQpOperation);
    if (defect != m::WqeDefect::kNone) {
      char why[256];
      std::snprintf(why, sizeof(why), "%s (index 0x%04x, QPN 0x%x, ds %u)", m::wqe_defect_text(defect), op.wqe.wqe_idx,
                    op.wqe.qpn, op.wqe.ds);
      pushError(qp, op.pi, op.wqe.opcode, local_qp_op, emuFaultOf(defect), why, op.bytes.bytes, m::kWqebbBytes);
      return;
    }
    // A WQE that parsed was copied whole (ds * 16 bytes fit what read_wqe copied).
    const uint32_t dump_bytes = op.wqe.num_wqebbs * m::kWqebbBytes;
    op.num_wqebbs = op.wqe.num_wqebbs;
    if (qp.announced - qp.fetched < op.num_wqebbs) {
      pushError(qp, op.pi, op.wqe.opcode, local_qp_op, EmuFault::kWqePastDoorbell,
                "the WQE's WQEBBs reach past the producer index of the last doorbell", op.bytes.bytes, dump_bytes);
      return;
    }
    if (!qp.connected) {
      pushError(qp, op.pi, op.wqe.opcode, local_qp_op, EmuFault::kNotConnected,
                "the QP has no responder (connect() was not called)", op.bytes.bytes, dump_bytes);
      return;
    }
    // Access checks, local references first (the requester finds those before anything goes on the wire).
    auto fail_access = [&](AccessFault f, AccessKind kind, uint32_t key, uint64_t addr, uint64_t bytes) {
      char why[256];
      std::snprintf(why, sizeof(why), "%s: %s key 0x%x, [0x%" PRIx64 ", +%" PRIu64 ")", rdma::access_fault_text(f),
                    rdma::is_remote(kind) ? "remote" : "local", key, addr, bytes);
      pushError(qp, op.pi, op.wqe.opcode, rdma::access_fault_syndrome(f, kind), emuFaultOf(f, kind), why,
                op.bytes.bytes, dump_bytes);
    };
    const m::WqeOpcode opcode = static_cast<m::WqeOpcode>(op.wqe.opcode);
    if (opcode == m::WqeOpcode::kNop) {
      op.kind = Op::Kind::kNop;
      op.done = true;
    } else if (opcode == m::WqeOpcode::kRdmaWrite) {
      op.kind = Op::Kind::kWrite;
      for (uint32_t g = 0; g < op.wqe.num_gathers; ++g) {
        const m::LocalSge& sge = op.wqe.gathers[g];
        const AccessFault f = local_windows_->check(sge.lkey, sge.addr, sge.bytes, AccessKind::kLocalRead);
        if (f != AccessFault::kNone) return fail_access(f, AccessKind::kLocalRead, sge.lkey, sge.addr, sge.bytes);
      }
      const AccessFault f =
          qp.responder.windows->check(op.wqe.rkey, op.wqe.remote_addr, op.wqe.total_bytes, AccessKind::kRemoteWrite);
      if (f != AccessFault::kNone)
        return fail_access(f, AccessKind::kRemoteWrite, op.wqe.rkey, op.wqe.remote_addr, op.wqe.total_bytes);
      planChunks(op);
    } else {  // fetch-add / compare-swap (the parser admits nothing else)
      op.kind = Op::Kind::kAtomic;
      op.barrier = true;
      const m::LocalSge& result = op.wqe.gathers[0];
      AccessFault f = local_windows_->check(result.lkey, result.addr, result.bytes, AccessKind::kLocalWrite);
      if (f != AccessFault::kNone)
        return fail_access(f, AccessKind::kLocalWrite, result.lkey, result.addr, result.bytes);
      f = qp.responder.windows->check(op.wqe.rkey, op.wqe.remote_addr, m::kAtomicBytes, AccessKind::kRemoteAtomic);
      if (f != AccessFault::kNone)
        return fail_access(f, AccessKind::kRemoteAtomic, op.wqe.rkey, op.wqe.remote_addr, m::kAtomicBytes);
    }
    if (op.wqe.fence_mode != 0 && op.kind != Op::Kind::kNop) op.barrier = true;
    qp.fetched += op.num_wqebbs;
    qp.ops.push_back(std::move(op));
  }
}

void SoftNic::planChunks(Op& op) {
  const uint64_t total = op.wqe.total_bytes;
  if (total == 0) {
    op.done = true;
    return;
  }
  const uint64_t cap = config_.max_chunk_bytes;
  std::vector<uint64_t> cuts;  // chunk starts, ascending, cuts[0] = 0
  if (!chaos_) {
    for (uint64_t off = 0; off < total; off += cap) cuts.push_back(off);
  } else {
    const uint64_t wanted = std::min<uint64_t>(total, 1 + rng_.below(config_.chaos.max_chunks));
    cuts.push_back(0);
    for (uint64_t i = 1; i < wanted; ++i) cuts.push_back(1 + rng_.below(total - 1));
    if (total > 1 && rng_.chance(config_.chaos.tail_first_pct, 100)) {
      // The last bytes land first: what a consumer polling the end of a message would wrongly take as "arrived".
      op.tail_first = true;
      cuts.push_back(total - 1 - rng_.below(std::min<uint64_t>(kMaxTailBytes, total - 1)));
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    // No chunk beyond the staging cap.
    std::vector<uint64_t> capped;
    for (size_t i = 0; i < cuts.size(); ++i) {
      const uint64_t end = i + 1 < cuts.size() ? cuts[i + 1] : total;
      for (uint64_t off = cuts[i]; off < end; off += cap) capped.push_back(off);
    }
    cuts.swap(capped);
  }
  for (size_t i = 0; i < cuts.size(); ++i) {
    Chunk c;
    c.offset = cuts[i];
    c.bytes = (i + 1 < cuts.size() ? cuts[i + 1] : total) - cuts[i];
    op.chunks.push_back(c);
  }
  if (op.chunks.size() < 2) op.tail_first = false;
}

// ---- Scheduling ----

void SoftNic::collectActions(uint32_t qp_idx, std::vector<Action>* out, uint32_t max_ops) {
  Qp& qp = *qps_[qp_idx];
  if (qp.ops.empty()) return;
  const Op& head = qp.ops.front();
  if (head.done) out->push_back({Action::Kind::kRetire, qp_idx, 0, 0});
  if (!head.done && head.kind == Op::Kind::kError) out->push_back({Action::Kind::kFail, qp_idx, 0, 0});
  if (!head.done && head.kind == Op::Kind::kAtomic) out->push_back({Action::Kind::kAtomic, qp_idx, 0, 0});
  uint32_t considered = 0;
  for (uint32_t pos = 0; pos < qp.ops.size(); ++pos) {
    const Op& op = qp.ops[pos];
    if (op.done) continue;
    // An ordering point moves only once everything before it has retired; nothing after it moves before it is done.
    if (op.barrier && pos != 0) break;
    if (op.kind == Op::Kind::kWrite) {
      const uint32_t last = static_cast<uint32_t>(op.chunks.size() - 1);
      const bool tail_pending = op.tail_first && !op.chunks[last].placed;
      for (uint32_t c = 0; c < op.chunks.size(); ++c) {
        const Chunk& chunk = op.chunks[c];
        if (!chunk.read)
          out->push_back({Action::Kind::kRead, qp_idx, pos, c});
        else if (!chunk.placed && (!tail_pending || c == last))
          out->push_back({Action::Kind::kPlace, qp_idx, pos, c});
      }
    }
    if (op.barrier || ++considered >= max_ops) break;
  }
}

void SoftNic::perform(const Action& a) {
  Qp& qp = *qps_[a.qp];
  switch (a.kind) {
    case Action::Kind::kRetire:
      retireHead(qp);
      break;
    case Action::Kind::kFail:
      failHead(qp);
      break;
    case Action::Kind::kAtomic:
      executeAtomic(qp, qp.ops.front());
      break;
    case Action::Kind::kRead:
      readChunk(qp, qp.ops[a.op_pos], qp.ops[a.op_pos].chunks[a.chunk]);
      break;
    case Action::Kind::kPlace:
      placeChunk(qp, qp.ops[a.op_pos], qp.ops[a.op_pos].chunks[a.chunk]);
      break;
  }
}

void SoftNic::performInOrder(uint32_t qp_idx) {
  Qp& qp = *qps_[qp_idx];
  Op& head = qp.ops.front();
  if (head.done) return retireHead(qp);
  if (head.kind == Op::Kind::kError) return failHead(qp);
  if (head.kind == Op::Kind::kAtomic) return executeAtomic(qp, head);
  for (Chunk& c : head.chunks) {
    if (!c.read) readChunk(qp, head, c);
    if (!c.placed) placeChunk(qp, head, c);
  }
}

bool SoftNic::step() {
  if (running()) return false;
  std::lock_guard<std::mutex> lock(mu_);
  return stepLocked();
}

uint64_t SoftNic::runUntilIdle(uint64_t max_steps) {
  uint64_t n = 0;
  while (n < max_steps && step()) ++n;
  return n;
}

bool SoftNic::stepLocked() {
  ++counters_.steps;
  const uint32_t num_qps = static_cast<uint32_t>(qps_.size());
  for (uint32_t i = 0; i < num_qps; ++i) pollDoorbell(i);
  for (auto& qp : qps_)
    if (qp->stall > 0) --qp->stall;

  if (!chaos_) {
    for (uint32_t k = 0; k < num_qps; ++k) {
      const uint32_t i = (rr_next_ + k) % num_qps;
      if (qps_[i]->ops.empty()) continue;
      performInOrder(i);
      rr_next_ = i + 1;
      return true;
    }
    return false;
  }

  std::vector<uint32_t> candidates;
  for (uint32_t i = 0; i < num_qps; ++i)
    if (!qps_[i]->ops.empty() && qps_[i]->stall == 0) candidates.push_back(i);
  if (candidates.empty()) {  // only stalled QPs have work: a stall never makes the NIC idle
    for (uint32_t i = 0; i < num_qps; ++i)
      if (!qps_[i]->ops.empty()) candidates.push_back(i);
  }
  if (candidates.empty()) return false;
  const uint32_t qp_idx = candidates[rng_.below(candidates.size())];
  std::vector<Action> actions;
  collectActions(qp_idx, &actions, kChaosLookaheadOps);
  if (actions.empty()) {
    performInOrder(qp_idx);  // unreachable by construction; keeps the NIC live if that ever changes
  } else {
    perform(actions[rng_.below(actions.size())]);
  }
  if (rng_.chance(config_.chaos.stall_pct, 100)) {
    Qp& qp = *qps_[qp_idx];
    qp.stall = 1 + static_cast<uint32_t>(rng_.below(config_.chaos.max_stall_steps));
    pending_sleep_us_ = static_cast<uint32_t>(rng_.below(config_.chaos.max_sleep_us + 1));
    record(TraceKind::kStall, qp_idx, 0, qp.stall, pending_sleep_us_);
  }
  return true;
}

// ---- Actions ----

void SoftNic::readChunk(Qp& qp, Op& op, Chunk& chunk) {
  chunk.staging = backend_->allocStaging(chunk.bytes);
  uint8_t* staging = static_cast<uint8_t*>(chunk.staging);
  if (op.wqe.is_inline) {
    backend_->stageInline(qp.idx, staging, op.bytes.bytes + op.wqe.inline_offset + chunk.offset, chunk.bytes);
  } else {
    // The chunk [offset, offset + bytes) of the payload, gathered from the entries it overlaps.
    uint64_t entry_start = 0;
    const uint64_t chunk_end = chunk.offset + chunk.bytes;
    for (uint32_t g = 0; g < op.wqe.num_gathers && entry_start < chunk_end; ++g) {
      const m::LocalSge& sge = op.wqe.gathers[g];
      const uint64_t entry_end = entry_start + sge.bytes;
      const uint64_t from = std::max(entry_start, chunk.offset);
      const uint64_t to = std::min(entry_end, chunk_end);
      if (from < to)
        backend_->readSource(qp.idx, staging + (from - chunk.offset), sge.addr + (from - entry_start), to - from);
      entry_start = entry_end;
    }
  }
  chunk.read = true;
  record(TraceKind::kRead, qp.idx, op.pi, chunk.offset, chunk.bytes);
}

void SoftNic::placeChunk(Qp& qp, Op& op, Chunk& chunk) {
  backend_->writeRemote(qp.idx, qp.responder.peer, op.wqe.remote_addr + chunk.offset, chunk.staging, chunk.bytes);
  chunk.placed = true;
  qp.deferred_staging.push_back(chunk.staging);
  chunk.staging = nullptr;
  counters_.bytes_placed += chunk.bytes;
  record(TraceKind::kPlace, qp.idx, op.pi, chunk.offset, chunk.bytes);
  if (++op.num_placed == op.chunks.size()) op.done = true;
  if (qp.deferred_staging.size() >= kMaxDeferredStaging) {
    backend_->complete(qp.idx);
    freeStaging(qp);
  }
}

void SoftNic::executeAtomic(Qp& qp, Op& op) {
  // Every earlier WRITE of this QP is placed (the atomic is an ordering point); make it complete first.
  backend_->complete(qp.idx);
  freeStaging(qp);
  AtomicRequest request;
  request.kind = static_cast<m::WqeOpcode>(op.wqe.opcode) == m::WqeOpcode::kAtomicFa
                     ? AtomicRequest::Kind::kFetchAdd
                     : AtomicRequest::Kind::kCompareSwap;
  request.remote_addr = op.wqe.remote_addr;
  request.add_or_swap = op.wqe.swap_add;
  request.compare = op.wqe.compare;
  request.result_addr = op.wqe.gathers[0].addr;
  request.result_big_endian = config_.atomic_result_big_endian;
  backend_->atomic(qp.idx, qp.responder.peer, request);
  op.done = true;
  ++counters_.atomics;
  record(TraceKind::kAtomic, qp.idx, op.pi, 0, m::kAtomicBytes);
}

void SoftNic::freeStaging(Qp& qp) {
  for (void* s : qp.deferred_staging) backend_->freeStaging(s);
  qp.deferred_staging.clear();
}

void SoftNic::retireHead(Qp& qp) {
  Op& op = qp.ops.front();
  const uint32_t pi = op.pi;
  const uint8_t opcode = op.wqe.opcode;
  const uint32_t byte_cnt = static_cast<uint32_t>(op.wqe.total_bytes);
  const bool signaled = op.wqe.signaled;
  qp.retired = op.pi + op.num_wqebbs;
  qp.ops.pop_front();
  if (!signaled) return;
  backend_->complete(qp.idx);  // a CQE means done: everything issued so far for this QP
  freeStaging(qp);
  if (!writeCqe(qp, pi, opcode, byte_cnt, false, 0, 0) && qp.state == QpState::kReady) {
    qp.state = QpState::kError;
    qp.error = describe() + ": a CQE could not be written (CQ overrun); QP " + std::to_string(qp.idx) + " failed";
    flushFrom(qp);
  }
}

void SoftNic::failHead(Qp& qp) {
  Op& op = qp.ops.front();
  backend_->complete(qp.idx);
  freeStaging(qp);
  qp.state = QpState::kError;
  qp.error = op.why;
  MOE_WARN("%s", op.why.c_str());
  writeCqe(qp, op.pi, op.wqe_opcode, 0, true, op.syndrome, static_cast<uint8_t>(op.fault));
  qp.retired = op.pi + op.num_wqebbs;
  qp.ops.pop_front();
  flushFrom(qp);
}

void SoftNic::flushFrom(Qp& qp) {
  const uint8_t flushed = syndromeOf(m::CqeSyndrome::kWrFlushed);
  const uint8_t vendor = static_cast<uint8_t>(EmuFault::kFlushed);
  // Fetched WQEs first (nothing of theirs was executed: they sit behind the failed one)...
  while (!qp.ops.empty()) {
    const Op& op = qp.ops.front();
    for (const Chunk& c : op.chunks)
      if (c.staging != nullptr) backend_->freeStaging(c.staging);
    writeCqe(qp, op.pi, op.kind == Op::Kind::kError ? op.wqe_opcode : op.wqe.opcode, 0, true, flushed, vendor);
    qp.retired = op.pi + op.num_wqebbs;
    qp.ops.pop_front();
  }
  // ... then every announced WQE not fetched. Only the newest wqe_cnt WQEBBs still exist in the ring.
  if (qp.announced - qp.fetched > qp.config.wqe_cnt) qp.fetched = qp.announced - qp.config.wqe_cnt;
  const m::ConstSqRing sq{qp.config.sq_buf, qp.config.wqe_cnt};
  while (qp.fetched != qp.announced) {
    const uint8_t* ctrl = sq.wqebb(qp.fetched);
    uint32_t n = 1;
    if (((m::load_be32(ctrl) >> 8) & m::kWqeIndexMask) == m::wqe_index(qp.fetched))
      n = std::max<uint32_t>(1, m::wqebbs_for_ds(m::load_be32(ctrl + 4) & 0xff));
    n = std::min(n, qp.announced - qp.fetched);
    writeCqe(qp, qp.fetched, ctrl[3], 0, true, flushed, vendor);
    qp.fetched += n;
  }
  qp.retired = qp.fetched;
  qp.fetch_blocked = true;
}

bool SoftNic::writeCqe(Qp& qp, uint32_t pi, uint8_t wqe_opcode, uint32_t byte_cnt, bool error, uint8_t syndrome,
                       uint8_t vendor) {
  Cq& cq = *cqs_[qp.config.cq];
  const uint32_t cqe_cnt = cq.config.cqe_cnt;
  if (cq.broken) {
    ++counters_.lost_cqes;
    return false;
  }
  if (!cq.config.overrun_ignore && cq.config.dbrec != nullptr) {
    const uint32_t ci =
        m::from_be(m::Be32{__atomic_load_n(&cq.config.dbrec[m::kCqSetCiDbrIndex], __ATOMIC_ACQUIRE)}) & m::kCqCiMask;
    const uint32_t in_flight = (cq.pi - ci) & m::kCqCiMask;
    if (in_flight >= cqe_cnt) {
      cq.broken = true;
      ++counters_.lost_cqes;
      char buf[256];
      std::snprintf(buf, sizeof(buf),
                    "%s: CQ %u overrun: CQE %u would overwrite an entry the consumer has not read (consumer index "
                    "%u, %u entries); the CQ is broken",
                    describe().c_str(), qp.config.cq, cq.pi, ci, cqe_cnt);
      nic_errors_.push_back(buf);
      MOE_WARN("%s", buf);
      return false;
    }
  }
  alignas(16) uint8_t entry[m::kCqeBytes];
  const uint8_t owner = m::cqe_lap_owner(cq.pi, cqe_cnt);
  if (error)
    m::build_err_cqe(entry, m::wqe_index(pi), wqe_opcode, qp.qpn, syndrome, vendor, owner);
  else
    m::build_req_cqe(entry, m::wqe_index(pi), wqe_opcode, qp.qpn, byte_cnt, owner);
  uint8_t* slot = cq.config.buf + static_cast<size_t>(m::cq_slot(cq.pi, cqe_cnt)) * m::kCqeBytes;
  std::memcpy(slot, entry, m::kCqeBytes - 1);
  // op_own last, with release: a consumer that sees the new owner bit (acquire) sees the whole entry and every
  // effect of the completed WQE.
  __atomic_store_n(slot + m::kCqeBytes - 1, entry[m::kCqeBytes - 1], __ATOMIC_RELEASE);
  ++cq.pi;
  ++counters_.cqes;
  TraceKind kind = TraceKind::kCqe;
  if (error) {
    if (syndrome == syndromeOf(m::CqeSyndrome::kWrFlushed)) {
      ++counters_.flush_cqes;
      kind = TraceKind::kFlushCqe;
    } else {
      ++counters_.error_cqes;
      kind = TraceKind::kErrorCqe;
    }
  }
  record(kind, qp.idx, pi, syndrome, byte_cnt);
  return true;
}

// ---- Executor thread ----

ncclResult_t SoftNic::start() {
  if (running())
    return setLastError(ncclInvalidUsage, "%s: the executor thread is already running", describe().c_str());
  stop_requested_.store(false, std::memory_order_release);
  running_.store(true, std::memory_order_release);
  thread_ = std::thread(&SoftNic::run, this);
  return ncclSuccess;
}

void SoftNic::stop() {
  if (!thread_.joinable()) return;
  stop_requested_.store(true, std::memory_order_release);
  thread_.join();
  running_.store(false, std::memory_order_release);
}

void SoftNic::run() {
  rdma::usePreciseSleeps();
  rdma::Backoff backoff;
  while (!stop_requested_.load(std::memory_order_acquire)) {
    bool progressed;
    uint32_t sleep_us;
    {
      std::lock_guard<std::mutex> lock(mu_);
      progressed = stepLocked();
      sleep_us = pending_sleep_us_;
      pending_sleep_us_ = 0;
    }
    if (progressed) {
      backoff.reset();
      if (sleep_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    } else {
      backoff.pause();
    }
  }
}

// ---- Host queue memory ----

HostQueueMemory::HostQueueMemory(uint32_t wqe_cnt_in, uint32_t cqe_cnt_in) : wqe_cnt(wqe_cnt_in), cqe_cnt(cqe_cnt_in) {
  sq = alignedZeroed(static_cast<size_t>(wqe_cnt) * m::kWqebbBytes);
  cq = alignedZeroed(static_cast<size_t>(cqe_cnt) * m::kCqeBytes);
  // One page for the small words, each on its own cache line.
  uint8_t* words = alignedZeroed(4096);
  sq_dbrec = reinterpret_cast<uint32_t*>(words);
  doorbell = reinterpret_cast<uint64_t*>(words + 64);
  cq_dbrec = reinterpret_cast<uint32_t*>(words + 128);
  if (cq != nullptr)
    for (uint32_t i = 0; i < cqe_cnt; ++i) cq[static_cast<size_t>(i) * m::kCqeBytes + 63] = m::kCqeInitialOpOwn;
}

HostQueueMemory::~HostQueueMemory() {
  std::free(sq);
  std::free(cq);
  std::free(sq_dbrec);
}

QpConfig HostQueueMemory::qpConfig(uint32_t cq_idx) const {
  QpConfig c;
  c.sq_buf = sq;
  c.wqe_cnt = wqe_cnt;
  c.dbrec = sq_dbrec;
  c.doorbell = doorbell;
  c.cq = cq_idx;
  return c;
}

CqConfig HostQueueMemory::cqConfig() const {
  CqConfig c;
  c.buf = cq;
  c.cqe_cnt = cqe_cnt;
  c.dbrec = cq_dbrec;
  return c;
}

}  // namespace nccl_moe::emulated
