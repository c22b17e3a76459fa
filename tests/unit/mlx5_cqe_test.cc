// mlx5 completion entries (src/transport/rdma/mlx5/cqe.h): layouts against mlx5dv.h, the owner bit over several
// laps of a CQ as a NIC would write it, the 24-bit consumer-index doorbell across its wrap, and requester / error
// CQE decoding with syndrome messages.
#include <gtest/gtest.h>
#include <infiniband/mlx5dv.h>

#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "transport/rdma/mlx5/cqe.h"

namespace {

namespace m = nccl_moe::mlx5;

#define EXPECT_SAME_FIELD(ours, theirs, field) EXPECT_EQ(offsetof(theirs, field), offsetof(ours, field)) << #field

TEST(Mlx5Cqe, LayoutsMatchMlx5dv) {
  EXPECT_EQ(sizeof(mlx5_cqe64), sizeof(m::Cqe64));
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, srqn_uidx);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, imm_inval_pkey);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, app);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, app_op);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, app_info);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, byte_cnt);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, timestamp);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, sop_drop_qpn);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, wqe_counter);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, signature);
  EXPECT_SAME_FIELD(m::Cqe64, mlx5_cqe64, op_own);

  EXPECT_EQ(sizeof(mlx5_err_cqe), sizeof(m::ErrCqe));
  EXPECT_SAME_FIELD(m::ErrCqe, mlx5_err_cqe, srqn);
  EXPECT_SAME_FIELD(m::ErrCqe, mlx5_err_cqe, vendor_err_synd);
  EXPECT_SAME_FIELD(m::ErrCqe, mlx5_err_cqe, syndrome);
  EXPECT_SAME_FIELD(m::ErrCqe, mlx5_err_cqe, s_wqe_opcode_qpn);
  EXPECT_SAME_FIELD(m::ErrCqe, mlx5_err_cqe, wqe_counter);
  EXPECT_SAME_FIELD(m::ErrCqe, mlx5_err_cqe, signature);
  EXPECT_SAME_FIELD(m::ErrCqe, mlx5_err_cqe, op_own);
}

TEST(Mlx5Cqe, ConstantsMatchMlx5dv) {
  EXPECT_EQ(MLX5_CQE_REQ, static_cast<int>(m::CqeOpcode::kReq));
  EXPECT_EQ(MLX5_CQE_RESP_SEND, static_cast<int>(m::CqeOpcode::kRespSend));
  EXPECT_EQ(MLX5_CQE_REQ_ERR, static_cast<int>(m::CqeOpcode::kReqErr));
  EXPECT_EQ(MLX5_CQE_RESP_ERR, static_cast<int>(m::CqeOpcode::kRespErr));
  EXPECT_EQ(MLX5_CQE_INVALID, static_cast<int>(m::CqeOpcode::kInvalid));
  EXPECT_EQ(MLX5_CQE_OWNER_MASK, 1);
  EXPECT_EQ(MLX5_CQE_SYNDROME_LOCAL_LENGTH_ERR, static_cast<int>(m::CqeSyndrome::kLocalLength));
  EXPECT_EQ(MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, static_cast<int>(m::CqeSyndrome::kLocalQpOperation));
  EXPECT_EQ(MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, static_cast<int>(m::CqeSyndrome::kLocalProtection));
  EXPECT_EQ(MLX5_CQE_SYNDROME_WR_FLUSH_ERR, static_cast<int>(m::CqeSyndrome::kWrFlushed));
  EXPECT_EQ(MLX5_CQE_SYNDROME_MW_BIND_ERR, static_cast<int>(m::CqeSyndrome::kMwBind));
  EXPECT_EQ(MLX5_CQE_SYNDROME_BAD_RESP_ERR, static_cast<int>(m::CqeSyndrome::kBadResponse));
  EXPECT_EQ(MLX5_CQE_SYNDROME_LOCAL_ACCESS_ERR, static_cast<int>(m::CqeSyndrome::kLocalAccess));
  EXPECT_EQ(MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR, static_cast<int>(m::CqeSyndrome::kRemoteInvalidRequest));
  EXPECT_EQ(MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, static_cast<int>(m::CqeSyndrome::kRemoteAccess));
  EXPECT_EQ(MLX5_CQE_SYNDROME_REMOTE_OP_ERR, static_cast<int>(m::CqeSyndrome::kRemoteOperation));
  EXPECT_EQ(MLX5_CQE_SYNDROME_TRANSPORT_RETRY_EXC_ERR, static_cast<int>(m::CqeSyndrome::kTransportRetryExceeded));
  EXPECT_EQ(MLX5_CQE_SYNDROME_RNR_RETRY_EXC_ERR, static_cast<int>(m::CqeSyndrome::kRnrRetryExceeded));
  EXPECT_EQ(MLX5_CQE_SYNDROME_REMOTE_ABORTED_ERR, static_cast<int>(m::CqeSyndrome::kRemoteAborted));
}

