// The host half of the GPU's QP view (src/transport/rdma/ibgda/gpu_qp.h): building and checking the view, and the
// messages of the scale-out error records the device code writes.
#include "transport/rdma/ibgda/gpu_qp.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe::ibgda {
namespace {

struct Fixture {
  alignas(64) uint8_t sq[64 * 64];
  alignas(64) uint8_t cq[128 * 64];
  uint32_t sq_dbrec[2];
  alignas(8) uint64_t doorbell;
  uint32_t cq_dbrec[2];
  GpuQpState state;
  ErrorRecord error;

  GpuQpQueues queues() {
    GpuQpQueues q;
    q.sq = sq;
    q.wqe_cnt = 64;
    q.sq_dbrec = sq_dbrec;
    q.doorbell = &doorbell;
    q.cq = cq;
    q.cqe_cnt = 128;
    q.cq_dbrec = cq_dbrec;
    q.state = &state;
    return q;
  }
  GpuQpBinding binding() {
    GpuQpBinding b;
    b.qpn = 0x1234;
    b.src_lkey = 0x100;
    b.result_lkey = 0x200;
    b.rank = 3;
    b.peer = 5;
    b.timeout_ns = 1000000;
    b.error = &error;
    return b;
  }
};

TEST(GpuQp, BuildsTheView) {
  Fixture f;
  GpuQp v{};
  ASSERT_EQ("", buildGpuQp(f.queues(), f.binding(), &v));
  EXPECT_EQ(f.sq, v.sq);
  EXPECT_EQ(64u, v.wqe_cnt);
  EXPECT_EQ(0x1234u, v.qpn);
  EXPECT_EQ(f.sq_dbrec, v.sq_dbrec);
  EXPECT_EQ(&f.doorbell, v.doorbell);
  EXPECT_EQ(f.cq, v.cq);
  EXPECT_EQ(128u, v.cqe_cnt);
  EXPECT_EQ(f.cq_dbrec, v.cq_dbrec);
  EXPECT_EQ(0x100u, v.lkey);
  EXPECT_EQ(0x200u, v.result_lkey);
  EXPECT_EQ(&f.state, v.state);
  EXPECT_EQ(3, v.rank);
  EXPECT_EQ(5, v.peer);
  EXPECT_EQ(1000000u, v.timeout_ns);
  EXPECT_EQ(&f.error, v.error);
}

TEST(GpuQp, RejectsWhatTheDeviceCodeCannotDrive) {
  struct Case {
    const char* name;
    void (*mutate)(GpuQpQueues*, GpuQpBinding*);
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"null sq", [](GpuQpQueues* q, GpuQpBinding*) { q->sq = nullptr; }, "null"},
      {"null state", [](GpuQpQueues* q, GpuQpBinding*) { q->state = nullptr; }, "null"},
      {"no error record", [](GpuQpQueues*, GpuQpBinding* b) { b->error = nullptr; }, "error record"},
      {"wqe_cnt 48", [](GpuQpQueues* q, GpuQpBinding*) { q->wqe_cnt = 48; }, "power of two"},
      {"wqe_cnt 2", [](GpuQpQueues* q, GpuQpBinding*) { q->wqe_cnt = 2; }, "at least 4"},
      {"cq smaller than sq", [](GpuQpQueues* q, GpuQpBinding*) { q->cqe_cnt = 32; }, "overrun"},
      {"qpn 0", [](GpuQpQueues*, GpuQpBinding* b) { b->qpn = 0; }, "24-bit"},
      {"qpn 25 bits", [](GpuQpQueues*, GpuQpBinding* b) { b->qpn = 1u << 24; }, "24-bit"},
      {"no timeout", [](GpuQpQueues*, GpuQpBinding* b) { b->timeout_ns = 0; }, "bounded"},
  };
  for (const Case& c : cases) {
    Fixture f;
    GpuQpQueues q = f.queues();
    GpuQpBinding b = f.binding();
    c.mutate(&q, &b);
    GpuQp v{};
    const std::string why = buildGpuQp(q, b, &v);
    EXPECT_NE(std::string::npos, why.find(c.expect)) << c.name << ": " << why;
  }
  Fixture f;
  GpuQpQueues q = f.queues();
  q.sq = f.sq + 8;  // misaligned ring
  GpuQp v{};
  EXPECT_NE(std::string::npos, buildGpuQp(q, f.binding(), &v).find("aligned"));
}

TEST(GpuQp, DescribesAQuietTimeoutWithItsQp) {
  ErrorRecord r{};
  r.code = kErrTimeout;
  r.phase = static_cast<int>(Phase::kNetQuiet);
  r.rank = 0;
  r.peer = 1;
  r.qpn = 0x2a;
  r.counter = 3;
  r.expected = 4;
  r.detail = 3;
  const std::string s = describeNetError(r, 200000000ull);
  EXPECT_NE(std::string::npos, s.find("net-quiet")) << s;
  EXPECT_NE(std::string::npos, s.find("rank 0")) << s;
  EXPECT_NE(std::string::npos, s.find("QP 0x2a")) << s;
  EXPECT_NE(std::string::npos, s.find("peer 1")) << s;
  EXPECT_NE(std::string::npos, s.find("0.200 s")) << s;
  EXPECT_NE(std::string::npos, s.find("never rung")) << s;
}

TEST(GpuQp, DescribesAnErrorCqe) {
  ErrorRecord r{};
  r.code = kErrNetCqe;
  r.phase = static_cast<int>(Phase::kNetCqe);
  r.rank = 1;
  r.peer = 0;
  r.qpn = 0x77;
  r.counter = 5;
  r.expected = -1;
  r.detail = 0x13 | (0x04 << 8) | (0x08 << 16);
  const std::string s = describeNetError(r, 1);
  EXPECT_NE(std::string::npos, s.find("net-cqe")) << s;
  EXPECT_NE(std::string::npos, s.find("QP 0x77")) << s;
  EXPECT_NE(std::string::npos, s.find("WQE 5 (RDMA_WRITE)")) << s;
  EXPECT_NE(std::string::npos, s.find("syndrome 0x13")) << s;
  EXPECT_NE(std::string::npos, s.find("remote access")) << s;
  EXPECT_NE(std::string::npos, s.find("vendor syndrome 0x04")) << s;
}

TEST(GpuQp, NamesTheTransportPhases) {
  EXPECT_STREQ("net-reserve", phaseName(Phase::kNetReserve));
  EXPECT_STREQ("net-ready", phaseName(Phase::kNetReady));
  EXPECT_STREQ("net-doorbell", phaseName(Phase::kNetDoorbell));
  EXPECT_STREQ("net-quiet", phaseName(Phase::kNetQuiet));
  EXPECT_STREQ("net-cqe", phaseName(Phase::kNetCqe));
}

}  // namespace
}  // namespace nccl_moe::ibgda
