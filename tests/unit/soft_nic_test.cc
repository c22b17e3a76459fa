// The software NIC (src/transport/emulated/nic.h) with the host memory backend: what it executes (WRITE, inline
// WRITE, fetch-add, compare-swap, NOP, exactly the builders' bytes), only what doorbells announced, CQEs (owner
// bit over laps, unsignaled WQEs, overrun), and every error kind: the syndrome and vendor code of the error CQE,
// the QP in the error state, every later WQE flushed and without effect, nothing hangs. Ordering litmus tests
// under chaos are in soft_nic_litmus_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "soft_nic_harness.h"
#include "transport/rdma/mlx5/wqe.h"

namespace nccl_moe::emulated::testing {
namespace {

using rdma::Completion;

std::vector<Completion> runAndPoll(Link& link, uint64_t max_steps = 1000000) {
  link.nic->runUntilIdle(max_steps);
  std::vector<Completion> out;
  link.sq->poll(&out);
  return out;
}

void fill(Buffer& b, size_t offset, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; ++i) b.data[offset + i] = static_cast<uint8_t>(seed + i * 7);
}

TEST(SoftNic, WriteThenFetchAddReturnsTheOldValueAndOneCqe) {
  for (uint64_t seed : {0ull, 3ull}) {
    Rank r0(0, seed), r1(1, seed);
    Buffer& src = r0.alloc(256);
    Buffer& result = r0.alloc(8, rdma::kAccessLocalWrite);
    Buffer& dst = r1.alloc(256);
    Buffer& sig = r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal);
    Link link(r0, r1);
    ASSERT_TRUE(link.ok);
    fill(src, 0, 256, 1);
    *sig.word(8) = 40;
    ASSERT_TRUE(link.sq->postWrite(src.sge(0, 256), dst.remote(0), false));
    ASSERT_TRUE(link.sq->postFetchAdd(sig.remote(8), 2, result.local_word(0), true));
    link.sq->ringDoorbell();
    const std::vector<Completion> c = runAndPoll(link);
    ASSERT_EQ(1u, c.size()) << "the unsignaled WRITE has no CQE";
    EXPECT_EQ(m::CqeStatus::kSuccess, c[0].status);
    EXPECT_EQ(1u, c[0].pi);
    EXPECT_EQ(static_cast<uint8_t>(m::WqeOpcode::kAtomicFa), c[0].info.wqe_opcode);
    EXPECT_EQ(link.qpn, c[0].info.qpn);
    EXPECT_EQ(8u, c[0].info.byte_cnt);
    EXPECT_EQ(0, std::memcmp(src.data, dst.data, 256));
    EXPECT_EQ(42u, *sig.word(8));
    EXPECT_EQ(40u, *result.word(0)) << "the previous value lands in the local buffer";
    EXPECT_EQ(2u, link.sq->completed());
    EXPECT_EQ(2u, r0.nic->qpRetired(link.qp));
    EXPECT_EQ(QpState::kReady, r0.nic->qpState(link.qp));
  }
}

