// Litmus tests of the software NIC's ordering contract under chaos (host memory backend), each of which can fail:
//   - data then signal on one QP: whoever sees the signal sees every byte of the data (observer thread, and the
//     test itself between deterministic steps), sizes 1 B .. 4 MB;
//   - a consumer that polls the last data byte instead of the signal is caught (it must fail under chaos);
//   - a source overwritten before its CQE is caught (late source reads);
//   - two QPs to one peer: the later-posted signal is observed first at least once (no cross-QP order);
//   - chaos determinism: one seed, one schedule.
// Iterations: CI-sized defaults; MOE_LITMUS_ITERATIONS overrides them (the GPU machine's 10^6-iteration runs).
// NCCL_MOE_EMU_CHAOS, when set, replaces the tests' chaos seeds, to replay a failure.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "soft_nic_harness.h"
#include "transport/emulated/chaos.h"
#include "transport/rdma/host_wait.h"

namespace nccl_moe::emulated::testing {
namespace {

using rdma::Backoff;
using rdma::Deadline;

uint64_t seedOr(uint64_t fallback) {
  const uint64_t env = chaosSeedFromEnvironment();
  return env != 0 ? env : fallback;
}

// A nonzero byte that depends on the iteration and the position, so a slot's previous contents (zeroed by the
// consumer) never pass for new data.
uint8_t patternByte(uint64_t iteration, uint64_t b) {
  uint64_t h = (iteration + 1) * 0x9e3779b97f4a7c15ull ^ (b * 0xbf58476d1ce4e5b9ull);
  h ^= h >> 29;
  return static_cast<uint8_t>(1 + (h % 255));
}
uint32_t smallSize(uint64_t iteration) { return 1 + static_cast<uint32_t>((iteration * 2654435761u >> 7) % 64); }

bool dataComplete(const uint8_t* p, uint64_t iteration, uint64_t n) {
  for (uint64_t b = 0; b < n; ++b)
    if (__atomic_load_n(p + b, __ATOMIC_RELAXED) != patternByte(iteration, b)) return false;
  return true;
}

// One requester, one responder, one QP, `num_slots` message slots of `slot_bytes` and one signal counter.
struct Channel {
  Channel(uint64_t seed, uint32_t num_slots, uint64_t slot_bytes, uint32_t wqe_cnt = 256)
      : r0(0, seed),
        r1(1, seed),
        slots(num_slots),
        slot_bytes(slot_bytes),
        src(r0.alloc(num_slots * slot_bytes)),
        result(r0.alloc(8, rdma::kAccessLocalWrite)),
        dst(r1.alloc(num_slots * slot_bytes)),
        sig(r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal)),
        link(r0, r1, wqe_cnt, wqe_cnt) {}
  uint64_t signal() const { return __atomic_load_n(sig.word(0), __ATOMIC_ACQUIRE); }
  uint8_t* slot(uint64_t i) const { return dst.data + (i % slots) * slot_bytes; }
  // Writes iteration i's source, posts WRITE + fetch-add(+1), rings.
  bool post(uint64_t i, uint64_t n) {
    uint8_t* s = src.data + (i % slots) * slot_bytes;
    for (uint64_t b = 0; b < n; ++b) s[b] = patternByte(i, b);
    if (!link.sq->postPutSignal(src.sge((i % slots) * slot_bytes, static_cast<uint32_t>(n)),
                                dst.remote((i % slots) * slot_bytes), sig.remote(0), 1, result.local_word(0), true))
      return false;
    link.sq->ringDoorbell();
    return true;
  }

