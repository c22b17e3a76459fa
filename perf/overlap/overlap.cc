// moe-overlap: is the tuner plugin's SM co-scheduling cap worth it? One process, one thread per GPU (rank r
// drives CUDA device r), two NCCL communicators from two ncclCommInitAll calls: `moe_nccl` carries the MoE
// communicator (and this tool's stream-ordered barriers on stream A), `ar_nccl` carries only the all-reduce
// on stream B, so the two never interleave collectives on one communicator.
//
// Per rank, three measurements, each preceded by warm-up iterations and a stream-ordered barrier:
//   1. ht alone:        N x (cached ncclMoeDispatch + ncclMoeCombine) on stream A (one host-count notify first);
//   2. allreduce alone: N x ncclAllReduce(ar_bytes, bf16, sum, in place) on stream B;
//   3. overlapped:      both loops enqueued together, A and B released by one event after the barrier.
// Per iteration, events on each stream give the iteration times (median reported) and the whole loop's
// time; the overlapped region ends when both streams are done. Reported per rank then reduced over ranks
// with max (the slowest rank governs a collective). Nothing is verified numerically (moe-perf does).
//
// The tuner plugin is chosen only by the caller's environment (NCCL_TUNER_PLUGIN, NCCL_MOE_SM_RESERVE) before
// the process starts; the tool prints them, whether a libnccl-tuner*.so got mapped, and the channel cap the
// plugin's rule (plugin/channel_cap.h) implies for this GPU.
//
// Failure policy (a tool, not the library): every CUDA/NCCL/NCCL-MoE return code and the asynchronous errors
// are checked; the first failure prints the call and ncclMoeGetLastError / ncclGetLastError, then the process
// exits with status 1 right away (_Exit), so no rank thread is left waiting in a collective its peers never
// enter. A watchdog ends a run that takes longer than --timeout with status 3, naming each rank's phase.
#include <cuda_runtime.h>
#include <link.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "channel_cap.h"      // plugin/: the tuner's cap rule, for the "expected cap" line
#include "harness/barrier.h"  // tests/: the host barrier of tests and tools
#include "nccl_moe.h"

