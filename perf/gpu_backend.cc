// GPU mode of moe-perf (contract in gpu_backend.h).
//
// Lockstep rule: every rank executes the same sequence of NCCL collectives (barriers, agreements, reductions).
// A rank whose MoE call failed keeps taking part in every barrier of a timed loop and skips only the MoE calls;
// availability is then agreed over all ranks (ncclMin), so control flow never diverges between ranks.
//
// Timing: CUDA events around every timed call; with the kernel timer (--timer kernel, the default when CUPTI works)
// each timed call is also bracketed by a CUPTI external-correlation id (kernel_timer.h) and the row reports the
// kernel spans, with the event median next to it. After each timed loop every rank thread of the process drains its
// stream and meets the others at a host barrier before the CUPTI buffers are flushed (collectKernelTimes).
#include "gpu_backend.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "baseline_kernels.h"
#include "core/error.h"
#include "cpu_baseline.h"
#include "gpu_baseline.h"
#include "harness/barrier.h"
#include "kernel_timer.h"
#include "nccl_moe.h"
#include "rank_device.h"
#include "topo/topo.h"
#include "verify.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const char* const kOtherRank = "failed on another rank";

// The rank threads of this process meet at `barrier`; one that does not arrive within timeout_s fails the run.
void meet(harness::HostBarrier& barrier, double timeout_s, const char* what) {
  if (!barrier.wait(timeout_s))
    throw harness::Error(std::string("host barrier (") + what + "): another rank thread of this process did not " +
                         "arrive within " + std::to_string(static_cast<long long>(timeout_s)) + " s");
}

// ------------------------------------------------------------------------------------------------
// Process-wide state
// ------------------------------------------------------------------------------------------------

struct Progress {
  std::atomic<int64_t> last_ns{0};
  std::atomic<const char*> phase{"starting"};
  std::atomic<bool> finished{false};
  void set(const char* what) {
    phase.store(what);
    last_ns.store(nowNs());
  }
};

struct Shared {
  RunInfo& run;
  RankLayout layout;
  ncclUniqueId id{};
  harness::HostBarrier barrier;      // the rank threads of this process
  double host_wait_s;                // bound of every wait at `barrier`
  std::unique_ptr<Problem> problem;  // built by local rank 0 for every size, shared by the process's ranks
  std::string problem_error;
  std::unique_ptr<Progress[]> progress;
  std::atomic<int> exit_code{0};
  std::atomic<int> unavailable_rows{0};  // counted by the printing rank
  std::atomic<bool> done{false};
  bool kernel_timer = false;  // the CUPTI kernel timer is on in this process (decided once, before the rank threads)

