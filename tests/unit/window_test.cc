// RDMA windows (src/transport/rdma/window.h): registration bookkeeping and keys, (key, offset) -> address
// translation, and the one access check the software NIC and the real path's asserts share: key, range, rights,
// atomic alignment, in that order, with the completion syndrome each fault maps to.
#include "transport/rdma/window.h"

#include <gtest/gtest.h>
#include <infiniband/verbs.h>

#include <atomic>
#include <cstdint>
#include <random>
#include <set>
#include <thread>
#include <vector>

namespace {

using namespace nccl_moe::rdma;
namespace m = nccl_moe::mlx5;

TEST(Window, AccessBitsAreIbvAccessFlags) {
  EXPECT_EQ(static_cast<uint32_t>(IBV_ACCESS_LOCAL_WRITE), kAccessLocalWrite);
  EXPECT_EQ(static_cast<uint32_t>(IBV_ACCESS_REMOTE_WRITE), kAccessRemoteWrite);
  EXPECT_EQ(static_cast<uint32_t>(IBV_ACCESS_REMOTE_READ), kAccessRemoteRead);
  EXPECT_EQ(static_cast<uint32_t>(IBV_ACCESS_REMOTE_ATOMIC), kAccessRemoteAtomic);
  EXPECT_EQ(static_cast<uint32_t>(IBV_ACCESS_RELAXED_ORDERING), kAccessRelaxedOrdering);
}

TEST(Window, KeysAreDistinctPerWindowPerKindAndPerRegistry) {
  WindowRegistry a(0x11), b(0x22);
  std::set<uint32_t> keys;
  for (int i = 0; i < 100; ++i) {
    Window wa, wb;
    ASSERT_EQ(ncclSuccess, a.registerWindow(0x10000 + i * 0x100, 0x100, kAccessAllRemote, 0, &wa));
    ASSERT_EQ(ncclSuccess, b.registerWindow(0x10000 + i * 0x100, 0x100, kAccessAllRemote, 0, &wb));
    EXPECT_NE(wa.lkey, wa.rkey) << "an lkey passed as an rkey must not work";
    EXPECT_TRUE(keys.insert(wa.lkey).second && keys.insert(wa.rkey).second);
    EXPECT_TRUE(keys.insert(wb.lkey).second && keys.insert(wb.rkey).second) << "another registry's keys differ";
  }
  EXPECT_EQ(100u, a.size());
}

TEST(Window, SignalWindowsAreStronglyOrdered) {
  WindowRegistry r;
  Window data, signal;
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x1000, 4096, kAccessAllRemote | kAccessRelaxedOrdering, 0, &data));
  ASSERT_EQ(ncclSuccess,
            r.registerWindow(0x3000, 64, kAccessAllRemote | kAccessRelaxedOrdering, kWindowSignal, &signal));
  EXPECT_FALSE(data.strongly_ordered());
  EXPECT_TRUE(signal.strongly_ordered()) << "relaxed ordering could let a signal overtake its data";
  EXPECT_EQ(kAccessAllRemote, signal.access);
  EXPECT_NE(std::string::npos, describeWindow(signal).find("strong signal")) << describeWindow(signal);
}

TEST(Window, RegistrationRejectsEmptyWrappingAndUnknownBits) {
  WindowRegistry r;
  EXPECT_EQ(ncclInvalidArgument, r.registerWindow(0x1000, 0, kAccessAllRemote, 0, nullptr));
  EXPECT_EQ(ncclInvalidArgument, r.registerWindow(~0ull - 10, 100, kAccessAllRemote, 0, nullptr));
  EXPECT_EQ(ncclInvalidArgument, r.registerWindow(0x1000, 8, 1u << 5, 0, nullptr));
  EXPECT_EQ(ncclInvalidArgument, r.registerWindow(0x1000, 8, kAccessAllRemote, 1u << 3, nullptr));
  EXPECT_EQ(0u, r.size());
}

