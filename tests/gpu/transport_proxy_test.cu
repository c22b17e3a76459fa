// The request-proxy mode of the scale-out transport on the GPU: kernels post through proxy.cuh into a mapped host
// ring, a ProxyThread (rdma::RequestProxy) turns the descriptors into WQEs on host-memory SQs, and the software NIC
// executes them on this GPU (CudaMemoryBackend). The same one-GPU world as transport_litmus_test.cu
// (transport_world.h): ranks 0 and 1, each with its own NIC, executor thread and error record; each rank that
// posts gets its own ring and proxy thread. Kernels are one block each on two non-blocking streams. The put_signal
// litmus through the proxy runs over whole worlds (2x1, 2x2, 4x1): transport_world_litmus_test.cu.
//
//   CrossQpReordering          one ring, two QPs to one peer: B's word is seen before all of A's data at least once
//   BackPressure               a ring of 4 slots, 4 blocks x 250 put_signal (1000 descriptors) starting 500 below
//                              2^32: credits throttle the GPU, nothing is lost, the indices wrap
//   BadRkey                    the proxy cannot translate the key: the ring's error word stops it, the GPU's quiet
//                              fails with kErrNetProxy (translation) naming phase, rank, peer and QP
//   StoppedProxy               quiet with no proxy thread: bounded kNetProxyQuiet timeout saying the quiet was
//                              never taken; starting the thread afterwards completes the put; a 4-slot ring with
//                              no consumer runs out of credits (kNetProxyCredit)
//   RingOverrun                the proxy mode's SQ overrun. The SQs themselves cannot overrun here: the proxy posts
//                              a descriptor only when its SQ has room (else it stays in the ring: back-pressure
//                              through credits), and the GPU writes only slots it has credit for. What a wrong
//                              producer can overrun is the ring: one that skips the credit wait writes descriptor
//                              4 of a 4-slot ring over descriptor 0; the proxy stops with ring error "producer
//                              overrun" before anything reaches the NIC, the GPU's next post records kErrNetProxy,
//                              and the peer, waiting for the lost signal, records a bounded timeout (0.3 s)
//
// Knobs: NCCL_MOE_EMU_CHAOS (chaos seed; a fixed non-zero seed when unset). Expected GPU time: a few seconds (the
// timeout tests wait 0.2-0.3 s each).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "peer_wait.cuh"
#include "transport/emulated/proxy_queues.h"
#include "transport/rdma/proxy/proxy.cuh"
#include "transport_world.h"

namespace {

using namespace nccl_moe::transport_test;  // NOLINT(build/namespaces): the tests' shared helpers

constexpr uint64_t kShortTimeoutNs = 200ull * 1000 * 1000;  // the tests that expect a timeout

// ---- Kernels (one thread per transport call, as the library's kernels will) ----

// Cross-QP: A (bytes, QP 0) then B (8 bytes at offset `bytes`, QP 1) through one ring, quiet, wait for the ack.
struct CrossSend {
  px::GpuProxyQp qa, qb;  // two views of one ring
  uint8_t* src;           // [0, bytes): A's source, [bytes, +8): B's
  uint32_t bytes;
  uint32_t dst_rkey;
  const uint64_t* ack;
  uint64_t tries;
  TestStatus* st;
};
struct CrossObserve {
  px::GpuProxyQp q;  // acks
  const uint8_t* dst_a;
  const uint64_t* dst_b;
  uint32_t bytes;
  uint32_t ack_rkey;
  uint64_t tries;
  TestStatus* st;
};

__global__ void crossSendKernel(CrossSend a) {
  __shared__ int abort_flag;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  for (uint64_t t = 0; t < a.tries; ++t) {
    fillBytes(a.src, a.bytes, tryByte(t));
    fillBytes(a.src + a.bytes, 8, tryByte(t));
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      if (!(px::put(a.qa, 0, 0, a.dst_rkey, a.bytes) && px::put(a.qb, a.bytes, a.bytes, a.dst_rkey, 8) &&
            px::quiet(a.qa))) {
        failStatus(a.st, 2, kWherePut, t, 0, 0);
        abort_flag = 1;
      } else if (!waitGeq(a.ack, t + 1, a.st, kWhereAck, t)) {
        abort_flag = 1;
      }
    }
    __syncthreads();
    if (abort_flag != 0) return;
  }
}