  Rank r0, r1;
  uint32_t slots;
  uint64_t slot_bytes;
  Buffer &src, &result, &dst, &sig;
  Link link;
};

// Producer (this thread) and observer (another thread) around the NIC's executor thread. The producer reuses a
// source slot only after its WRITE completed (CQE) and a destination slot only after the observer released it.
// `wrong_consumer`: the observer waits for the last data byte instead of the signal, counts how often the data
// is then incomplete, and only then waits for the signal (so the run still ends).
struct ThreadLitmus {
  uint64_t failures = 0;
  uint64_t detections = 0;
  std::string first_failure;
};

ThreadLitmus runThreadLitmus(uint64_t seed, uint64_t iterations, uint32_t num_slots, uint64_t slot_bytes,
                             const std::function<uint64_t(uint64_t)>& size_of, bool wrong_consumer,
                             double timeout_s = 60.0) {
  Channel ch(seed, num_slots, slot_bytes);
  ThreadLitmus out;
  std::atomic<uint64_t> released{0};
  std::atomic<bool> abort{false};
  EXPECT_EQ(ncclSuccess, ch.r0.nic->start());
  rdma::usePreciseSleeps();
  std::thread observer([&] {
    rdma::usePreciseSleeps();
    Deadline deadline(timeout_s);
    for (uint64_t i = 0; i < iterations && !abort.load(); ++i) {
      const uint64_t n = size_of(i);
      uint8_t* data = ch.slot(i);
      Backoff backoff;
      if (wrong_consumer) {
        while (__atomic_load_n(data + n - 1, __ATOMIC_ACQUIRE) != patternByte(i, n - 1) && !abort.load()) {
          if (deadline.expired()) return abort.store(true);
          std::this_thread::yield();  // poll hard: the window between the last byte and the rest is short
        }
        if (!dataComplete(data, i, n)) ++out.detections;
      }
      while (ch.signal() < i + 1) {
        if (deadline.expired() || abort.load()) return abort.store(true);
        backoff.pause();
      }
      if (!dataComplete(data, i, n)) {
        if (out.failures++ == 0)
          out.first_failure = "iteration " + std::to_string(i) + " (" + std::to_string(n) +
                              " bytes): the signal was visible before all the data, chaos seed " + std::to_string(seed);
      }
      std::memset(data, 0, n);
      released.store(i + 1, std::memory_order_release);
    }
  });
  Deadline deadline(timeout_s);
  for (uint64_t i = 0; i < iterations && !abort.load(); ++i) {
    Backoff backoff;
    // Destination slot free, source slot's WRITE complete (two WQEBBs per iteration), SQ room.
    while (released.load(std::memory_order_acquire) + num_slots < i + 1 ||
           (i >= num_slots && static_cast<int32_t>(ch.link.sq->completed() - 2 * (i - num_slots + 1)) < 0) ||
           !ch.link.sq->hasRoom(2)) {
      ch.link.sq->poll();
      if (ch.link.sq->failed() || deadline.expired()) {
        abort.store(true);
        break;
      }
      backoff.pause();
    }
    if (abort.load() || !ch.post(i, size_of(i))) {
      abort.store(true);
      break;
    }
  }
  observer.join();
  EXPECT_EQ(ncclSuccess, ch.link.drain(10.0)) << ch.link.sq->error();
  ch.r0.nic->stop();
  EXPECT_FALSE(abort.load()) << "the litmus run stalled or failed (chaos seed " << seed << "): " << ch.link.sq->error()
                             << ch.r0.nic->qpError(ch.link.qp);
  return out;
}

TEST(SoftNicLitmus, ObserverOfTheSignalSeesAllDataSmallSizesThreads) {
  const uint64_t seed = seedOr(0x5eed);
  const uint64_t iterations = litmusIterations(100000);
  const auto t0 = std::chrono::steady_clock::now();
  const ThreadLitmus r = runThreadLitmus(seed, iterations, 64, 64, smallSize, false);
  EXPECT_EQ(0u, r.failures) << r.first_failure;
  std::printf("  %llu iterations in %.2f s (chaos seed %llu)\n", static_cast<unsigned long long>(iterations),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              static_cast<unsigned long long>(seed));
}

TEST(SoftNicLitmus, ObserverOfTheSignalSeesAllDataOneByteToFourMegabytes) {
  const uint64_t seed = seedOr(0xb16);
  const std::vector<uint64_t> sizes = {
      1, 2, 3, 7, 8, 9, 63, 64, 65, 4095, 4096, 4097, 65535, 65537, 1 << 20, (1 << 20) + 3, (3 << 20) - 1, 4 << 20};
  const uint64_t reps = 3;
  const ThreadLitmus r = runThreadLitmus(
      seed, sizes.size() * reps, 2, 4 << 20, [&](uint64_t i) { return sizes[i % sizes.size()]; }, false);
  EXPECT_EQ(0u, r.failures) << r.first_failure;
}

TEST(SoftNicLitmus, ConsumerPollingTheLastByteIsCaughtThreads) {
  const uint64_t seed = seedOr(0x1a57);
  const ThreadLitmus r = runThreadLitmus(
      seed, litmusIterations(3000), 64, 256, [](uint64_t i) { return 2 + (i * 37) % 255; }, true);
  EXPECT_EQ(0u, r.failures) << r.first_failure;
  EXPECT_GT(r.detections, 0u) << "a consumer polling the last byte was never caught (chaos seed " << seed << ")";
}

// The same two contracts with the test as the observer between deterministic steps: no timing involved, so the
// counts below are properties of the seed.
struct StepLitmus {
  uint64_t failures = 0;
  uint64_t last_byte_early = 0;  // the wrong consumer's view: last byte there, data incomplete
  std::string first_failure;
};

StepLitmus runStepLitmus(uint64_t seed, uint64_t iterations) {
  Channel ch(seed, 4, 64, 64);
  StepLitmus out;
  for (uint64_t i = 0; i < iterations; ++i) {
    const uint64_t n = smallSize(i);
    uint8_t* data = ch.slot(i);
    std::memset(data, 0, n);
    if (!ch.post(i, n)) {
      out.first_failure = "could not post iteration " + std::to_string(i);
      ++out.failures;
      return out;
    }
    bool caught = false;
    for (int steps = 0; ch.signal() < i + 1; ++steps) {
      if (!ch.r0.nic->step() || steps > 100000) {
        out.first_failure = "iteration " + std::to_string(i) + " never completed: " + ch.r0.nic->qpError(ch.link.qp);
        ++out.failures;
        return out;
      }
      const bool complete = dataComplete(data, i, n);
      if (!caught && !complete && data[n - 1] == patternByte(i, n - 1)) {
        caught = true;
        ++out.last_byte_early;
      }
      if (ch.signal() >= i + 1 && !complete && out.failures++ == 0)
        out.first_failure =
            "iteration " + std::to_string(i) + ": signal before data, chaos seed " + std::to_string(seed);
    }
    ch.r0.nic->runUntilIdle(100000);
    ch.link.sq->poll();
  }
  return out;
}

TEST(SoftNicLitmus, SignalOrdersDataAndTheLastByteDoesNotSteps) {
  const uint64_t seed = seedOr(0xc0ffee);
  const StepLitmus chaos = runStepLitmus(seed, litmusIterations(100000));
  EXPECT_EQ(0u, chaos.failures) << chaos.first_failure;
  EXPECT_GT(chaos.last_byte_early, 0u) << "chaos never placed the last byte first (seed " << seed << ")";
  const StepLitmus plain = runStepLitmus(0, 2000);
  EXPECT_EQ(0u, plain.failures) << plain.first_failure;
  EXPECT_EQ(0u, plain.last_byte_early) << "without chaos a WRITE lands whole: the wrong consumer would pass";
}

// A producer that reuses its source buffer before the WRITE's CQE: chaos reads sources late, so the corruption
// shows; without chaos the NIC copies at once and the bug hides.
uint64_t lateSourceDetections(uint64_t seed, uint64_t iterations, bool wait_for_cqe) {
  Channel ch(seed, 1, 256, 64);
  uint64_t detected = 0;
  for (uint64_t i = 0; i < iterations; ++i) {
    const uint32_t n = 16 + static_cast<uint32_t>(i % 200);
    for (uint32_t b = 0; b < n; ++b) ch.src.data[b] = patternByte(i, b);
    EXPECT_TRUE(ch.link.sq->postWrite(ch.src.sge(0, n), ch.dst.remote(0), true));
    ch.link.sq->ringDoorbell();
    for (uint64_t s = 0; s < 1 + i % 3; ++s) ch.r0.nic->step();
    if (wait_for_cqe) EXPECT_EQ(ncclSuccess, ch.link.drain());
    std::memset(ch.src.data, 0xee, n);  // the reuse
    EXPECT_EQ(ncclSuccess, ch.link.drain());
    if (!dataComplete(ch.dst.data, i, n)) ++detected;
  }
  return detected;
}

TEST(SoftNicLitmus, SourceReusedBeforeItsCqeIsCaught) {
  const uint64_t seed = seedOr(0x7a7e);
  EXPECT_GT(lateSourceDetections(seed, 2000, false), 0u)
      << "chaos never read a source late enough to expose early reuse (seed " << seed << ")";
  EXPECT_EQ(0u, lateSourceDetections(seed, 2000, true)) << "reuse after the CQE must be safe (seed " << seed << ")";
  EXPECT_EQ(0u, lateSourceDetections(0, 500, false)) << "without chaos the bug hides: why chaos exists";
}

// Two QPs to one peer; per iteration QP 0's WRITE + signal is posted and rung before QP 1's. RC orders nothing
// across QPs: the suite must see QP 1's signal before QP 0's at least once.
struct TwoQps {
  explicit TwoQps(uint64_t seed)
      : r0(0, seed),
        r1(1, seed),
        src(r0.alloc(4096)),
        result(r0.alloc(16, rdma::kAccessLocalWrite)),
        dst(r1.alloc(8192)),
        sig(r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal)),
        qp0(r0, r1),
        qp1(r0, r1) {}
  void post(uint64_t i) {
    const uint32_t n = 1 + static_cast<uint32_t>(i % 512);
    Link* links[2] = {&qp0, &qp1};
    for (int q = 0; q < 2; ++q) {
      links[q]->sq->postPutSignal(src.sge(0, n), dst.remote(q * 4096), sig.remote(q * 8), 1, result.local_word(q * 8),
                                  true);
      links[q]->sq->ringDoorbell();
    }
  }
  uint64_t signal(int q) const { return __atomic_load_n(sig.word(q * 8), __ATOMIC_ACQUIRE); }
  Rank r0, r1;
  Buffer &src, &result, &dst, &sig;
  Link qp0, qp1;
};

