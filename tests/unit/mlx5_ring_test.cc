// Send-queue ring arithmetic and doorbell values (src/transport/rdma/mlx5/ring.h): slot and 16-bit index wrap,
// WQEBB counts and spans at the ring end, the SQ-full condition across the 32-bit wrap of the producer index,
// CQE counter unwrapping, and the doorbell record / UAR doorbell bytes against rdma-core's encoding.
#include <gtest/gtest.h>
#include <infiniband/mlx5dv.h>

#include <cstdint>
#include <cstring>
#include <random>

#include "transport/rdma/mlx5/ring.h"

namespace {

namespace m = nccl_moe::mlx5;

TEST(Mlx5Ring, SlotAndIndexWrap) {
  EXPECT_TRUE(m::is_valid_wqe_cnt(1));
  EXPECT_TRUE(m::is_valid_wqe_cnt(1u << 15));
  EXPECT_FALSE(m::is_valid_wqe_cnt(0));
  EXPECT_FALSE(m::is_valid_wqe_cnt(96));
  EXPECT_FALSE(m::is_valid_wqe_cnt(1u << 16)) << "the 16-bit WQE index must stay unambiguous";

  EXPECT_EQ(0u, m::sq_slot(256, 256));
  EXPECT_EQ(255u, m::sq_slot(0xffffffffu, 256));
  EXPECT_EQ(3u, m::sq_slot(0x10003u, 8));
  EXPECT_EQ(0xffffu, m::wqe_index(0x1ffffu));
  EXPECT_EQ(0u, m::wqe_index(0x10000u));
  EXPECT_EQ(0x1234u, m::wqe_index(0xabcd1234u));

  std::mt19937 rng(7);
  for (int i = 0; i < 10000; ++i) {
    const uint32_t pi = rng();
    const uint32_t cnt = 1u << (rng() % 16);
    ASSERT_EQ(pi % cnt, m::sq_slot(pi, cnt));
    ASSERT_EQ(pi % 65536, m::wqe_index(pi));
    // The slot is recoverable from the 16-bit index alone: what the NIC sees is enough.
    ASSERT_EQ(m::sq_slot(pi, cnt), m::sq_slot(m::wqe_index(pi), cnt));
  }
}

TEST(Mlx5Ring, WqebbCountsAndSpans) {
  EXPECT_EQ(1u, m::wqebbs_for_ds(1));
  EXPECT_EQ(1u, m::wqebbs_for_ds(4));
  EXPECT_EQ(2u, m::wqebbs_for_ds(5));
  EXPECT_EQ(16u, m::wqebbs_for_ds(63));
  EXPECT_EQ(16u, m::kMaxWqeWqebbs);

  m::WqeSpan s = m::wqe_span(6, 4, 8);
  EXPECT_EQ(6u, s.first_slot);
  EXPECT_EQ(2u, s.num_before_end);
  EXPECT_EQ(2u, s.num_wrapped);
  s = m::wqe_span(5, 3, 8);  // ends exactly at the ring end
  EXPECT_EQ(3u, s.num_before_end);
  EXPECT_EQ(0u, s.num_wrapped);
  s = m::wqe_span(0xffffffffu, 2, 4);  // the producer index itself wraps
  EXPECT_EQ(3u, s.first_slot);
  EXPECT_EQ(1u, s.num_before_end);
  EXPECT_EQ(1u, s.num_wrapped);
}

TEST(Mlx5Ring, SendQueueFullCondition) {
  constexpr uint32_t kCnt = 64;
  for (uint32_t ci : {0u, 1000u, 0xffffffc0u, 0xfffffffeu}) {
    SCOPED_TRACE(ci);
    EXPECT_TRUE(m::sq_has_room(ci, ci, kCnt, kCnt)) << "an empty queue takes a full ring";
    EXPECT_FALSE(m::sq_has_room(ci, ci, kCnt + 1, kCnt));
    EXPECT_TRUE(m::sq_has_room(ci + kCnt - 1, ci, 1, kCnt));
    EXPECT_FALSE(m::sq_has_room(ci + kCnt - 1, ci, 2, kCnt));
    EXPECT_FALSE(m::sq_has_room(ci + kCnt, ci, 1, kCnt)) << "full";
    EXPECT_TRUE(m::sq_has_room(ci + kCnt, ci, 0, kCnt));
    EXPECT_EQ(kCnt, m::sq_in_flight(ci + kCnt, ci));
    EXPECT_FALSE(m::sq_has_room(ci + kCnt + 1, ci, 0, kCnt)) << "more in flight than the ring holds is never room";
  }
  // Reservation wait: WQEBBs [base, base + n) need ci >= base + n - wqe_cnt.
  EXPECT_EQ(1u, m::sq_ci_needed(64, 1, 64));
  EXPECT_EQ(0xfffffff0u + 8 - 64, m::sq_ci_needed(0xfffffff0u, 8, 64));
  const uint32_t base = 0xfffffff0u, need = m::sq_ci_needed(base, 8, 64);
  EXPECT_TRUE(m::sq_has_room(base, need, 8, 64));
  EXPECT_FALSE(m::sq_has_room(base, need - 1, 8, 64));
}

TEST(Mlx5Ring, WqeCounterUnwrapsAgainstAReference) {
  EXPECT_EQ(0x20005u, m::unwrap_wqe_index(0x1fff0u, 0x0005));
  EXPECT_EQ(0x1fff0u, m::unwrap_wqe_index(0x1fff0u, 0xfff0));
  EXPECT_EQ(0x3u, m::unwrap_wqe_index(0xfffffff0u, 0x0003)) << "across the 32-bit wrap";
  std::mt19937 rng(11);
  for (int i = 0; i < 10000; ++i) {
    const uint32_t ref = rng();
    const uint32_t ahead = rng() % 65536;
    ASSERT_EQ(ref + ahead, m::unwrap_wqe_index(ref, static_cast<uint16_t>(ref + ahead)));
  }
  EXPECT_TRUE(m::wqe_index_reached(5, 5));
  EXPECT_TRUE(m::wqe_index_reached(6, 5));
  EXPECT_FALSE(m::wqe_index_reached(4, 5));
  EXPECT_TRUE(m::wqe_index_reached(2, 0xfffe)) << "16-bit wrap";
  EXPECT_FALSE(m::wqe_index_reached(0xfffe, 2));
}

TEST(Mlx5Ring, DoorbellRecordAndDoorbellBytes) {
  const m::Be32 dbr = m::sq_dbr_value(0x12345);
  const uint8_t dbr_bytes[4] = {0, 0, 0x23, 0x45};
  EXPECT_EQ(0, std::memcmp(dbr_bytes, &dbr, 4));

  const uint32_t pi = 0x12345, qpn = 0xabcdef;
  const uint8_t db_bytes[8] = {0, 0x23, 0x45, 0, 0xab, 0xcd, 0xef, 0};
  const m::SqDoorbell db = m::sq_doorbell(pi, qpn);
  EXPECT_EQ(0, std::memcmp(db_bytes, &db, 8));
  const uint64_t word = m::sq_doorbell_word(pi, qpn);
  EXPECT_EQ(0, std::memcmp(db_bytes, &word, 8)) << "one little-endian 8-byte store writes the doorbell bytes";

  // rdma-core rings with the first 8 bytes of a control segment: with opcode, opmod and ds 0 they are ours.
  std::mt19937_64 rng(99);
  for (int i = 0; i < 10000; ++i) {
    const uint32_t p = static_cast<uint32_t>(rng());
    const uint32_t q = static_cast<uint32_t>(rng()) & 0xffffff;
    mlx5_wqe_ctrl_seg ctrl;
    std::memset(&ctrl, 0, sizeof(ctrl));
    mlx5dv_set_ctrl_seg(&ctrl, static_cast<uint16_t>(p), 0, 0, q, 0, 0, 0, 0);
    const uint64_t ours = m::sq_doorbell_word(p, q);
    ASSERT_EQ(0, std::memcmp(&ctrl, &ours, 8)) << "pi " << p << " qpn " << q;
    const m::Be32 rec = m::sq_dbr_value(p);
    ASSERT_EQ(htobe32(p & 0xffff), rec.raw);
  }
}

}  // namespace
