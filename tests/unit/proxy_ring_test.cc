// The request-proxy ring (src/transport/rdma/proxy_ring.h) and its consumer (request_proxy.h) over the software
// NIC: descriptor encoding, per-qword phase bits (a half-written descriptor is never taken), rolling 32-bit
// indices across 2^32, credits, producer overrun detection, and producer threads playing the GPU against the
// consumer thread: no descriptor lost or duplicated, quiet = completion, errors reach the ring's error word.
#include "transport/rdma/proxy_ring.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "soft_nic_harness.h"
#include "transport/rdma/host_wait.h"
#include "transport/rdma/request_proxy.h"

namespace nccl_moe::emulated::testing {
namespace {

using namespace nccl_moe::rdma;

ProxyRequest randomRequest(std::mt19937_64& rng) {
  ProxyRequest r;
  r.op = static_cast<ProxyOp>(1 + rng() % 4);
  r.qp = static_cast<uint16_t>(rng());
  r.bytes = static_cast<uint32_t>(rng() & kProxyMaxBytes);
  r.local_key = static_cast<uint32_t>(rng());
  r.local_offset = rng() & kProxyPayloadMask;
  r.remote_key = static_cast<uint32_t>(rng());
  r.remote_offset = rng() & kProxyPayloadMask;
  r.signal_key = static_cast<uint32_t>(rng());
  r.signal_offset = rng() & kProxyPayloadMask;
  r.signal_add = rng() & kProxyPayloadMask;
  return r;
}

bool sameRequest(const ProxyRequest& a, const ProxyRequest& b) {
  return a.op == b.op && a.qp == b.qp && a.bytes == b.bytes && a.local_key == b.local_key &&
         a.local_offset == b.local_offset && a.remote_key == b.remote_key && a.remote_offset == b.remote_offset &&
         a.signal_key == b.signal_key && a.signal_offset == b.signal_offset && a.signal_add == b.signal_add;
}

TEST(ProxyRing, EncodeDecodeRoundTripAtEveryLap) {
  std::mt19937_64 rng(3);
  for (int i = 0; i < 20000; ++i) {
    const ProxyRequest r = randomRequest(rng);
    const uint32_t num_slots = 1u << (rng() % 12);
    const uint32_t seq = static_cast<uint32_t>(rng());
    ProxyDesc d;
    ASSERT_TRUE(proxy_encode(r, seq, num_slots, &d));
    ASSERT_TRUE(proxy_desc_ready(d, seq, num_slots));
    ASSERT_FALSE(proxy_desc_ready(d, seq + num_slots, num_slots)) << "the next lap's phase differs";
    ProxyRequest back;
    ASSERT_EQ(ProxyDefect::kNone, proxy_decode(d, seq, &back));
    ASSERT_TRUE(sameRequest(r, back)) << "i " << i;
    ASSERT_EQ(ProxyDefect::kSequence, proxy_decode(d, seq + 2 * num_slots, &back)) << "a stale lap of equal phase";
  }
}

TEST(ProxyRing, FieldsBeyondTheirWidthAreRejected) {
  ProxyDesc d;
  ProxyRequest r;
  r.op = ProxyOp::kPut;
  EXPECT_TRUE(proxy_encode(r, 0, 8, &d));
  ProxyRequest bad = r;
  bad.bytes = kProxyMaxBytes + 1;
  EXPECT_FALSE(proxy_encode(bad, 0, 8, &d));
  bad = r;
  bad.remote_offset = 1ull << 63;
  EXPECT_FALSE(proxy_encode(bad, 0, 8, &d));
  bad = r;
  bad.signal_add = ~0ull;
  EXPECT_FALSE(proxy_encode(bad, 0, 8, &d));
  bad = r;
  bad.op = ProxyOp::kInvalid;
  EXPECT_FALSE(proxy_encode(bad, 0, 8, &d));
  bad.op = static_cast<ProxyOp>(9);
  EXPECT_FALSE(proxy_encode(bad, 0, 8, &d));

  ASSERT_TRUE(proxy_encode(r, 5, 8, &d));
  ProxyRequest out;
  ProxyDesc x = d;
  x.q[0] |= 1ull << 4;  // flags
  EXPECT_EQ(ProxyDefect::kReservedBits, proxy_decode(x, 5, &out));
  x = d;
  x.q[2] |= 1ull << 40;
  EXPECT_EQ(ProxyDefect::kReservedBits, proxy_decode(x, 5, &out));
  x = d;
  x.q[0] = (x.q[0] & ~0xfull) | 7;
  EXPECT_EQ(ProxyDefect::kOpcode, proxy_decode(x, 5, &out));
}

TEST(ProxyRing, AHalfWrittenDescriptorIsNeverTaken) {
  std::mt19937_64 rng(11);
  const uint32_t num_slots = 4;
  for (int round = 0; round < 2000; ++round) {
    const uint32_t seq = static_cast<uint32_t>(rng());
    ProxyDesc slot;
    if (round % 2) {
      proxy_init_slot(&slot, proxy_slot(seq, num_slots), seq, num_slots);
    } else {  // the previous lap's descriptor still there
      ASSERT_TRUE(proxy_encode(randomRequest(rng), seq - num_slots, num_slots, &slot));
    }
    ProxyDesc d;
    ASSERT_TRUE(proxy_encode(randomRequest(rng), seq, num_slots, &d));
    int order[8];
    std::iota(order, order + 8, 0);
    std::shuffle(order, order + 8, rng);
    ProxyDesc copy;
    for (int k = 0; k < 8; ++k) {
      ASSERT_FALSE(proxy_load_host(&slot, seq, num_slots, &copy)) << k << " of 8 qwords written";
      __atomic_store_n(&slot.q[order[k]], d.q[order[k]], __ATOMIC_RELAXED);
    }
    ASSERT_TRUE(proxy_load_host(&slot, seq, num_slots, &copy));
    ProxyRequest out;
    ASSERT_EQ(ProxyDefect::kNone, proxy_decode(copy, seq, &out));
  }
}

TEST(ProxyRing, RollingIndicesAcrossTwoToThe32) {
  EXPECT_TRUE(proxy_index_before(0xfffffff0u, 5));
  EXPECT_FALSE(proxy_index_before(5, 0xfffffff0u));
  EXPECT_TRUE(proxy_index_reached(5, 0xfffffff0u));
  EXPECT_TRUE(proxy_index_reached(7, 7));
  EXPECT_FALSE(proxy_index_reached(0xffffffffu, 0));
  EXPECT_TRUE(proxy_has_credit(0xfffffffeu, 0xfffffff0u, 16));
  EXPECT_FALSE(proxy_has_credit(0x0u, 0xfffffff0u, 16)) << "16 outstanding: the ring is full";
  EXPECT_TRUE(proxy_has_credit(0x2u, 0xfffffff3u, 16));
  for (uint32_t n : {1u, 2u, 16u, 1u << 20}) {
    for (uint32_t seq : {0u, 1u, n - 1, n, 0x7fffffffu, 0xfffffff0u, 0xffffffffu}) {
      EXPECT_NE(proxy_phase(seq, n), proxy_phase(seq + n, n)) << "n " << n << " seq " << seq;
      EXPECT_EQ(proxy_phase(seq, n), proxy_phase(seq + 2 * n, n)) << "n " << n << " seq " << seq;
      EXPECT_EQ((seq + n) % n, proxy_slot(seq + n, n));
    }
  }
  EXPECT_EQ(proxy_phase(0xffffffffu, 16) == 0, proxy_phase(0, 16) != 0) << "the wrap of 2^32 is a lap boundary";
}

TEST(ProxyRing, InitialisedSlotsAreNotReadyWhateverTheStart) {
  for (uint32_t n : {1u, 4u, 16u}) {
    for (uint32_t start : {0u, 3u, 16u, 21u, 0xfffffff5u, 0xffffffffu}) {
      std::vector<ProxyDesc> slots(n);
      for (uint32_t s = 0; s < n; ++s) proxy_init_slot(&slots[s], s, start, n);
      for (uint32_t k = 0; k < n; ++k) {
        ProxyDesc copy;
        EXPECT_FALSE(proxy_load_host(&slots[proxy_slot(start + k, n)], start + k, n, &copy))
            << "n " << n << " start " << start << " k " << k;
      }
    }
  }
  // Why initialisation matters: zeroed memory reads as a complete descriptor of every odd lap.
  ProxyDesc zero{};
  EXPECT_TRUE(proxy_desc_ready(zero, 16, 16));
}

TEST(ProxyRing, ADescriptorWrittenPastTheCreditsIsRecognised) {
  const uint32_t n = 4, seq = 0xfffffffeu;
  ProxyRequest r;
  r.op = ProxyOp::kSignal;
  ProxyDesc d;
  ASSERT_TRUE(proxy_encode(r, seq + n, n, &d));
  EXPECT_TRUE(proxy_desc_overrun(d, seq, n));
  ASSERT_TRUE(proxy_encode(r, seq, n, &d));
  EXPECT_FALSE(proxy_desc_overrun(d, seq, n));
}

// ---- The consumer over the software NIC ----

struct RingMemory {
  RingMemory(uint32_t n, uint32_t start) : num_slots(n), producer_index(start) {
    slots = static_cast<ProxyDesc*>(std::aligned_alloc(64, n * sizeof(ProxyDesc)));
    for (uint32_t s = 0; s < n; ++s) proxy_init_slot(&slots[s], s, start, n);
    shared = new ProxyRingShared();
    shared->consumed = shared->completed = start;
    shared->error = 0;
  }
  ~RingMemory() {
    std::free(slots);
    delete shared;
  }
  ProxyRing view() { return ProxyRing{slots, num_slots, &producer_index, shared}; }
  uint32_t load(const uint32_t& w) const { return __atomic_load_n(&w, __ATOMIC_ACQUIRE); }

