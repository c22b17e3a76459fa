// The doorbell proxy (src/transport/rdma/dbproxy/doorbell_proxy.h): a CPU producer (HostSq, the GPU's posting code
// on the host) writes WQEs and the doorbell record and stores its doorbell word to a mailbox; the proxy forwards
// the word to the software NIC's doorbell, and only then does the NIC execute. Also: only changed words are
// forwarded and only the latest one (batching), describe() names a QP whose mailbox is ahead of what was
// forwarded, the MMIO store sequence writes the word, and a run with both threads (NIC executor, proxy thread) under
// chaos delivers every put_signal.
#include "transport/rdma/dbproxy/doorbell_proxy.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "soft_nic_harness.h"
#include "transport/rdma/mlx5/ring.h"

namespace nccl_moe::emulated::testing {
namespace {

using dbproxy::DoorbellProxy;
using dbproxy::DoorbellRoute;
using dbproxy::DoorbellTarget;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A Link whose producer rings a mailbox word instead of the NIC's doorbell.
struct MailboxLink {
  MailboxLink(Rank& from, Rank& to, uint32_t wqe_cnt = 64) : link(from, to, wqe_cnt, wqe_cnt) {
    rdma::SqView sv{link.mem.sq, wqe_cnt, link.mem.sq_dbrec, &mailbox, link.qpn};
    rdma::CqView cv{link.mem.cq, wqe_cnt, link.mem.cq_dbrec};
    sq.reset(new rdma::HostSq(sv, cv));
  }
  DoorbellRoute route(int peer) {
    DoorbellRoute r;
    r.mailbox = &mailbox;
    r.doorbell = link.mem.doorbell;
    r.target = DoorbellTarget::kHostWord;
    r.peer = peer;
    r.qpn = link.qpn;
    return r;
  }
  Link link;
  alignas(64) uint64_t mailbox = 0;
  std::unique_ptr<rdma::HostSq> sq;
};

TEST(DoorbellProxy, ForwardsOnlyChangedWordsAndOnlyTheLatest) {
  alignas(8) uint64_t mailbox = 0, doorbell = 0;
  DoorbellProxy proxy(3);
  EXPECT_EQ(ncclInvalidArgument, proxy.add(DoorbellRoute{nullptr, &doorbell}));
  ASSERT_EQ(ncclSuccess, proxy.add(DoorbellRoute{&mailbox, &doorbell, DoorbellTarget::kHostWord, 1, 0x1234}));
  bool progressed = true;
  ASSERT_EQ(ncclSuccess, proxy.progress(&progressed));
  EXPECT_FALSE(progressed);
  EXPECT_EQ(0u, proxy.forwarded());
  const uint64_t w1 = mlx5::sq_doorbell_word(5, 0x1234), w2 = mlx5::sq_doorbell_word(9, 0x1234);
  mailbox = w1;
  mailbox = w2;  // two doorbells before the proxy looks: the later one announces both
  ASSERT_EQ(ncclSuccess, proxy.progress(&progressed));
  EXPECT_TRUE(progressed);
  EXPECT_EQ(w2, doorbell);
  EXPECT_EQ(1u, proxy.forwarded());
  EXPECT_EQ(w2, proxy.lastForwarded(0));
  ASSERT_EQ(ncclSuccess, proxy.progress(&progressed));
  EXPECT_FALSE(progressed) << "an unchanged mailbox is not forwarded again";
  mailbox = mlx5::sq_doorbell_word(12, 0x1234);
  const std::string d = proxy.describe(true);
  EXPECT_TRUE(contains(d, "doorbell proxy of rank 3: 1 QPs")) << d;
  EXPECT_TRUE(contains(d, "QP 0x1234 to peer 1: mailbox index 12, forwarded 9")) << d;
  EXPECT_EQ(1u, proxy.pending());
  ASSERT_EQ(ncclSuccess, proxy.progress(&progressed));
  EXPECT_EQ(0u, proxy.pending());
  EXPECT_FALSE(contains(proxy.describe(true), "mailbox index")) << "nothing pending";
}

TEST(DoorbellProxy, TheMmioStoreSequenceWritesTheWord) {
  alignas(8) uint64_t uar = 0;
  dbproxy::ringMmio(&uar, 0x0123456789abcdefull);
  EXPECT_EQ(0x0123456789abcdefull, uar);
}

TEST(DoorbellProxy, TheNicExecutesOnlyWhatTheProxyForwarded) {
  for (uint64_t seed : {0ull, 5ull}) {
    Rank r0(0, seed), r1(1, seed);
    Buffer& src = r0.alloc(4096);
    Buffer& result = r0.alloc(8, rdma::kAccessLocalWrite);
    Buffer& dst = r1.alloc(4096);
    Buffer& sig = r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal);
    MailboxLink ml(r0, r1);
    ASSERT_TRUE(ml.link.ok);
    DoorbellProxy proxy(0);
    ASSERT_EQ(ncclSuccess, proxy.add(ml.route(1)));
    for (size_t i = 0; i < 4096; ++i) src.data[i] = static_cast<uint8_t>(i * 13 + seed);
    ASSERT_TRUE(ml.sq->postPutSignal(src.sge(0, 4096), dst.remote(0), sig.remote(0), 1, result.local_word(0), true));
    ml.sq->ringDoorbell();  // into the mailbox
    r0.nic->runUntilIdle(100000);
    EXPECT_EQ(0u, r0.nic->qpRetired(ml.link.qp)) << "the NIC saw no doorbell: nothing executes";
    EXPECT_EQ(0u, *sig.word(0));
    bool progressed = false;
    ASSERT_EQ(ncclSuccess, proxy.progress(&progressed));
    EXPECT_TRUE(progressed);
    ASSERT_EQ(ncclSuccess, ml.sq->waitCompleted(ml.sq->pi(), 10.0, [&] { r0.nic->step(); })) << ml.sq->error();
    EXPECT_EQ(1u, *sig.word(0));
    EXPECT_EQ(0, std::memcmp(src.data, dst.data, 4096));
    EXPECT_EQ(QpState::kReady, r0.nic->qpState(ml.link.qp));
  }
}

// Both threads running, chaos on: every put_signal of many batches arrives, in order, through the proxy thread.
TEST(DoorbellProxy, ProxyThreadAndNicThreadDeliverEveryPutSignalUnderChaos) {
  const uint64_t iterations = litmusIterations(2000);
  for (uint64_t seed : {7ull, 1786666733ull}) {
    Rank r0(0, seed), r1(1, seed);
    constexpr size_t kSlot = 512;
    Buffer& src = r0.alloc(kSlot * 4);
    Buffer& result = r0.alloc(8, rdma::kAccessLocalWrite);
    Buffer& dst = r1.alloc(kSlot * 4);
    Buffer& sig = r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal);
    MailboxLink ml(r0, r1, 16);
    ASSERT_TRUE(ml.link.ok);
    DoorbellProxy proxy(0);
    ASSERT_EQ(ncclSuccess, proxy.add(ml.route(1)));
    ASSERT_EQ(ncclSuccess, r0.nic->start());
    ASSERT_EQ(ncclSuccess, proxy.start());
    EXPECT_EQ(ncclInvalidUsage, proxy.start()) << "a second start is refused";
    EXPECT_EQ(ncclInvalidArgument, proxy.add(ml.route(1))) << "no route after the thread started";
    for (uint64_t i = 0; i < iterations; ++i) {
      const size_t slot = (i % 4) * kSlot;
      const uint32_t bytes = static_cast<uint32_t>(1 + (i * 37) % kSlot);
      // The slot is reused every 4 iterations: wait until its last put completed before refilling it.
      if (i >= 4) ASSERT_EQ(ncclSuccess, ml.sq->waitCompleted(ml.sq->pi() - 6, 10.0)) << ml.sq->error();
      std::memset(src.data + slot, static_cast<int>(i & 0xff), bytes);
      ASSERT_EQ(ncclSuccess, ml.sq->waitRoom(2, 10.0)) << ml.sq->error() << "; " << proxy.describe(true);
      ASSERT_TRUE(
          ml.sq->postPutSignal(src.sge(slot, bytes), dst.remote(slot), sig.remote(0), 1, result.local_word(0), true))
          << "iteration " << i;
      if (i % 3 == 2 || i + 1 == iterations) ml.sq->ringDoorbell();  // batches of up to three
    }
    ASSERT_EQ(ncclSuccess, ml.sq->waitCompleted(ml.sq->pi(), 10.0))
        << ml.sq->error() << "; " << proxy.describe(true) << " (chaos seed " << seed << ")";
    EXPECT_EQ(iterations, __atomic_load_n(sig.word(0), __ATOMIC_ACQUIRE)) << "chaos seed " << seed;
    EXPECT_LE(proxy.forwarded(), (iterations + 2) / 3);
    EXPECT_GE(proxy.forwarded(), 1u);
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(ncclSuccess, proxy.stop(1.0));
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.5);
    EXPECT_FALSE(proxy.running());
    r0.nic->stop();
  }
}

}  // namespace
}  // namespace nccl_moe::emulated::testing