TEST(Mlx5Cqe, RequesterCqeFieldsReadBackThroughRdmaCore) {
  alignas(64) uint8_t bytes[64];
  m::build_req_cqe(bytes, 0xbeef, 0x12, 0x00abcdef, 8, 1);
  mlx5_cqe64 theirs;
  std::memcpy(&theirs, bytes, 64);
  EXPECT_EQ(MLX5_CQE_REQ, mlx5dv_get_cqe_opcode(&theirs));
  EXPECT_EQ(1, mlx5dv_get_cqe_owner(&theirs));
  EXPECT_EQ(0, mlx5dv_get_cqe_format(&theirs));
  EXPECT_EQ(0xbeef, be16toh(theirs.wqe_counter));
  EXPECT_EQ(0x12abcdefu, be32toh(theirs.sop_drop_qpn));
  EXPECT_EQ(8u, be32toh(theirs.byte_cnt));

  m::build_err_cqe(bytes, 0x0102, 0x08, 0x000777, 0x15, 0x81, 0);
  mlx5_err_cqe err;
  std::memcpy(&err, bytes, 64);
  EXPECT_EQ(MLX5_CQE_REQ_ERR, err.op_own >> 4);
  EXPECT_EQ(0x15, err.syndrome);
  EXPECT_EQ(0x81, err.vendor_err_synd);
  EXPECT_EQ(0x08000777u, be32toh(err.s_wqe_opcode_qpn));
  EXPECT_EQ(0x0102, be16toh(err.wqe_counter));
}

// A NIC writes CQE n into entry n % cqe_cnt with owner bit (n / cqe_cnt) & 1; the consumer must see entry ci as
// ready exactly when CQE ci has been written, over several laps.
TEST(Mlx5Cqe, OwnerBitTracksLaps) {
  for (uint32_t cqe_cnt : {1u, 2u, 8u, 64u}) {
    SCOPED_TRACE(cqe_cnt);
    std::vector<uint8_t> cq(cqe_cnt * m::kCqeBytes);
    for (uint32_t i = 0; i < cqe_cnt; ++i) cq[i * 64 + 63] = m::kCqeInitialOpOwn;
    uint32_t produced = 0;
    for (uint32_t ci = 0; ci < 5 * cqe_cnt; ++ci) {
      uint8_t* entry = cq.data() + m::cq_slot(ci, cqe_cnt) * m::kCqeBytes;
      m::CqeInfo info;
      ASSERT_EQ(m::CqeStatus::kEmpty, m::decode_cqe(entry, ci, cqe_cnt, &info))
          << "ci " << ci << ": an entry of the previous lap (or never written) is not ready";
      m::build_req_cqe(entry, static_cast<uint16_t>(produced), 0x08, 0x42, 0, (produced / cqe_cnt) & 1);
      ++produced;
      ASSERT_EQ(m::CqeStatus::kSuccess, m::decode_cqe(entry, ci, cqe_cnt, &info)) << "ci " << ci;
      EXPECT_EQ(static_cast<uint16_t>(ci), info.wqe_counter);
      EXPECT_EQ(0x42u, info.qpn);
      EXPECT_EQ(0x08, info.wqe_opcode);
      // The same entry is stale for the consumer one lap later.
      ASSERT_EQ(m::CqeStatus::kEmpty, m::decode_cqe(entry, ci + cqe_cnt, cqe_cnt, &info));
    }
  }
}

