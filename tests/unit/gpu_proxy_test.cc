// The host half of the GPU request proxy (src/transport/rdma/proxy/): building and checking the GPU's ring view,
// the messages of its error records, and the proxy thread (start, progress over the software NIC, a failure
// that stops it, bounded stop), with a CPU producer standing in for the GPU.
#include "transport/rdma/proxy/gpu_proxy.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "soft_nic_harness.h"
#include "transport/rdma/host_wait.h"
#include "transport/rdma/proxy/proxy_thread.h"
#include "transport/rdma/request_proxy.h"

namespace nccl_moe::proxy {
namespace {

struct Fixture {
  alignas(64) rdma::ProxyDesc slots[16];
  uint32_t producer_index = 0;
  rdma::ProxyRingShared shared{};
  ErrorRecord error{};

  GpuProxyRingMemory ring() { return GpuProxyRingMemory{slots, 16, &producer_index, &shared}; }
  GpuProxyBinding binding() {
    GpuProxyBinding b;
    b.qp = 3;
    b.qpn = 0x1234;
    b.src_lkey = 0x55;
    b.rank = 2;
    b.peer = 5;
    b.timeout_ns = 1000;
    b.error = &error;
    return b;
  }
};

TEST(GpuProxyQp, BuildCopiesTheRingAndTheBinding) {
  Fixture f;
  GpuProxyQp v;
  ASSERT_EQ("", buildGpuProxyQp(f.ring(), f.binding(), &v));
  EXPECT_EQ(f.slots, v.slots);
  EXPECT_EQ(16u, v.num_slots);
  EXPECT_EQ(&f.producer_index, v.producer_index);
  EXPECT_EQ(&f.shared, v.shared);
  EXPECT_EQ(3u, v.qp);
  EXPECT_EQ(0x1234u, v.qpn);
  EXPECT_EQ(0x55u, v.lkey);
  EXPECT_EQ(2, v.rank);
  EXPECT_EQ(5, v.peer);
  EXPECT_EQ(1000u, v.timeout_ns);
  EXPECT_EQ(&f.error, v.error);
}

TEST(GpuProxyQp, EachBadFieldIsNamed) {
  struct Case {
    const char* name;
    void (*mutate)(GpuProxyRingMemory*, GpuProxyBinding*);
    const char* expect;
  };
  const Case cases[] = {
      {"null slots", [](GpuProxyRingMemory* r, GpuProxyBinding*) { r->slots = nullptr; }, "null"},
      {"null producer index", [](GpuProxyRingMemory* r, GpuProxyBinding*) { r->producer_index = nullptr; }, "null"},
      {"null shared", [](GpuProxyRingMemory* r, GpuProxyBinding*) { r->shared = nullptr; }, "null"},
      {"no error record", [](GpuProxyRingMemory*, GpuProxyBinding* b) { b->error = nullptr; }, "error record"},
      {"zero slots", [](GpuProxyRingMemory* r, GpuProxyBinding*) { r->num_slots = 0; }, "num_slots 0"},
      {"12 slots", [](GpuProxyRingMemory* r, GpuProxyBinding*) { r->num_slots = 12; }, "num_slots 12"},
      {"misaligned slots",
       [](GpuProxyRingMemory* r, GpuProxyBinding*) {
         r->slots = reinterpret_cast<rdma::ProxyDesc*>(reinterpret_cast<uint8_t*>(r->slots) + 16);
       },
       "64-byte aligned"},
      {"misaligned shared",
       [](GpuProxyRingMemory* r, GpuProxyBinding*) {
         r->shared = reinterpret_cast<const rdma::ProxyRingShared*>(reinterpret_cast<const uint8_t*>(r->shared) + 4);
       },
       "shared words"},
      {"QP index beyond 16 bits", [](GpuProxyRingMemory*, GpuProxyBinding* b) { b->qp = 0x10000; }, "16 bits"},
      {"QPN beyond 24 bits", [](GpuProxyRingMemory*, GpuProxyBinding* b) { b->qpn = 0x1000000; }, "24-bit"},
      {"zero timeout", [](GpuProxyRingMemory*, GpuProxyBinding* b) { b->timeout_ns = 0; }, "bounded"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Fixture f;
    GpuProxyRingMemory r = f.ring();
    GpuProxyBinding b = f.binding();
    c.mutate(&r, &b);
    GpuProxyQp v;
    const std::string why = buildGpuProxyQp(r, b, &v);
    EXPECT_NE(std::string::npos, why.find(c.expect)) << why;
  }
  Fixture f;
  EXPECT_EQ("no output view", buildGpuProxyQp(f.ring(), f.binding(), nullptr));
}

ErrorRecord record(int code, Phase phase, long long counter, long long expected, int detail) {
  ErrorRecord r{};
  r.code = code;
  r.phase = static_cast<int>(phase);
  r.rank = 2;
  r.peer = 5;
  r.counter = counter;
  r.expected = expected;
  r.qpn = 0x1234;
  r.detail = detail;
  return r;
}

TEST(GpuProxyError, MessagesNamePhaseRankPeerQpAndIndices) {
  const uint64_t timeout_ns = 200ull * 1000 * 1000;
  EXPECT_EQ("no error", describeProxyError(ErrorRecord{}, timeout_ns));
  EXPECT_EQ(std::string("net-proxy-credit"), phaseName(Phase::kNetProxyCredit));
  EXPECT_EQ(std::string("net-proxy-quiet"), phaseName(Phase::kNetProxyQuiet));

  const std::string ring = describeProxyError(
      record(kErrNetProxy, Phase::kNetProxyQuiet, 0, 2, static_cast<int>(rdma::ProxyError::kTranslation)), timeout_ns);
  EXPECT_EQ(
      "phase net-proxy-quiet: rank 2, QP 0x1234 to peer 5: the request proxy failed (ring error 3: translation "
      "(unknown key or range outside its window)) while the GPU waited for index 2 (last seen 0); the proxy "
      "thread's log names the descriptor",
      ring);
  const std::string before = describeProxyError(
      record(kErrNetProxy, Phase::kNetProxyCredit, -1, -1, static_cast<int>(rdma::ProxyError::kCompletion)),
      timeout_ns);
  EXPECT_NE(std::string::npos, before.find("phase net-proxy-credit")) << before;
  EXPECT_NE(std::string::npos, before.find("error completion")) << before;
  EXPECT_NE(std::string::npos, before.find("about to post")) << before;

  const std::string credit = describeProxyError(record(kErrTimeout, Phase::kNetProxyCredit, 7, 8, 0), timeout_ns);
  EXPECT_EQ(
      "phase net-proxy-credit: rank 2, QP 0x1234 to peer 5: gave up after 0.200 s waiting for a ring slot: consumed "
      "index 7, expected 8 (is the proxy thread running?)",
      credit);

  const std::string never = describeProxyError(record(kErrTimeout, Phase::kNetProxyQuiet, 0, 2, 0), timeout_ns);
  EXPECT_NE(std::string::npos, never.find("completed index 0, expected 2 (consumed by the proxy: 0")) << never;
  EXPECT_NE(std::string::npos, never.find("never took the quiet")) << never;
  const std::string taken = describeProxyError(record(kErrTimeout, Phase::kNetProxyQuiet, 1, 2, 2), timeout_ns);
  EXPECT_NE(std::string::npos, taken.find("the proxy took the quiet, the NIC did not complete")) << taken;
  // Across the 2^32 wrap: consumed 1 is past an awaited 0xffffffff.
  const std::string wrapped =
      describeProxyError(record(kErrTimeout, Phase::kNetProxyQuiet, 0xfffffffe, 0xffffffff, 1), timeout_ns);
  EXPECT_NE(std::string::npos, wrapped.find("took the quiet")) << wrapped;

  // Other records: describeNetError's text.
  const std::string other = describeProxyError(record(kErrTimeout, Phase::kNetQuiet, 0, 1, 0), timeout_ns);
  EXPECT_NE(std::string::npos, other.find("phase net-quiet")) << other;
  EXPECT_STREQ("unknown", proxyErrorName(99));
  EXPECT_STREQ("none", proxyErrorName(0));
}

// ---- The proxy thread over the software NIC, a CPU producer playing the GPU ----

using emulated::testing::Buffer;
using emulated::testing::Link;
using emulated::testing::Rank;

TEST(ProxyThread, ProgressesUntilAFailureThenStopsWithinItsBound) {
  Rank r0(0, 0x51), r1(1, 0x51);
  Buffer& src = r0.alloc(4096);
  Buffer& scratch = r0.alloc(8, rdma::kAccessLocalWrite);
  Buffer& dst = r1.alloc(4096);
  Buffer& sig = r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal);
  Link link(r0, r1);
  ASSERT_TRUE(link.ok);
  constexpr uint32_t kSlots = 8;
  auto* slots = static_cast<rdma::ProxyDesc*>(std::aligned_alloc(64, kSlots * sizeof(rdma::ProxyDesc)));
  for (uint32_t s = 0; s < kSlots; ++s) rdma::proxy_init_slot(&slots[s], s, 0, kSlots);
  rdma::ProxyRingShared shared{};
  uint32_t producer_index = 0;
  const rdma::ProxyRing ring{slots, kSlots, &producer_index, &shared};
  rdma::RequestProxyConfig config;
  config.fetch_result = scratch.local_word(0);
  rdma::RequestProxy proxy(ring, 0, &r0.windows, {{link.sq.get(), r1.windows.snapshot()}}, config);
  ProxyThread thread(&proxy, -1);
  ASSERT_EQ(ncclSuccess, r0.nic->start());
  ASSERT_EQ(ncclSuccess, thread.start());
  EXPECT_EQ(ncclInvalidUsage, thread.start()) << "a second start is refused";
  for (uint32_t i = 0; i < 64; ++i) src.data[i] = static_cast<uint8_t>(i + 1);

  auto produce = [&](uint32_t seq, const rdma::ProxyRequest& r) {
    rdma::Deadline deadline(10.0);
    while (!rdma::proxy_has_credit(seq, __atomic_load_n(&shared.consumed, __ATOMIC_ACQUIRE), kSlots)) {
      if (deadline.expired()) return false;
      std::this_thread::yield();
    }
    rdma::ProxyDesc d;
    if (!rdma::proxy_encode(r, seq, kSlots, &d)) return false;
    rdma::proxy_store_host(&slots[rdma::proxy_slot(seq, kSlots)], d);
    return true;
  };
  rdma::ProxyRequest put;
  put.op = rdma::ProxyOp::kPutSignal;
  put.bytes = 64;
  put.local_key = src.window.lkey;
  put.remote_key = dst.window.rkey;
  put.signal_key = sig.window.rkey;
  put.signal_add = 1;
  rdma::ProxyRequest quiet;
  quiet.op = rdma::ProxyOp::kQuiet;
  uint32_t seq = 0;
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(produce(seq++, put)) << "no credit for descriptor " << seq;
  ASSERT_TRUE(produce(seq++, quiet));
  rdma::Deadline deadline(10.0);
  while (__atomic_load_n(&shared.completed, __ATOMIC_ACQUIRE) != seq && !deadline.expired())
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  ASSERT_EQ(seq, __atomic_load_n(&shared.completed, __ATOMIC_ACQUIRE)) << "the thread did not complete 21 descriptors";
  EXPECT_EQ(20u, __atomic_load_n(sig.word(0), __ATOMIC_ACQUIRE));
  for (uint32_t i = 0; i < 64; ++i) ASSERT_EQ(i + 1, dst.data[i]) << "byte " << i;
  EXPECT_FALSE(thread.failed());
  EXPECT_GT(thread.passes(), 0u);

  // A descriptor the proxy cannot translate stops the thread; the ring's error word says why.
  rdma::ProxyRequest bad = put;
  bad.remote_key = dst.window.rkey + (1000u << 8);
  ASSERT_TRUE(produce(seq++, bad));
  rdma::Deadline fail_deadline(10.0);
  while (!thread.failed() && !fail_deadline.expired()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  ASSERT_TRUE(thread.failed());
  EXPECT_TRUE(thread.exited());
  EXPECT_EQ(static_cast<uint32_t>(rdma::ProxyError::kTranslation), __atomic_load_n(&shared.error, __ATOMIC_ACQUIRE));
  EXPECT_NE(std::string::npos, thread.error().find("remote key")) << thread.error();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(ncclSuccess, thread.stop(1.0));
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  EXPECT_FALSE(thread.running());
  EXPECT_EQ(ncclSuccess, thread.stop()) << "stop is idempotent";
  r0.nic->stop();
  std::free(slots);
}

}  // namespace
}  // namespace nccl_moe::proxy