  Shared(RunInfo& r, const RankLayout& l)
      : run(r),
        layout(l),
        barrier(l.ranksPerProc()),
        host_wait_s(hostWaitSeconds(r.options)),
        progress(new Progress[sz(l.ranksPerProc())]) {}
  void fail(int code) {
    int cur = exit_code.load();
    while (code > cur && !exit_code.compare_exchange_weak(cur, code)) {
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Collectives on the rank's NCCL communicator (host-visible results)
// ------------------------------------------------------------------------------------------------

// Scratch buffers are allocated once: cudaFree synchronises the device, which must never happen while a collective
// of this rank is in flight.
class Collective {
 public:
  static constexpr size_t kMaxDoubles = 256;
  static constexpr size_t kMaxGatherBytes = 4096;  // per rank
  explicit Collective(const RankDevice& rd)
      : rd_(rd),
        token_(1),
        doubles_(kMaxDoubles),
        gather_send_(kMaxGatherBytes),
        gather_recv_(kMaxGatherBytes * sz(rd.num_ranks)) {
    token_.zeroAsync(rd.stream);
    HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  }
  ~Collective() {
    for (long long* p : gate_opened_) cudaIpcCloseMemHandle(p);
  }
  Collective(const Collective&) = delete;
  Collective& operator=(const Collective&) = delete;

  // Stream-ordered: everything enqueued after it starts once every rank has reached it. The hold that follows
  // the all-reduce keeps the stream busy while the host enqueues the timed call, so timing events measure GPU
  // execution (kernel time, as DeepEP's profiler-based figures do) and not the host's launch latency. With the
  // start gate (setupGate) the hold ends in a meeting of all ranks on the device, so the timed calls of all
  // ranks start within about one flag trip of each other: a rank's host that enqueued the hold late (after its
  // NCCL all-reduce had finished on the GPU) no longer starts its calls late, which a call that waits for its
  // peers (a Both LL dispatch) would otherwise count on the early rank.
  void barrier() {
    PERF_NCCL(ncclAllReduce(token_.get(), token_.get(), 1, ncclInt32, ncclSum, rd_.comm, rd_.stream));
    if (gate_) {
      HARNESS_CUDA(holdAndMeet(kHoldUs, gate_peers_.get(), gate_flags_.get(), rd_.rank, rd_.num_ranks, ++gate_epoch_,
                               kGateTimeoutS, gate_timed_out_.get(), rd_.stream));
    } else {
      HARNESS_CUDA(holdStream(kHoldUs, rd_.stream));
    }
  }
  // Where a rank runs (gathered once by the caller).
  struct Place {
    std::string host;
    int pid;
    int device;
  };
  // Collective. Sets up the device start gate when every rank's GPU can reach every other's memory (same host:
  // peer access within the process, CUDA IPC across processes); otherwise barrier() keeps the plain hold.
  // `places` [rank]: every rank's host, process and device. Returns whether the gate is on (the same on every
  // rank).
  bool setupGate(const std::vector<Place>& places) {
    struct Entry {
      long long* ptr;
      int ipc_ok;  // `ipc` is valid (needed only by peers in other processes)
      cudaIpcMemHandle_t ipc;
    };
    gate_flags_.allocate(sz(rd_.num_ranks));
    gate_flags_.zeroAsync(rd_.stream);
    gate_timed_out_.allocate(1);
    gate_timed_out_.zeroAsync(rd_.stream);
    Entry mine{};
    mine.ptr = gate_flags_.get();
    mine.ipc_ok = cudaIpcGetMemHandle(&mine.ipc, mine.ptr) == cudaSuccess;
    if (!mine.ipc_ok) (void)cudaGetLastError();
    bool ok = true;
    std::vector<char> bytes(sizeof(Entry));
    std::memcpy(bytes.data(), &mine, sizeof(Entry));
    const std::vector<char> all = allGather(bytes);
    const Place& me = places[sz(rd_.rank)];
    std::vector<long long*> peers(sz(rd_.num_ranks), nullptr);
    for (int r = 0; r < rd_.num_ranks && ok; ++r) {
      Entry e;
      std::memcpy(&e, all.data() + sz(r) * sizeof(Entry), sizeof(Entry));
      const Place& pl = places[sz(r)];
      if (pl.host != me.host) {
        ok = false;
      } else if (pl.pid == me.pid) {
        int can = 0;
        if (pl.device != rd_.device) {
          ok = cudaDeviceCanAccessPeer(&can, rd_.device, pl.device) == cudaSuccess && can != 0;
          if (ok) {
            const cudaError_t err = cudaDeviceEnablePeerAccess(pl.device, 0);
            if (err == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();
            ok = err == cudaSuccess || err == cudaErrorPeerAccessAlreadyEnabled;
          }
        }
        peers[sz(r)] = e.ptr;
      } else {
        void* p = nullptr;
        ok = e.ipc_ok && cudaIpcOpenMemHandle(&p, e.ipc, cudaIpcMemLazyEnablePeerAccess) == cudaSuccess;
        if (ok) gate_opened_.push_back(static_cast<long long*>(p));
        peers[sz(r)] = static_cast<long long*>(p);
      }
    }
    if (!ok) (void)cudaGetLastError();
    if (ok) gate_peers_.assign(peers, rd_.stream);
    gate_ = agree(ok);
    return gate_;
  }
  // Whether a gate meeting gave up waiting (a peer never arrived: the timing of the rows since is not aligned).
  bool gateTimedOut() const { return gate_ && gate_timed_out_.download(1, rd_.stream)[0] != 0; }
  // 100 us: with the kernel timer CUPTI also traces every runtime/driver call, and the host's enqueue of a timed
  // call (event, correlation push, launch) then took longer than a 30 us hold on some calls; the rank whose GPU
  // went idle started late and its peer's kernel waited for it (erratic small-size medians).
  static constexpr int kHoldUs = 100;
  static constexpr double kGateTimeoutS = 30.0;
  std::vector<double> allReduce(const std::vector<double>& v, ncclRedOp_t op) {
    if (v.size() > kMaxDoubles) throw harness::Error("Collective::allReduce: too many values");
    doubles_.upload(v.data(), v.size(), rd_.stream);
    PERF_NCCL(ncclAllReduce(doubles_.get(), doubles_.get(), v.size(), ncclFloat64, op, rd_.comm, rd_.stream));
    return doubles_.download(v.size(), rd_.stream);
  }
  bool agree(bool ok) { return allReduce({ok ? 1.0 : 0.0}, ncclMin)[0] > 0.5; }
  // [R * mine.size()]: every rank's bytes, in rank order.
  std::vector<char> allGather(const std::vector<char>& mine) {
    if (mine.size() > kMaxGatherBytes) throw harness::Error("Collective::allGather: too many bytes");
    gather_send_.upload(mine.data(), mine.size(), rd_.stream);
    PERF_NCCL(ncclAllGather(gather_send_.get(), gather_recv_.get(), mine.size(), ncclChar, rd_.comm, rd_.stream));
    return gather_recv_.download(mine.size() * sz(rd_.num_ranks), rd_.stream);
  }

 private:
  RankDevice rd_;
  DeviceArray<int> token_;
  DeviceArray<double> doubles_;
  DeviceArray<char> gather_send_, gather_recv_;
  bool gate_ = false;
  long long gate_epoch_ = 0;
  DeviceArray<long long> gate_flags_;   // [R]: word r = rank r's latest meeting
  DeviceArray<long long*> gate_peers_;  // [R]: every rank's gate_flags_, as this GPU reaches it
  DeviceArray<int> gate_timed_out_;
  std::vector<long long*> gate_opened_;  // IPC mappings to close
};

class Events {
 public:
  explicit Events(int n) : ev_(sz(n)) {
    for (auto& e : ev_) HARNESS_CUDA(cudaEventCreate(&e));
  }
  ~Events() {
    for (auto& e : ev_) cudaEventDestroy(e);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  void record(int i, cudaStream_t s) { HARNESS_CUDA(cudaEventRecord(ev_[sz(i)], s)); }
  double us(int a, int b) const {
    float ms = 0;
    HARNESS_CUDA(cudaEventElapsedTime(&ms, ev_[sz(a)], ev_[sz(b)]));
    return static_cast<double>(ms) * 1e3;
  }

 private:
  std::vector<cudaEvent_t> ev_;
};

// ------------------------------------------------------------------------------------------------
// The MoE communicator of one mode
// ------------------------------------------------------------------------------------------------

std::string apiError(const char* fn, ncclResult_t r, ncclMoeComm_t comm) {
  std::string s = std::string(fn) + " returned " + ncclMoeGetErrorString(r);
  const char* detail = ncclMoeGetLastError(comm);
  if (detail != nullptr && *detail != '\0') s += ": " + std::string(detail);
  return s;
}

struct MoeSession {
  ncclMoeComm_t comm = nullptr;
  ncclMoeHandle_t handle = nullptr;
  bool usable = false;
  std::string error;
  size_t buffer_bytes = 0;

  void init(const RankDevice& rd, Collective& col, const ModeConfig& cfg, int capacity) {
    ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
    c.num_experts = cfg.experts;
    c.hidden = cfg.hidden;
    c.max_topk = cfg.topk;
    if (cfg.mode == Mode::kHt) {
      c.max_tokens_per_rank = capacity;
    } else {
      c.ll_max_tokens_per_rank = capacity;
    }
    if (ncclMoeGetBufferSize(&c, rd.num_ranks, &buffer_bytes) != ncclSuccess) buffer_bytes = 0;
    ncclResult_t r = ncclMoeCommInit(&comm, rd.comm, &c);
    std::string err = r == ncclSuccess ? "" : apiError("ncclMoeCommInit", r, nullptr);
    if (!col.agree(r == ncclSuccess)) {
      // A rank that succeeded while another failed cannot destroy collectively: leave its communicator alone.
      comm = nullptr;
      error = err.empty() ? kOtherRank : err;
      return;
    }
    r = ncclMoeHandleCreate(comm, &handle);
    err = r == ncclSuccess ? "" : apiError("ncclMoeHandleCreate", r, comm);
    if (!col.agree(r == ncclSuccess)) {
      if (handle != nullptr) ncclMoeHandleDestroy(handle);
      handle = nullptr;
      ncclMoeCommDestroy(comm);
      comm = nullptr;
      error = err.empty() ? kOtherRank : err;
      return;
    }
    usable = true;
  }

  // ncclSuccess on every rank, else marks the session broken (every later MoE row is "not available").
  bool checkAsync(Collective& col, std::string* err) {
    if (comm == nullptr) return false;
    ncclResult_t async = ncclSuccess;
    const ncclResult_t r = ncclMoeCommGetAsyncError(comm, &async);
    const bool ok = r == ncclSuccess && async == ncclSuccess;
    std::string local;
    if (!ok) local = apiError("asynchronous error", r != ncclSuccess ? r : async, comm);
    if (col.agree(ok)) return true;
    *err = local.empty() ? kOtherRank : local;
    usable = false;
    error = *err;
    return false;
  }

  void destroy() {
    if (handle != nullptr) ncclMoeHandleDestroy(handle);
    if (comm != nullptr) ncclMoeCommDestroy(comm);
    handle = nullptr;
    comm = nullptr;
  }
};

// ------------------------------------------------------------------------------------------------
// Per-rank results of one size
// ------------------------------------------------------------------------------------------------

struct OpResult {
  bool available = false;
  std::string error;
  std::vector<double> us;  // CUDA-event time of each timed call
  int64_t wrong = 0;
  // Kernel timer: one id per timed call (bracketed with push/pop), their spans once collected (-1 = no record).
  std::vector<uint64_t> kernel_ids;
  std::vector<double> kernel_us;
  std::string kernel_error;  // why kernel_us is not usable ("" when it is)
  bool kernelComplete() const {
    return kernel_error.empty() && !kernel_us.empty() && kernel_us.size() == us.size() &&
           std::all_of(kernel_us.begin(), kernel_us.end(), [](double v) { return v >= 0; });
  }
  void fail(const std::string& e) {
    available = false;
    if (error.empty()) error = e.empty() ? kOtherRank : e;
  }
};

struct Aggregate {
  bool available = false;
  std::string error;
  double median_us = 0, min_us = 0, max_us = 0;  // CUDA events
  int64_t wrong = 0;
  // Kernel timer: every rank has a complete kernel span for every timed call.
  bool kernel = false;
  double kernel_median_us = 0, kernel_min_us = 0, kernel_max_us = 0;
  std::string kernel_error;  // why not (first rank with a reason), when the kernel timer was used
};

// Reduces per-rank results over all ranks: available = all ranks, median = max of the per-rank medians,
// min/max over every call of every rank, wrong = sum; the error text of the first rank that had its own. The same
// for the kernel spans (kernel = all ranks have them).
std::vector<Aggregate> aggregate(Collective& col, const std::vector<const OpResult*>& ops, int num_ranks) {
  const size_t n = ops.size();
  std::vector<double> mins(2 * n), maxs(6 * n), sums(n);
  auto stats = [&](const std::vector<double>& us, bool have, size_t at) {
    maxs[at] = have ? median(us) : 0.0;
    maxs[n + at] = have ? *std::max_element(us.begin(), us.end()) : 0.0;
    maxs[2 * n + at] = have ? -*std::min_element(us.begin(), us.end()) : -1e300;
  };
  for (size_t i = 0; i < n; ++i) {
    const OpResult& o = *ops[i];
    const bool have = o.available && !o.us.empty();
    const bool have_kernel = have && o.kernelComplete();
    mins[i] = have ? 1.0 : 0.0;
    mins[n + i] = have_kernel ? 1.0 : 0.0;
    stats(o.us, have, i);
    stats(o.kernel_us, have_kernel, 3 * n + i);
    sums[i] = static_cast<double>(o.wrong);
  }
  mins = col.allReduce(mins, ncclMin);
  maxs = col.allReduce(maxs, ncclMax);
  sums = col.allReduce(sums, ncclSum);
  // Per rank and op: the error text, then the kernel timer's.
  constexpr size_t kText = 256;
  std::vector<char> mine(2 * n * kText, '\0');
  for (size_t i = 0; i < n; ++i) {
    std::strncpy(&mine[i * kText], ops[i]->error.c_str(), kText - 1);
    std::strncpy(&mine[(n + i) * kText], ops[i]->kernel_error.c_str(), kText - 1);
  }
  const std::vector<char> all = col.allGather(mine);
  std::vector<Aggregate> out(n);
  for (size_t i = 0; i < n; ++i) {
    Aggregate& a = out[i];
    a.available = mins[i] > 0.5;
    a.median_us = maxs[i];
    a.max_us = maxs[n + i];
    a.min_us = -maxs[2 * n + i];
    a.kernel = mins[n + i] > 0.5;
    a.kernel_median_us = maxs[3 * n + i];
    a.kernel_max_us = maxs[4 * n + i];
    a.kernel_min_us = -maxs[5 * n + i];
    a.wrong = static_cast<int64_t>(sums[i]);
    for (int r = 0; r < num_ranks && !a.available; ++r) {
      const std::string e(&all[(sz(r) * 2 * n + i) * kText]);
      if (!e.empty() && (a.error.empty() || a.error == kOtherRank)) a.error = e;
    }
    for (int r = 0; r < num_ranks && !a.kernel && a.kernel_error.empty(); ++r) {
      const std::string e(&all[(sz(r) * 2 * n + n + i) * kText]);
      if (!e.empty()) a.kernel_error = "rank " + std::to_string(r) + ": " + e;
    }
    if (!a.available && a.error.empty()) a.error = "no timed calls";
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Timing of the timed loops
// ------------------------------------------------------------------------------------------------

struct Timing {
  KernelTimer* kernel = nullptr;          // null: CUDA events only
  harness::HostBarrier* local = nullptr;  // the rank threads of this process
  double local_wait_s = 0;                // bound of a wait at `local`
  // Where a timed call's kernel-timer id goes: null (no bracketing) for warm-up calls and without the kernel timer.
  std::vector<uint64_t>* ids(OpResult& op, bool timed) const {
    return kernel != nullptr && timed ? &op.kernel_ids : nullptr;
  }
};

// Called by every rank thread of the process at the same point, after a timed loop whose last iteration drained the
// rank's stream: once all local ranks are at the barrier no timed kernel runs in the process, so the forced flush
// delivers complete records only; the second barrier keeps every thread from starting timed work while another
// one still flushes. Fills each op's kernel_us (or kernel_error).
void collectKernelTimes(const Timing& t, std::initializer_list<OpResult*> ops) {
  if (t.kernel == nullptr) {
    for (OpResult* o : ops) o->kernel_error = "the kernel timer is off in this process";
    return;
  }
  meet(*t.local, t.local_wait_s, "before the kernel timer's flush");
  std::vector<uint64_t> ids;
  for (const OpResult* o : ops) ids.insert(ids.end(), o->kernel_ids.begin(), o->kernel_ids.end());
  std::vector<double> spans;
  std::string err;
  t.kernel->collect(ids, &spans, &err);
  size_t at = 0;
  for (OpResult* o : ops) {
    const size_t n = o->kernel_ids.size();
    o->kernel_us.assign(spans.begin() + static_cast<std::ptrdiff_t>(at),
                        spans.begin() + static_cast<std::ptrdiff_t>(at + n));
    at += n;
    const auto missing = std::count_if(o->kernel_us.begin(), o->kernel_us.end(), [](double v) { return v < 0; });
    if (!t.kernel->usable()) {
      o->kernel_error = t.kernel->error();
    } else if (missing > 0) {
      o->kernel_error = "no complete CUPTI kernel record for " + std::to_string(missing) + " of " + std::to_string(n) +
                        " timed calls";
    } else if (n != o->us.size()) {
      o->kernel_error = std::to_string(n) + " kernel-timed calls for " + std::to_string(o->us.size()) + " timed calls";
    }
    o->kernel_ids.clear();
  }
  meet(*t.local, t.local_wait_s, "after the kernel timer's flush");
}

// The timed dispatch-then-combine loop of HT and LL: a barrier before each call, CUDA events around it and a
// kernel-timer id on the timed (non-warm-up) calls. `dispatch` / `combine` issue one call and return false with
// the error in *err. A rank whose call failed skips that op from then on but keeps taking part in every barrier;
// availability is agreed over all ranks after the loop. The combine is timed only when it is available.
template <typename Dispatch, typename Combine>
void timeDispatchCombine(Collective& col, cudaStream_t st, const RunInfo& run, const Timing& tm, Progress& prog,
                         const char* label, OpResult* d, OpResult* c, Dispatch dispatch, Combine combine) {
  Events ev(4);
  const bool with_combine = c->available;
  bool fail_d = false, fail_c = false;
  std::string ed, ec;
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.set(label);
    const bool timed = i >= run.warmup;
    col.barrier();
    ev.record(0, st);
    if (!fail_d) {
      KernelTimerScope k(tm.kernel, tm.ids(*d, timed));
      fail_d = !dispatch(&ed);
    }
    ev.record(1, st);
    if (with_combine) {
      col.barrier();
      ev.record(2, st);
      if (!fail_c && !fail_d) {
        KernelTimerScope k(tm.kernel, tm.ids(*c, timed));
        fail_c = !combine(&ec);
      }
      ev.record(3, st);
    }
    HARNESS_CUDA(cudaStreamSynchronize(st));
    if (timed) {
      d->us.push_back(ev.us(0, 1));
      if (with_combine) c->us.push_back(ev.us(2, 3));
    }
  }
  collectKernelTimes(tm, {d, c});
  if (!col.agree(!fail_d)) d->fail(ed);
  if (with_combine && !col.agree(!fail_c && !fail_d)) c->fail(ec.empty() ? ed : ec);
}

// ------------------------------------------------------------------------------------------------
// Device copies of one rank's inputs
// ------------------------------------------------------------------------------------------------

template <typename T>
void uploadBytes(DeviceArray<uint8_t>* dst, const std::vector<T>& src, cudaStream_t stream) {
  dst->allocate(src.size() * sizeof(T));
  dst->upload(reinterpret_cast<const uint8_t*>(src.data()), src.size() * sizeof(T), stream);
}

// ------------------------------------------------------------------------------------------------
// NCCL baseline
// ------------------------------------------------------------------------------------------------

struct BaselineResult {
  OpResult dispatch, combine, first;
};

void runBaseline(const Problem& p, const RankDevice& rd, Collective& col, const RunInfo& run, const Timing& tm,
                 Progress& prog, BaselineResult* res) {
  const bool check = run.options.check != 0;
  prog.set("baseline: setup");
  GpuBaseline bl(p, rd);
  prog.set("baseline: verification pass");
  col.barrier();
  bl.countExchange();
  bl.dispatch();
  HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  if (check) res->dispatch.wrong = res->first.wrong = bl.dispatchWrong();
  col.barrier();
  bl.combine();
  HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  if (check) res->combine.wrong = bl.combineWrong();

  Events ev(4);
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.set("baseline: timed dispatch/combine");
    const bool timed = i >= run.warmup;
    col.barrier();
    ev.record(0, rd.stream);
    {
      KernelTimerScope k(tm.kernel, tm.ids(res->dispatch, timed));
      bl.dispatch();
    }
    ev.record(1, rd.stream);
    col.barrier();
    ev.record(2, rd.stream);
    {
      KernelTimerScope k(tm.kernel, tm.ids(res->combine, timed));
      bl.combine();
    }
    ev.record(3, rd.stream);
    HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
    if (timed) {
      res->dispatch.us.push_back(ev.us(0, 1));
      res->combine.us.push_back(ev.us(2, 3));
    }
  }
  collectKernelTimes(tm, {&res->dispatch, &res->combine});
  // The count exchange includes a host wait: event-timed, like the MoE notify_dispatch it stands next to.
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.set("baseline: timed count exchange + dispatch");
    col.barrier();
    ev.record(0, rd.stream);
    bl.countExchange();
    bl.dispatch();
    ev.record(1, rd.stream);
    HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
    if (i >= run.warmup) res->first.us.push_back(ev.us(0, 1));
  }
  res->dispatch.available = res->combine.available = res->first.available = true;
}

// ------------------------------------------------------------------------------------------------
// High-throughput MoE operations
// ------------------------------------------------------------------------------------------------

struct HtResult {
  OpResult dispatch, combine, first;
};

void runMoeHt(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, int sms, const RunInfo& run,
              const Timing& tm, Progress& prog, HtResult* res) {
  OpResult* all[3] = {&res->dispatch, &res->combine, &res->first};
  if (!moe.usable) {
    for (OpResult* o : all) o->fail(moe.error);
    return;
  }
  const bool check = run.options.check != 0;
  const bool fp8 = p.spec.dtype == DType::kFp8;
  const int r = rd.rank, R = rd.num_ranks, T = p.spec.tokens, H = p.spec.hidden, K = p.spec.topk;
  const int El = p.numLocalExperts();
  const RowFormat& f = p.fmt;
  const cudaStream_t st = rd.stream;
  const size_t cap_rows = std::max<size_t>(1, sz(R) * sz(T));  // no rank can receive more

  prog.set("ht: setup");
  DeviceArray<uint8_t> x;
  DeviceArray<float> xs;
  if (fp8) {
    uploadBytes(&x, p.x_fp8[sz(r)].fp8, st);
    xs.assign(p.x_fp8[sz(r)].scales, st);
  } else {
    uploadBytes(&x, p.x_bf16[sz(r)], st);
  }
  DeviceArray<int64_t> idx;
  idx.assign(p.routing.ranks[sz(r)].topk_idx, st);
  DeviceArray<float> w;
  w.assign(p.routing.ranks[sz(r)].topk_weights, st);
  DeviceArray<uint8_t> recv_x(cap_rows * f.data_bytes);
  DeviceArray<float> recv_xs(cap_rows * sz(std::max(1, f.groups)));
  DeviceArray<int64_t> recv_idx(cap_rows * sz(K));
  DeviceArray<float> recv_w(cap_rows * sz(K));
  DeviceArray<uint16_t> y(cap_rows * sz(H));
  y.zeroAsync(st);
  y.upload(p.ht_y[sz(r)].data(), p.ht_y[sz(r)].size(), st);
  DeviceArray<uint16_t> out(sz(T) * sz(H));

  int num_recv = -1;
  std::vector<int> per_expert(sz(El), 0);
  ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  na.topk_idx = idx.get();
  na.topk_idx_type = ncclMoeIndexInt64;
  na.num_tokens = T;
  na.topk = K;
  na.expert_alignment = p.spec.expert_alignment;
  na.recv_capacity = 0;  // host-count mode: the notify learns N_recv on the host (the documented sync)
  na.num_recv_tokens = &num_recv;
  na.num_recv_tokens_per_expert = per_expert.data();
  ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  da.x = x.get();
  da.dtype = fp8 ? ncclMoeFp8E4M3 : ncclMoeBfloat16;
  da.hidden = H;
  da.x_scales = fp8 ? xs.get() : nullptr;
  da.scale_format = ncclMoeScaleFloat;
  da.topk_weights = w.get();
  da.recv_x = recv_x.get();
  da.recv_x_scales = fp8 ? recv_xs.get() : nullptr;
  da.recv_topk_idx = recv_idx.get();
  da.recv_topk_weights = recv_w.get();
  da.num_sms = sms;
  ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  ca.x = y.get();
  ca.hidden = H;
  ca.combined_x = out.get();
  ca.num_sms = sms;

  auto call = [&](const char* fn, ncclResult_t result, std::string* err) {
    if (result != ncclSuccess && err->empty()) *err = apiError(fn, result, moe.comm);
    return result == ncclSuccess;
  };

  // Verification pass (also the availability probe).
  prog.set("ht: notify (verification)");
  std::string err;
  col.barrier();
  bool ok = call("ncclMoeDispatchNotify", ncclMoeDispatchNotify(moe.comm, moe.handle, &na, st), &err);
  if (!col.agree(ok)) {
    for (OpResult* o : all) o->fail(err);
    moe.checkAsync(col, &err);
    return;
  }
  prog.set("ht: dispatch (verification)");
  ok = call("ncclMoeDispatch", ncclMoeDispatch(moe.comm, moe.handle, &da, st), &err);
  HARNESS_CUDA(cudaStreamSynchronize(st));
  if (!col.agree(ok)) {
    res->dispatch.fail(err);
    res->first.fail(err);
    res->combine.fail(err.empty() ? kOtherRank : "needs ncclMoeDispatch: " + err);
    moe.checkAsync(col, &err);
    return;
  }
  res->dispatch.available = res->first.available = true;
  if (check) {
    const int64_t rows = std::clamp<int64_t>(num_recv, 0, static_cast<int64_t>(cap_rows));
    const std::vector<uint8_t> gx = recv_x.download(sz(rows) * f.data_bytes, st);
    const std::vector<float> gs = fp8 ? recv_xs.download(sz(rows) * sz(f.groups), st) : std::vector<float>();
    const std::vector<int64_t> gi = recv_idx.download(sz(rows) * sz(K), st);
    const std::vector<float> gw = recv_w.download(sz(rows) * sz(K), st);
    const int64_t wrong_rows = htRecvWrong(p, r, rows, RowView::split(gx.data(), gs.data(), f)) +
                               htMetaWrong(p, r, rows, nullptr, gi.data(), gw.data());
    res->dispatch.wrong = wrong_rows;
    res->first.wrong = wrong_rows + htMetaWrong(p, r, num_recv, &per_expert, nullptr, nullptr);
  }
  prog.set("ht: combine (verification)");
  std::string comb_err;
  col.barrier();
  ok = call("ncclMoeCombine", ncclMoeCombine(moe.comm, moe.handle, &ca, st), &comb_err);
  HARNESS_CUDA(cudaStreamSynchronize(st));
  if (!col.agree(ok)) {
    res->combine.fail(comb_err);
  } else {
    res->combine.available = true;
    if (check) res->combine.wrong = bf16Wrong(out.download(out.size(), st).data(), p.ht_expected_combine[sz(r)]);
  }
  if (!moe.checkAsync(col, &err)) {
    for (OpResult* o : all) o->fail(err);
    return;
  }

  // Timed: cached-handle dispatch (no notify, no host wait), then combine.
  timeDispatchCombine(
      col, st, run, tm, prog, "ht: timed dispatch/combine", &res->dispatch, &res->combine,
      [&](std::string* e) { return call("ncclMoeDispatch", ncclMoeDispatch(moe.comm, moe.handle, &da, st), e); },
      [&](std::string* e) { return call("ncclMoeCombine", ncclMoeCombine(moe.comm, moe.handle, &ca, st), e); });

  // Timed: the full first call, notify (layout + count exchange + host wait) + dispatch. It includes a host wait by
  // definition, so it is always event-timed (no kernel-timer ids).
  Events ev(2);
  bool fail_f = false;
  std::string ef;
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.set("ht: timed notify + dispatch");
    col.barrier();
    ev.record(0, st);
    if (!fail_f)
      fail_f = !call("ncclMoeDispatchNotify", ncclMoeDispatchNotify(moe.comm, moe.handle, &na, st), &ef) ||
               !call("ncclMoeDispatch", ncclMoeDispatch(moe.comm, moe.handle, &da, st), &ef);
    ev.record(1, st);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    if (i >= run.warmup) res->first.us.push_back(ev.us(0, 1));
  }
  if (!col.agree(!fail_f)) res->first.fail(ef);
  if (!moe.checkAsync(col, &err))
    for (OpResult* o : all) o->fail(err);
}

// ------------------------------------------------------------------------------------------------
// Low-latency MoE operations
// ------------------------------------------------------------------------------------------------

struct LlResult {
  OpResult dispatch, combine, dispatch_send, dispatch_recv, combine_send, combine_recv;
};

void runMoeLl(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, const RunInfo& run,
              const Timing& tm, Progress& prog, LlResult* res) {
  OpResult* all[6] = {&res->dispatch,      &res->combine,      &res->dispatch_send,
                      &res->dispatch_recv, &res->combine_send, &res->combine_recv};
  if (!moe.usable) {
    for (OpResult* o : all) o->fail(moe.error);
    return;
  }
  const bool check = run.options.check != 0;
  const bool fp8 = p.spec.dtype == DType::kFp8;
  const int r = rd.rank, T = p.spec.tokens, H = p.spec.hidden, K = p.spec.topk;
  const int El = p.numLocalExperts(), slab = p.slabRows();
  const RowFormat& f = p.fmt;
  const cudaStream_t st = rd.stream;
  const size_t slab_total = sz(El) * sz(slab);

  prog.set("ll: setup");
  DeviceArray<uint16_t> x;
  x.assign(p.x_bf16[sz(r)], st);
  DeviceArray<int64_t> idx;
  idx.assign(p.routing.ranks[sz(r)].topk_idx, st);
  DeviceArray<float> w;
  w.assign(p.routing.ranks[sz(r)].topk_weights, st);
  DeviceArray<uint8_t> recv_x(slab_total * f.data_bytes);
  DeviceArray<float> recv_xs(slab_total * sz(std::max(1, f.groups)));
  DeviceArray<int> recv_count(sz(El));
  DeviceArray<uint16_t> y(slab_total * sz(H));
  DeviceArray<uint16_t> out(sz(T) * sz(H));

  ncclMoeLLDispatchArgs_t la = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
  la.x = x.get();
  la.topk_idx = idx.get();
  la.topk_idx_type = ncclMoeIndexInt64;
  la.num_tokens = T;
  la.hidden = H;
  la.topk = K;
  la.use_fp8 = fp8 ? 1 : 0;
  la.scale_format = ncclMoeScaleFloat;
  la.recv_x = recv_x.get();
  la.recv_x_scales = fp8 ? recv_xs.get() : nullptr;
  la.recv_count = recv_count.get();
  la.phase = ncclMoePhaseBoth;
  la.topk_weights = w.get();  // carried with the tokens: the combine needs no weight exchange
  ncclMoeLLCombineArgs_t lc = NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER;
  lc.x = y.get();
  lc.zero_copy = 0;
  lc.topk_idx = idx.get();
  lc.topk_weights = nullptr;  // the dispatch's
  lc.num_tokens = T;
  lc.hidden = H;
  lc.topk = K;
  lc.out = out.get();
  lc.phase = ncclMoePhaseBoth;

  auto call = [&](const char* fn, ncclResult_t result, std::string* err) {
    if (result != ncclSuccess && err->empty()) *err = apiError(fn, result, moe.comm);
    return result == ncclSuccess;
  };
  auto dispatchCall = [&](ncclMoePhase_t phase, std::string* err) {
    la.phase = phase;
    return call("ncclMoeLowLatencyDispatch", ncclMoeLowLatencyDispatch(moe.comm, moe.handle, &la, st), err);
  };
  auto combineCall = [&](ncclMoePhase_t phase, std::string* err) {
    lc.phase = phase;
    return call("ncclMoeLowLatencyCombine", ncclMoeLowLatencyCombine(moe.comm, moe.handle, &lc, st), err);
  };

  // Verification: one round with both phases per call, one with the send and receive halves as separate calls.
  struct Round {
    bool dispatch_ok = false, combine_ok = false;
    std::string dispatch_err, combine_err;
    int64_t dispatch_wrong = 0, combine_wrong = 0;
  };
  auto verifyRound = [&](bool split) {
    Round result;
    prog.set(split ? "ll: split dispatch (verification)" : "ll: dispatch (verification)");
    col.barrier();
    bool ok = split ? dispatchCall(ncclMoePhaseSend, &result.dispatch_err) &&
                          dispatchCall(ncclMoePhaseRecv, &result.dispatch_err)
                    : dispatchCall(ncclMoePhaseBoth, &result.dispatch_err);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    result.dispatch_ok = col.agree(ok);
    if (!result.dispatch_ok) return result;
    if (check) {
      const std::vector<int> counts = recv_count.download(sz(El), st);
      const std::vector<uint8_t> gx = recv_x.download(recv_x.size(), st);
      const std::vector<float> gs = fp8 ? recv_xs.download(slab_total * sz(f.groups), st) : std::vector<float>();
      std::vector<int32_t> identity;
      result.dispatch_wrong = llRecvWrong(p, r, counts.data(), RowView::split(gx.data(), gs.data(), f), &identity);
      // Expert outputs in the order this GPU received the rows, so the combine check is order-independent.
      const std::vector<uint16_t> yh = llExpertOutputsFor(p, r, identity);
      y.upload(yh.data(), yh.size(), st);
    } else {
      y.zeroAsync(st);
    }
    prog.set(split ? "ll: split combine (verification)" : "ll: combine (verification)");
    col.barrier();
    ok = split
             ? combineCall(ncclMoePhaseSend, &result.combine_err) && combineCall(ncclMoePhaseRecv, &result.combine_err)
             : combineCall(ncclMoePhaseBoth, &result.combine_err);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    result.combine_ok = col.agree(ok);
    if (result.combine_ok && check)
      result.combine_wrong = bf16Wrong(out.download(out.size(), st).data(), p.ll_expected_combine[sz(r)]);
    return result;
  };
  std::string err;
  const Round both = verifyRound(false);
  if (!both.dispatch_ok) {
    const std::string e = both.dispatch_err;
    for (OpResult* o : all) o->fail(o == &res->dispatch || e.empty() ? e : "needs dispatch: " + e);
    moe.checkAsync(col, &err);
    return;
  }
  res->dispatch.available = true;
  res->dispatch.wrong = both.dispatch_wrong;
  if (both.combine_ok) {
    res->combine.available = true;
    res->combine.wrong = both.combine_wrong;
  } else {
    res->combine.fail(both.combine_err);
  }
  const Round split = verifyRound(true);
  OpResult* dispatch_halves[2] = {&res->dispatch_send, &res->dispatch_recv};
  OpResult* combine_halves[2] = {&res->combine_send, &res->combine_recv};
  for (OpResult* o : dispatch_halves) {
    o->available = split.dispatch_ok;
    o->wrong = split.dispatch_wrong;  // the pair is verified together
    if (!split.dispatch_ok) o->fail(split.dispatch_err);
  }
  for (OpResult* o : combine_halves) {
    o->available = split.dispatch_ok && split.combine_ok;
    o->wrong = split.combine_wrong;
    if (!split.dispatch_ok) {
      o->fail(split.dispatch_err.empty() ? "" : "needs the split dispatch: " + split.dispatch_err);
    } else if (!split.combine_ok) {
      o->fail(split.combine_err);
    }
  }
  if (!moe.checkAsync(col, &err)) {
    for (OpResult* o : all) o->fail(err);
    return;
  }

  // Timed: dispatch then combine (both phases in one call each), a barrier before each.
  timeDispatchCombine(
      col, st, run, tm, prog, "ll: timed dispatch/combine", &res->dispatch, &res->combine,
      [&](std::string* e) { return dispatchCall(ncclMoePhaseBoth, e); },
      [&](std::string* e) { return combineCall(ncclMoePhaseBoth, e); });

  Events ev(6);
  // Timed: send and receive halves separately.
  bool fail_ds = !res->dispatch_send.available, fail_cs = !res->combine_send.available;
  std::string eds, ecs;
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.set("ll: timed send/recv halves");
    const bool timed = i >= run.warmup;
    col.barrier();
    ev.record(0, st);
    if (!fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->dispatch_send, timed));
      fail_ds = !dispatchCall(ncclMoePhaseSend, &eds);
    }
    ev.record(1, st);
    if (!fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->dispatch_recv, timed));
      fail_ds = !dispatchCall(ncclMoePhaseRecv, &eds);
    }
    ev.record(2, st);
    col.barrier();
    ev.record(3, st);
    if (!fail_cs && !fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->combine_send, timed));
      fail_cs = !combineCall(ncclMoePhaseSend, &ecs);
    }
    ev.record(4, st);
    if (!fail_cs && !fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->combine_recv, timed));
      fail_cs = !combineCall(ncclMoePhaseRecv, &ecs);
    }
    ev.record(5, st);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    if (timed) {
      res->dispatch_send.us.push_back(ev.us(0, 1));
      res->dispatch_recv.us.push_back(ev.us(1, 2));
      res->combine_send.us.push_back(ev.us(3, 4));
      res->combine_recv.us.push_back(ev.us(4, 5));
    }
  }
  collectKernelTimes(tm, {&res->dispatch_send, &res->dispatch_recv, &res->combine_send, &res->combine_recv});
  if (!col.agree(!fail_ds))
    for (OpResult* o : dispatch_halves) o->fail(eds);
  if (!col.agree(!fail_cs && !fail_ds))
    for (OpResult* o : combine_halves) o->fail(ecs.empty() ? eds : ecs);
  if (!moe.checkAsync(col, &err))
    for (OpResult* o : all) o->fail(err);
}

