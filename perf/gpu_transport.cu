// moe-perf transport mode, the GPU side: the one-GPU transport world of the scale-out transport's GPU tests
// (tests/harness/transport_world.h: ranks 0 and 1 as two virtual nodes on GPU 0, a software NIC with the CUDA
// memory backend and an executor thread each), one backend at a time, and a sender / receiver kernel pair per
// (backend, op, size). Labels, rows and the timestamp reduction are perf/transport.h (pure, unit-tested).
//
// Kernels (one block of kThreads each, on the world's two non-blocking streams; the receiver is launched first):
//   sender (rank 0)    latency loop: fill the source with iteration i's pattern, fence, post (put + quiet +
//                      signal, or put_signal), wait for the receiver's ack (the source may then be refilled);
//                      stream loop: fill once per batch, post `batch` messages to consecutive slots, (put: quiet,
//                      signal), wait for the ack. Thread 0 posts; the whole block fills.
//   receiver (rank 1)  waits for the signal that covers the message(s), takes the end timestamp (put_signal), checks
//                      every byte against the pattern (the whole block, L2 loads), acks with a signal to rank 0.
// Signal words only grow: the host keeps how far each has counted (sig_base, ack_base) across launches, and every
// launch uses fresh pattern ids, so data left by an earlier launch can never pass a check. Timestamps go to mapped
// host memory (no copy while kernels spin). Every device wait is bounded (kTimeoutNs) and every host wait too.
#include <cuda_runtime.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gpu_transport.h"
#include "harness/transport_world.h"
#include "transport.h"
#include "transport/rdma/ibgda/ibgda.cuh"
#include "transport/rdma/proxy/proxy.cuh"