uint64_t crossQpReorderingsSteps(uint64_t seed, uint64_t iterations) {
  TwoQps w(seed);
  uint64_t seen = 0;
  for (uint64_t i = 0; i < iterations; ++i) {
    w.post(i);
    bool reordered = false;
    while (w.r0.nic->step()) reordered = reordered || (w.signal(1) == i + 1 && w.signal(0) == i);
    seen += reordered;
    w.qp0.sq->poll();
    w.qp1.sq->poll();
    EXPECT_EQ(i + 1, w.signal(0));
    EXPECT_EQ(i + 1, w.signal(1));
  }
  return seen;
}

TEST(SoftNicLitmus, CrossQpReorderingIsObserved) {
  const uint64_t seed = seedOr(0x0dd);
  EXPECT_GT(crossQpReorderingsSteps(seed, 500), 0u) << "no cross-QP reordering in 500 iterations (seed " << seed << ")";
  EXPECT_EQ(0u, crossQpReorderingsSteps(0, 200)) << "round robin without chaos keeps posting order";

  // With threads: an observer reading QP 1's signal and then QP 0's sees QP 1 ahead.
  TwoQps w(seed);
  ASSERT_EQ(ncclSuccess, w.r0.nic->start());
  std::atomic<bool> done{false};
  std::atomic<uint64_t> seen{0};
  std::thread observer([&] {
    while (!done.load()) {
      const uint64_t s1 = w.signal(1);
      const uint64_t s0 = w.signal(0);
      if (s1 > s0) seen.fetch_add(1);
      std::this_thread::yield();
    }
  });
  Deadline deadline(20.0);
  for (uint64_t i = 0; i < litmusIterations(2000) && seen.load() == 0 && !deadline.expired(); ++i) {
    w.post(i);
    ASSERT_EQ(ncclSuccess, w.qp0.drain(10.0)) << w.qp0.sq->error();
    ASSERT_EQ(ncclSuccess, w.qp1.drain(10.0)) << w.qp1.sq->error();
  }
  done.store(true);
  observer.join();
  w.r0.nic->stop();
  EXPECT_GT(seen.load(), 0u) << "the observer thread never saw QP 1's signal ahead of QP 0's (seed " << seed << ")";
}

