// The mlx5 send-WQE encoding (src/transport/rdma/mlx5/wqe.h, wqe_parse.h) against rdma-core: segment layouts
// field by field against mlx5dv.h, the control and data segments byte for byte against rdma-core's own static
// inline encoders over random fields, the remote-address and atomic segments against hand-written big-endian
// bytes, and builder -> parser round trips over seeded random operations, ring positions and wraps.
#include <gtest/gtest.h>
#include <infiniband/mlx5dv.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "transport/rdma/mlx5/ring.h"
#include "transport/rdma/mlx5/wqe.h"
#include "transport/rdma/mlx5/wqe_parse.h"

namespace {

namespace m = nccl_moe::mlx5;

#define EXPECT_SAME_FIELD(ours, theirs, field) EXPECT_EQ(offsetof(theirs, field), offsetof(ours, field)) << #field

TEST(Mlx5Wqe, SegmentLayoutsMatchMlx5dv) {
  EXPECT_EQ(sizeof(mlx5_wqe_ctrl_seg), sizeof(m::CtrlSeg));
  EXPECT_SAME_FIELD(m::CtrlSeg, mlx5_wqe_ctrl_seg, opmod_idx_opcode);
  EXPECT_SAME_FIELD(m::CtrlSeg, mlx5_wqe_ctrl_seg, qpn_ds);
  EXPECT_SAME_FIELD(m::CtrlSeg, mlx5_wqe_ctrl_seg, signature);
  EXPECT_SAME_FIELD(m::CtrlSeg, mlx5_wqe_ctrl_seg, dci_stream_channel_id);
  EXPECT_SAME_FIELD(m::CtrlSeg, mlx5_wqe_ctrl_seg, fm_ce_se);
  EXPECT_SAME_FIELD(m::CtrlSeg, mlx5_wqe_ctrl_seg, imm);
  EXPECT_EQ(sizeof(mlx5_wqe_ctrl_seg::dci_stream_channel_id), sizeof(m::CtrlSeg::dci_stream_channel_id));

  EXPECT_EQ(sizeof(mlx5_wqe_raddr_seg), sizeof(m::RaddrSeg));
  EXPECT_SAME_FIELD(m::RaddrSeg, mlx5_wqe_raddr_seg, raddr);
  EXPECT_SAME_FIELD(m::RaddrSeg, mlx5_wqe_raddr_seg, rkey);
  EXPECT_SAME_FIELD(m::RaddrSeg, mlx5_wqe_raddr_seg, reserved);

  EXPECT_EQ(sizeof(mlx5_wqe_data_seg), sizeof(m::DataSeg));
  EXPECT_SAME_FIELD(m::DataSeg, mlx5_wqe_data_seg, byte_count);
  EXPECT_SAME_FIELD(m::DataSeg, mlx5_wqe_data_seg, lkey);
  EXPECT_SAME_FIELD(m::DataSeg, mlx5_wqe_data_seg, addr);

  EXPECT_EQ(sizeof(mlx5_wqe_atomic_seg), sizeof(m::AtomicSeg));
  EXPECT_SAME_FIELD(m::AtomicSeg, mlx5_wqe_atomic_seg, swap_add);
  EXPECT_SAME_FIELD(m::AtomicSeg, mlx5_wqe_atomic_seg, compare);

  EXPECT_EQ(sizeof(mlx5_wqe_inl_data_seg), sizeof(m::InlineHeader));
  EXPECT_SAME_FIELD(m::InlineHeader, mlx5_wqe_inl_data_seg, byte_count);
}

TEST(Mlx5Wqe, ConstantsMatchMlx5dv) {
  EXPECT_EQ(MLX5_OPCODE_NOP, static_cast<int>(m::WqeOpcode::kNop));
  EXPECT_EQ(MLX5_OPCODE_RDMA_WRITE, static_cast<int>(m::WqeOpcode::kRdmaWrite));
  EXPECT_EQ(MLX5_OPCODE_RDMA_WRITE_IMM, static_cast<int>(m::WqeOpcode::kRdmaWriteImm));
  EXPECT_EQ(MLX5_OPCODE_SEND, static_cast<int>(m::WqeOpcode::kSend));
  EXPECT_EQ(MLX5_OPCODE_RDMA_READ, static_cast<int>(m::WqeOpcode::kRdmaRead));
  EXPECT_EQ(MLX5_OPCODE_ATOMIC_CS, static_cast<int>(m::WqeOpcode::kAtomicCs));
  EXPECT_EQ(MLX5_OPCODE_ATOMIC_FA, static_cast<int>(m::WqeOpcode::kAtomicFa));
  EXPECT_EQ(MLX5_OPCODE_ATOMIC_MASKED_CS, static_cast<int>(m::WqeOpcode::kAtomicMaskedCs));
  EXPECT_EQ(MLX5_OPCODE_ATOMIC_MASKED_FA, static_cast<int>(m::WqeOpcode::kAtomicMaskedFa));
  EXPECT_EQ(MLX5_WQE_CTRL_CQ_UPDATE, m::kCtrlCqUpdate);
  EXPECT_EQ(MLX5_WQE_CTRL_SOLICITED, m::kCtrlSolicited);
  EXPECT_EQ(MLX5_WQE_CTRL_FENCE, m::encode_fm_ce_se(false, m::FenceMode::kFence));
  EXPECT_EQ(MLX5_WQE_CTRL_INITIATOR_SMALL_FENCE, m::encode_fm_ce_se(false, m::FenceMode::kInitiatorSmall));
  EXPECT_EQ(MLX5_WQE_CTRL_CQ_UPDATE | MLX5_WQE_CTRL_FENCE, m::encode_fm_ce_se(true, m::FenceMode::kFence));
  EXPECT_EQ(static_cast<uint32_t>(MLX5_INLINE_SEG), m::kInlineFlag);
  EXPECT_EQ(static_cast<uint32_t>(MLX5_SEND_WQE_BB), m::kWqebbBytes);
  EXPECT_EQ(static_cast<uint32_t>(MLX5_SEND_WQE_SHIFT), m::kWqebbShift);
  EXPECT_EQ(static_cast<uint32_t>(MLX5_SND_DBR), m::kSendDbrIndex);
  // The inline limit is what is left of one WQEBB after ctrl, raddr and the inline header.
  EXPECT_EQ(MLX5_SEND_WQE_BB - sizeof(mlx5_wqe_ctrl_seg) - sizeof(mlx5_wqe_raddr_seg) - sizeof(mlx5_wqe_inl_data_seg),
            m::kMaxInlineWriteBytes);
}

// rdma-core's mlx5dv_set_ctrl_seg leaves dci_stream_channel_id untouched: start it from zeroed memory; ours
// starts from 0xff so every byte it fails to write shows up.
TEST(Mlx5Wqe, ControlSegmentMatchesRdmaCoreOverRandomFields) {
  std::mt19937_64 rng(0x6d6c7835);
  for (int i = 0; i < 20000; ++i) {
    const uint16_t pi = static_cast<uint16_t>(rng());
    const uint8_t opcode = static_cast<uint8_t>(rng());
    const uint8_t opmod = static_cast<uint8_t>(rng());
    const uint32_t qpn = static_cast<uint32_t>(rng()) & 0xffffff;
    const uint8_t fm_ce_se = static_cast<uint8_t>(rng());
    const uint8_t ds = static_cast<uint8_t>(rng() % 64);
    const uint32_t imm = static_cast<uint32_t>(rng());

    mlx5_wqe_ctrl_seg theirs;
    std::memset(&theirs, 0, sizeof(theirs));
    mlx5dv_set_ctrl_seg(&theirs, pi, opcode, opmod, qpn, fm_ce_se, ds, 0, imm);
    alignas(16) uint8_t ours[16];
    std::memset(ours, 0xff, sizeof(ours));
    *reinterpret_cast<m::CtrlSeg*>(ours) = m::make_ctrl_seg(pi, opcode, opmod, qpn, fm_ce_se, ds, imm);
    ASSERT_EQ(0, std::memcmp(&theirs, ours, sizeof(ours)))
        << "pi=" << pi << " opcode=" << int{opcode} << " opmod=" << int{opmod} << " qpn=" << qpn
        << " fm_ce_se=" << int{fm_ce_se} << " ds=" << int{ds} << " imm=" << imm;
  }
}

TEST(Mlx5Wqe, DataSegmentMatchesRdmaCoreOverRandomFields) {
  std::mt19937_64 rng(0x64617461);
  for (int i = 0; i < 20000; ++i) {
    const uint32_t length = static_cast<uint32_t>(rng());
    const uint32_t lkey = static_cast<uint32_t>(rng());
    const uint64_t addr = rng();
    mlx5_wqe_data_seg theirs;
    mlx5dv_set_data_seg(&theirs, length, lkey, static_cast<uintptr_t>(addr));
    const m::DataSeg ours = m::make_data_seg(length, lkey, addr);
    ASSERT_EQ(0, std::memcmp(&theirs, &ours, sizeof(ours))) << "length=" << length << " lkey=" << lkey;
  }
}

TEST(Mlx5Wqe, RemoteAddressAndAtomicSegmentsAreBigEndian) {
  const m::RaddrSeg raddr = m::make_raddr_seg(0x0102030405060708ull, 0x0a0b0c0du);
  const uint8_t raddr_bytes[16] = {1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0, 0, 0};
  EXPECT_EQ(0, std::memcmp(raddr_bytes, &raddr, 16));

  const m::AtomicSeg fa = m::make_fetch_add_seg(0x1122334455667788ull);
  const uint8_t fa_bytes[16] = {0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(0, std::memcmp(fa_bytes, &fa, 16));

  // Compare-swap: swap_add holds the swap value and compare the comparand (rdma-core qp.c _set_atomic_seg).
  const m::AtomicSeg cs = m::make_compare_swap_seg(/*compare=*/0xa1a2a3a4a5a6a7a8ull, /*swap=*/0xb1b2b3b4b5b6b7b8ull);
  const uint8_t cs_bytes[16] = {0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8,
                                0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8};
  EXPECT_EQ(0, std::memcmp(cs_bytes, &cs, 16));

  const m::InlineHeader inl{m::to_be32(20 | m::kInlineFlag)};
  const uint8_t inl_bytes[4] = {0x80, 0, 0, 20};
  EXPECT_EQ(0, std::memcmp(inl_bytes, &inl, 4));
}

// A whole WRITE and fetch-add WQE, composed with rdma-core's encoders where it has them.
TEST(Mlx5Wqe, WriteAndFetchAddWqesMatchRdmaCoreComposition) {
  const uint32_t pi = 0x2468a, qpn = 0x00abcdef;
  alignas(64) uint8_t ours[64];
  alignas(64) uint8_t theirs[64];

  std::memset(ours, 0xee, 64);
  std::memset(theirs, 0xee, 64);
  m::WriteWqe write{{pi, qpn, true, m::FenceMode::kNone}, {0x7f0000001000ull, 0x1234, 4096}, {0x5000002000ull, 0x9876}};
  ASSERT_EQ(3u, m::build_write(ours, write));
  std::memset(theirs, 0, 16);
  mlx5dv_set_ctrl_seg(reinterpret_cast<mlx5_wqe_ctrl_seg*>(theirs), pi & 0xffff, MLX5_OPCODE_RDMA_WRITE, 0, qpn,
                      MLX5_WQE_CTRL_CQ_UPDATE, 3, 0, 0);
  auto* r = reinterpret_cast<mlx5_wqe_raddr_seg*>(theirs + 16);
  r->raddr = htobe64(0x5000002000ull);
  r->rkey = htobe32(0x9876);
  r->reserved = 0;
  mlx5dv_set_data_seg(reinterpret_cast<mlx5_wqe_data_seg*>(theirs + 32), 4096, 0x1234, 0x7f0000001000ull);
  EXPECT_EQ(0, std::memcmp(ours, theirs, 64)) << "the builder writes ds * 16 bytes and leaves the rest";

  std::memset(ours, 0xee, 64);
  m::FetchAddWqe fa{
      {pi + 1, qpn, false, m::FenceMode::kNone}, {0x5000003000ull, 0x9876}, 3, {0x7f0000002000ull, 0x1234}};
  ASSERT_EQ(4u, m::build_fetch_add(ours, fa));
  std::memset(theirs, 0, 16);
  mlx5dv_set_ctrl_seg(reinterpret_cast<mlx5_wqe_ctrl_seg*>(theirs), (pi + 1) & 0xffff, MLX5_OPCODE_ATOMIC_FA, 0, qpn, 0,
                      4, 0, 0);
  r->raddr = htobe64(0x5000003000ull);
  r->rkey = htobe32(0x9876);
  auto* a = reinterpret_cast<mlx5_wqe_atomic_seg*>(theirs + 32);
  a->swap_add = htobe64(3);
  a->compare = 0;
  mlx5dv_set_data_seg(reinterpret_cast<mlx5_wqe_data_seg*>(theirs + 48), 8, 0x1234, 0x7f0000002000ull);
  EXPECT_EQ(0, std::memcmp(ours, theirs, 64));
}

TEST(Mlx5Wqe, InlineWriteLayoutAndLimit) {
  alignas(64) uint8_t wqe[64];
  uint8_t data[m::kMaxInlineWriteBytes + 1];
  for (size_t i = 0; i < sizeof(data); ++i) data[i] = static_cast<uint8_t>(0xc0 + i);

  std::memset(wqe, 0xee, 64);
  ASSERT_EQ(3u, m::build_write_inline(wqe, {{5, 7, false, m::FenceMode::kNone}, data, 4, {0x1000, 1}}));
  const uint8_t head[8] = {0x80, 0, 0, 4, 0xc0, 0xc1, 0xc2, 0xc3};
  EXPECT_EQ(0, std::memcmp(head, wqe + 32, 8));
  for (int i = 40; i < 48; ++i) EXPECT_EQ(0, wqe[i]) << "inline padding byte " << i;
  for (int i = 48; i < 64; ++i) EXPECT_EQ(0xee, wqe[i]) << "byte " << i << " lies beyond ds";

  std::memset(wqe, 0xee, 64);
  ASSERT_EQ(
      4u, m::build_write_inline(wqe, {{5, 7, false, m::FenceMode::kNone}, data, m::kMaxInlineWriteBytes, {0x1000, 1}}));
  EXPECT_EQ(0, std::memcmp(data, wqe + 36, m::kMaxInlineWriteBytes));

  std::memset(wqe, 0xee, 64);
  EXPECT_EQ(0u, m::build_write_inline(
                    wqe, {{5, 7, false, m::FenceMode::kNone}, data, m::kMaxInlineWriteBytes + 1, {0x1000, 1}}));
  for (int i = 0; i < 64; ++i) ASSERT_EQ(0xee, wqe[i]) << "a rejected WQE writes nothing";

  // Zero bytes: no inline segment at all (ds 2), as rdma-core encodes an empty inline write.
  ASSERT_EQ(2u, m::build_write_inline(wqe, {{5, 7, false, m::FenceMode::kNone}, data, 0, {0x1000, 1}}));
  EXPECT_EQ(2u, m::load_be32(wqe + 4) & 0xff);
}

TEST(Mlx5Wqe, WriteRejectsLengthsThatCollideWithTheInlineFlag) {
  alignas(64) uint8_t wqe[64];
  std::memset(wqe, 0xee, 64);
  EXPECT_EQ(0u, m::build_write(wqe, {{0, 1, false, m::FenceMode::kNone}, {0, 1, 0x80000000u}, {0, 1}}));
  EXPECT_EQ(0xee, wqe[0]);
  EXPECT_EQ(3u, m::build_write(wqe, {{0, 1, false, m::FenceMode::kNone}, {0, 1, 0x7fffffffu}, {0, 1}}));
  EXPECT_EQ(2u, m::build_write(wqe, {{0, 1, false, m::FenceMode::kNone}, {0, 1, 0}, {0, 1}}));
}

// ---- Builder -> parser round trips ----

enum class Op { kNop, kWrite, kInline, kFetchAdd, kCompareSwap };

struct Expected {
  Op op;
  m::WqeCtrl ctrl;
  m::LocalSge src;
  m::RemoteSge dst;
  std::vector<uint8_t> inline_data;
  uint64_t a = 0, b = 0;  // add | (compare, swap)
  m::LocalWord result{};
};

Expected randomOp(std::mt19937_64& rng, uint32_t pi) {
  Expected e;
  e.op = static_cast<Op>(rng() % 5);
  const m::FenceMode fences[] = {m::FenceMode::kNone, m::FenceMode::kInitiatorSmall, m::FenceMode::kStrongOrdering,
                                 m::FenceMode::kFence};
  e.ctrl = {pi, static_cast<uint32_t>(rng()) & 0xffffff, (rng() & 1) != 0, fences[rng() % 4]};
  const uint32_t bytes = rng() % 4 == 0 ? 0 : static_cast<uint32_t>(rng() % (1u << 31));
  e.src = {rng(), static_cast<uint32_t>(rng()), bytes};
  e.dst = {rng(), static_cast<uint32_t>(rng())};
  e.inline_data.resize(rng() % (m::kMaxInlineWriteBytes + 1));
  for (uint8_t& byte : e.inline_data) byte = static_cast<uint8_t>(rng());
  e.a = rng();
  e.b = rng();
  e.result = {rng(), static_cast<uint32_t>(rng())};
  return e;
}

uint32_t build(const Expected& e, uint8_t* wqe) {
  switch (e.op) {
    case Op::kNop:
      return m::build_nop(wqe, e.ctrl);
    case Op::kWrite:
      return m::build_write(wqe, {e.ctrl, e.src, e.dst});
    case Op::kInline:
      return m::build_write_inline(wqe,
                                   {e.ctrl, e.inline_data.data(), static_cast<uint32_t>(e.inline_data.size()), e.dst});
    case Op::kFetchAdd:
      return m::build_fetch_add(wqe, {e.ctrl, e.dst, e.a, e.result});
    case Op::kCompareSwap:
      return m::build_compare_swap(wqe, {e.ctrl, e.dst, e.a, e.b, e.result});
  }
  return 0;
}

void expectParsed(const Expected& e, uint32_t ds, const uint8_t* wqe_bytes, const m::ParsedWqe& p) {
  EXPECT_EQ(ds, p.ds);
  EXPECT_EQ(1u, p.num_wqebbs);
  EXPECT_EQ(e.ctrl.pi & 0xffff, p.wqe_idx);
  EXPECT_EQ(e.ctrl.qpn, p.qpn);
  EXPECT_EQ(e.ctrl.signaled, p.signaled);
  EXPECT_EQ(static_cast<uint8_t>(e.ctrl.fence), p.fence_mode);
  EXPECT_FALSE(p.solicited);
  EXPECT_EQ(0, p.opmod);
  switch (e.op) {
    case Op::kNop:
      EXPECT_EQ(MLX5_OPCODE_NOP, p.opcode);
      EXPECT_EQ(0u, p.total_bytes);
      break;
    case Op::kWrite:
      EXPECT_EQ(MLX5_OPCODE_RDMA_WRITE, p.opcode);
      EXPECT_EQ(e.dst.addr, p.remote_addr);
      EXPECT_EQ(e.dst.rkey, p.rkey);
      EXPECT_FALSE(p.is_inline);
      EXPECT_EQ(e.src.bytes, p.total_bytes);
      ASSERT_EQ(e.src.bytes == 0 ? 0u : 1u, p.num_gathers);
      if (e.src.bytes != 0) {
        EXPECT_EQ(e.src.addr, p.gathers[0].addr);
        EXPECT_EQ(e.src.lkey, p.gathers[0].lkey);
        EXPECT_EQ(e.src.bytes, p.gathers[0].bytes);
      }
      break;
    case Op::kInline:
      EXPECT_EQ(MLX5_OPCODE_RDMA_WRITE, p.opcode);
      EXPECT_EQ(e.dst.addr, p.remote_addr);
      EXPECT_EQ(e.dst.rkey, p.rkey);
      EXPECT_EQ(!e.inline_data.empty(), p.is_inline);
      EXPECT_EQ(e.inline_data.size(), p.total_bytes);
      EXPECT_EQ(0u, p.num_gathers);
      if (!e.inline_data.empty()) {
        ASSERT_EQ(e.inline_data.size(), p.inline_bytes);
        EXPECT_EQ(0, std::memcmp(e.inline_data.data(), wqe_bytes + p.inline_offset, p.inline_bytes));
      }
      break;
    case Op::kFetchAdd:
    case Op::kCompareSwap:
      EXPECT_EQ(e.op == Op::kFetchAdd ? MLX5_OPCODE_ATOMIC_FA : MLX5_OPCODE_ATOMIC_CS, p.opcode);
      EXPECT_EQ(e.dst.addr, p.remote_addr);
      EXPECT_EQ(e.dst.rkey, p.rkey);
      EXPECT_EQ(e.op == Op::kFetchAdd ? e.a : e.b, p.swap_add);
      EXPECT_EQ(e.op == Op::kFetchAdd ? 0 : e.a, p.compare);
      ASSERT_EQ(1u, p.num_gathers);
      EXPECT_EQ(e.result.addr, p.gathers[0].addr);
      EXPECT_EQ(e.result.lkey, p.gathers[0].lkey);
      EXPECT_EQ(8u, p.gathers[0].bytes);
      EXPECT_EQ(8u, p.total_bytes);
      break;
  }
}

TEST(Mlx5Wqe, BuilderParserRoundTripOverRandomOperationsAndRingPositions) {
  std::mt19937_64 rng(20240611);
  for (int trial = 0; trial < 200; ++trial) {
    const uint32_t wqe_cnt = 1u << (rng() % 8);  // 1..128 WQEBBs
    std::vector<uint8_t> ring(wqe_cnt * m::kWqebbBytes, 0);
    // Start anywhere, including just before the 16-bit and 32-bit wraps of the producer index.
    const uint32_t starts[] = {0u, 0xfff0u, 0xfffffff0u, static_cast<uint32_t>(rng())};
    uint32_t pi = starts[trial % 4];
    for (int i = 0; i < 64; ++i, ++pi) {
      const Expected e = randomOp(rng, pi);
      const uint32_t ds = build(e, m::SqRing{ring.data(), wqe_cnt}.wqebb(pi));
      ASSERT_NE(0u, ds);
      m::WqeBytes copy;
      m::ParsedWqe parsed;
      const m::WqeDefect defect = m::read_wqe(m::ConstSqRing{ring.data(), wqe_cnt}, pi, e.ctrl.qpn, &copy, &parsed);
      ASSERT_EQ(m::WqeDefect::kNone, defect) << m::wqe_defect_text(defect) << " op " << static_cast<int>(e.op);
      SCOPED_TRACE(testing::Message() << "trial " << trial << " pi " << pi << " op " << static_cast<int>(e.op));
      expectParsed(e, ds, copy.bytes, parsed);
    }
  }
}

TEST(Mlx5Wqe, PutSignalWrapsItsFetchAddToSlotZero) {
  constexpr uint32_t kWqeCnt = 8;
  alignas(64) uint8_t ring[kWqeCnt * 64];
  std::memset(ring, 0, sizeof(ring));
  const uint32_t pi = 8 * 1000 + 7;  // last slot
  const m::PutSignal op{pi, 0x1234, {0x1000, 11, 256}, {0x2000, 22}, {0x3008, 33}, 5, {0x4000, 11}, true};
  ASSERT_EQ(2u, m::build_put_signal(m::SqRing{ring, kWqeCnt}, op));

  m::WqeBytes copy;
  m::ParsedWqe w, s;
  ASSERT_EQ(m::WqeDefect::kNone, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, pi, 0x1234, &copy, &w));
  ASSERT_EQ(m::WqeDefect::kNone, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, pi + 1, 0x1234, &copy, &s));
  EXPECT_EQ(7u, m::sq_slot(pi, kWqeCnt));
  EXPECT_EQ(0u, m::sq_slot(pi + 1, kWqeCnt));
  EXPECT_EQ(MLX5_OPCODE_RDMA_WRITE, w.opcode);
  EXPECT_FALSE(w.signaled);
  EXPECT_EQ(256u, w.total_bytes);
  EXPECT_EQ(0x2000u, w.remote_addr);
  EXPECT_EQ(MLX5_OPCODE_ATOMIC_FA, s.opcode);
  EXPECT_TRUE(s.signaled);
  EXPECT_EQ((pi + 1) & 0xffff, s.wqe_idx);
  EXPECT_EQ(0x3008u, s.remote_addr);
  EXPECT_EQ(33u, s.rkey);
  EXPECT_EQ(5u, s.swap_add);
  EXPECT_EQ(static_cast<uint8_t>(MLX5_OPCODE_ATOMIC_FA), ring[3]) << "slot 0 starts with the fetch-add's opcode";
}