namespace nccl_moe::perf {
namespace {

using namespace nccl_moe::transport_world;  // NOLINT(build/namespaces): the world this mode runs in

// ---- Device: the two backends behind one posting interface ----

// IBGDA: addresses (iova = the owner's device address on the software NIC), the QP's lkey covers the source.
struct IbgdaLink {
  ib::GpuQp qp;
  uint64_t src = 0;  // local source base
  uint64_t dst = 0;  // remote data window base
  uint32_t dst_rkey = 0;
  uint64_t sig = 0;  // remote signal word
  uint32_t sig_rkey = 0;
  __device__ bool put(uint64_t dst_off, uint32_t bytes) const {
    return ib::put(qp, src, dst + dst_off, dst_rkey, bytes);
  }
  __device__ bool put_signal(uint64_t dst_off, uint32_t bytes) const {
    return ib::put_signal(qp, src, dst + dst_off, dst_rkey, bytes, sig, sig_rkey, 1);
  }
  __device__ bool signal() const { return ib::signal(qp, sig, sig_rkey, 1); }
  __device__ bool quiet() const { return ib::quiet(qp); }
};

// Request proxy: (key, offset) pairs; the ring's lkey is the source window, the signal word is offset 0 of its window.
struct ProxyLink {
  px::GpuProxyQp q;
  uint32_t dst_rkey = 0;
  uint32_t sig_rkey = 0;
  __device__ bool put(uint64_t dst_off, uint32_t bytes) const { return px::put(q, 0, dst_off, dst_rkey, bytes); }
  __device__ bool put_signal(uint64_t dst_off, uint32_t bytes) const {
    return px::put_signal(q, 0, dst_off, dst_rkey, bytes, 0, sig_rkey, 1);
  }
  __device__ bool signal() const { return px::signal(q, 0, sig_rkey, 1); }
  __device__ bool quiet() const { return px::quiet(q); }
};

// Timestamps of the timed iterations (mapped host memory, ns of %globaltimer).
struct Stamps {
  uint64_t* lat_start;
  uint64_t* lat_end;
  uint64_t* batch_start;
  uint64_t* batch_end;
};

template <class Link>
struct SendArgs {
  Link link;  // rank 0 -> rank 1
  uint8_t* src;
  uint32_t bytes;
  uint64_t slot_bytes;
  int batch;
  int warmup, iters;
  int put_signal;         // 0: put (+ quiet + signal), 1: put_signal
  uint64_t pattern_base;  // pattern id of latency iteration i: base + i; of batch b: base + warmup + iters + b
  const uint64_t* ack;    // rank 0's ack word
  uint64_t ack_base;      // its value before this launch
  Stamps stamps;
  TestStatus* st;
};

template <class Link>
struct RecvArgs {
  Link link;  // rank 1 -> rank 0 (acks)
  const uint8_t* dst;
  uint32_t bytes;
  uint64_t slot_bytes;
  int batch;
  int warmup, iters;
  int put_signal;
  int check;
  uint64_t pattern_base;
  const uint64_t* sig;  // rank 1's signal word
  uint64_t sig_base;    // its value before this launch
  Stamps stamps;
  TestStatus* st;
};

// One loop step of the sender: fill, post `count` messages (thread 0), wait for the ack. Returns false to stop.
template <class Link>
__device__ bool sendStep(const SendArgs<Link>& a, uint64_t pattern, int count, uint64_t ack_target, uint64_t* t_start,
                         uint64_t* t_end, int* abort_flag) {
  fillLitmusSource(a.src, pattern, a.bytes);
  __threadfence_system();  // the NIC (or the proxy) reads the source: every thread's stores before the post
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint64_t t0 = dev::globaltimer_ns();
    bool ok = true;
    for (int k = 0; k < count && ok; ++k) {
      const uint64_t off = static_cast<uint64_t>(k) * a.slot_bytes;
      ok = a.put_signal != 0 ? a.link.put_signal(off, a.bytes) : a.link.put(off, a.bytes);
    }
    if (ok && a.put_signal == 0) {
      ok = a.link.quiet();
      if (t_end != nullptr) *t_end = dev::globaltimer_ns();
      ok = ok && a.link.signal();  // untimed: tells the receiver to check
    }
    if (t_start != nullptr) *t_start = t0;
    if (!ok) {
      failStatus(a.st, 2, kWherePut, pattern, 0, 0);
      *abort_flag = 1;
    } else if (!waitGeq(a.ack, ack_target, a.st, kWhereAck, pattern)) {
      *abort_flag = 1;
    }
  }
  __syncthreads();
  return *abort_flag == 0;
}

template <class Link>
__global__ void transportSendKernel(SendArgs<Link> a) {
  __shared__ int abort_flag;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  const int n = a.warmup + a.iters;
  for (int i = 0; i < n; ++i) {
    const bool timed = i >= a.warmup;
    if (!sendStep(a, a.pattern_base + i, 1, a.ack_base + i + 1, timed ? &a.stamps.lat_start[i - a.warmup] : nullptr,
                  timed && a.put_signal == 0 ? &a.stamps.lat_end[i - a.warmup] : nullptr, &abort_flag))
      return;
  }
  for (int b = 0; b < n; ++b) {
    const bool timed = b >= a.warmup;
    if (!sendStep(a, a.pattern_base + n + b, a.batch, a.ack_base + n + b + 1,
                  timed ? &a.stamps.batch_start[b - a.warmup] : nullptr,
                  timed && a.put_signal == 0 ? &a.stamps.batch_end[b - a.warmup] : nullptr, &abort_flag))
      return;
  }
  if (threadIdx.x == 0 && !a.link.quiet()) failStatus(a.st, 2, kWhereQuiet, a.pattern_base, 0, 0);
}

// One loop step of the receiver: wait for the signal, stamp (put_signal), check `count` messages, ack.
template <class Link>
__device__ bool recvStep(const RecvArgs<Link>& a, uint64_t pattern, int count, uint64_t sig_target, uint64_t* t_end,
                         int* abort_flag) {
  if (threadIdx.x == 0) {
    if (!waitGeq(a.sig, sig_target, a.st, kWhereSignal, pattern)) {
      *abort_flag = 1;
    } else if (t_end != nullptr) {
      *t_end = dev::globaltimer_ns();
    }
  }
  __syncthreads();
  if (*abort_flag != 0) return false;
  if (a.check != 0)
    for (int k = 0; k < count; ++k)
      checkLitmusDestination(a.dst + static_cast<uint64_t>(k) * a.slot_bytes, pattern, a.bytes, a.st);
  __syncthreads();  // every read of these messages before the ack lets rank 0 refill its source
  if (threadIdx.x == 0 && !a.link.signal()) {
    failStatus(a.st, 2, kWhereAckSend, pattern, 0, 0);
    *abort_flag = 1;
  }
  __syncthreads();
  return *abort_flag == 0;
}

template <class Link>
__global__ void transportRecvKernel(RecvArgs<Link> a) {
  __shared__ int abort_flag;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  const int n = a.warmup + a.iters;
  for (int i = 0; i < n; ++i) {
    const bool stamp = i >= a.warmup && a.put_signal != 0;
    if (!recvStep(a, a.pattern_base + i, 1, a.sig_base + i + 1, stamp ? &a.stamps.lat_end[i - a.warmup] : nullptr,
                  &abort_flag))
      return;
  }
  // Signals after the latency loop: n. Each batch adds `batch` (put_signal) or 1 (put's trailing signal).
  const uint64_t per_batch = a.put_signal != 0 ? static_cast<uint64_t>(a.batch) : 1;
  for (int b = 0; b < n; ++b) {
    const bool stamp = b >= a.warmup && a.put_signal != 0;
    if (!recvStep(a, a.pattern_base + n + b, a.batch, a.sig_base + n + (b + 1) * per_batch,
                  stamp ? &a.stamps.batch_end[b - a.warmup] : nullptr, &abort_flag))
      return;
  }
  if (threadIdx.x == 0 && !a.link.quiet()) failStatus(a.st, 2, kWhereQuiet, a.pattern_base, 0, 0);
}

// ---- Host ----

// Mapped pinned array of n words, zeroed.
struct MappedWords {
  uint64_t* host = nullptr;
  uint64_t* dev = nullptr;
  explicit MappedWords(size_t n) {
    if (cudaHostAlloc(reinterpret_cast<void**>(&host), n * sizeof(uint64_t), cudaHostAllocMapped) != cudaSuccess) {
      host = nullptr;
      return;
    }
    std::memset(host, 0, n * sizeof(uint64_t));
    if (cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), host, 0) != cudaSuccess) dev = nullptr;
  }
  ~MappedWords() {
    if (host != nullptr) cudaFreeHost(host);
  }
  MappedWords(const MappedWords&) = delete;
  MappedWords& operator=(const MappedWords&) = delete;
};