TEST(SoftNic, PutSignalInlineWriteAndCompareSwap) {
  NicConfig big_endian = nicConfig(0, 0);
  big_endian.atomic_result_big_endian = true;
  Rank r0(big_endian), r1(1, 0);
  Buffer& src = r0.alloc(4096);
  Buffer& result = r0.alloc(16, rdma::kAccessLocalWrite);
  Buffer& dst = r1.alloc(4096);
  Buffer& sig = r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal);
  Link link(r0, r1);
  fill(src, 0, 4096, 9);
  *sig.word(0) = 0x1122334455667788ull;
  *sig.word(8) = 5;
  const char inline_bytes[13] = "inline-12345";
  ASSERT_TRUE(link.sq->postPutSignal(src.sge(0, 3000), dst.remote(100), sig.remote(0), 1, result.local_word(0), true));
  ASSERT_TRUE(link.sq->postWriteInline(inline_bytes, 12, dst.remote(3500), false));
  m::CompareSwapWqe cs{m::WqeCtrl{link.sq->pi(), link.qpn, true, m::FenceMode::kNone}, sig.remote(8), 5, 77,
                       result.local_word(8)};
  uint8_t wqebb[64] = {};
  m::build_compare_swap(wqebb, cs);
  ASSERT_TRUE(link.sq->postRawWqebb(wqebb));
  link.sq->ringDoorbell();
  const std::vector<Completion> c = runAndPoll(link);
  ASSERT_EQ(2u, c.size());
  EXPECT_EQ(1u, c[0].pi);
  EXPECT_EQ(3u, c[1].pi);
  EXPECT_EQ(0, std::memcmp(src.data, dst.data + 100, 3000));
  EXPECT_EQ(0, std::memcmp(inline_bytes, dst.data + 3500, 12));
  EXPECT_EQ(0x1122334455667789ull, *sig.word(0));
  EXPECT_EQ(m::byte_swap64(0x1122334455667788ull), *result.word(0)) << "big-endian atomic results configured";
  EXPECT_EQ(77u, *sig.word(8)) << "compare matched: swapped";
  EXPECT_EQ(m::byte_swap64(5), *result.word(8));
}

TEST(SoftNic, ExecutesNothingBeyondTheDoorbell) {
  Rank r0(0, 0), r1(1, 0);
  Buffer& src = r0.alloc(64);
  Buffer& dst = r1.alloc(64);
  Link link(r0, r1, 8, 8);
  fill(src, 0, 64, 1);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(link.sq->postWrite(src.sge(i * 8, 8), dst.remote(i * 8), true));
  EXPECT_EQ(0u, r0.nic->runUntilIdle()) << "no doorbell, no work";
  link.sq->ringDoorbellAt(1);
  EXPECT_EQ(1u, runAndPoll(link).size());
  EXPECT_EQ(0, std::memcmp(src.data, dst.data, 8));
  EXPECT_EQ(0, dst.data[8]) << "WQE 1 was written but not announced";
  EXPECT_EQ(1u, r0.nic->qpAnnounced(link.qp));
  EXPECT_EQ(1u, r0.nic->qpDbrValue(link.qp));
  // Garbage right after the announced index is never read.
  std::memset(link.mem.sq + 3 * 64, 0xee, 64);
  link.sq->ringDoorbellAt(3);
  EXPECT_EQ(2u, runAndPoll(link).size());
  EXPECT_EQ(0, std::memcmp(src.data, dst.data, 24));
  EXPECT_EQ(QpState::kReady, r0.nic->qpState(link.qp));
  EXPECT_EQ(3u, r0.nic->qpDbrValue(link.qp));
}

TEST(SoftNic, UnsignaledWqesCompleteSilentlyAndALaterCqeCoversThem) {
  Rank r0(0, 11), r1(1, 11);
  Buffer& src = r0.alloc(1024);
  Buffer& dst = r1.alloc(1024);
  Link link(r0, r1);
  fill(src, 0, 1024, 3);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(link.sq->postWrite(src.sge(i * 100, 100), dst.remote(i * 100), i == 9));
  link.sq->ringDoorbell();
  const std::vector<Completion> c = runAndPoll(link);
  ASSERT_EQ(1u, c.size());
  EXPECT_EQ(9u, c[0].pi);
  EXPECT_EQ(100u, c[0].info.byte_cnt);
  EXPECT_EQ(10u, link.sq->completed());
  EXPECT_EQ(0, std::memcmp(src.data, dst.data, 1000));
}