__global__ void crossObserveKernel(CrossObserve a) {
  __shared__ int abort_flag;
  __shared__ unsigned long long off_bytes, odd_bytes;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  for (uint64_t t = 0; t < a.tries; ++t) {
    const uint8_t x = tryByte(t);
    const uint8_t old = t == 0 ? 0 : tryByte(t - 1);
    if (threadIdx.x == 0) {
      off_bytes = odd_bytes = 0;
      const uint64_t start = dev::globaltimer_ns();
      for (uint32_t spins = 0;; ++spins) {
        const uint64_t seen = dev::ld_acquire_sys(a.dst_b);
        if (seen == tryWord(t)) break;
        if ((spins & 255u) == 255u && dev::globaltimer_ns() - start > kTimeoutNs) {
          failStatus(a.st, 1, kWhereBWord, t, seen, tryWord(t));
          abort_flag = 1;
          break;
        }
      }
    }
    __syncthreads();
    if (abort_flag != 0) return;
    unsigned long long my_off = 0, my_odd = 0;
    for (uint32_t j = threadIdx.x; j < a.bytes; j += blockDim.x) {
      const uint8_t v = __ldcg(a.dst_a + j);
      my_off += v != x ? 1 : 0;
      my_odd += v != x && v != old ? 1 : 0;
    }
    if (my_off != 0) atomicAdd(&off_bytes, my_off);
    if (my_odd != 0) atomicAdd(&odd_bytes, my_odd);
    __syncthreads();
    if (threadIdx.x == 0) {
      if (off_bytes != 0) atomicAdd(&a.st->count, 1ull);  // B seen before all of A
      if (odd_bytes != 0) atomicAdd(&a.st->corrupt, odd_bytes);
      // The sender's quiet covered A: A is complete before the sender waits for this ack, so the next try's
      // fill never races with A's placement here.
      if (!px::signal(a.q, 0, a.ack_rkey, 1)) {
        failStatus(a.st, 2, kWhereAckSend, t, 0, 0);
        abort_flag = 1;
      }
    }
    __syncthreads();
    if (abort_flag != 0) return;
  }
  if (threadIdx.x == 0 && !px::quiet(a.q)) failStatus(a.st, 2, kWhereQuiet, a.tries, 0, 0);
}

// Thread 0 of every block posts `per_block` put_signal of slot_bytes from / to its slot, then quiet.
struct ManyArgs {
  px::GpuProxyQp q;
  uint32_t dst_rkey;
  uint32_t slot_bytes;
  uint32_t sig_rkey;
  uint32_t per_block;
  TestStatus* st;
};
__global__ void manySendKernel(ManyArgs a) {
  if (threadIdx.x != 0) return;
  const uint64_t off = static_cast<uint64_t>(blockIdx.x) * a.slot_bytes;
  for (uint32_t i = 0; i < a.per_block; ++i) {
    if (!px::put_signal(a.q, off, off, a.dst_rkey, a.slot_bytes, 0, a.sig_rkey, 1)) {
      failStatus(a.st, 2, kWherePut, i, blockIdx.x, 0);
      return;
    }
    atomicAdd(&a.st->count, 1ull);
  }
  if (!px::quiet(a.q)) failStatus(a.st, 2, kWhereQuiet, a.per_block, blockIdx.x, 0);
}

// num_puts puts, then quiet (when asked): st->count = puts posted, st->call_result = 1 all posted | 2 quiet ok.
struct SingleArgs {
  px::GpuProxyQp q;
  uint32_t rkey;
  uint32_t bytes;
  uint32_t num_puts;
  int do_quiet;
  TestStatus* st;
};
__global__ void singleKernel(SingleArgs a) {
  uint32_t posted = 0;
  while (posted < a.num_puts && px::put(a.q, 0, 0, a.rkey, a.bytes)) ++posted;
  const bool quiet_ok = a.do_quiet != 0 && posted == a.num_puts && px::quiet(a.q);
  a.st->count = posted;
  a.st->call_result = (posted == a.num_puts ? 1 : 0) | (quiet_ok ? 2 : 0);
  __threadfence_system();
}