// The windows and counters of one backend's run.
struct Endpoints {
  DevWindow src, dst, sig, ack;
  uint64_t sig_count = 0, ack_count = 0, pattern_next = 1;
};

std::string gpuName() {
  cudaDeviceProp prop{};
  return cudaGetDeviceProperties(&prop, 0) == cudaSuccess ? std::string(prop.name) : std::string("unknown");
}

// Runs one (op, size) of a backend; fills `row` (available, error, stats, wrong). False when the world is no longer
// usable (a failed call, a timeout, an error record: the QP or the ring is dead, later launches would fail too).
template <class Link>
bool runOne(World& w, const Link& send_link, const Link& recv_link, Endpoints& ep, const TransportConfig& cfg,
            TransportOp op, int64_t bytes, MappedWords& stamps, Mapped<TestStatus>& st, TransportRow* row,
            const std::function<std::string()>& describe_errors) {
  std::memset(static_cast<void*>(st.host), 0, sizeof(TestStatus));
  st.host->first_bad_iter = -1;
  const int n = cfg.warmup + cfg.iters;
  std::memset(stamps.host, 0, 4 * static_cast<size_t>(cfg.iters) * sizeof(uint64_t));
  const Stamps s{stamps.dev, stamps.dev + cfg.iters, stamps.dev + 2 * cfg.iters, stamps.dev + 3 * cfg.iters};
  const int ps = op == TransportOp::kPutSignal ? 1 : 0;
  const uint64_t slot = static_cast<uint64_t>(TransportConfig::slotBytes(bytes));
  SendArgs<Link> sa{send_link,
                    ep.src.ptr,
                    static_cast<uint32_t>(bytes),
                    slot,
                    cfg.batch,
                    cfg.warmup,
                    cfg.iters,
                    ps,
                    ep.pattern_next,
                    reinterpret_cast<const uint64_t*>(ep.ack.ptr),
                    ep.ack_count,
                    s,
                    st.dev};
  RecvArgs<Link> ra{recv_link,
                    ep.dst.ptr,
                    static_cast<uint32_t>(bytes),
                    slot,
                    cfg.batch,
                    cfg.warmup,
                    cfg.iters,
                    ps,
                    cfg.check ? 1 : 0,
                    ep.pattern_next,
                    reinterpret_cast<const uint64_t*>(ep.sig.ptr),
                    ep.sig_count,
                    s,
                    st.dev};
  transportRecvKernel<Link><<<1, kThreads, 0, w.streams[1]>>>(ra);
  transportSendKernel<Link><<<1, kThreads, 0, w.streams[0]>>>(sa);
  const cudaError_t launch = cudaGetLastError();
  if (launch != cudaSuccess) {
    row->error = std::string("kernel launch: ") + cudaGetErrorString(launch);
    return false;
  }
  // Device waits end within kTimeoutNs each; the whole launch within a generous multiple of its round trips.
  const double limit_s = kHostTimeoutS + 0.05 * n * (cfg.batch + 1);
  const std::string waited = waitStreams(w, limit_s, "moe-perf transport");
  const TestStatus status = *st.host;
  const std::string records = describe_errors();
  ep.pattern_next += 2 * static_cast<uint64_t>(n);
  ep.ack_count += 2 * static_cast<uint64_t>(n);
  ep.sig_count += static_cast<uint64_t>(n) + static_cast<uint64_t>(n) * (ps != 0 ? cfg.batch : 1);
  row->checked = cfg.check;
  row->wrong = static_cast<int64_t>(status.mismatches);
  if (!waited.empty() || status.failed != 0 || !records.empty()) {
    row->error = !waited.empty() ? waited : "";
    if (status.failed != 0) row->error += (row->error.empty() ? "" : "; ") + describeStatus(status);
    if (!records.empty()) row->error += (row->error.empty() ? "" : "; ") + records;
    return false;
  }
  TransportTimes t;
  t.lat_start_ns.assign(stamps.host, stamps.host + cfg.iters);
  t.lat_end_ns.assign(stamps.host + cfg.iters, stamps.host + 2 * cfg.iters);
  t.batch_start_ns.assign(stamps.host + 2 * cfg.iters, stamps.host + 3 * cfg.iters);
  t.batch_end_ns.assign(stamps.host + 3 * cfg.iters, stamps.host + 4 * cfg.iters);
  std::string err;
  if (!summarizeTransport(t, bytes, cfg.batch, &row->stats, &err)) {
    row->error = "timestamps: " + err;
    return true;
  }
  row->available = true;
  return true;
}