// One seed, one schedule: the same script of posts, doorbells and steps gives the same trace; another seed
// gives another.
uint64_t scriptedTrace(uint64_t seed, std::vector<TraceEvent>* trace, std::vector<uint8_t>* dst_bytes) {
  Rank r0(0, seed, /*trace=*/true), r1(1, seed);
  Buffer& src = r0.alloc(1 << 16);
  Buffer& result = r0.alloc(16, rdma::kAccessLocalWrite);
  Buffer& dst = r1.alloc(1 << 16);
  Buffer& sig = r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal);
  Link a(r0, r1), b(r0, r1);
  for (int i = 0; i < (1 << 16); ++i) src.data[i] = static_cast<uint8_t>(i * 13);
  for (int round = 0; round < 20; ++round) {
    Link& l = round % 3 == 0 ? b : a;
    const uint32_t off = (round * 3001) % 60000;
    l.sq->postWrite(src.sge(off, 1 + round * 97), dst.remote(off), false);
    l.sq->postFetchAdd(sig.remote(round % 2 * 8), 1, result.local_word(round % 2 * 8), round % 4 == 0);
    l.sq->ringDoorbell();
    for (int s = 0; s < round % 5; ++s) r0.nic->step();
  }
  r0.nic->runUntilIdle();
  *trace = r0.nic->trace();
  dst_bytes->assign(dst.data, dst.data + (1 << 16));
  return r0.nic->traceHash();
}