// A two-WQEBB WQE (four gather entries, ds 6) at the last slot continues at slot 0; read_wqe reassembles it.
TEST(Mlx5Wqe, MultiWqebbWqeWrapsAtTheRingEnd) {
  constexpr uint32_t kWqeCnt = 4;
  alignas(64) uint8_t linear[128];
  std::memset(linear, 0, sizeof(linear));
  const uint32_t pi = 3;
  *reinterpret_cast<m::CtrlSeg*>(linear) = m::make_ctrl_seg(pi, MLX5_OPCODE_RDMA_WRITE, 0, 77, m::kCtrlCqUpdate, 6, 0);
  *reinterpret_cast<m::RaddrSeg*>(linear + 16) = m::make_raddr_seg(0xabc000, 5);
  for (int g = 0; g < 4; ++g)
    *reinterpret_cast<m::DataSeg*>(linear + 32 + 16 * g) = m::make_data_seg(100 + g, 9, 0x10000 * (g + 1));
  alignas(64) uint8_t ring[kWqeCnt * 64];
  std::memset(ring, 0x5a, sizeof(ring));
  std::memcpy(ring + 3 * 64, linear, 64);
  std::memcpy(ring, linear + 64, 64);

  const m::WqeSpan span = m::wqe_span(pi, m::wqebbs_for_ds(6), kWqeCnt);
  EXPECT_EQ(3u, span.first_slot);
  EXPECT_EQ(1u, span.num_before_end);
  EXPECT_EQ(1u, span.num_wrapped);

  m::WqeBytes copy;
  m::ParsedWqe p;
  ASSERT_EQ(m::WqeDefect::kNone, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, pi, 77, &copy, &p));
  EXPECT_EQ(2u, p.num_wqebbs);
  ASSERT_EQ(4u, p.num_gathers);
  for (int g = 0; g < 4; ++g) {
    EXPECT_EQ(100u + g, p.gathers[g].bytes);
    EXPECT_EQ(0x10000u * (g + 1), p.gathers[g].addr);
  }
  EXPECT_EQ(406u, p.total_bytes);
}