// The world, windows and links of one backend, then every (op, size). Returns the rows' worst exit code.
int runBackend(const RunInfo& run, const TransportConfig& cfg, NetBackend backend, uint64_t chaos_seed,
               const std::string& gpu_name) {
  const int64_t max_bytes = cfg.maxBytes();
  const int64_t dst_bytes = TransportConfig::slotBytes(max_bytes) * cfg.batch;
  out("#\n# backend %s: %s; source %lld B on rank 0, destination %lld B (%d slots) on rank 1\n",
      netBackendName(backend),
      backend == NetBackend::kIbgda ? "the GPU writes mlx5 WQEs and rings the doorbell (ibgda.cuh)"
      : backend == NetBackend::kDbProxy
          ? "the GPU writes mlx5 WQEs and rings a mailbox, a CPU thread forwards the doorbell (doorbell_proxy.h)"
          : "the GPU writes 64-byte requests, a CPU proxy thread posts them (proxy.cuh)",
      static_cast<long long>(max_bytes), static_cast<long long>(dst_bytes), cfg.batch);
  auto fail = [&](const std::string& what) {
    out("# backend %s: setup failed: %s\n", netBackendName(backend), what.c_str());
    return 1;
  };
  World w;
  const std::string made = makeWorld(chaos_seed, &w);
  if (made == "skip") return fail("no CUDA GPU");
  if (!made.empty()) return fail(made);
  Proxies ps{&w, {}};  // after the World: destroyed first (stops the proxy threads, then the NICs)
  Endpoints ep;
  std::string e;
  if (!(e = allocWindow(w[0], static_cast<uint64_t>(TransportConfig::slotBytes(max_bytes)), 0, &ep.src)).empty() ||
      !(e = allocWindow(w[1], static_cast<uint64_t>(dst_bytes), 0, &ep.dst)).empty() ||
      !(e = allocWindow(w[1], 64, rdma::kWindowSignal, &ep.sig)).empty() ||
      !(e = allocWindow(w[0], 64, rdma::kWindowSignal, &ep.ack)).empty())
    return fail(e);
  MappedWords stamps(4 * static_cast<size_t>(cfg.iters));
  Mapped<TestStatus> status;
  if (stamps.host == nullptr || stamps.dev == nullptr || status.host == nullptr || status.dev == nullptr)
    return fail("mapped timestamp / status allocation failed");

  IbgdaLink ib_send, ib_recv;
  ProxyLink px_send, px_recv;
  std::function<std::string()> describe_errors;
  const bool gpu_qps = backend != NetBackend::kProxy;  // ibgda and dbproxy: the GPU writes the WQEs
  if (gpu_qps) {
    const bool via_mailbox = backend == NetBackend::kDbProxy;
    em::EmulatedGpuQp *q01 = nullptr, *q10 = nullptr;
    if (!(e = connectQp(w[0], w[1], ep.src.w.lkey, kTimeoutNs, nullptr, &q01, 64, 64, via_mailbox)).empty() ||
        !(e = connectQp(w[1], w[0], 0, kTimeoutNs, nullptr, &q10, 64, 64, via_mailbox)).empty())
      return fail(e);
    ib_send = IbgdaLink{q01->view(), ep.src.addr(), ep.dst.addr(), ep.dst.w.rkey, ep.sig.addr(), ep.sig.w.rkey};
    ib_recv = IbgdaLink{q10->view(), 0, 0, 0, ep.ack.addr(), ep.ack.w.rkey};
    if (!(e = startNics(w)).empty() || !(e = startDoorbellProxies(w)).empty()) return fail(e);
    describe_errors = [&w]() {
      std::string text;
      for (int r = 0; r < 2; ++r)
        if (w[r].error.host->code != 0)
          text += (text.empty() ? "" : "; ") + ib::describeNetError(*w[r].error.host, kTimeoutNs);
      return text;
    };
  } else {
    em::EmulatedGpuProxy *p01 = nullptr, *p10 = nullptr;
    if (!(e = makeProxy(ps, 0, {1}, 64, 0, ep.src.w.lkey, kTimeoutNs, nullptr, &p01)).empty() ||
        !(e = makeProxy(ps, 1, {0}, 64, 0, 0, kTimeoutNs, nullptr, &p10)).empty())
      return fail(e);
    px_send = ProxyLink{p01->view(0), ep.dst.w.rkey, ep.sig.w.rkey};
    px_recv = ProxyLink{p10->view(0), 0, ep.ack.w.rkey};
    if (!(e = startNics(w)).empty() || !(e = startProxies(ps)).empty()) return fail(e);
    describe_errors = [&w, &ps]() {
      std::string text;
      for (int r = 0; r < 2; ++r)
        if (w[r].error.host->code != 0)
          text += (text.empty() ? "" : "; ") + px::describeProxyError(*w[r].error.host, kTimeoutNs);
      for (auto& p : ps.all)
        if (p->thread().failed()) text += (text.empty() ? "" : "; ") + std::string("proxy: ") + p->thread().error();
      return text;
    };
  }

  int rc = 0;
  bool usable = true;
  out("%s", transportTableHeader().c_str());
  for (TransportOp op : cfg.ops) {
    for (int64_t bytes : cfg.sizes) {
      TransportRow row;
      row.net_backend = backend;
      row.op = op;
      row.bytes = bytes;
      row.batch = cfg.batch;
      row.iters = cfg.iters;
      row.warmup = cfg.warmup;
      row.chaos_seed = chaos_seed;
      row.gpu_name = gpu_name;
      row.git_sha = run.git_sha;
      if (!usable) {
        row.error = "skipped: an earlier size failed on this backend (its QP or ring is in error)";
      } else if (gpu_qps) {
        usable = runOne(w, ib_send, ib_recv, ep, cfg, op, bytes, stamps, status, &row, describe_errors);
      } else {
        usable = runOne(w, px_send, px_recv, ep, cfg, op, bytes, stamps, status, &row, describe_errors);
      }
      for (int r = 0; r < 2 && usable; ++r)
        if (w[r].backend->failed()) {
          row.available = false;
          row.error = "software NIC backend of rank " + std::to_string(r) + ": " + w[r].backend->error();
          usable = false;
        }
      out("%s", transportTableRow(row).c_str());
      if (run.json != nullptr) run.json->writeLine(transportToJson(row));
      if (!row.verified()) rc = 1;
      if (!usable && row.error.rfind("skipped", 0) != 0) {
        std::fflush(stdout);
        if (gpu_qps) {
          dumpWorld(w);
        } else {
          dumpProxies(w, ps, kTimeoutNs);
        }
      }
    }
  }
  out("%s", transportNotes(cfg.batch).c_str());
  out("%s", transportBanner(chaos_seed).c_str());
  return rc;
}

}  // namespace