TEST(SoftNicLitmus, SameSeedSameScheduleOtherSeedOtherSchedule) {
  const uint64_t seed = seedOr(424242);
  std::vector<TraceEvent> t1, t2, t3;
  std::vector<uint8_t> d1, d2, d3;
  const uint64_t h1 = scriptedTrace(seed, &t1, &d1);
  const uint64_t h2 = scriptedTrace(seed, &t2, &d2);
  const uint64_t h3 = scriptedTrace(seed + 1, &t3, &d3);
  ASSERT_GT(t1.size(), 100u);
  EXPECT_TRUE(t1 == t2) << "chaos seed " << seed << " gave two schedules";
  EXPECT_EQ(h1, h2);
  EXPECT_FALSE(t1 == t3) << "seeds " << seed << " and " << seed + 1 << " gave the same schedule";
  EXPECT_NE(h1, h3);
  EXPECT_EQ(d1, d3) << "different schedules, same final memory (no overlapping WRITEs in the script)";
  int kinds[9] = {};
  for (const TraceEvent& e : t1) ++kinds[static_cast<int>(e.kind)];
  for (TraceKind k : {TraceKind::kDoorbell, TraceKind::kFetch, TraceKind::kRead, TraceKind::kPlace, TraceKind::kAtomic,
                      TraceKind::kCqe, TraceKind::kStall})
    EXPECT_GT(kinds[static_cast<int>(k)], 0) << traceKindName(k);
}

}  // namespace
}  // namespace nccl_moe::emulated::testing