// ---- Rejections ----

struct Corruption {
  const char* name;
  void (*mutate)(uint8_t* wqe);
  uint32_t avail;
  m::WqeDefect expected;
};

void setDs(uint8_t* w, uint8_t ds) { w[7] = ds; }
void setBe32(uint8_t* p, uint32_t v) { *reinterpret_cast<m::Be32*>(p) = m::to_be32(v); }

TEST(Mlx5Wqe, ParserRejectsIllegalEncodingsWithAReason) {
  // Base: a valid fetch-add (ds 4) or a valid WRITE (ds 3), corrupted one way each.
  const Corruption fa_cases[] = {
      {"ds 0", [](uint8_t* w) { setDs(w, 0); }, 64, m::WqeDefect::kDsZero},
      {"ds 64", [](uint8_t* w) { setDs(w, 64); }, 1024, m::WqeDefect::kDsReservedBits},
      {"ds past the bytes", [](uint8_t* w) {}, 48, m::WqeDefect::kTruncated},
      {"fetch-add ds 3", [](uint8_t* w) { setDs(w, 3); }, 64, m::WqeDefect::kMissingSegments},
      {"fetch-add with two result entries", [](uint8_t* w) { setDs(w, 5); }, 128, m::WqeDefect::kTooManyGathers},
      {"fetch-add result 4 bytes", [](uint8_t* w) { setBe32(w + 48, 4); }, 64, m::WqeDefect::kAtomicResultSize},
      {"fetch-add result inline", [](uint8_t* w) { setBe32(w + 48, 8 | m::kInlineFlag); }, 64,
       m::WqeDefect::kInlineFlagInGather},
      {"SEND", [](uint8_t* w) { w[3] = MLX5_OPCODE_SEND; }, 64, m::WqeDefect::kUnsupportedOpcode},
      {"RDMA_READ", [](uint8_t* w) { w[3] = MLX5_OPCODE_RDMA_READ; }, 64, m::WqeDefect::kUnsupportedOpcode},
      {"masked fetch-add", [](uint8_t* w) { w[3] = MLX5_OPCODE_ATOMIC_MASKED_FA; }, 64,
       m::WqeDefect::kUnsupportedOpcode},
      {"extended-atomic opmod", [](uint8_t* w) { w[0] = 0x09; }, 64, m::WqeDefect::kUnsupportedOpmod},
  };
  const Corruption write_cases[] = {
      {"WRITE ds 1", [](uint8_t* w) { setDs(w, 1); }, 64, m::WqeDefect::kMissingSegments},
      {"gather length 0", [](uint8_t* w) { setBe32(w + 32, 0); }, 64, m::WqeDefect::kEmptyGather},
      {"inline 20 bytes in ds 3", [](uint8_t* w) { setBe32(w + 32, 20 | m::kInlineFlag); }, 64,
       m::WqeDefect::kInlineLengthMismatch},
      {"inline 8 bytes in ds 4",
       [](uint8_t* w) {
         setBe32(w + 32, 8 | m::kInlineFlag);
         setDs(w, 4);
       },
       64, m::WqeDefect::kInlineLengthMismatch},
      {"inline flag in the second gather entry",
       [](uint8_t* w) {
         setDs(w, 4);
         setBe32(w + 48, 16 | m::kInlineFlag);
       },
       64, m::WqeDefect::kInlineFlagInGather},
      {"five gather entries", [](uint8_t* w) { setDs(w, 7); }, 128, m::WqeDefect::kTooManyGathers},
  };
  for (bool atomic : {true, false}) {
    for (const Corruption& c : atomic ? std::vector<Corruption>(std::begin(fa_cases), std::end(fa_cases))
                                      : std::vector<Corruption>(std::begin(write_cases), std::end(write_cases))) {
      alignas(64) uint8_t wqe[1024];
      std::memset(wqe, 0, sizeof(wqe));
      if (atomic)
        m::build_fetch_add(wqe, {{9, 3, true, m::FenceMode::kNone}, {0x1000, 1}, 1, {0x2000, 2}});
      else
        m::build_write(wqe, {{9, 3, true, m::FenceMode::kNone}, {0x2000, 2, 64}, {0x1000, 1}});
      // Gather entries the corruption exposes are valid 16-byte entries.
      for (int s = 3 + (atomic ? 1 : 0); s < 8; ++s)
        *reinterpret_cast<m::DataSeg*>(wqe + 16 * s) = m::make_data_seg(16, 2, 0x3000);
      c.mutate(wqe);
      m::ParsedWqe p;
      const m::WqeDefect d = m::parse_wqe(wqe, c.avail, &p);
      EXPECT_EQ(c.expected, d) << c.name << ": got \"" << m::wqe_defect_text(d) << "\"";
      EXPECT_NE(std::string::npos,
                std::string(m::wqe_defect_text(d)).find(m::is_malformed(d) ? "malformed" : "unsupported"))
          << c.name;
      EXPECT_EQ(3u, p.qpn) << c.name << ": the control fields are still decoded";
    }
  }
}