int runTransport(const RunInfo& run) {
  const TransportConfig cfg = resolveTransport(run.options);
  const uint64_t chaos_seed = em::chaosSeedFromEnvironment();
  if (cudaSetDevice(0) != cudaSuccess) {
    std::fprintf(stderr, "moe-perf: cudaSetDevice(0) failed\n");
    return 1;
  }
  const std::string gpu_name = gpuName();
  out("# transport mode: 2 ranks = 2 virtual nodes (one rank each) on GPU 0 (%s), one process; NCCL not used\n",
      gpu_name.c_str());
  out("# sizes %lld .. %lld B (%zu), ops put, put_signal, backends", static_cast<long long>(cfg.sizes.front()),
      static_cast<long long>(cfg.maxBytes()), cfg.sizes.size());
  for (NetBackend b : cfg.backends) out(" %s", netBackendName(b));
  out(", batch %d, iters %d, warmup %d, check %d\n", cfg.batch, cfg.iters, cfg.warmup, cfg.check ? 1 : 0);
  out("%s", transportBanner(chaos_seed).c_str());
  int rc = 0;
  for (NetBackend b : cfg.backends) rc = std::max(rc, runBackend(run, cfg, b, chaos_seed, gpu_name));
  out("# %s\n", rc == 0 ? "all payloads verified" : "FAILED: some rows are not available or have wrong bytes");
  return rc;
}

}  // namespace nccl_moe::perf