TEST(Mlx5Cqe, ConsumerIndexDoorbellWrapsAt24Bits) {
  const m::Be32 a = m::cq_ci_dbr_value(0xffffff);
  const uint8_t a_bytes[4] = {0, 0xff, 0xff, 0xff};
  EXPECT_EQ(0, std::memcmp(a_bytes, &a, 4));
  const m::Be32 b = m::cq_ci_dbr_value(0x1000000);
  const uint8_t b_bytes[4] = {0, 0, 0, 0};
  EXPECT_EQ(0, std::memcmp(b_bytes, &b, 4));
  const m::Be32 c = m::cq_ci_dbr_value(0x12345678);
  const uint8_t c_bytes[4] = {0, 0x34, 0x56, 0x78};
  EXPECT_EQ(0, std::memcmp(c_bytes, &c, 4));
  // The lap parity of the full index equals that of the 24-bit index the NIC keeps, across 2^24 and 2^32.
  for (uint32_t cqe_cnt : {1u, 256u, 1u << 23}) {
    for (uint32_t ci : {0xfffff0u, 0xffffffu, 0x1000000u, 0x1000005u, 0xfffffff0u, 0xffffffffu, 0u, 7u}) {
      EXPECT_EQ(m::cqe_lap_owner(ci & 0xffffff, cqe_cnt), m::cqe_lap_owner(ci, cqe_cnt))
          << "ci " << ci << " cqe_cnt " << cqe_cnt;
    }
  }
  EXPECT_EQ(1, m::cqe_lap_owner(0xffffffffu, 256));
  EXPECT_EQ(0, m::cqe_lap_owner(0u, 256)) << "after the 32-bit wrap the parity continues";
  EXPECT_TRUE(m::is_valid_cqe_cnt(1u << 23));
  EXPECT_FALSE(m::is_valid_cqe_cnt(1u << 24));
}

TEST(Mlx5Cqe, ErrorCqeDecodesToSyndromeAndMessage) {
  alignas(64) uint8_t e[64];
  m::build_err_cqe(e, 0x0203, 0x12, 0x000999, 0x13, 0x88, 1);
  m::CqeInfo info;
  ASSERT_EQ(m::CqeStatus::kError, m::decode_cqe(e, 8, 8, &info));
  EXPECT_EQ(static_cast<uint8_t>(m::CqeOpcode::kReqErr), info.opcode);
  EXPECT_EQ(0x13, info.syndrome);
  EXPECT_EQ(0x88, info.vendor_syndrome);
  EXPECT_EQ(0x0203, info.wqe_counter);
  EXPECT_EQ(0x999u, info.qpn);
  EXPECT_EQ(0x12, info.wqe_opcode);
  EXPECT_NE(std::string::npos, std::string(m::cqe_syndrome_text(info.syndrome)).find("remote access"));
  EXPECT_NE(std::string::npos, std::string(m::cqe_syndrome_text(0x15)).find("retry counter exceeded"));
  EXPECT_NE(std::string::npos, std::string(m::cqe_syndrome_text(0x05)).find("flushed"));
  EXPECT_STREQ("unknown syndrome", m::cqe_syndrome_text(0x7f));
  // Every syndrome rdma-core knows has its own message.
  std::set<std::string> texts;
  for (int s : {0x01, 0x02, 0x04, 0x05, 0x06, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x22}) {
    const std::string t = m::cqe_syndrome_text(static_cast<uint8_t>(s));
    EXPECT_EQ(std::string::npos, t.find("unknown")) << s;
    texts.insert(t);
  }
  EXPECT_EQ(13u, texts.size());
}

TEST(Mlx5Cqe, UnexpectedEntriesOnASendCq) {
  alignas(64) uint8_t e[64];
  m::CqeInfo info;
  m::build_req_cqe(e, 1, 0x08, 1, 0, 0);
  e[63] = static_cast<uint8_t>((static_cast<uint8_t>(m::CqeOpcode::kRespSend) << 4) | 0);
  EXPECT_EQ(m::CqeStatus::kUnexpected, m::decode_cqe(e, 0, 4, &info));
  EXPECT_EQ(static_cast<uint8_t>(m::CqeOpcode::kRespSend), info.opcode);
  m::build_req_cqe(e, 1, 0x08, 1, 0, 0);
  e[63] |= m::kCqeFormatCompressed << 2;
  EXPECT_EQ(m::CqeStatus::kUnexpected, m::decode_cqe(e, 0, 4, &info)) << "compressed CQEs are never enabled";
  m::build_req_cqe(e, 1, 0x08, 1, 0, 0);
  EXPECT_EQ(m::CqeStatus::kSuccess, m::decode_cqe(e, 0, 4, &info));
  EXPECT_EQ(m::CqeStatus::kEmpty, m::decode_cqe(e, 4, 4, &info)) << "owner 0 on lap 1";
}

}  // namespace