TEST(Mlx5Wqe, RingReaderRejectsStaleIndexAndForeignQpn) {
  constexpr uint32_t kWqeCnt = 16;
  alignas(64) uint8_t ring[kWqeCnt * 64];
  std::memset(ring, 0, sizeof(ring));
  m::build_nop(m::SqRing{ring, kWqeCnt}.wqebb(5), {5, 0x42, true, m::FenceMode::kNone});
  m::WqeBytes copy;
  m::ParsedWqe p;
  EXPECT_EQ(m::WqeDefect::kNone, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, 5, 0x42, &copy, &p));
  // The same slot read one lap later: the producer has not written it yet.
  EXPECT_EQ(m::WqeDefect::kIndexMismatch, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, 5 + kWqeCnt, 0x42, &copy, &p));
  EXPECT_EQ(m::WqeDefect::kQpnMismatch, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, 5, 0x43, &copy, &p));
  // A never-written slot: ds 0, but the wrong index is what the reader reports first (slot 6 holds index 0).
  EXPECT_EQ(m::WqeDefect::kIndexMismatch, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, 6, 0x42, &copy, &p));
  EXPECT_EQ(m::WqeDefect::kDsZero, m::read_wqe(m::ConstSqRing{ring, kWqeCnt}, 0, 0, &copy, &p));
}

TEST(Mlx5Wqe, EveryDefectHasItsOwnText) {
  std::vector<std::string> texts;
  for (int d = 0; d <= static_cast<int>(m::WqeDefect::kTooManyGathers); ++d) {
    const std::string t = m::wqe_defect_text(static_cast<m::WqeDefect>(d));
    EXPECT_EQ(std::string::npos, t.find("unknown")) << d;
    for (const std::string& other : texts) EXPECT_NE(other, t);
    texts.push_back(t);
  }
  EXPECT_FALSE(m::is_malformed(m::WqeDefect::kNone));
  EXPECT_FALSE(m::is_unsupported(m::WqeDefect::kNone));
  EXPECT_TRUE(m::is_malformed(m::WqeDefect::kQpnMismatch));
  EXPECT_TRUE(m::is_unsupported(m::WqeDefect::kUnsupportedOpcode));
  EXPECT_STREQ("ATOMIC_FA", m::wqe_opcode_name(MLX5_OPCODE_ATOMIC_FA));
}

}  // namespace