  ProxyDesc* slots;
  uint32_t num_slots;
  uint32_t producer_index;
  ProxyRingShared* shared;
};

// Rank 0 runs the proxy and its NIC; rank 1 is the peer. Each descriptor i owns 64 source bytes, 64 destination
// bytes and one 8-byte hit counter at the peer.
struct ProxyWorld {
  ProxyWorld(uint64_t seed, uint32_t num_slots, uint32_t start, uint32_t num_descs, uint32_t wqe_cnt = 64)
      : r0(0, seed),
        r1(1, seed),
        src(r0.alloc(static_cast<size_t>(num_descs) * 64)),
        scratch(r0.alloc(8, kAccessLocalWrite)),
        dst(r1.alloc(static_cast<size_t>(num_descs) * 64)),
        hits(r1.alloc(static_cast<size_t>(num_descs) * 8, kAccessAllRemote, kWindowSignal)),
        qp0(r0, r1, wqe_cnt, wqe_cnt),
        qp1(r0, r1, wqe_cnt, wqe_cnt),
        ring(num_slots, start),
        start(start) {
    RequestProxyConfig config;
    config.fetch_result = scratch.local_word(0);
    std::vector<ProxyQp> qps = {{qp0.sq.get(), r1.windows.snapshot()}, {qp1.sq.get(), r1.windows.snapshot()}};
    proxy.reset(new RequestProxy(ring.view(), start, &r0.windows, qps, config));
  }
  // The operation descriptor number i (= seq - start) asks for: a function of i, so any thread can check it.
  ProxyRequest request(uint32_t i) const {
    ProxyRequest r;
    const uint32_t h = i * 2654435761u;
    const uint32_t kind = (h >> 8) % 10;
    r.op = kind < 5 ? ProxyOp::kPutSignal : kind < 7 ? ProxyOp::kPut : kind < 9 ? ProxyOp::kSignal : ProxyOp::kQuiet;
    r.qp = static_cast<uint16_t>((h >> 16) & 1);
    r.bytes = 1 + (h >> 20) % 64;
    r.local_key = src.window.lkey;
    r.local_offset = static_cast<uint64_t>(i) * 64;
    r.remote_key = dst.window.rkey;
    r.remote_offset = static_cast<uint64_t>(i) * 64;
    r.signal_key = hits.window.rkey;
    r.signal_offset = static_cast<uint64_t>(i) * 8;
    r.signal_add = 1;
    return r;
  }
  static uint8_t byteOf(uint32_t i, uint32_t b) { return static_cast<uint8_t>(1 + (i * 31 + b * 7) % 251); }
  // Whether descriptor i's effects are all there (and nothing more).
  bool effectsPresent(uint32_t i, std::string* why) const {
    const ProxyRequest r = request(i);
    const bool data = r.op == ProxyOp::kPut || r.op == ProxyOp::kPutSignal;
    const bool signal = r.op == ProxyOp::kPutSignal || r.op == ProxyOp::kSignal;
    const uint64_t hit = __atomic_load_n(hits.word(static_cast<size_t>(i) * 8), __ATOMIC_ACQUIRE);
    if (hit != (signal ? 1u : 0u)) {
      *why = "descriptor " + std::to_string(i) + ": hit counter " + std::to_string(hit) + " (lost or duplicated)";
      return false;
    }
    for (uint32_t b = 0; data && b < r.bytes; ++b) {
      if (dst.data[static_cast<size_t>(i) * 64 + b] != byteOf(i, b)) {
        *why = "descriptor " + std::to_string(i) + ": data byte " + std::to_string(b) + " missing";
        return false;
      }
    }
    return true;
  }
  // The GPU's post: reserve, wait for a credit, write the source, then the descriptor (qwords in random order).
  bool produce(std::mt19937& rng, uint32_t* seq_out, double timeout_s) {
    const uint32_t seq = __atomic_fetch_add(&ring.producer_index, 1, __ATOMIC_RELAXED);
    const uint32_t i = seq - start;
    Deadline deadline(timeout_s);
    Backoff backoff;
    while (!proxy_has_credit(seq, ring.load(ring.shared->consumed), ring.num_slots)) {
      if (ring.load(ring.shared->error) != 0 || deadline.expired()) return false;
      backoff.pause();
    }
    const ProxyRequest r = request(i);
    for (uint32_t b = 0; b < r.bytes; ++b) src.data[static_cast<size_t>(i) * 64 + b] = byteOf(i, b);
    ProxyDesc d;
    if (!proxy_encode(r, seq, ring.num_slots, &d)) return false;
    int order[8];
    std::iota(order, order + 8, 0);
    std::shuffle(order, order + 8, rng);
    proxy_store_host(&ring.slots[proxy_slot(seq, ring.num_slots)], d, order);
    *seq_out = seq;
    return true;
  }