TEST(Window, TranslationAddsTheOffsetWithinTheWindow) {
  WindowRegistry r;
  Window w;
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x7f0000001000ull, 4096, kAccessAllRemote, 0, &w));
  uint64_t addr = 0;
  EXPECT_TRUE(r.translate(w.lkey, false, 0, 4096, &addr));
  EXPECT_EQ(0x7f0000001000ull, addr);
  EXPECT_TRUE(r.translate(w.rkey, true, 4088, 8, &addr));
  EXPECT_EQ(0x7f0000001ff8ull, addr);
  EXPECT_TRUE(r.translate(w.rkey, true, 4096, 0, &addr)) << "an empty range at the end is inside";
  EXPECT_FALSE(r.translate(w.rkey, true, 4089, 8, &addr));
  EXPECT_FALSE(r.translate(w.rkey, true, 4097, 0, &addr));
  EXPECT_FALSE(r.translate(w.rkey, true, 8, ~0ull, &addr)) << "no overflow";
  EXPECT_FALSE(r.translate(w.lkey, true, 0, 8, &addr)) << "an lkey is not an rkey";
  EXPECT_FALSE(r.translate(w.rkey, false, 0, 8, &addr)) << "an rkey is not an lkey";
  Window found;
  EXPECT_TRUE(r.locate(0x7f0000001800ull, 16, &found));
  EXPECT_EQ(w.rkey, found.rkey);
  EXPECT_FALSE(r.locate(0x7f0000001ff8ull, 16, &found));
}