// ------------------------------------------------------------------------------------------------
// Rank threads
// ------------------------------------------------------------------------------------------------

struct RankInfo {
  int rank, local, pid, device, sms;
  char host[64];
  char bus_id[32];
  char name[96];
};

// `kernel_timed`: the kernel timer is on and the op is one it times (not notify_dispatch). The MoE op and its
// baseline are reported with the same timer: kernel spans when both have them on every rank, else CUDA events for
// both, with the reason in timer_note. event_median_us keeps the CUDA-event medians either way.
void fillRow(ResultRow* row, const Aggregate& moe, const Aggregate* baseline, bool kernel_timed) {
  const bool moe_kernel = !moe.available || moe.kernel;
  const bool baseline_kernel = baseline == nullptr || baseline->kernel;
  const bool kernel = kernel_timed && moe_kernel && baseline_kernel && (moe.available || baseline != nullptr);
  row->available = moe.available;
  row->error = moe.error;
  row->timer = kernel ? "kernel" : "event";
  row->median_us = kernel ? moe.kernel_median_us : moe.median_us;
  row->min_us = kernel ? moe.kernel_min_us : moe.min_us;
  row->max_us = kernel ? moe.kernel_max_us : moe.max_us;
  row->event_median_us = moe.median_us;
  row->wrong = moe.wrong;
  if (baseline != nullptr) {
    row->has_baseline = true;
    row->baseline_median_us = kernel ? baseline->kernel_median_us : baseline->median_us;
    row->baseline_event_median_us = baseline->median_us;
    row->baseline_wrong = baseline->wrong;
  }
  if (kernel_timed && !kernel) {
    if (!moe_kernel) {
      row->timer_note = moe.kernel_error.empty() ? "no kernel spans" : moe.kernel_error;
    } else if (!baseline_kernel) {
      row->timer_note = "baseline: " + (baseline->kernel_error.empty() ? "no kernel spans" : baseline->kernel_error);
    }
  }
}