  Rank r0, r1;
  Buffer &src, &scratch, &dst, &hits;
  Link qp0, qp1;
  RingMemory ring;
  uint32_t start;
  std::unique_ptr<RequestProxy> proxy;
};

TEST(RequestProxy, ProducerThreadsAgainstTheConsumerThreadLoseAndDuplicateNothing) {
  const uint32_t num_descs = static_cast<uint32_t>(litmusIterations(20000));
  const uint32_t start = 0xffffffffu - 1000;  // the indices wrap 2^32 during the run
  const uint64_t seed = 0x9e0;
  ProxyWorld w(seed, 16, start, num_descs, 64);
  ASSERT_EQ(ncclSuccess, w.r0.nic->start());
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<uint32_t> quiets_checked{0};
  std::string first_failure;
  std::mutex failure_mu;
  auto report = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(failure_mu);
    if (failures.fetch_add(1) == 0) first_failure = what + " (chaos seed " + std::to_string(seed) + ")";
  };
  std::thread consumer([&] {
    usePreciseSleeps();
    Backoff backoff;
    Deadline deadline(60.0);
    while (!stop.load() && !deadline.expired()) {
      bool progressed = false;
      if (w.proxy->progress(&progressed) != ncclSuccess) return report(w.proxy->error());
      if (progressed)
        backoff.reset();
      else
        backoff.pause();
    }
  });
  // Two producers share the ring like GPU threads: indices from an atomic add, descriptors written in any order.
  std::vector<std::thread> producers;
  std::atomic<uint32_t> produced{0};
  for (int p = 0; p < 2; ++p) {
    producers.emplace_back([&, p] {
      usePreciseSleeps();
      std::mt19937 rng(p + 1);
      while (produced.fetch_add(1) < num_descs) {
        uint32_t seq = 0;
        if (!w.produce(rng, &seq, 30.0)) return report("a producer ran out of credits or saw an error");
        const uint32_t i = seq - start;
        if (w.request(i).op != ProxyOp::kQuiet) continue;
        // quiet: wait for completion of everything up to and including it, then every earlier effect is there.
        Deadline deadline(30.0);
        Backoff backoff;
        while (!proxy_index_reached(w.ring.load(w.ring.shared->completed), seq + 1)) {
          if (w.ring.load(w.ring.shared->error) != 0 || deadline.expired())
            return report("quiet " + std::to_string(i) + " never completed");
          backoff.pause();
        }
        for (uint32_t j = i > 400 ? i - 400 : 0; j < i; ++j) {
          std::string why;
          if (!w.effectsPresent(j, &why)) return report("after quiet " + std::to_string(i) + ": " + why);
        }
        quiets_checked.fetch_add(1);
      }
    });
  }
  for (auto& t : producers) t.join();
  Deadline deadline(30.0);
  while (!proxy_index_reached(w.ring.load(w.ring.shared->completed), start + num_descs) && failures.load() == 0 &&
         !deadline.expired())
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  stop.store(true);
  consumer.join();
  w.r0.nic->stop();
  ASSERT_EQ(0, failures.load()) << first_failure;
  EXPECT_EQ(start + num_descs, w.ring.load(w.ring.shared->completed));
  EXPECT_EQ(start + num_descs, w.ring.load(w.ring.shared->consumed));
  EXPECT_EQ(0u, w.ring.load(w.ring.shared->error));
  EXPECT_GT(quiets_checked.load(), 0u);
  for (uint32_t i = 0; i < num_descs; ++i) {
    std::string why;
    ASSERT_TRUE(w.effectsPresent(i, &why)) << why;
  }
}

TEST(RequestProxy, AFullSqHoldsDescriptorsBackInsteadOfLosingThem) {
  ProxyWorld w(77, 64, 0, 200, 4);  // 4 WQEBBs per QP: a put_signal takes 2
  std::mt19937 rng(1);
  uint32_t next = 0;
  Deadline deadline(20.0);
  while (!proxy_index_reached(w.ring.load(w.ring.shared->completed), 200) && !deadline.expired()) {
    uint32_t seq;
    while (next < 200 && proxy_has_credit(next, w.ring.load(w.ring.shared->consumed), 64) && w.produce(rng, &seq, 1.0))
      ++next;
    ASSERT_EQ(ncclSuccess, w.proxy->progress()) << w.proxy->error();
    w.r0.nic->step();
  }
  for (uint32_t i = 0; i < 200; ++i) {
    std::string why;
    ASSERT_TRUE(w.effectsPresent(i, &why)) << why;
  }
}

TEST(RequestProxy, AProducerIgnoringItsCreditsIsCaught) {
  ProxyWorld w(0, 4, 0xfffffffeu, 64);
  std::mt19937 rng(1);
  uint32_t seq;
  ASSERT_TRUE(w.produce(rng, &seq, 1.0));
  // Descriptor seq + 4 lands in the same slot before the consumer took seq.
  ProxyDesc d;
  ASSERT_TRUE(proxy_encode(w.request(4), seq + 4, 4, &d));
  proxy_store_host(&w.ring.slots[proxy_slot(seq, 4)], d);
  EXPECT_EQ(ncclInvalidUsage, w.proxy->progress());
  EXPECT_EQ(static_cast<uint32_t>(ProxyError::kOverrun), w.ring.load(w.ring.shared->error));
  EXPECT_NE(std::string::npos, w.proxy->error().find("ignored its credits")) << w.proxy->error();
  EXPECT_EQ(ncclInvalidUsage, w.proxy->progress()) << "sticky";
}

TEST(RequestProxy, UnknownKeysAndBadDescriptorsStopTheProxy) {
  {
    ProxyWorld w(0, 8, 0, 16);
    ProxyRequest r = w.request(0);
    r.op = ProxyOp::kPut;
    r.remote_key ^= 0x100;
    ProxyDesc d;
    ASSERT_TRUE(proxy_encode(r, 0, 8, &d));
    proxy_store_host(&w.ring.slots[0], d);
    EXPECT_EQ(ncclInvalidUsage, w.proxy->progress());
    EXPECT_EQ(static_cast<uint32_t>(ProxyError::kTranslation), w.ring.load(w.ring.shared->error));
    EXPECT_NE(std::string::npos, w.proxy->error().find("descriptor 0 (put on QP index")) << w.proxy->error();
    EXPECT_EQ(0u, w.proxy->consumed()) << "a failed descriptor is not consumed";
  }
  {
    ProxyWorld w(0, 8, 0, 16);
    ProxyRequest r = w.request(0);
    r.op = ProxyOp::kPut;
    r.remote_offset = 16 * 64 - 8;  // 9 bytes from 8 before the window's end
    r.bytes = 9;
    ProxyDesc d;
    ASSERT_TRUE(proxy_encode(r, 0, 8, &d));
    proxy_store_host(&w.ring.slots[0], d);
    EXPECT_EQ(ncclInvalidUsage, w.proxy->progress());
    EXPECT_NE(std::string::npos, w.proxy->error().find("leaves its window")) << w.proxy->error();
  }
  {
    ProxyWorld w(0, 8, 0, 16);
    ProxyRequest r = w.request(0);
    r.qp = 5;
    ProxyDesc d;
    ASSERT_TRUE(proxy_encode(r, 0, 8, &d));
    proxy_store_host(&w.ring.slots[0], d);
    EXPECT_EQ(ncclInvalidUsage, w.proxy->progress());
    EXPECT_EQ(static_cast<uint32_t>(ProxyError::kBadDescriptor), w.ring.load(w.ring.shared->error));
  }
}

TEST(RequestProxy, AnErrorCqeReachesTheRingsErrorWord) {
  ProxyWorld w(5, 8, 0, 16);
  ProxyRequest r = w.request(0);
  r.op = ProxyOp::kSignal;
  r.signal_offset = 4;  // inside the window, so the proxy posts it; the NIC refuses the misaligned atomic
  ProxyDesc d;
  ASSERT_TRUE(proxy_encode(r, 0, 8, &d));
  proxy_store_host(&w.ring.slots[0], d);
  ASSERT_EQ(ncclSuccess, w.proxy->progress());
  w.r0.nic->runUntilIdle();
  EXPECT_EQ(ncclRemoteError, w.proxy->progress());
  EXPECT_EQ(static_cast<uint32_t>(ProxyError::kCompletion), w.ring.load(w.ring.shared->error));
  EXPECT_NE(std::string::npos, w.proxy->error().find("syndrome 0x12")) << w.proxy->error();
  EXPECT_EQ(0u, w.ring.load(w.ring.shared->completed)) << "a failed descriptor never completes";
}

}  // namespace
}  // namespace nccl_moe::emulated::testing