TEST(Window, AccessCheckFaultsInOrderWithTheirSyndromes) {
  WindowRegistry r;
  Window rw, ro, atomic_only, local_only;
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x10000, 0x1000, kAccessAllRemote, 0, &rw));
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x20000, 0x1000, kAccessRemoteRead, 0, &ro));
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x30000, 0x100, kAccessRemoteAtomic, kWindowSignal, &atomic_only));
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x40000, 0x100, 0, 0, &local_only));

  // Good references.
  EXPECT_EQ(AccessFault::kNone, r.check(rw.rkey, 0x10000, 0x1000, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kNone, r.check(rw.rkey, 0x10ff8, 8, AccessKind::kRemoteAtomic));
  EXPECT_EQ(AccessFault::kNone, r.check(atomic_only.rkey, 0x30000, 8, AccessKind::kRemoteAtomic));
  EXPECT_EQ(AccessFault::kNone, r.check(local_only.lkey, 0x40000, 0x100, AccessKind::kLocalRead))
      << "reading a local gather source needs no right";
  EXPECT_EQ(AccessFault::kNone, r.check(rw.lkey, 0x10000, 8, AccessKind::kLocalWrite));
  EXPECT_EQ(AccessFault::kNone, r.check(0xdead, 0x0, 0, AccessKind::kRemoteWrite)) << "zero bytes: not validated";

  // Key.
  EXPECT_EQ(AccessFault::kBadKey, r.check(0xdead, 0x10000, 8, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kBadKey, r.check(rw.lkey, 0x10000, 8, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kBadKey, r.check(rw.rkey, 0x10000, 8, AccessKind::kLocalRead));
  // Range (checked before rights and alignment).
  EXPECT_EQ(AccessFault::kOutOfWindow, r.check(rw.rkey, 0x10001, 0x1000, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kOutOfWindow, r.check(rw.rkey, 0xffff, 2, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kOutOfWindow, r.check(rw.rkey, 0x11000, 1, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kOutOfWindow, r.check(rw.rkey, 0x10ffc, 8, AccessKind::kRemoteAtomic));
  EXPECT_EQ(AccessFault::kOutOfWindow, r.check(ro.rkey, ~0ull - 3, 8, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kOutOfWindow, r.check(rw.lkey, 0x10000, 0x1001, AccessKind::kLocalRead));
  // Rights.
  EXPECT_EQ(AccessFault::kNoRights, r.check(ro.rkey, 0x20000, 8, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kNoRights, r.check(ro.rkey, 0x20000, 8, AccessKind::kRemoteAtomic));
  EXPECT_EQ(AccessFault::kNoRights, r.check(atomic_only.rkey, 0x30000, 8, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kNoRights, r.check(local_only.lkey, 0x40000, 8, AccessKind::kLocalWrite));
  EXPECT_EQ(AccessFault::kNoRights, r.check(ro.rkey, 0x20001, 8, AccessKind::kRemoteAtomic)) << "rights first";
  // Alignment.
  EXPECT_EQ(AccessFault::kMisalignedAtomic, r.check(rw.rkey, 0x10004, 8, AccessKind::kRemoteAtomic));
  EXPECT_EQ(AccessFault::kMisalignedAtomic, r.check(atomic_only.rkey, 0x30001, 8, AccessKind::kRemoteAtomic));
  EXPECT_EQ(AccessFault::kMisalignedAtomic, r.check(rw.rkey, 0x10000, 4, AccessKind::kRemoteAtomic))
      << "an atomic touches exactly 8 bytes";

  // Syndromes: local faults are local protection errors, remote ones remote access errors, misalignment an
  // invalid request.
  EXPECT_EQ(0x04, access_fault_syndrome(AccessFault::kBadKey, AccessKind::kLocalRead));
  EXPECT_EQ(0x04, access_fault_syndrome(AccessFault::kNoRights, AccessKind::kLocalWrite));
  EXPECT_EQ(0x13, access_fault_syndrome(AccessFault::kBadKey, AccessKind::kRemoteWrite));
  EXPECT_EQ(0x13, access_fault_syndrome(AccessFault::kOutOfWindow, AccessKind::kRemoteAtomic));
  EXPECT_EQ(0x13, access_fault_syndrome(AccessFault::kNoRights, AccessKind::kRemoteWrite));
  EXPECT_EQ(0x12, access_fault_syndrome(AccessFault::kMisalignedAtomic, AccessKind::kRemoteAtomic));
  EXPECT_EQ(static_cast<uint8_t>(m::CqeSyndrome::kRemoteAccess),
            access_fault_syndrome(AccessFault::kBadKey, AccessKind::kRemoteWrite));
}

// The pure function against a brute-force model over random windows and references.
TEST(Window, AccessCheckMatchesAModel) {
  std::mt19937_64 rng(5);
  for (int round = 0; round < 200; ++round) {
    std::vector<Window> ws;
    for (int i = 0; i < 4; ++i) {
      Window w;
      w.addr = (rng() % 64) * 8 + (rng() % 2);
      w.bytes = 1 + rng() % 64;
      w.lkey = 100 + i;
      w.rkey = 200 + i;
      w.access = static_cast<uint32_t>(rng() % 16);
      ws.push_back(w);
    }
    for (int q = 0; q < 200; ++q) {
      const uint32_t key = static_cast<uint32_t>((rng() % 2 ? 100 : 200) + rng() % 5);
      const uint64_t addr = rng() % 600;
      const uint64_t bytes = rng() % 3 == 0 ? 8 : rng() % 70;
      const AccessKind kind = static_cast<AccessKind>(rng() % 4);
      const AccessFault got = check_window_access(ws.data(), static_cast<uint32_t>(ws.size()), key, addr, bytes, kind);
      AccessFault want = AccessFault::kNone;
      const Window* w = nullptr;
      for (const Window& c : ws)
        if ((is_remote(kind) ? c.rkey : c.lkey) == key) w = &c;
      if (bytes == 0) {
        want = AccessFault::kNone;
      } else if (w == nullptr) {
        want = AccessFault::kBadKey;
      } else {
        bool inside = true;
        for (uint64_t b = addr; b < addr + bytes; ++b) inside = inside && b >= w->addr && b < w->addr + w->bytes;
        const uint32_t need = kind == AccessKind::kLocalWrite     ? kAccessLocalWrite
                              : kind == AccessKind::kRemoteWrite  ? kAccessRemoteWrite
                              : kind == AccessKind::kRemoteAtomic ? kAccessRemoteAtomic
                                                                  : 0;
        if (!inside)
          want = AccessFault::kOutOfWindow;
        else if ((w->access & need) != need)
          want = AccessFault::kNoRights;
        else if (kind == AccessKind::kRemoteAtomic && (addr % 8 != 0 || bytes != 8))
          want = AccessFault::kMisalignedAtomic;
      }
      ASSERT_EQ(want, got) << "round " << round << " key " << key << " addr " << addr << " bytes " << bytes << " kind "
                           << static_cast<int>(kind);
    }
  }
}

TEST(Window, DeregisteredKeysStayInvalid) {
  WindowRegistry r;
  Window a, b;
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x1000, 0x100, kAccessAllRemote, 0, &a));
  ASSERT_EQ(ncclSuccess, r.deregisterWindow(a.lkey));
  EXPECT_EQ(ncclInvalidArgument, r.deregisterWindow(a.lkey));
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x1000, 0x100, kAccessAllRemote, 0, &b));
  EXPECT_NE(a.rkey, b.rkey) << "keys are never reused";
  EXPECT_EQ(AccessFault::kBadKey, r.check(a.rkey, 0x1000, 8, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kNone, r.check(b.rkey, 0x1000, 8, AccessKind::kRemoteWrite));
}

TEST(Window, AMirrorChecksAnotherRanksWindowsByRkey) {
  WindowRegistry owner(0x31), mirror(0x32);
  Window a, b;
  ASSERT_EQ(ncclSuccess, owner.registerWindow(0x10000, 0x1000, kAccessAllRemote, 0, &a));
  ASSERT_EQ(ncclSuccess, owner.registerWindow(0x20000, 0x40, kAccessAllRemote, kWindowSignal, &b));
  // What the connection record carries: address, size, rkey.
  std::vector<Window> listed(2);
  listed[0].addr = a.addr, listed[0].bytes = a.bytes, listed[0].rkey = a.rkey;
  listed[1].addr = b.addr, listed[1].bytes = b.bytes, listed[1].rkey = b.rkey;
  ASSERT_EQ(ncclSuccess, mirror.mirror(listed, kAccessRemoteWrite | kAccessRemoteAtomic));
  EXPECT_EQ(AccessFault::kNone, mirror.check(a.rkey, 0x10ff0, 16, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kOutOfWindow, mirror.check(a.rkey, 0x10ff0, 17, AccessKind::kRemoteWrite));
  EXPECT_EQ(AccessFault::kNone, mirror.check(b.rkey, 0x20008, 8, AccessKind::kRemoteAtomic));
  EXPECT_EQ(AccessFault::kBadKey, mirror.check(a.lkey, 0x10000, 8, AccessKind::kLocalRead)) << "no lkeys in a mirror";
  listed.push_back(listed[0]);
  EXPECT_EQ(ncclInvalidArgument, mirror.mirror(listed, kAccessRemoteWrite));
  EXPECT_EQ(2u, mirror.size()) << "a rejected mirror leaves the previous contents";
}

TEST(Window, RegistrationWhileCheckingIsSafe) {
  WindowRegistry r;
  Window base;
  ASSERT_EQ(ncclSuccess, r.registerWindow(0x1000, 0x100, kAccessAllRemote, 0, &base));
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::thread checker([&] {
    while (!stop.load())
      if (r.check(base.rkey, 0x1000, 8, AccessKind::kRemoteWrite) != AccessFault::kNone) bad.fetch_add(1);
  });
  for (int i = 0; i < 2000; ++i) {
    Window w;
    ASSERT_EQ(ncclSuccess, r.registerWindow(0x100000 + i * 16, 16, kAccessAllRemote, 0, &w));
    if (i % 2) ASSERT_EQ(ncclSuccess, r.deregisterWindow(w.lkey));
  }
  stop.store(true);
  checker.join();
  EXPECT_EQ(0, bad.load());
  EXPECT_EQ(1001u, r.size());
}

}  // namespace