TEST(SoftNic, CqOwnerBitAcrossLapsAndSqWrap) {
  Rank r0(0, 5), r1(1, 5);
  Link link(r0, r1, 4, 4);
  uint32_t seen = 0;
  for (int round = 0; round < 25; ++round) {
    ASSERT_TRUE(link.sq->postNop(true));
    ASSERT_TRUE(link.sq->postNop(true));
    link.sq->ringDoorbell();
    for (const Completion& c : runAndPoll(link)) {
      ASSERT_EQ(m::CqeStatus::kSuccess, c.status);
      ASSERT_EQ(seen++, c.pi);
    }
  }
  EXPECT_EQ(50u, seen);
  EXPECT_TRUE(r0.nic->nicErrors().empty());
}

TEST(SoftNic, CqOverrunIsReportedAndFailsTheQp) {
  Rank r0(0, 0), r1(1, 0);
  Link link(r0, r1, 8, 2);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(link.sq->postNop(true));
  link.sq->ringDoorbell();
  r0.nic->runUntilIdle(1000);  // nobody polls the CQ
  const std::vector<std::string> errors = r0.nic->nicErrors();
  ASSERT_EQ(1u, errors.size());
  EXPECT_NE(std::string::npos, errors[0].find("CQ 0 overrun")) << errors[0];
  EXPECT_EQ(QpState::kError, r0.nic->qpState(link.qp));
  EXPECT_GT(r0.nic->counters().lost_cqes, 0u);
}

TEST(SoftNic, StaleAndForeignDoorbellsAreIgnored) {
  Rank r0(0, 0), r1(1, 0);
  Link link(r0, r1, 16, 16);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(link.sq->postNop(true));
  link.sq->ringDoorbell();
  EXPECT_EQ(5u, runAndPoll(link).size());
  link.sq->ringDoorbellAt(3);  // an older doorbell observed late
  EXPECT_EQ(0u, runAndPoll(link).size());
  // The mailbox holds one word: only the last store before a poll is seen.
  __atomic_store_n(link.mem.doorbell, m::sq_doorbell_word(9, link.qpn + 1), __ATOMIC_RELEASE);
  EXPECT_EQ(0u, runAndPoll(link).size());
  const NicCounters c = r0.nic->counters();
  EXPECT_EQ(1u, c.stale_doorbells);
  EXPECT_EQ(1u, c.foreign_doorbells);
  EXPECT_EQ(5u, r0.nic->qpAnnounced(link.qp));
  ASSERT_EQ(1u, r0.nic->nicErrors().size());
  EXPECT_NE(std::string::npos, r0.nic->nicErrors()[0].find("names QPN")) << r0.nic->nicErrors()[0];
  EXPECT_EQ(QpState::kReady, r0.nic->qpState(link.qp));
}

// ---- Error CQEs ----

struct ErrorWorld {
  explicit ErrorWorld(uint64_t seed, bool connect = true, uint32_t wqe_cnt = 16)
      : r0(0, seed),
        r1(1, seed),
        src(r0.alloc(4096)),
        result(r0.alloc(8, rdma::kAccessLocalWrite)),
        no_local_write(r0.alloc(8, 0)),
        dst(r1.alloc(4096)),
        read_only(r1.alloc(64, rdma::kAccessRemoteRead)),
        sig(r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal)),
        link(r0, r1, wqe_cnt, 64, connect) {
    fill(src, 0, 4096, 17);
  }
  Rank r0, r1;
  Buffer &src, &result, &no_local_write, &dst, &read_only, &sig;
  Link link;
};