// A producer that ignores its credits (what post()'s credit wait prevents): n put descriptors at once, the last a
// put_signal to the peer's signal word. With n > num_slots and nobody consuming, descriptor num_slots lands in
// slot 0 over descriptor 0.
struct RingOverrunArgs {
  px::GpuProxyQp q;
  uint32_t n;
  uint32_t dst_rkey;
  uint32_t sig_rkey;
};
__global__ void ringOverrunKernel(RingOverrunArgs a) {
  const uint32_t seq = dev::atom_add_relaxed_gpu(a.q.producer_index, a.n);  // no credit wait
  dev::fence_acq_rel_sys();
  for (uint32_t k = 0; k < a.n; ++k) {
    rdma::ProxyRequest r;
    r.op = k + 1 < a.n ? rdma::ProxyOp::kPut : rdma::ProxyOp::kPutSignal;
    r.qp = a.q.qp;
    r.bytes = 64;
    r.local_key = a.q.lkey;
    r.remote_key = a.dst_rkey;
    r.signal_key = a.sig_rkey;
    r.signal_add = 1;
    rdma::ProxyDesc d;
    rdma::proxy_encode(r, seq + k, a.q.num_slots, &d);
    uint64_t* slot = a.q.slots[rdma::proxy_slot(seq + k, a.q.num_slots)].q;
    for (int i = 0; i < 8; i += 2) dev::st_relaxed_sys_v2(slot + i, d.q[i], d.q[i + 1]);
  }
}

// ---- Host side ----

#define PROXY_WORLD_OR_SKIP(world, seed)                                                     \
  do {                                                                                       \
    const std::string why_ = makeWorld((seed), &(world));                                    \
    if (why_ == "skip") GTEST_SKIP() << "no CUDA GPU: the GPU request-proxy tests need one"; \
    ASSERT_EQ("", why_);                                                                     \
  } while (0)

// ---- Tests ----

TEST(GpuRequestProxy, CrossQpReorderingIsObserved) {
  const uint64_t seed = testChaosSeed();
  World w;
  PROXY_WORLD_OR_SKIP(w, seed);
  Proxies ps{&w, {}};
  constexpr uint32_t kBytes = 256u << 10;
  constexpr uint64_t kTries = 200;
  std::printf("GpuRequestProxy.CrossQpReordering: chaos seed %" PRIu64 ", %" PRIu64 " tries of %u bytes\n", seed,
              kTries, kBytes);
  DevWindow src, dst, ack;
  ASSERT_EQ("", allocWindow(w[0], kBytes + 64, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], kBytes + 64, 0, &dst));
  ASSERT_EQ("", allocWindow(w[0], 64, rdma::kWindowSignal, &ack));
  em::EmulatedGpuProxy *p01 = nullptr, *p10 = nullptr;
  ASSERT_EQ("", makeProxy(ps, 0, {1, 1}, 64, 0, src.w.lkey, kTimeoutNs, nullptr, &p01));  // QP A and QP B
  ASSERT_EQ("", makeProxy(ps, 1, {0}, 64, 0, 0, kTimeoutNs, nullptr, &p10));
  ASSERT_EQ("", startNics(w));
  ASSERT_EQ("", startProxies(ps));
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  const CrossObserve obs{p10->view(0), dst.ptr, reinterpret_cast<const uint64_t*>(dst.ptr + kBytes), kBytes, ack.w.rkey,
                         kTries,       st.dev};
  const CrossSend send{p01->view(0), p01->view(1), src.ptr,
                       kBytes,       dst.w.rkey,   reinterpret_cast<const uint64_t*>(ack.ptr),
                       kTries,       st.dev};
  const auto t0 = std::chrono::steady_clock::now();
  crossObserveKernel<<<1, kThreads, 0, w.streams[1]>>>(obs);
  crossSendKernel<<<1, kThreads, 0, w.streams[0]>>>(send);
  CUDA_OK(cudaGetLastError());
  const std::string waited = waitStreams(w, kHostTimeoutS, "GpuRequestProxy.CrossQpReordering");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("GpuRequestProxy.CrossQpReordering: %.3f s; B's word seen before all of A's data in %llu of %" PRIu64
              " tries; %s\n",
              secs, st.host->count, kTries, describeStatus(*st.host).c_str());
  dumpProxies(w, ps, kTimeoutNs);
  ASSERT_EQ("", waited);
  EXPECT_EQ(0, st.host->failed) << describeStatus(*st.host);
  EXPECT_EQ(0, w[0].error.host->code) << px::describeProxyError(*w[0].error.host, kTimeoutNs);
  EXPECT_EQ(0, w[1].error.host->code) << px::describeProxyError(*w[1].error.host, kTimeoutNs);
  EXPECT_FALSE(p01->thread().failed()) << p01->thread().error();
  EXPECT_GT(st.host->count, 0ull) << "no cross-QP reordering seen through the proxy: chaos does not interleave QPs";
  EXPECT_EQ(0ull, st.host->corrupt) << "bytes that are neither the old nor the new value";
}