namespace nccl_moe {
namespace overlap {
namespace {

// ------------------------------------------------------------------------------------------------
// Options
// ------------------------------------------------------------------------------------------------

struct Options {
  int num_gpus = 0;  // 0 = every visible GPU, at most NCCL_MOE_MAX_RANKS
  int iters = 20;
  int warmup = 3;
  int num_sms = 24;
  size_t ar_bytes = size_t{256} << 20;
  int tokens = 4096;
  int hidden = 7168;
  int experts = 256;
  int topk = 8;
  uint64_t seed = 1234;
  int timeout_s = 300;
};

void usage(FILE* f) {
  std::fprintf(f,
               "usage: moe-overlap [options]\n"
               "  -g N            ranks = GPUs 0..N-1 (default: all visible, at most %d)\n"
               "  -n N            timed iterations (default 20)\n"
               "  -w N            warm-up iterations (default 3)\n"
               "  --sms N         SM budget of the HT dispatch/combine (default 24)\n"
               "  --ar-bytes B    all-reduce size, bf16 sum; suffix K, M, G (default 256M)\n"
               "  --tokens T      tokens per rank (default 4096)\n"
               "  --hidden H      hidden size, bf16 elements (default 7168)\n"
               "  --experts E     experts (default 256)\n"
               "  --topk K        experts per token (default 8)\n"
               "  --seed S        routing seed (default 1234)\n"
               "  --timeout S     watchdog: abort when the run takes longer (default 300)\n"
               "The tuner plugin is selected by the environment: NCCL_TUNER_PLUGIN=<path of libnccl-tuner-moe.so>,\n"
               "NCCL_MOE_SM_RESERVE=<SMs>.\n",
               NCCL_MOE_MAX_RANKS);
}

bool parseInt(const char* s, long long lo, long long hi, long long* out) {
  if (s == nullptr || *s == '\0') return false;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s, &end, 10);
  if (errno != 0 || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool parseBytes(const char* s, size_t* out) {
  if (s == nullptr || *s == '\0') return false;
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s) return false;
  unsigned long long mul = 1;
  if (*end == 'K' || *end == 'k') mul = 1ull << 10;
  if (*end == 'M' || *end == 'm') mul = 1ull << 20;
  if (*end == 'G' || *end == 'g') mul = 1ull << 30;
  if (mul != 1) ++end;
  if (*end == 'B' || *end == 'b') ++end;
  if (*end != '\0' || v == 0 || v > (1ull << 40) / mul) return false;
  *out = static_cast<size_t>(v * mul);
  return true;
}

// Returns 0 to run, otherwise the process exit status (help: 0 after printing; bad option: 2).
int parseOptions(int argc, char** argv, Options* o, bool* help) {
  *help = false;
  for (int i = 1; i < argc; ++i) {
    std::string name = argv[i];
    const char* value = nullptr;
    const size_t eq = name.find('=');
    if (name.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = argv[i] + eq + 1;
      name = name.substr(0, eq);
    }
    if (name == "-h" || name == "--help") {
      *help = true;
      return 0;
    }
    auto next = [&]() -> const char* {
      if (value != nullptr) return value;
      return i + 1 < argc ? argv[++i] : nullptr;
    };
    auto intOpt = [&](long long lo, long long hi, auto* field) {
      long long v = 0;
      const char* s = next();
      if (!parseInt(s, lo, hi, &v)) {
        std::fprintf(stderr, "moe-overlap: %s needs an integer in [%lld, %lld], got '%s'\n", name.c_str(), lo, hi,
                     s ? s : "");
        return false;
      }
      *field = static_cast<std::remove_pointer_t<decltype(field)>>(v);
      return true;
    };
    bool ok = true;
    if (name == "-g") {
      ok = intOpt(1, NCCL_MOE_MAX_RANKS, &o->num_gpus);
    } else if (name == "-n") {
      ok = intOpt(1, 1000000, &o->iters);
    } else if (name == "-w") {
      ok = intOpt(0, 1000000, &o->warmup);
    } else if (name == "--sms") {
      ok = intOpt(1, 1024, &o->num_sms);
    } else if (name == "--tokens") {
      ok = intOpt(0, 1 << 20, &o->tokens);
    } else if (name == "--hidden") {
      ok = intOpt(8, 1 << 20, &o->hidden);
    } else if (name == "--experts") {
      ok = intOpt(1, 1 << 16, &o->experts);
    } else if (name == "--topk") {
      ok = intOpt(1, NCCL_MOE_MAX_TOPK, &o->topk);
    } else if (name == "--seed") {
      ok = intOpt(0, (1ll << 62), &o->seed);
    } else if (name == "--timeout") {
      ok = intOpt(1, 86400, &o->timeout_s);
    } else if (name == "--ar-bytes") {
      const char* s = next();
      ok = parseBytes(s, &o->ar_bytes);
      if (!ok) std::fprintf(stderr, "moe-overlap: --ar-bytes needs a size such as 256M, got '%s'\n", s ? s : "");
    } else {
      std::fprintf(stderr, "moe-overlap: unknown option '%s'\n", argv[i]);
      ok = false;
    }
    if (!ok) return 2;
  }
  if (o->topk > o->experts) {
    std::fprintf(stderr, "moe-overlap: --topk %d exceeds --experts %d\n", o->topk, o->experts);
    return 2;
  }
  if (o->ar_bytes < 2) {
    std::fprintf(stderr, "moe-overlap: --ar-bytes must hold at least one bf16 element\n");
    return 2;
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------
// Failure handling: print once, end the process (other rank threads may sit in collectives)
// ------------------------------------------------------------------------------------------------

std::mutex g_fatal_mutex;

[[noreturn]] void fatal(int rank, const char* call, const std::string& detail) {
  g_fatal_mutex.lock();  // never unlocked: the first failure ends the process
  std::fflush(stdout);
  std::fprintf(stderr, "moe-overlap: rank %d: %s failed: %s\n", rank, call, detail.c_str());
  std::fprintf(stderr, "moe-overlap: aborting the run (exit status 1)\n");
  std::fflush(stderr);
  std::_Exit(1);
}

std::string moeText(ncclResult_t r, ncclMoeComm_t comm) {
  std::string s = ncclMoeGetErrorString(r);
  const char* detail = ncclMoeGetLastError(comm);
  if (detail != nullptr && *detail != '\0') s += std::string(": ") + detail;
  return s;
}

std::string ncclText(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
  const char* detail = ncclGetLastError(comm);
  if (detail != nullptr && *detail != '\0') s += std::string(": ") + detail;
  return s;
}

#define OV_CUDA(rank, call)                                                        \
  do {                                                                             \
    const cudaError_t ov_err_ = (call);                                            \
    if (ov_err_ != cudaSuccess) fatal((rank), #call, cudaGetErrorString(ov_err_)); \
  } while (0)

#define OV_NCCL(rank, comm, call)                                                \
  do {                                                                           \
    const ncclResult_t ov_res_ = (call);                                         \
    if (ov_res_ != ncclSuccess) fatal((rank), #call, ncclText(ov_res_, (comm))); \
  } while (0)

// `comm` may be nullptr (the calling thread's last error, e.g. for ncclMoeCommInit).
#define OV_MOE(rank, comm, call)                                                \
  do {                                                                          \
    const ncclResult_t ov_res_ = (call);                                        \
    if (ov_res_ != ncclSuccess) fatal((rank), #call, moeText(ov_res_, (comm))); \
  } while (0)

using harness::HostBarrier;  // the rank threads' host barrier, bounded by --timeout

// ------------------------------------------------------------------------------------------------
// Results
// ------------------------------------------------------------------------------------------------

// Microseconds per iteration. *_med: median of one stream's iteration times; *_loop: that stream's whole
// loop / iterations; region: first event to the end of both streams / iterations.
struct RankResult {
  int num_recv = 0;
  double ht_med = 0, ht_loop = 0;
  double ar_med = 0, ar_loop = 0;
  double ov_ht_med = 0, ov_ht_loop = 0, ov_ar_med = 0, ov_ar_loop = 0, ov_region = 0;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Shared {
  Options opt;
  int num_ranks = 0;
  std::vector<ncclComm_t> moe_nccl, ar_nccl;
  HostBarrier barrier;
  std::vector<RankResult> results;
  std::unique_ptr<std::atomic<const char*>[]> phase;
  std::atomic<int> finished{0};

  Shared(const Options& o, int n)
      : opt(o), num_ranks(n), moe_nccl(n), ar_nccl(n), barrier(n), results(n), phase(new std::atomic<const char*>[n]) {
    for (int r = 0; r < n; ++r) phase[r].store("starting");
  }
};

// Uniform random top-k routing of one rank: K distinct experts per token, int64, seeded per rank.
std::vector<int64_t> makeRouting(const Options& o, int rank) {
  std::mt19937_64 rng(o.seed * 1000003ull + static_cast<uint64_t>(rank));
  std::uniform_int_distribution<int> pick(0, o.experts - 1);
  std::vector<int64_t> idx(static_cast<size_t>(o.tokens) * o.topk);
  for (int t = 0; t < o.tokens; ++t) {
    int64_t* row = &idx[static_cast<size_t>(t) * o.topk];
    for (int k = 0; k < o.topk; ++k) {
      int e;
      do {
        e = pick(rng);
      } while (std::find(row, row + k, static_cast<int64_t>(e)) != row + k);
      row[k] = e;
    }
  }
  return idx;
}

// Timing events of one stream's loop: ev[0] before the first iteration, ev[i + 1] after iteration i.
class LoopEvents {
 public:
  LoopEvents(int rank, int iters) : rank_(rank), ev_(static_cast<size_t>(iters) + 1) {
    for (auto& e : ev_) OV_CUDA(rank_, cudaEventCreate(&e));
  }
  ~LoopEvents() {
    for (auto& e : ev_) cudaEventDestroy(e);
  }
  LoopEvents(const LoopEvents&) = delete;
  LoopEvents& operator=(const LoopEvents&) = delete;
  cudaEvent_t operator[](size_t i) const { return ev_[i]; }
  double us(cudaEvent_t a, cudaEvent_t b) const {
    float ms = 0;
    OV_CUDA(rank_, cudaEventElapsedTime(&ms, a, b));
    return static_cast<double>(ms) * 1e3;
  }
  double medianUs() const {
    std::vector<double> v;
    for (size_t i = 0; i + 1 < ev_.size(); ++i) v.push_back(us(ev_[i], ev_[i + 1]));
    return median(v);
  }
  double loopUs() const { return us(ev_.front(), ev_.back()) / static_cast<double>(ev_.size() - 1); }

 private:
  int rank_;
  std::vector<cudaEvent_t> ev_;
};

// ------------------------------------------------------------------------------------------------
// One rank
// ------------------------------------------------------------------------------------------------

void runRank(Shared& sh, int r) {
  const Options& o = sh.opt;
  auto phase = [&](const char* p) { sh.phase[r].store(p); };
  auto meet = [&] {
    if (!sh.barrier.wait(o.timeout_s))
      fatal(r, "host barrier",
            "another rank did not arrive within --timeout " + std::to_string(o.timeout_s) + " s (phase " +
                sh.phase[r].load() + ")");
  };
  OV_CUDA(r, cudaSetDevice(r));
  ncclComm_t moe_nccl = sh.moe_nccl[r], ar_nccl = sh.ar_nccl[r];

  phase("ncclMoeCommInit");
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = o.experts;
  config.hidden = o.hidden;
  config.max_topk = o.topk;
  config.max_tokens_per_rank = o.tokens;
  config.num_sms = o.num_sms;
  ncclMoeComm_t comm = nullptr;
  OV_MOE(r, nullptr, ncclMoeCommInit(&comm, moe_nccl, &config));
  ncclMoeHandle_t handle = nullptr;
  OV_MOE(r, comm, ncclMoeHandleCreate(comm, &handle));

  cudaStream_t sa = nullptr, sb = nullptr;
  OV_CUDA(r, cudaStreamCreateWithFlags(&sa, cudaStreamNonBlocking));
  OV_CUDA(r, cudaStreamCreateWithFlags(&sb, cudaStreamNonBlocking));

  // Inputs: routing, activations (any finite bf16), the all-reduce buffer, the barrier tokens.
  const std::vector<int64_t> routing = makeRouting(o, r);
  const size_t row_bytes = static_cast<size_t>(o.hidden) * 2;
  const size_t ar_elems = o.ar_bytes / 2;
  void *idx = nullptr, *x = nullptr, *out = nullptr, *ar_buf = nullptr, *recv_x = nullptr;
  int *token_a = nullptr, *token_b = nullptr;
  OV_CUDA(r, cudaMalloc(&idx, std::max<size_t>(routing.size(), 1) * sizeof(int64_t)));
  OV_CUDA(r, cudaMalloc(&x, std::max<size_t>(o.tokens, 1) * row_bytes));
  OV_CUDA(r, cudaMalloc(&out, std::max<size_t>(o.tokens, 1) * row_bytes));
  OV_CUDA(r, cudaMalloc(&ar_buf, ar_elems * 2));
  OV_CUDA(r, cudaMalloc(&token_a, sizeof(int)));
  OV_CUDA(r, cudaMalloc(&token_b, sizeof(int)));
  if (!routing.empty())
    OV_CUDA(r, cudaMemcpy(idx, routing.data(), routing.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  OV_CUDA(r, cudaMemset(x, 0x3c, std::max<size_t>(o.tokens, 1) * row_bytes));  // bf16 0x3c3c ~ 0.0115
  OV_CUDA(r, cudaMemset(ar_buf, 0, ar_elems * 2));
  OV_CUDA(r, cudaMemset(token_a, 0, sizeof(int)));
  OV_CUDA(r, cudaMemset(token_b, 0, sizeof(int)));
  OV_CUDA(r, cudaDeviceSynchronize());

  auto checkAsync = [&](const char* where) {
    ncclResult_t async = ncclSuccess;
    OV_MOE(r, comm, ncclMoeCommGetAsyncError(comm, &async));
    if (async != ncclSuccess) fatal(r, where, "asynchronous NCCL-MoE error: " + moeText(async, comm));
    for (ncclComm_t c : {moe_nccl, ar_nccl}) {
      OV_NCCL(r, c, ncclCommGetAsyncError(c, &async));
      if (async != ncclSuccess) fatal(r, where, "asynchronous NCCL error: " + ncclText(async, c));
    }
  };
  auto syncBoth = [&](const char* where) {
    OV_CUDA(r, cudaStreamSynchronize(sa));
    OV_CUDA(r, cudaStreamSynchronize(sb));
    checkAsync(where);
  };
  // Stream-ordered barrier: work enqueued after it starts once every rank has reached it.
  auto barrierA = [&] { OV_NCCL(r, moe_nccl, ncclAllReduce(token_a, token_a, 1, ncclInt32, ncclSum, moe_nccl, sa)); };
  auto barrierB = [&] { OV_NCCL(r, ar_nccl, ncclAllReduce(token_b, token_b, 1, ncclInt32, ncclSum, ar_nccl, sb)); };

  // One notify (host-count mode), then every HT iteration is a cached dispatch + combine.
  phase("ncclMoeDispatchNotify");
  int num_recv = -1;
  ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  na.topk_idx = idx;
  na.topk_idx_type = ncclMoeIndexInt64;
  na.num_tokens = o.tokens;
  na.topk = o.topk;
  na.expert_alignment = 1;
  na.recv_capacity = 0;
  na.num_recv_tokens = &num_recv;
  OV_MOE(r, comm, ncclMoeDispatchNotify(comm, handle, &na, sa));
  syncBoth("ncclMoeDispatchNotify");
  if (num_recv < 0) fatal(r, "ncclMoeDispatchNotify", "returned a negative receive count");
  sh.results[r].num_recv = num_recv;
  OV_CUDA(r, cudaMalloc(&recv_x, std::max<size_t>(num_recv, 1) * row_bytes));

  ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  da.x = x;
  da.dtype = ncclMoeBfloat16;
  da.hidden = o.hidden;
  da.recv_x = recv_x;
  da.num_sms = o.num_sms;
  ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  ca.x = recv_x;  // the "expert output" is the dispatched rows themselves: values do not matter here
  ca.hidden = o.hidden;
  ca.combined_x = out;
  ca.num_sms = o.num_sms;
  auto htIter = [&] {
    OV_MOE(r, comm, ncclMoeDispatch(comm, handle, &da, sa));
    OV_MOE(r, comm, ncclMoeCombine(comm, handle, &ca, sa));
  };
  auto arIter = [&] {
    OV_NCCL(r, ar_nccl, ncclAllReduce(ar_buf, ar_buf, ar_elems, ncclBfloat16, ncclSum, ar_nccl, sb));
  };
  RankResult& res = sh.results[r];

  // 1. HT alone on stream A.
  {
    phase("ht alone: warm-up");
    meet();
    for (int i = 0; i < o.warmup; ++i) htIter();
    syncBoth("ht alone warm-up");
    phase("ht alone: timed");
    LoopEvents ev(r, o.iters);
    meet();
    barrierA();
    OV_CUDA(r, cudaEventRecord(ev[0], sa));
    for (int i = 0; i < o.iters; ++i) {
      htIter();
      OV_CUDA(r, cudaEventRecord(ev[static_cast<size_t>(i) + 1], sa));
    }
    syncBoth("ht alone");
    res.ht_med = ev.medianUs();
    res.ht_loop = ev.loopUs();
  }

  // 2. All-reduce alone on stream B.
  {
    phase("allreduce alone: warm-up");
    meet();
    for (int i = 0; i < o.warmup; ++i) arIter();
    syncBoth("allreduce alone warm-up");
    phase("allreduce alone: timed");
    LoopEvents ev(r, o.iters);
    meet();
    barrierB();
    OV_CUDA(r, cudaEventRecord(ev[0], sb));
    for (int i = 0; i < o.iters; ++i) {
      arIter();
      OV_CUDA(r, cudaEventRecord(ev[static_cast<size_t>(i) + 1], sb));
    }
    syncBoth("allreduce alone");
    res.ar_med = ev.medianUs();
    res.ar_loop = ev.loopUs();
  }

  // 3. Overlapped: one barrier on A, then both streams released by the same event; the iterations are
  //    enqueued alternately so that neither stream waits for the host to enqueue the other's loop.
  {
    cudaEvent_t start = nullptr, end = nullptr;
    OV_CUDA(r, cudaEventCreate(&start));
    OV_CUDA(r, cudaEventCreate(&end));
    LoopEvents ea(r, o.iters), eb(r, o.iters);
    for (int pass = 0; pass < 2; ++pass) {
      const bool timed = pass == 1;
      const int n = timed ? o.iters : o.warmup;
      phase(timed ? "overlapped: timed" : "overlapped: warm-up");
      meet();
      barrierA();
      OV_CUDA(r, cudaEventRecord(start, sa));
      OV_CUDA(r, cudaStreamWaitEvent(sb, start, 0));
      if (timed) {
        OV_CUDA(r, cudaEventRecord(ea[0], sa));
        OV_CUDA(r, cudaEventRecord(eb[0], sb));
      }
      for (int i = 0; i < n; ++i) {
        htIter();
        if (timed) OV_CUDA(r, cudaEventRecord(ea[static_cast<size_t>(i) + 1], sa));
        arIter();
        if (timed) OV_CUDA(r, cudaEventRecord(eb[static_cast<size_t>(i) + 1], sb));
      }
      if (timed) {
        OV_CUDA(r, cudaStreamWaitEvent(sa, eb[static_cast<size_t>(n)], 0));
        OV_CUDA(r, cudaEventRecord(end, sa));
      }
      syncBoth(timed ? "overlapped" : "overlapped warm-up");
    }
    res.ov_ht_med = ea.medianUs();
    res.ov_ht_loop = ea.loopUs();
    res.ov_ar_med = eb.medianUs();
    res.ov_ar_loop = eb.loopUs();
    res.ov_region = ea.us(start, end) / o.iters;
    OV_CUDA(r, cudaEventDestroy(start));
    OV_CUDA(r, cudaEventDestroy(end));
  }

  // Teardown (collective: every rank gets here, or the process already ended).
  phase("teardown");
  meet();
  for (void* p : {idx, x, out, ar_buf, recv_x, static_cast<void*>(token_a), static_cast<void*>(token_b)})
    OV_CUDA(r, cudaFree(p));
  OV_MOE(r, comm, ncclMoeHandleDestroy(handle));
  OV_MOE(r, nullptr, ncclMoeCommDestroy(comm));  // the comm is gone once this returns: the thread's error
  OV_CUDA(r, cudaStreamDestroy(sa));
  OV_CUDA(r, cudaStreamDestroy(sb));
  OV_NCCL(r, ar_nccl, ncclCommDestroy(ar_nccl));
  OV_NCCL(r, moe_nccl, ncclCommDestroy(moe_nccl));
  phase("done");
  sh.finished.fetch_add(1);
}

// ------------------------------------------------------------------------------------------------
// Report
// ------------------------------------------------------------------------------------------------

// Path of a mapped tuner plugin (any libnccl-tuner*.so), "" if none.
std::string mappedTuner() {
  std::string found;
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* data) {
        const char* name = info->dlpi_name;
        if (name == nullptr) return 0;
        const char* base = std::strrchr(name, '/');
        base = base ? base + 1 : name;
        if (std::strncmp(base, "libnccl-tuner", 13) == 0) {
          *static_cast<std::string*>(data) = name;
          return 1;
        }
        return 0;
      },
      &found);
  return found;
}

const char* envOr(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : fallback;
}

void printReport(const Shared& sh, const std::string& tuner, const char* gpu_name, int device_sms) {
  const Options& o = sh.opt;
  const int n = sh.num_ranks;
  auto worst = [&](double RankResult::*f) {
    double v = 0;
    for (const RankResult& rr : sh.results) v = std::max(v, rr.*f);
    return v;
  };
  int recv_min = sh.results[0].num_recv, recv_max = recv_min;
  for (const RankResult& rr : sh.results) {
    recv_min = std::min(recv_min, rr.num_recv);
    recv_max = std::max(recv_max, rr.num_recv);
  }
  const char* reserve_env = std::getenv("NCCL_MOE_SM_RESERVE");
  const int reserve = reserve_env != nullptr ? std::atoi(reserve_env) : 0;
  const int cap = tuner.empty() ? 0 : tuner::channelCap(reserve, device_sms);
  int nccl_version = 0;
  ncclGetVersion(&nccl_version);

  std::printf("# moe-overlap: %d ranks (%s, %d SMs), NCCL %d, %d iterations after %d warm-up\n", n, gpu_name,
              device_sms, nccl_version, o.iters, o.warmup);
  std::printf(
      "# ht: cached dispatch + combine, bf16, %d tokens/rank, hidden %d, top-%d of %d experts, %d SMs, "
      "N_recv %d..%d rows/rank\n",
      o.tokens, o.hidden, o.topk, o.experts, o.num_sms, recv_min, recv_max);
  std::printf("# allreduce: %.1f MiB bf16 sum in place, on its own communicator\n", o.ar_bytes / 1048576.0);
  std::printf("# env: NCCL_TUNER_PLUGIN=%s NCCL_MOE_SM_RESERVE=%s NCCL_NVLS_ENABLE=%s NCCL_MAX_CTAS=%s\n",
              envOr("NCCL_TUNER_PLUGIN", "(unset)"), reserve_env ? reserve_env : "(unset)",
              envOr("NCCL_NVLS_ENABLE", "(unset)"), envOr("NCCL_MAX_CTAS", "(unset)"));
  std::printf("# tuner mapped: %s; channel cap by the plugin's rule: %s\n", tuner.empty() ? "none" : tuner.c_str(),
              cap > 0 ? std::to_string(cap).c_str() : "none");
  std::printf(
      "# us per iteration; ht_us/allreduce_us: median iteration of that stream, total_us: loop or region "
      "time / iterations; slowest rank\n");

  const double ht = worst(&RankResult::ht_med), ht_loop = worst(&RankResult::ht_loop);
  const double ar = worst(&RankResult::ar_med), ar_loop = worst(&RankResult::ar_loop);
  const double ov = worst(&RankResult::ov_region);
  std::printf("%-18s %12s %14s %12s\n", "mode", "ht_us", "allreduce_us", "total_us");
  std::printf("%-18s %12.1f %14s %12.1f\n", "ht alone", ht, "-", ht_loop);
  std::printf("%-18s %12s %14.1f %12.1f\n", "allreduce alone", "-", ar, ar_loop);
  std::printf("%-18s %12.1f %14.1f %12.1f\n", "sum (serial)", ht, ar, ht_loop + ar_loop);
  std::printf("%-18s %12.1f %14.1f %12.1f\n", "max (ideal)", ht, ar, std::max(ht_loop, ar_loop));
  std::printf("%-18s %12.1f %14.1f %12.1f\n", "overlapped", worst(&RankResult::ov_ht_med),
              worst(&RankResult::ov_ar_med), ov);
  std::printf(
      "# overlapped stream loops: ht %.1f us, allreduce %.1f us per iteration (stretch vs alone: ht %.2fx, "
      "allreduce %.2fx)\n",
      worst(&RankResult::ov_ht_loop), worst(&RankResult::ov_ar_loop),
      ht_loop > 0 ? worst(&RankResult::ov_ht_loop) / ht_loop : 0.0,
      ar_loop > 0 ? worst(&RankResult::ov_ar_loop) / ar_loop : 0.0);
  std::printf("# overlap: sum/overlapped = %.2fx (1.00 = no gain), overlapped/max = %.2fx (1.00 = perfect)\n",
              ov > 0 ? (ht_loop + ar_loop) / ov : 0.0,
              std::max(ht_loop, ar_loop) > 0 ? ov / std::max(ht_loop, ar_loop) : 0.0);
  std::fflush(stdout);
}

int run(int argc, char** argv) {
  Options o;
  bool help = false;
  const int rc = parseOptions(argc, argv, &o, &help);
  if (help) {
    usage(stdout);
    return 0;
  }
  if (rc != 0) {
    usage(stderr);
    return rc;
  }
  int visible = 0;
  if (cudaGetDeviceCount(&visible) != cudaSuccess || visible <= 0) {
    std::printf("moe-overlap needs GPUs\n");
    return 0;
  }
  int n = o.num_gpus > 0 ? o.num_gpus : std::min(visible, NCCL_MOE_MAX_RANKS);
  if (n > visible) {
    std::fprintf(stderr, "moe-overlap: -g %d but only %d GPUs are visible\n", n, visible);
    return 2;
  }
  if (o.experts % n != 0) {
    std::fprintf(stderr, "moe-overlap: %d experts do not divide over %d ranks; use -g or --experts\n", o.experts, n);
    return 2;
  }

  Shared sh(o, n);
  std::atomic<bool> stop{false};
  std::thread watchdog([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(o.timeout_s);
    while (!stop.load()) {
      if (std::chrono::steady_clock::now() > deadline) {
        g_fatal_mutex.lock();
        std::fflush(stdout);
        std::fprintf(stderr, "moe-overlap: no result after %d s (--timeout); phase per rank:\n", o.timeout_s);
        for (int r = 0; r < n; ++r) std::fprintf(stderr, "  rank %d: %s\n", r, sh.phase[r].load());
        std::fprintf(stderr, "moe-overlap: aborting the run (exit status 3)\n");
        std::fflush(stderr);
        std::_Exit(3);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  std::vector<int> devs(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) devs[static_cast<size_t>(i)] = i;
  OV_NCCL(-1, nullptr, ncclCommInitAll(sh.moe_nccl.data(), n, devs.data()));
  OV_NCCL(-1, nullptr, ncclCommInitAll(sh.ar_nccl.data(), n, devs.data()));
  const std::string tuner = mappedTuner();  // NCCL loads the tuner at the first communicator init
  cudaDeviceProp prop{};
  OV_CUDA(-1, cudaGetDeviceProperties(&prop, 0));

  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) threads.emplace_back([&sh, r] { runRank(sh, r); });
  for (auto& t : threads) t.join();
  stop.store(true);
  watchdog.join();

  printReport(sh, tuner, prop.name, prop.multiProcessorCount);
  return 0;
}

}  // namespace
}  // namespace overlap
}  // namespace nccl_moe

int main(int argc, char** argv) { return nccl_moe::overlap::run(argc, argv); }