// Posts a good signaled WRITE (bytes [0, 64); not on an unconnected QP, where every WQE fails), the bad WQE, a
// good unsignaled WRITE ([64, 128)) and a signaled NOP, rings, runs; then posts and rings one more WRITE
// ([128, 192)). Checks the completions, the data and the QP's state and message.
void expectErrorCqe(uint64_t seed, const char* what, uint8_t syndrome, EmuFault fault,
                    const std::function<void(ErrorWorld&)>& post_bad, bool connect = true) {
  SCOPED_TRACE(std::string(what) + ", chaos seed " + std::to_string(seed));
  ErrorWorld w(seed, connect);
  if (connect) ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(0, 64), w.dst.remote(0), true));
  const uint32_t bad_pi = w.link.sq->pi();
  post_bad(w);
  ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(64, 64), w.dst.remote(64), false));
  ASSERT_TRUE(w.link.sq->postNop(true));
  w.link.sq->ringDoorbell();
  std::vector<Completion> c = runAndPoll(w.link);
  ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(128, 64), w.dst.remote(128), true));
  w.link.sq->ringDoorbell();
  const std::vector<Completion> later = runAndPoll(w.link);
  c.insert(c.end(), later.begin(), later.end());

  if (connect) {
    ASSERT_EQ(5u, c.size()) << "good CQE, error CQE, 3 flushes (the unsignaled WRITE included)";
    EXPECT_EQ(m::CqeStatus::kSuccess, c[0].status);
    EXPECT_EQ(0u, c[0].pi);
    c.erase(c.begin());
  } else {
    ASSERT_EQ(4u, c.size()) << "error CQE, 3 flushes";
  }
  const Completion& err = c[0];
  EXPECT_EQ(m::CqeStatus::kError, err.status);
  EXPECT_EQ(bad_pi, err.pi);
  EXPECT_EQ(syndrome, err.info.syndrome) << m::cqe_syndrome_text(err.info.syndrome);
  EXPECT_EQ(static_cast<uint8_t>(fault), err.info.vendor_syndrome) << emuFaultName(fault);
  EXPECT_EQ(w.link.qpn, err.info.qpn);
  for (size_t i = 1; i < c.size(); ++i) {
    EXPECT_EQ(m::CqeStatus::kError, c[i].status);
    EXPECT_EQ(static_cast<uint8_t>(m::CqeSyndrome::kWrFlushed), c[i].info.syndrome);
    EXPECT_EQ(static_cast<uint8_t>(EmuFault::kFlushed), c[i].info.vendor_syndrome);
    EXPECT_EQ(bad_pi + i, c[i].pi);
  }
  if (connect) EXPECT_EQ(0, std::memcmp(w.src.data, w.dst.data, 64)) << "the WQE before the bad one completed";
  for (int i = 64; i < 192; ++i) ASSERT_EQ(0, w.dst.data[i]) << "a flushed WRITE placed data at byte " << i;
  EXPECT_EQ(QpState::kError, w.r0.nic->qpState(w.link.qp));
  const std::string msg = w.r0.nic->qpError(w.link.qp);
  EXPECT_NE(std::string::npos, msg.find("chaos seed " + std::to_string(seed))) << msg;
  EXPECT_NE(std::string::npos, msg.find(emuFaultName(fault))) << msg;
  EXPECT_NE(std::string::npos, msg.find("WQE bytes: ")) << msg;
  // The poster sees the error at once instead of waiting out a timeout.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(ncclRemoteError, w.link.drain(5.0));
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  EXPECT_TRUE(w.link.sq->failed());
}

class SoftNicError : public ::testing::TestWithParam<uint64_t> {};