TEST(GpuRequestProxy, AFourSlotRingCompletesAThousandDescriptors) {
  const uint64_t seed = testChaosSeed();
  World w;
  PROXY_WORLD_OR_SKIP(w, seed);
  Proxies ps{&w, {}};
  constexpr uint32_t kBlocks = 4, kPerBlock = 250, kSlotBytes = 4096, kSlots = 4;
  constexpr uint32_t kStart = 0xffffffffu - 500;  // the indices wrap 2^32 half way
  std::printf("GpuRequestProxy.BackPressure: chaos seed %" PRIu64
              ", %u blocks x %u put_signal through a ring of %u "
              "slots starting at %u\n",
              seed, kBlocks, kPerBlock, kSlots, kStart);
  DevWindow src, dst, sig;
  ASSERT_EQ("", allocWindow(w[0], kBlocks * kSlotBytes, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], kBlocks * kSlotBytes, 0, &dst));
  ASSERT_EQ("", allocWindow(w[1], 64, rdma::kWindowSignal, &sig));
  std::vector<uint8_t> pattern(kBlocks * kSlotBytes);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(1 + (i / kSlotBytes) * 29 + i % 7);
  CUDA_OK(cudaMemcpy(src.ptr, pattern.data(), pattern.size(), cudaMemcpyHostToDevice));
  em::EmulatedGpuProxy* p = nullptr;
  ASSERT_EQ("", makeProxy(ps, 0, {1}, kSlots, kStart, src.w.lkey, kTimeoutNs, nullptr, &p));
  ASSERT_EQ("", startNics(w));
  ASSERT_EQ("", startProxies(ps));
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  const auto t0 = std::chrono::steady_clock::now();
  manySendKernel<<<kBlocks, 32, 0, w.streams[0]>>>(
      ManyArgs{p->view(0), dst.w.rkey, kSlotBytes, sig.w.rkey, kPerBlock, st.dev});
  CUDA_OK(cudaGetLastError());
  const std::string waited = waitStreams(w, kHostTimeoutS, "GpuRequestProxy.BackPressure", [&] {
    return "posted " + std::to_string(st.host->count) + "; " + p->describe();
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("GpuRequestProxy.BackPressure: %.3f s; %s\n", secs, describeStatus(*st.host).c_str());
  dumpProxies(w, ps, kTimeoutNs);
  ASSERT_EQ("", waited);
  constexpr uint32_t kDescriptors = kBlocks * kPerBlock + kBlocks;  // the put_signals and one quiet per block
  EXPECT_EQ(0, st.host->failed) << describeStatus(*st.host);
  EXPECT_EQ(0, w[0].error.host->code) << px::describeProxyError(*w[0].error.host, kTimeoutNs);
  EXPECT_FALSE(p->thread().failed()) << p->thread().error();
  EXPECT_EQ(0u, p->ringError());
  EXPECT_EQ(kStart + kDescriptors, p->consumed());
  EXPECT_EQ(kStart + kDescriptors, p->completed());
  uint32_t produced = 0;
  NCCL_OK(p->producerIndex(&produced));
  EXPECT_EQ(kStart + kDescriptors, produced);
  EXPECT_EQ(uint64_t{kBlocks} * kPerBlock, w[0].nic->counters().atomics);
  EXPECT_EQ(em::QpState::kReady, w[0].nic->qpState(p->nicQp(0))) << w[0].nic->qpError(p->nicQp(0));
  uint64_t signal = 0;
  CUDA_OK(cudaMemcpy(&signal, sig.ptr, sizeof(signal), cudaMemcpyDeviceToHost));
  EXPECT_EQ(uint64_t{kBlocks} * kPerBlock, signal);
  std::vector<uint8_t> got(pattern.size());
  CUDA_OK(cudaMemcpy(got.data(), dst.ptr, got.size(), cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += got[i] != pattern[i] ? 1 : 0;
  EXPECT_EQ(0u, bad) << "bytes of the slots that differ from their sources";
}

TEST(GpuRequestProxy, ABadRkeyStopsTheRingAndQuietReportsIt) {
  const uint64_t seed = testChaosSeed();
  World w;
  PROXY_WORLD_OR_SKIP(w, seed);
  Proxies ps{&w, {}};
  DevWindow src, dst;
  ASSERT_EQ("", allocWindow(w[0], 4096, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], 4096, 0, &dst));
  em::EmulatedGpuProxy* p = nullptr;
  ASSERT_EQ("", makeProxy(ps, 0, {1}, 64, 0, src.w.lkey, kTimeoutNs, nullptr, &p));
  ASSERT_EQ("", startNics(w));
  ASSERT_EQ("", startProxies(ps));
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  const uint32_t bad_rkey = dst.w.rkey + (1000u << 8);
  singleKernel<<<1, 1, 0, w.streams[0]>>>(SingleArgs{p->view(0), bad_rkey, 64, 1, 1, st.dev});
  CUDA_OK(cudaGetLastError());
  ASSERT_EQ("", waitStreams(w, kHostTimeoutS, "GpuRequestProxy.BadRkey kernel"));
  const ErrorRecord rec = *w[0].error.host;
  const std::string msg = px::describeProxyError(rec, kTimeoutNs);
  std::printf("GpuRequestProxy.BadRkey: GPU record: %s\n  proxy thread: %s\n", msg.c_str(),
              p->thread().error().c_str());
  dumpProxies(w, ps, kTimeoutNs);
  EXPECT_EQ(1, st.host->call_result) << "the put is posted (the ring cannot check keys), quiet reports the error";
  EXPECT_EQ(nccl_moe::kErrNetProxy, rec.code) << msg;
  // Usually the quiet's wait sees the error; if the proxy failed before the GPU posted the quiet, the post does.
  EXPECT_TRUE(rec.phase == static_cast<int>(Phase::kNetProxyQuiet) ||
              rec.phase == static_cast<int>(Phase::kNetProxyCredit))
      << msg;
  EXPECT_EQ(static_cast<int>(rdma::ProxyError::kTranslation), rec.detail) << msg;
  EXPECT_EQ(0, rec.rank);
  EXPECT_EQ(1, rec.peer);
  EXPECT_EQ(static_cast<int>(p->qpn(0)), rec.qpn);
  if (rec.phase == static_cast<int>(Phase::kNetProxyQuiet))
    EXPECT_EQ(2, rec.expected) << "the quiet is descriptor 1: it waits for completed >= 2";
  EXPECT_NE(std::string::npos, msg.find("translation")) << msg;
  EXPECT_NE(std::string::npos, msg.find("net-proxy-")) << msg;
  EXPECT_EQ(static_cast<uint32_t>(rdma::ProxyError::kTranslation), p->ringError());
  EXPECT_TRUE(p->thread().failed());
  EXPECT_NE(std::string::npos, p->thread().error().find("remote key")) << p->thread().error();
  EXPECT_EQ(0u, w[0].nic->qpAnnounced(p->nicQp(0))) << "nothing reaches the NIC after a translation failure";
}

TEST(GpuRequestProxy, QuietWithoutAProxyThreadTimesOutNamingThePhase) {
  const uint64_t seed = testChaosSeed();
  World w;
  PROXY_WORLD_OR_SKIP(w, seed);
  Proxies ps{&w, {}};
  DevWindow src, dst;
  ASSERT_EQ("", allocWindow(w[0], 4096, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], 4096, 0, &dst));
  CUDA_OK(cudaMemset(src.ptr, 0x5a, 4096));
  CUDA_OK(cudaDeviceSynchronize());
  Mapped<ErrorRecord> credit_rec;  // the second case's own record
  ASSERT_NE(nullptr, credit_rec.dev);
  em::EmulatedGpuProxy *p = nullptr, *p4 = nullptr;
  ASSERT_EQ("", makeProxy(ps, 0, {1}, 64, 0, src.w.lkey, kShortTimeoutNs, nullptr, &p));
  ASSERT_EQ("", makeProxy(ps, 0, {1}, 4, 0, src.w.lkey, kShortTimeoutNs, credit_rec.dev, &p4));
  ASSERT_EQ("", startNics(w));
  // Started and stopped: stop() is bounded and leaves the ring as it was.
  NCCL_OK(p->start());
  NCCL_OK(p->stop(5.0));

  // 1. put + quiet with nobody consuming: the quiet times out, and the record says the quiet was never taken.
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  singleKernel<<<1, 1, 0, w.streams[0]>>>(SingleArgs{p->view(0), dst.w.rkey, 4096, 1, 1, st.dev});
  CUDA_OK(cudaGetLastError());
  ASSERT_EQ("", waitStreams(w, kHostTimeoutS, "GpuRequestProxy.StoppedProxy quiet kernel"));
  const ErrorRecord rec = *w[0].error.host;
  const std::string msg = px::describeProxyError(rec, kShortTimeoutNs);
  std::printf("GpuRequestProxy.StoppedProxy: quiet %s; record: %s\n",
              (st.host->call_result & 2) ? "returned true" : "timed out", msg.c_str());
  EXPECT_EQ(1, st.host->call_result) << "the put must be posted and quiet must fail";
  EXPECT_EQ(nccl_moe::kErrTimeout, rec.code) << msg;
  EXPECT_EQ(static_cast<int>(Phase::kNetProxyQuiet), rec.phase) << msg;
  EXPECT_EQ(0, rec.rank);
  EXPECT_EQ(1, rec.peer);
  EXPECT_EQ(static_cast<int>(p->qpn(0)), rec.qpn);
  EXPECT_EQ(0, rec.counter) << "completed index";
  EXPECT_EQ(2, rec.expected) << "put = descriptor 0, quiet = descriptor 1";
  EXPECT_EQ(0, rec.detail) << "consumed index";
  EXPECT_NE(std::string::npos, msg.find("never took the quiet")) << msg;
  EXPECT_NE(std::string::npos, msg.find("net-proxy-quiet")) << msg;
  EXPECT_EQ(0u, p->consumed());

  // The descriptors were well-formed, only unconsumed: a proxy thread started now completes them.
  NCCL_OK(p->start());
  const auto start = std::chrono::steady_clock::now();
  while (p->completed() != 2u && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 10.0)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(2u, p->completed()) << "the late proxy thread did not complete the put and the quiet within 10 s; "
                                << p->describe();
  std::vector<uint8_t> got(4096);
  CUDA_OK(cudaMemcpy(got.data(), dst.ptr, 4096, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(0x5a, got[i]) << "byte " << i;

  // 2. A ring of 4 slots that nobody consumes: the 5th put waits for a credit and times out.
  Mapped<TestStatus> st4;
  ASSERT_NE(nullptr, st4.dev);
  singleKernel<<<1, 1, 0, w.streams[0]>>>(SingleArgs{p4->view(0), dst.w.rkey, 64, 5, 0, st4.dev});
  CUDA_OK(cudaGetLastError());
  ASSERT_EQ("", waitStreams(w, kHostTimeoutS, "GpuRequestProxy.StoppedProxy credit kernel"));
  const ErrorRecord crec = *credit_rec.host;
  const std::string cmsg = px::describeProxyError(crec, kShortTimeoutNs);
  std::printf("GpuRequestProxy.StoppedProxy: %llu of 5 puts posted; record: %s\n", st4.host->count, cmsg.c_str());
  dumpProxies(w, ps, kShortTimeoutNs);
  EXPECT_EQ(4ull, st4.host->count) << "four slots, no consumer: the fifth put has no credit";
  EXPECT_EQ(nccl_moe::kErrTimeout, crec.code) << cmsg;
  EXPECT_EQ(static_cast<int>(Phase::kNetProxyCredit), crec.phase) << cmsg;
  EXPECT_EQ(0, crec.counter) << "consumed index";
  EXPECT_EQ(1, crec.expected) << "descriptor 4 needs consumed > 0";
  EXPECT_NE(std::string::npos, cmsg.find("ring slot")) << cmsg;
  EXPECT_EQ(static_cast<int>(p4->qpn(0)), crec.qpn);
}

TEST(GpuRequestProxy, ARingOverrunStopsTheProxyAndEveryRankReportsIt) {
  const uint64_t seed = testChaosSeed();
  World w;
  PROXY_WORLD_OR_SKIP(w, seed);
  Proxies ps{&w, {}};
  constexpr uint32_t kSlots = 4;
  constexpr uint64_t kPeerTimeoutNs = 300ull * 1000 * 1000;
  DevWindow src, dst, sig;
  ASSERT_EQ("", allocWindow(w[0], 4096, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], 4096, 0, &dst));
  ASSERT_EQ("", allocWindow(w[1], 64, rdma::kWindowSignal, &sig));
  em::EmulatedGpuProxy* p = nullptr;
  ASSERT_EQ("", makeProxy(ps, 0, {1}, kSlots, 0, src.w.lkey, kTimeoutNs, nullptr, &p));
  ASSERT_EQ("", startNics(w));
  // The wrong producer first, with nobody consuming (the thread is not started yet): the overrun is in the ring when
  // the proxy first looks, so what it finds does not depend on timing.
  peerWaitKernel<<<1, 1, 0, w.streams[1]>>>(PeerWaitArgs{reinterpret_cast<const uint64_t*>(sig.ptr), 1, kPeerTimeoutNs,
                                                         w[1].error.dev, 1, 0, static_cast<int>(p->qpn(0))});
  ringOverrunKernel<<<1, 1, 0, w.streams[0]>>>(RingOverrunArgs{p->view(0), kSlots + 1, dst.w.rkey, sig.w.rkey});
  CUDA_OK(cudaGetLastError());
  for (const auto start = std::chrono::steady_clock::now(); cudaStreamQuery(w.streams[0]) == cudaErrorNotReady;) {
    ASSERT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), kHostTimeoutS)
        << "the overrun writer did not finish";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  NCCL_OK(p->start());
  const auto start = std::chrono::steady_clock::now();
  while (p->ringError() == 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 10.0)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(static_cast<uint32_t>(rdma::ProxyError::kOverrun), p->ringError())
      << "the proxy did not report the overrun within 10 s; " << p->describe();
  // The producer's rank: its next call (a quiet) sees the ring's error word.
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  singleKernel<<<1, 1, 0, w.streams[0]>>>(SingleArgs{p->view(0), dst.w.rkey, 64, 0, 1, st.dev});
  CUDA_OK(cudaGetLastError());
  ASSERT_EQ("", waitStreams(w, kHostTimeoutS, "GpuRequestProxy.RingOverrun kernels"));
  const ErrorRecord r0 = *w[0].error.host;
  const ErrorRecord r1 = *w[1].error.host;
  const std::string msg0 = px::describeProxyError(r0, kTimeoutNs);
  const std::string msg1 = px::describeProxyError(r1, kPeerTimeoutNs);
  std::printf("GpuRequestProxy.RingOverrun: rank 0 (the producer): %s\n  rank 1 (its peer): %s\n  proxy thread: %s\n",
              msg0.c_str(), msg1.c_str(), p->thread().error().c_str());
  dumpProxies(w, ps, kTimeoutNs);
  EXPECT_EQ(0, st.host->call_result & 2) << "quiet must fail";
  EXPECT_EQ(nccl_moe::kErrNetProxy, r0.code) << msg0;
  EXPECT_EQ(static_cast<int>(rdma::ProxyError::kOverrun), r0.detail) << msg0;
  EXPECT_TRUE(r0.phase == static_cast<int>(Phase::kNetProxyCredit) ||
              r0.phase == static_cast<int>(Phase::kNetProxyQuiet))
      << msg0;
  EXPECT_EQ(0, r0.rank);
  EXPECT_EQ(1, r0.peer);
  EXPECT_EQ(static_cast<int>(p->qpn(0)), r0.qpn);
  EXPECT_NE(std::string::npos, msg0.find("producer overrun")) << msg0;
  EXPECT_TRUE(p->thread().failed());
  EXPECT_NE(std::string::npos, p->thread().error().find("ignored its credits")) << p->thread().error();
  EXPECT_EQ(0u, p->consumed()) << "descriptor 0 was never taken";
  EXPECT_EQ(0u, w[0].nic->qpAnnounced(p->nicQp(0))) << "nothing reaches the NIC after an overrun";
  EXPECT_EQ(0u, w[0].nic->counters().bytes_placed);
  // The peer: the signal of descriptor 4 never comes, so its bounded wait times out (the names in its record are
  // the wait's own arguments, peer_wait.cuh) and the signal word is untouched.
  EXPECT_EQ(nccl_moe::kErrTimeout, r1.code) << msg1;
  EXPECT_NE(std::string::npos, msg1.find("gave up")) << msg1;
  uint64_t signal = ~0ull;
  CUDA_OK(cudaMemcpy(&signal, sig.ptr, sizeof(signal), cudaMemcpyDeviceToHost));
  EXPECT_EQ(0u, signal);
}

}  // namespace