// The topology block (nccl_moe::topo, GPUs of rank 0's host), then one line per rank like nccl-tests.
void printRankList(const std::vector<RankInfo>& infos) {
  std::vector<std::string> bus_ids;
  for (const RankInfo& i : infos)
    if (std::strcmp(i.host, infos[0].host) == 0) bus_ids.push_back(i.bus_id);
  topo::Topology t;
  if (topo::discover(bus_ids, &t) == ncclSuccess) {
    const std::string text = topo::formatTopology(t);
    size_t start = 0;
    while (start < text.size()) {
      const size_t end = text.find('\n', start);
      out("# %s\n", text.substr(start, end == std::string::npos ? std::string::npos : end - start).c_str());
      if (end == std::string::npos) break;
      start = end + 1;
    }
  } else {
    out("# topology: not available (%s)\n", threadLastError());
  }
  for (const RankInfo& i : infos)
    out("#  Rank %2d Group %2d Pid %7d on %12s device %2d [%s] %s (%d SMs)\n", i.rank, i.local, i.pid, i.host, i.device,
        i.bus_id, i.name, i.sms);
}

void rankMain(Shared& sh, int local) {
  const RunInfo& run = sh.run;
  const Options& o = run.options;
  Progress& prog = sh.progress[local];
  RankDevice rd;
  rd.rank = sh.layout.firstRank() + local;
  rd.num_ranks = sh.layout.numRanks();
  rd.device = sh.layout.firstDevice() + local;
  const bool printer = rd.rank == 0;
  Timing tm;
  tm.kernel = sh.kernel_timer ? &KernelTimer::instance() : nullptr;
  tm.local = &sh.barrier;
  tm.local_wait_s = sh.host_wait_s;
  prog.set("cudaSetDevice");
  HARNESS_CUDA(cudaSetDevice(rd.device));
  HARNESS_CUDA(cudaStreamCreateWithFlags(&rd.stream, cudaStreamNonBlocking));
  prog.set("ncclCommInitRank");
  PERF_NCCL(ncclCommInitRank(&rd.comm, rd.num_ranks, sh.id, rd.rank));
  Collective col(rd);

  // Who is where.
  RankInfo info{};
  cudaDeviceProp prop{};
  HARNESS_CUDA(cudaGetDeviceProperties(&prop, rd.device));
  info.rank = rd.rank;
  info.local = local;
  info.pid = static_cast<int>(::getpid());
  info.device = rd.device;
  info.sms = prop.multiProcessorCount;
  ::gethostname(info.host, sizeof(info.host) - 1);
  HARNESS_CUDA(cudaDeviceGetPCIBusId(info.bus_id, sizeof(info.bus_id), rd.device));
  std::snprintf(info.name, sizeof(info.name), "%.95s", prop.name);
  std::vector<char> mine(sizeof(RankInfo));
  std::memcpy(mine.data(), &info, sizeof(RankInfo));
  const std::vector<char> all = col.allGather(mine);
  std::vector<RankInfo> infos(sz(rd.num_ranks));
  std::memcpy(infos.data(), all.data(), all.size());
  if (printer) printRankList(infos);
  const std::string gpu_name = infos[0].name;
  prog.set("start gate setup");
  std::vector<Collective::Place> places;
  for (const RankInfo& i : infos) places.push_back({i.host, i.pid, i.device});
  const bool gate = col.setupGate(places);
  if (printer) {
    out(gate ? "# start gate: on (each timed call follows an NCCL barrier, a %d us hold and a device-side meeting "
               "of all ranks)\n"
             : "# start gate: off, some rank cannot reach another's memory (each timed call follows an NCCL "
               "barrier and a %d us hold)\n",
        Collective::kHoldUs);
  }

  for (Mode mode : resolveModes(o)) {
    const ModeConfig cfg = resolveMode(o, mode);
    const int cap = static_cast<int>(*std::max_element(cfg.tokens.begin(), cfg.tokens.end()));
    prog.set("ncclMoeCommInit");
    MoeSession moe;
    moe.init(rd, col, cfg, cap);
    if (printer) {
      out("#\n# %s mode: %d GPUs, capacity %d tokens per rank, hidden %d, top-%d of %d experts\n",
          mode == Mode::kHt ? "HT (high-throughput)" : "LL (low-latency)", rd.num_ranks, cap, cfg.hidden, cfg.topk,
          cfg.experts);
      if (moe.usable) {
        out("# MoE communicator: %.1f MiB of communication buffer per rank\n",
            static_cast<double>(moe.buffer_bytes) / (1 << 20));
      } else {
        out("# MoE communicator not available: %s\n", moe.error.c_str());
      }
    }
    bool header = false;
    for (DType dtype : cfg.dtypes) {
      const std::string bad = checkShape(cfg, dtype, rd.num_ranks);
      if (!bad.empty()) {
        if (printer) out("# %s %s: invalid shape: %s\n", modeName(mode), dtypeName(dtype), bad.c_str());
        sh.fail(2);
        continue;
      }
      for (int64_t tokens : cfg.tokens) {
        // One problem per process, built by local rank 0.
        if (local == 0) {
          prog.set("building the problem (CPU reference)");
          if (printer)
            out("# building %s %s problem: %lld tokens per rank%s\n", modeName(mode), dtypeName(dtype),
                static_cast<long long>(tokens), o.check ? " (with expected results)" : "");
          ProblemSpec spec;
          spec.mode = mode;
          spec.dtype = dtype;
          spec.num_ranks = rd.num_ranks;
          spec.tokens = static_cast<int>(tokens);
          spec.hidden = cfg.hidden;
          spec.topk = cfg.topk;
          spec.experts = cfg.experts;
          spec.ll_max_tokens = cap;
          spec.expert_alignment = o.expert_alignment;
          spec.routing = o.routing;
          spec.seed = o.seed;
          spec.build_expected = o.check != 0;
          spec.ranks_needed.assign(sz(rd.num_ranks), false);
          for (int i = 0; i < sh.layout.ranksPerProc(); ++i) spec.ranks_needed[sz(sh.layout.firstRank() + i)] = true;
          sh.problem_error.clear();
          try {
            sh.problem = std::make_unique<Problem>(buildProblem(spec));
          } catch (const std::exception& e) {
            sh.problem.reset();
            sh.problem_error = e.what();
          }
        }
        prog.set("waiting for the problem");
        meet(sh.barrier, sh.host_wait_s, "problem built");
        if (!sh.problem) {
          if (printer)
            out("# %s %s %lld tokens: error: %s\n", modeName(mode), dtypeName(dtype), static_cast<long long>(tokens),
                sh.problem_error.c_str());
          sh.fail(1);
          meet(sh.barrier, sh.host_wait_s, "problem failed");
          continue;
        }
        const Problem& p = *sh.problem;
        if (printer) {
          printRoutingSummary(p, false);
          if (!header) out("%s", tableHeader().c_str());
          header = true;
        }
        if (printer) out("# [gpu] NCCL baseline: verification pass + %d timed calls per op\n", run.warmup + run.iters);
        BaselineResult bl;
        runBaseline(p, rd, col, run, tm, prog, &bl);
        const std::vector<Aggregate> bla = aggregate(col, {&bl.dispatch, &bl.combine, &bl.first}, rd.num_ranks);
        for (const Aggregate& a : bla)
          if (a.wrong != 0) sh.fail(1);

        for (int sms : cfg.sms) {
          if (printer && moe.usable)
            out("# [gpu] MoE %s ops (sms %s): verification pass + %d timed calls per op\n", modeName(mode),
                sms ? std::to_string(sms).c_str() : "auto", run.warmup + run.iters);
          std::vector<ResultRow> rows;
          if (mode == Mode::kHt) {
            HtResult ht;
            runMoeHt(p, rd, col, moe, sms, run, tm, prog, &ht);
            const std::vector<Aggregate> a = aggregate(col, {&ht.dispatch, &ht.combine, &ht.first}, rd.num_ranks);
            const char* names[3] = {"dispatch", "combine", "notify_dispatch"};
            for (int i = 0; i < 3; ++i) {
              ResultRow row = makeRow(run, p, names[i], sms, false);
              fillRow(&row, a[sz(i)], &bla[sz(i)], sh.kernel_timer && i != 2);  // notify_dispatch: events
              rows.push_back(row);
            }
          } else {
            LlResult ll;
            runMoeLl(p, rd, col, moe, run, tm, prog, &ll);
            const std::vector<Aggregate> a = aggregate(
                col,
                {&ll.dispatch, &ll.combine, &ll.dispatch_send, &ll.dispatch_recv, &ll.combine_send, &ll.combine_recv},
                rd.num_ranks);
            const char* names[6] = {"dispatch",      "combine",      "dispatch_send",
                                    "dispatch_recv", "combine_send", "combine_recv"};
            for (int i = 0; i < 6; ++i) {
              ResultRow row = makeRow(run, p, names[i], 0, false);
              fillRow(&row, a[sz(i)], i < 2 ? &bla[sz(i)] : nullptr, sh.kernel_timer);
              rows.push_back(row);
            }
          }
          for (ResultRow& row : rows) {
            row.gpu_name = gpu_name;
            if (row.available && row.wrong != 0) sh.fail(1);
            if (!row.available && o.require_moe) sh.fail(1);
            if (printer) {
              if (!row.available) ++sh.unavailable_rows;
              out("%s", tableRow(row).c_str());
              if (run.json) run.json->write(row);
            }
          }
        }
        prog.set("end of size");
        meet(sh.barrier, sh.host_wait_s, "end of size");
        if (local == 0) sh.problem.reset();
      }
    }
    prog.set("ncclMoeCommDestroy");
    moe.destroy();
    if (printer && header) printTableNotes(mode, false, sh.kernel_timer);
  }
  prog.set("ncclCommDestroy");
  col.barrier();
  HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  if (col.gateTimedOut()) {
    std::fprintf(stderr,
                 "moe-perf: rank %d: a start-gate meeting gave up after %.0f s waiting for a peer; the ranks' "
                 "calls were not aligned and the timings are suspect\n",
                 rd.rank, Collective::kGateTimeoutS);
    sh.fail(1);
  }
  ncclCommDestroy(rd.comm);
  cudaStreamDestroy(rd.stream);
  prog.set("done");
  prog.finished.store(true);
}

}  // namespace