TEST_P(SoftNicError, BadRkey) {
  expectErrorCqe(GetParam(), "bad rkey", 0x13, EmuFault::kBadRemoteKey, [](ErrorWorld& w) {
    ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(0, 8), m::RemoteSge{w.dst.addr(0), w.dst.window.rkey ^ 0x100}, false));
  });
}
TEST_P(SoftNicError, LkeyPassedAsRkey) {
  expectErrorCqe(GetParam(), "lkey as rkey", 0x13, EmuFault::kBadRemoteKey, [](ErrorWorld& w) {
    ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(0, 8), m::RemoteSge{w.dst.addr(0), w.dst.window.lkey}, false));
  });
}
TEST_P(SoftNicError, BadLkey) {
  expectErrorCqe(GetParam(), "bad lkey", 0x04, EmuFault::kBadLocalKey, [](ErrorWorld& w) {
    ASSERT_TRUE(w.link.sq->postWrite(m::LocalSge{w.src.addr(0), 0x4242, 8}, w.dst.remote(0), false));
  });
}
TEST_P(SoftNicError, RemoteRangeOutsideTheWindow) {
  expectErrorCqe(GetParam(), "out of window", 0x13, EmuFault::kRemoteOutOfWindow, [](ErrorWorld& w) {
    ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(0, 16), w.dst.remote(4096 - 8), true));
  });
}
TEST_P(SoftNicError, LocalRangeOutsideTheWindow) {
  expectErrorCqe(GetParam(), "local out of window", 0x04, EmuFault::kLocalOutOfWindow,
                 [](ErrorWorld& w) { ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(4000, 200), w.dst.remote(0), true)); });
}
TEST_P(SoftNicError, WriteWithoutRemoteWriteRights) {
  expectErrorCqe(GetParam(), "no rights", 0x13, EmuFault::kRemoteNoRights, [](ErrorWorld& w) {
    ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(0, 8), w.read_only.remote(0), true));
  });
}
TEST_P(SoftNicError, MisalignedAtomic) {
  expectErrorCqe(GetParam(), "misaligned atomic", 0x12, EmuFault::kMisalignedAtomic, [](ErrorWorld& w) {
    ASSERT_TRUE(w.link.sq->postFetchAdd(w.sig.remote(4), 1, w.result.local_word(0), false));
  });
}
TEST_P(SoftNicError, AtomicResultBufferWithoutLocalWrite) {
  expectErrorCqe(GetParam(), "result without local write", 0x04, EmuFault::kLocalNoRights, [](ErrorWorld& w) {
    ASSERT_TRUE(w.link.sq->postFetchAdd(w.sig.remote(0), 1, w.no_local_write.local_word(0), true));
  });
}
TEST_P(SoftNicError, ProducerIndexPassesAnUnwrittenWqe) {
  expectErrorCqe(GetParam(), "unwritten WQE", 0x02, EmuFault::kStaleWqe, [](ErrorWorld& w) { w.link.sq->skip(1); });
}
TEST_P(SoftNicError, WqeOfAnotherQpn) {
  expectErrorCqe(GetParam(), "wrong QPN", 0x02, EmuFault::kWrongQpn, [](ErrorWorld& w) {
    uint8_t wqebb[64] = {};
    m::build_nop(wqebb, m::WqeCtrl{w.link.sq->pi(), w.link.qpn + 1, true, m::FenceMode::kNone});
    ASSERT_TRUE(w.link.sq->postRawWqebb(wqebb));
  });
}
TEST_P(SoftNicError, MalformedWqe) {
  expectErrorCqe(GetParam(), "ds 0", 0x02, EmuFault::kMalformedWqe, [](ErrorWorld& w) {
    uint8_t wqebb[64] = {};
    m::build_nop(wqebb, m::WqeCtrl{w.link.sq->pi(), w.link.qpn, true, m::FenceMode::kNone});
    wqebb[7] = 0;  // ds
    ASSERT_TRUE(w.link.sq->postRawWqebb(wqebb));
  });
}
TEST_P(SoftNicError, UnsupportedOpcode) {
  expectErrorCqe(GetParam(), "RDMA READ", 0x02, EmuFault::kUnsupportedWqe, [](ErrorWorld& w) {
    uint8_t wqebb[64] = {};
    m::build_write(wqebb, m::WriteWqe{m::WqeCtrl{w.link.sq->pi(), w.link.qpn, true, m::FenceMode::kNone},
                                      w.src.sge(0, 8), w.dst.remote(0)});
    wqebb[3] = static_cast<uint8_t>(m::WqeOpcode::kRdmaRead);
    ASSERT_TRUE(w.link.sq->postRawWqebb(wqebb));
  });
}
TEST_P(SoftNicError, UnconnectedQp) {
  expectErrorCqe(
      GetParam(), "not connected", 0x02, EmuFault::kNotConnected,
      [](ErrorWorld& w) { ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(0, 8), w.dst.remote(0), false)); },
      /*connect=*/false);
}

INSTANTIATE_TEST_SUITE_P(ChaosOffAndOn, SoftNicError, ::testing::Values(0ull, 7ull, 0xfeedull),
                         [](const ::testing::TestParamInfo<uint64_t>& p) {
                           return p.param == 0 ? std::string("ChaosOff") : "Seed" + std::to_string(p.param);
                         });

// A slot of the previous lap: the producer index passed a WQE it never rewrote (the classic IBGDA race).
TEST(SoftNic, WqeLeftFromThePreviousLapIsStale) {
  ErrorWorld w(21, true, 4);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(w.link.sq->postNop(true));
  w.link.sq->ringDoorbell();
  ASSERT_EQ(4u, runAndPoll(w.link).size());
  w.link.sq->skip(1);  // slot 0 still holds WQE 0
  ASSERT_TRUE(w.link.sq->postNop(true));
  w.link.sq->ringDoorbell();
  const std::vector<Completion> c = runAndPoll(w.link);
  ASSERT_EQ(2u, c.size());
  EXPECT_EQ(4u, c[0].pi);
  EXPECT_EQ(0x02, c[0].info.syndrome);
  EXPECT_EQ(static_cast<uint8_t>(EmuFault::kStaleWqe), c[0].info.vendor_syndrome);
  EXPECT_NE(std::string::npos, w.r0.nic->qpError(w.link.qp).find("index 0x0000")) << w.r0.nic->qpError(w.link.qp);
  EXPECT_EQ(0x05, c[1].info.syndrome);
}

TEST(SoftNic, SqOverrunFailsTheFirstUnfetchedWqe) {
  for (uint64_t seed : {0ull, 9ull}) {
    ErrorWorld w(seed, true, 8);
    ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(0, 64), w.dst.remote(0), true));
    w.link.sq->ringDoorbell();
    ASSERT_EQ(1u, runAndPoll(w.link).size());
    // WQEs 1..3 fetched but not complete, then a doorbell 9 WQEBBs ahead of the oldest incomplete one.
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(w.link.sq->postWrite(w.src.sge(64, 64), w.dst.remote(64), false));
    w.link.sq->ringDoorbell();
    w.r0.nic->step();    // polls the doorbell and fetches, executes at most one action
    w.link.sq->skip(7);  // a producer that forgot to wait for room
    w.link.sq->ringDoorbellAt(11);
    std::vector<Completion> c = runAndPoll(w.link);
    ASSERT_FALSE(c.empty());
    const Completion& err = c.front();
    EXPECT_EQ(m::CqeStatus::kError, err.status);
    EXPECT_EQ(4u, err.pi) << "the fetched WQEs 1..3 were copied out and complete normally";
    EXPECT_EQ(0x02, err.info.syndrome);
    EXPECT_EQ(static_cast<uint8_t>(EmuFault::kSqOverrun), err.info.vendor_syndrome);
    for (size_t i = 1; i < c.size(); ++i) EXPECT_EQ(0x05, c[i].info.syndrome);
    EXPECT_EQ(QpState::kError, w.r0.nic->qpState(w.link.qp));
    EXPECT_NE(std::string::npos, w.r0.nic->qpError(w.link.qp).find("SQ overrun"));
    EXPECT_EQ(11u, w.r0.nic->qpRetired(w.link.qp));
  }
}

// ---- Ordering points under chaos, read from the trace ----

// Where events of one WQE sit in the trace.
struct Span {
  size_t first = SIZE_MAX, last = 0;
  void add(size_t i) {
    first = std::min(first, i);
    last = std::max(last, i);
  }
};