int runGpu(RunInfo& run, const RankLayout& layout, int num_devices) {
  (void)num_devices;
  run.iters = run.options.iters > 0 ? run.options.iters : 20;
  run.warmup = run.options.warmup >= 0 ? run.options.warmup : 5;
  Shared sh(run, layout);
  const std::string rv = prepareRendezvous(layout);
  if (!rv.empty()) {
    std::fprintf(stderr, "moe-perf: %s\n", rv.c_str());
    return 1;
  }
  const ncclResult_t idr = ncclGetUniqueId(&sh.id);
  if (idr != ncclSuccess) {
    std::fprintf(stderr, "moe-perf: ncclGetUniqueId failed: %s (%s)\n", ncclGetErrorString(idr),
                 ncclGetLastError(nullptr));
    return 1;
  }
  if (layout.proc_rank == 0)
    out("# iters %d, warmup %d, check %d, routing %s, seed %llu\n", run.iters, run.warmup, run.options.check,
        run.options.routing.text.c_str(), static_cast<unsigned long long>(run.options.seed));
  // The timer, decided once per process before any rank thread launches work.
  std::string why;
  if (run.options.timer != TimerChoice::kEvent) sh.kernel_timer = KernelTimer::instance().start(&why);
  if (sh.kernel_timer) {
    if (layout.proc_rank == 0)
      out("# timer: kernel (CUPTI kernel records, first kernel start to last kernel end of each call; CUDA-event "
          "times in JSON event_median_us)\n");
  } else if (run.options.timer == TimerChoice::kEvent) {
    if (layout.proc_rank == 0) out("# timer: event (CUDA events around each call, --timer event)\n");
  } else {
    // Every process that falls back says so (another process may have a working CUPTI; its rows then fall back
    // too, with the reason in the row).
    out("# timer: event (CUDA events around each call): kernel timer not available: %s\n", why.c_str());
  }

  const int n = layout.ranksPerProc();
  for (int i = 0; i < n; ++i) sh.progress[i].set("starting");
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&sh, i] {
      try {
        rankMain(sh, i);
      } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "moe-perf: rank %d: error: %s\n", sh.layout.firstRank() + i, e.what());
        std::fflush(stderr);
        std::_Exit(1);  // other ranks may be blocked in collectives with this one: end the process
      }
    });
  // Watchdog: a rank that makes no progress for --timeout seconds ends the run.
  std::thread watchdog([&sh, n] {
    const int64_t limit = static_cast<int64_t>(sh.run.options.timeout_s) * 1000000000LL;
    while (!sh.done.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (limit <= 0) continue;
      for (int i = 0; i < n; ++i) {
        if (sh.progress[i].finished.load() || nowNs() - sh.progress[i].last_ns.load() <= limit) continue;
        std::fflush(stdout);
        for (int j = 0; j < n; ++j)
          std::fprintf(stderr, "moe-perf: rank %d: no progress for %d s, last phase: %s\n", sh.layout.firstRank() + j,
                       sh.run.options.timeout_s, sh.progress[j].phase.load());
        std::fflush(stderr);
        std::_Exit(3);
      }
    }
  });
  for (auto& t : threads) t.join();
  sh.done.store(true);
  watchdog.join();
  // No CUPTI tracing or buffer callbacks while the process tears down.
  if (sh.kernel_timer) KernelTimer::instance().stop();
  if (layout.proc_rank == 0) {
    if (sh.exit_code.load() != 0) {
      out("# errors: see above (wrong results, invalid shapes, failures or unavailable MoE ops)\n");
    } else {
      out("# %s", run.options.check ? "all checks passed" : "no errors (checks skipped: -c 0)");
      if (sh.unavailable_rows.load() > 0)
        out(" (%d MoE rows not available: baseline only)", sh.unavailable_rows.load());
      out("\n");
    }
  }
  return sh.exit_code.load();
}

}  // namespace nccl_moe::perf