TEST(SoftNic, AtomicsAndFencesAreOrderingPointsUnderChaos) {
  int writes_interleaved = 0;
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    Rank r0(0, seed, /*trace=*/true), r1(1, seed);
    Buffer& src = r0.alloc(1 << 16);
    Buffer& result = r0.alloc(8, rdma::kAccessLocalWrite);
    Buffer& dst = r1.alloc(1 << 16);
    Buffer& sig = r1.alloc(64, rdma::kAccessAllRemote, rdma::kWindowSignal);
    Link link(r0, r1);
    // 0, 1: WRITEs; 2: fetch-add; 3, 4: WRITEs; 5: fenced WRITE; 6: WRITE
    for (int i = 0; i < 2; ++i) ASSERT_TRUE(link.sq->postWrite(src.sge(i * 8192, 8192), dst.remote(i * 8192), false));
    ASSERT_TRUE(link.sq->postFetchAdd(sig.remote(0), 1, result.local_word(0), false));
    for (int i = 3; i < 5; ++i) ASSERT_TRUE(link.sq->postWrite(src.sge(i * 8192, 8192), dst.remote(i * 8192), false));
    ASSERT_TRUE(link.sq->postWrite(src.sge(5 * 8192, 8192), dst.remote(5 * 8192), false, m::FenceMode::kFence));
    ASSERT_TRUE(link.sq->postWrite(src.sge(6 * 8192, 8192), dst.remote(6 * 8192), true));
    link.sq->ringDoorbell();
    ASSERT_EQ(ncclSuccess, link.drain());
    Span span[7];
    const std::vector<TraceEvent> trace = r0.nic->trace();
    for (size_t i = 0; i < trace.size(); ++i)
      if (trace[i].kind == TraceKind::kPlace || trace[i].kind == TraceKind::kAtomic) span[trace[i].pi].add(i);
    SCOPED_TRACE("chaos seed " + std::to_string(seed));
    EXPECT_LT(std::max(span[0].last, span[1].last), span[2].first) << "the atomic follows the earlier WRITEs' data";
    EXPECT_LT(span[2].last, std::min(span[3].first, span[4].first)) << "later WRITEs wait for the atomic";
    EXPECT_LT(std::max(span[3].last, span[4].last), span[5].first) << "the fenced WRITE waits for earlier WQEs";
    EXPECT_LT(span[5].last, span[6].first) << "a fenced WQE is an ordering point";
    if (span[1].first < span[0].last || span[4].first < span[3].last) ++writes_interleaved;
    EXPECT_EQ(0, std::memcmp(src.data, dst.data, 7 * 8192));
  }
  EXPECT_GT(writes_interleaved, 0) << "chaos never placed two WRITEs' chunks interleaved";
}

TEST(SoftNic, ExecutorThreadRunsAndStopsPromptly) {
  Rank r0(0, 13), r1(1, 13);
  Buffer& src = r0.alloc(1 << 20);
  Buffer& dst = r1.alloc(1 << 20);
  Link link(r0, r1, 64, 64);
  fill(src, 0, 1 << 20, 5);
  ASSERT_EQ(ncclSuccess, r0.nic->start());
  EXPECT_EQ(ncclInvalidUsage, r0.nic->start());
  EXPECT_FALSE(r0.nic->step()) << "step() belongs to tests without the thread";
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(link.sq->postWrite(src.sge(i << 16, 1 << 16), dst.remote(i << 16), i == 15));
  link.sq->ringDoorbell();
  ASSERT_EQ(ncclSuccess, link.drain(10.0)) << link.sq->error();
  EXPECT_EQ(0, std::memcmp(src.data, dst.data, 1 << 20));
  const auto t0 = std::chrono::steady_clock::now();
  r0.nic->stop();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.5);
  EXPECT_FALSE(r0.nic->running());
  // Idle with nothing to do, then a wait that must time out rather than hang.
  ASSERT_TRUE(link.sq->postNop(true));  // never rung
  EXPECT_EQ(ncclSystemError, link.sq->waitCompleted(link.sq->pi(), 0.2));
}

}  // namespace
}  // namespace nccl_moe::emulated::testing
