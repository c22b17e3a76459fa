// The RC QP state machine as data (src/transport/rdma/verbs/qp_attr.h): attribute values and masks of
// RESET -> INIT -> RTR -> RTS for InfiniBand (with and without a GRH) and RoCE, the legal-transition table,
// config validation, and the SL / TC resolution from the environment with its precedence and range errors.
#include "transport/rdma/verbs/qp_attr.h"

#include <gtest/gtest.h>
#include <infiniband/verbs.h>
#include <stdlib.h>

#include <cstring>
#include <map>
#include <set>
#include <string>
#include <utility>

#include "core/error.h"

namespace {

namespace v = nccl_moe::verbs;

std::string lastError() { return nccl_moe::threadLastError(); }

v::QpConnectConfig ibConfig() {
  v::QpConnectConfig c;
  c.link_layer = v::LinkLayer::kInfiniBand;
  c.port_num = 1;
  c.pkey_index = 3;
  c.path_mtu = IBV_MTU_4096;
  c.sl = 5;
  c.traffic_class = 106;
  c.timeout = 18;
  c.retry_cnt = 6;
  c.rnr_retry = 7;
  c.min_rnr_timer = 12;
  c.max_rd_atomic = 16;
  c.max_dest_rd_atomic = 8;
  c.sq_psn = 0x123456;
  c.remote_qpn = 0xabcd;
  c.remote_lid = 0x21;
  c.rq_psn = 0x654321;
  return c;
}

v::QpConnectConfig roceConfig() {
  v::QpConnectConfig c = ibConfig();
  c.link_layer = v::LinkLayer::kEthernet;
  c.remote_lid = 0;
  c.gid_index = 3;
  c.hop_limit = 64;
  for (int i = 0; i < 16; ++i) c.remote_gid[i] = static_cast<uint8_t>(0xf0 + i);
  return c;
}

TEST(QpAttr, ResetToInit) {
  v::QpTransition t;
  ASSERT_EQ(ncclSuccess, v::buildQpTransition(ibConfig(), IBV_QPS_RESET, IBV_QPS_INIT, &t)) << lastError();
  EXPECT_EQ(IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, t.attr_mask);
  EXPECT_EQ(IBV_QPS_INIT, t.attr.qp_state);
  EXPECT_EQ(3, t.attr.pkey_index);
  EXPECT_EQ(1, t.attr.port_num);
  EXPECT_EQ(static_cast<unsigned>(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                                  IBV_ACCESS_REMOTE_ATOMIC),
            t.attr.qp_access_flags);
}

TEST(QpAttr, InitToRtrOnInfiniBand) {
  v::QpTransition t;
  ASSERT_EQ(ncclSuccess, v::buildQpTransition(ibConfig(), IBV_QPS_INIT, IBV_QPS_RTR, &t)) << lastError();
  EXPECT_EQ(IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                IBV_QP_MIN_RNR_TIMER,
            t.attr_mask);
  EXPECT_EQ(IBV_QPS_RTR, t.attr.qp_state);
  EXPECT_EQ(IBV_MTU_4096, t.attr.path_mtu);
  EXPECT_EQ(0xabcdu, t.attr.dest_qp_num);
  EXPECT_EQ(0x654321u, t.attr.rq_psn);
  EXPECT_EQ(8, t.attr.max_dest_rd_atomic);
  EXPECT_EQ(12, t.attr.min_rnr_timer);
  EXPECT_EQ(0x21, t.attr.ah_attr.dlid);
  EXPECT_EQ(5, t.attr.ah_attr.sl);
  EXPECT_EQ(1, t.attr.ah_attr.port_num);
  EXPECT_EQ(0, t.attr.ah_attr.is_global) << "no GRH on one IB subnet";
  EXPECT_EQ(0, t.attr.ah_attr.grh.traffic_class) << "TC travels only in a GRH";
}

TEST(QpAttr, InitToRtrOnInfiniBandWithGrh) {
  v::QpConnectConfig c = ibConfig();
  c.ib_use_grh = true;
  c.gid_index = 1;
  c.remote_gid[15] = 0x77;
  v::QpTransition t;
  ASSERT_EQ(ncclSuccess, v::buildQpTransition(c, IBV_QPS_INIT, IBV_QPS_RTR, &t)) << lastError();
  EXPECT_EQ(1, t.attr.ah_attr.is_global);
  EXPECT_EQ(0x21, t.attr.ah_attr.dlid);
  EXPECT_EQ(106, t.attr.ah_attr.grh.traffic_class);
  EXPECT_EQ(1, t.attr.ah_attr.grh.sgid_index);
  EXPECT_EQ(0x77, t.attr.ah_attr.grh.dgid.raw[15]);
}

TEST(QpAttr, InitToRtrOnRoce) {
  const v::QpConnectConfig c = roceConfig();
  v::QpTransition t;
  ASSERT_EQ(ncclSuccess, v::buildQpTransition(c, IBV_QPS_INIT, IBV_QPS_RTR, &t)) << lastError();
  EXPECT_EQ(1, t.attr.ah_attr.is_global);
  EXPECT_EQ(0, t.attr.ah_attr.dlid);
  EXPECT_EQ(5, t.attr.ah_attr.sl);
  EXPECT_EQ(0, std::memcmp(c.remote_gid, t.attr.ah_attr.grh.dgid.raw, 16));
  EXPECT_EQ(3, t.attr.ah_attr.grh.sgid_index);
  EXPECT_EQ(64, t.attr.ah_attr.grh.hop_limit);
  EXPECT_EQ(106, t.attr.ah_attr.grh.traffic_class);
  EXPECT_EQ(0u, t.attr.ah_attr.grh.flow_label);
}

TEST(QpAttr, RtrToRts) {
  v::QpTransition t;
  ASSERT_EQ(ncclSuccess, v::buildQpTransition(ibConfig(), IBV_QPS_RTR, IBV_QPS_RTS, &t)) << lastError();
  EXPECT_EQ(
      IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC,
      t.attr_mask);
  EXPECT_EQ(IBV_QPS_RTS, t.attr.qp_state);
  EXPECT_EQ(18, t.attr.timeout);
  EXPECT_EQ(6, t.attr.retry_cnt);
  EXPECT_EQ(7, t.attr.rnr_retry);
  EXPECT_EQ(0x123456u, t.attr.sq_psn);
  EXPECT_EQ(16, t.attr.max_rd_atomic);
}

TEST(QpAttr, ToErrorAndResetSetTheStateOnly) {
  for (ibv_qp_state from :
       {IBV_QPS_RESET, IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS, IBV_QPS_SQD, IBV_QPS_SQE, IBV_QPS_ERR}) {
    for (ibv_qp_state to : {IBV_QPS_ERR, IBV_QPS_RESET}) {
      v::QpTransition t;
      ASSERT_EQ(ncclSuccess, v::buildQpTransition(v::QpConnectConfig{}, from, to, &t)) << lastError();
      EXPECT_EQ(IBV_QP_STATE, t.attr_mask);
      EXPECT_EQ(to, t.attr.qp_state);
    }
  }
}

TEST(QpAttr, LegalTransitionTable) {
  const ibv_qp_state states[] = {IBV_QPS_RESET, IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS,
                                 IBV_QPS_SQD,   IBV_QPS_SQE,  IBV_QPS_ERR};
  const std::set<std::pair<ibv_qp_state, ibv_qp_state>> forward = {
      {IBV_QPS_RESET, IBV_QPS_INIT}, {IBV_QPS_INIT, IBV_QPS_INIT}, {IBV_QPS_INIT, IBV_QPS_RTR},
      {IBV_QPS_RTR, IBV_QPS_RTS},    {IBV_QPS_RTS, IBV_QPS_RTS},   {IBV_QPS_RTS, IBV_QPS_SQD},
      {IBV_QPS_SQD, IBV_QPS_SQD},    {IBV_QPS_SQD, IBV_QPS_RTS},   {IBV_QPS_SQE, IBV_QPS_RTS},
  };
  int legal = 0;
  for (ibv_qp_state from : states) {
    for (ibv_qp_state to : states) {
      const bool expected = to == IBV_QPS_RESET || to == IBV_QPS_ERR || forward.count({from, to}) != 0;
      EXPECT_EQ(expected, v::isLegalQpTransition(from, to)) << v::qpStateName(from) << " -> " << v::qpStateName(to);
      legal += expected;
    }
  }
  EXPECT_EQ(7 * 2 + 9, legal);
  EXPECT_FALSE(v::isLegalQpTransition(IBV_QPS_UNKNOWN, IBV_QPS_RESET));

  v::QpTransition t;
  EXPECT_EQ(ncclInvalidArgument, v::buildQpTransition(ibConfig(), IBV_QPS_RESET, IBV_QPS_RTR, &t));
  EXPECT_NE(std::string::npos, lastError().find("RESET -> RTR is not legal")) << lastError();
  EXPECT_EQ(ncclInvalidArgument, v::buildQpTransition(ibConfig(), IBV_QPS_RTS, IBV_QPS_INIT, &t));
  EXPECT_NE(std::string::npos, lastError().find("RTS -> INIT")) << lastError();
  EXPECT_EQ(ncclInvalidArgument, v::buildQpTransition(ibConfig(), IBV_QPS_RTS, IBV_QPS_SQD, &t));
  EXPECT_NE(std::string::npos, lastError().find("legal but not one this transport builds")) << lastError();
}

TEST(QpAttr, ValidationNamesTheField) {
  struct Case {
    const char* expect;
    void (*mutate)(v::QpConnectConfig&);
    bool roce;
  };
  const Case cases[] = {
      {"remote_qpn", [](v::QpConnectConfig& c) { c.remote_qpn = 0; }, false},
      {"remote_qpn", [](v::QpConnectConfig& c) { c.remote_qpn = 0x1000000; }, false},
      {"remote LID", [](v::QpConnectConfig& c) { c.remote_lid = 0; }, false},
      {"RoCE needs the remote GID", [](v::QpConnectConfig& c) { std::memset(c.remote_gid, 0, 16); }, true},
      {"InfiniBand with a GRH needs the remote GID", [](v::QpConnectConfig& c) { c.ib_use_grh = true; }, false},
      {"sl 16", [](v::QpConnectConfig& c) { c.sl = 16; }, false},
      {"timeout 32", [](v::QpConnectConfig& c) { c.timeout = 32; }, false},
      {"retry_cnt 8", [](v::QpConnectConfig& c) { c.retry_cnt = 8; }, false},
      {"rnr_retry 8", [](v::QpConnectConfig& c) { c.rnr_retry = 8; }, false},
      {"min_rnr_timer 32", [](v::QpConnectConfig& c) { c.min_rnr_timer = 32; }, false},
      {"max_rd_atomic 0", [](v::QpConnectConfig& c) { c.max_rd_atomic = 0; }, false},
      {"max_dest_rd_atomic 0", [](v::QpConnectConfig& c) { c.max_dest_rd_atomic = 0; }, false},
      {"PSNs are 24 bits", [](v::QpConnectConfig& c) { c.sq_psn = 0x1000000; }, false},
      {"PSNs are 24 bits", [](v::QpConnectConfig& c) { c.rq_psn = 0x1000000; }, false},
      {"path_mtu 0", [](v::QpConnectConfig& c) { c.path_mtu = static_cast<ibv_mtu>(0); }, false},
      {"port_num 0", [](v::QpConnectConfig& c) { c.port_num = 0; }, false},
  };
  for (const Case& k : cases) {
    v::QpConnectConfig c = k.roce ? roceConfig() : ibConfig();
    ASSERT_EQ(ncclSuccess, v::validateQpConfig(c));
    k.mutate(c);
    EXPECT_EQ(ncclInvalidArgument, v::validateQpConfig(c)) << k.expect;
    EXPECT_NE(std::string::npos, lastError().find(k.expect)) << lastError();
    v::QpTransition t;
    EXPECT_EQ(ncclInvalidArgument, v::buildQpTransition(c, IBV_QPS_INIT, IBV_QPS_RTR, &t)) << k.expect;
  }
}

// ---- SL / TC ----

struct FakeEnv {
  std::map<std::string, std::string> vars;
  v::EnvLookup lookup() const {
    return [this](const char* name) -> const char* {
      auto it = vars.find(name);
      return it == vars.end() ? nullptr : it->second.c_str();
    };
  }
};

TEST(ServiceLevels, DefaultsAreZero) {
  FakeEnv env;
  v::ServiceLevels s;
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(0, s.general.sl);
  EXPECT_EQ(0, s.general.traffic_class);
  EXPECT_EQ(0, s.low_latency.sl);
  EXPECT_EQ(0, s.low_latency.traffic_class);
  EXPECT_STREQ("default", s.general.sl_source);
  EXPECT_STREQ("default", s.low_latency.tc_source);
}

TEST(ServiceLevels, PrecedenceOfTheVariables) {
  FakeEnv env;
  v::ServiceLevels s;
  // NCCL's own variables are the defaults, for both QP sets.
  env.vars = {{"NCCL_IB_SL", "3"}, {"NCCL_IB_TC", "106"}};
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(3, s.general.sl);
  EXPECT_EQ(106, s.general.traffic_class);
  EXPECT_EQ(3, s.low_latency.sl);
  EXPECT_EQ(106, s.low_latency.traffic_class);
  EXPECT_STREQ("NCCL_IB_SL", s.low_latency.sl_source);

  // NCCL_MOE_IB_* override them; the LL set follows the general value.
  env.vars["NCCL_MOE_IB_SL"] = "5";
  env.vars["NCCL_MOE_IB_TC"] = "0x68";
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(5, s.general.sl);
  EXPECT_EQ(0x68, s.general.traffic_class);
  EXPECT_EQ(5, s.low_latency.sl);
  EXPECT_EQ(0x68, s.low_latency.traffic_class);
  EXPECT_STREQ("NCCL_MOE_IB_SL", s.general.sl_source);

  // The LL variables move the LL set only.
  env.vars["NCCL_MOE_IB_LL_SL"] = "7";
  env.vars["NCCL_MOE_IB_LL_TC"] = "184";
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(5, s.general.sl);
  EXPECT_EQ(0x68, s.general.traffic_class);
  EXPECT_EQ(7, s.low_latency.sl);
  EXPECT_EQ(184, s.low_latency.traffic_class);
  EXPECT_STREQ("NCCL_MOE_IB_LL_TC", s.low_latency.tc_source);

  // LL alone, without any general value.
  env.vars = {{"NCCL_MOE_IB_LL_SL", "2"}};
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(0, s.general.sl);
  EXPECT_EQ(2, s.low_latency.sl);

  // Empty means unset.
  env.vars = {{"NCCL_MOE_IB_SL", ""}, {"NCCL_IB_SL", "4"}, {"NCCL_MOE_IB_LL_TC", ""}};
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(4, s.general.sl);
  EXPECT_EQ(4, s.low_latency.sl);

  // An overridden variable is not read, even when malformed.
  env.vars = {{"NCCL_MOE_IB_SL", "1"}, {"NCCL_IB_SL", "junk"}};
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(1, s.general.sl);
}

TEST(ServiceLevels, RangeAndSyntaxErrorsNameTheVariable) {
  const struct {
    const char* name;
    const char* value;
    const char* expect;
  } cases[] = {
      {"NCCL_MOE_IB_SL", "16", "NCCL_MOE_IB_SL=16 is out of range: an InfiniBand service level is 0..15"},
      {"NCCL_IB_SL", "99", "NCCL_IB_SL=99 is out of range"},
      {"NCCL_MOE_IB_TC", "256", "NCCL_MOE_IB_TC=256 is out of range: a traffic class is 0..255"},
      {"NCCL_IB_TC", "-1", "NCCL_IB_TC=-1 is out of range"},
      {"NCCL_MOE_IB_LL_SL", "abc", "NCCL_MOE_IB_LL_SL=\"abc\" is not an integer"},
      {"NCCL_MOE_IB_LL_TC", "3x", "NCCL_MOE_IB_LL_TC=\"3x\" is not an integer"},
      {"NCCL_MOE_IB_LL_TC", "300", "NCCL_MOE_IB_LL_TC=300 is out of range"},
      {"NCCL_MOE_IB_SL", "99999999999999999999", "NCCL_MOE_IB_SL=99999999999999999999 is out of range"},
      {"NCCL_MOE_IB_SL", " ", "NCCL_MOE_IB_SL=\" \" is not an integer"},
  };
  for (const auto& c : cases) {
    FakeEnv env;
    env.vars[c.name] = c.value;
    v::ServiceLevels s;
    s.general.sl = 9;
    EXPECT_EQ(ncclInvalidArgument, v::resolveServiceLevels(env.lookup(), &s)) << c.name << "=" << c.value;
    EXPECT_NE(std::string::npos, lastError().find(c.expect)) << lastError();
    EXPECT_EQ(9, s.general.sl) << "a failed resolution leaves the output alone";
  }
  // The edges are accepted.
  FakeEnv env;
  env.vars = {{"NCCL_MOE_IB_SL", "15"}, {"NCCL_MOE_IB_TC", "255"}, {"NCCL_MOE_IB_LL_SL", "0"}};
  v::ServiceLevels s;
  ASSERT_EQ(ncclSuccess, v::resolveServiceLevels(env.lookup(), &s)) << lastError();
  EXPECT_EQ(15, s.general.sl);
  EXPECT_EQ(255, s.general.traffic_class);
  EXPECT_EQ(0, s.low_latency.sl);
}

TEST(ServiceLevels, ProcessEnvironmentAndTheLowLatencyQpSet) {
  setenv("NCCL_MOE_IB_LL_SL", "6", 1);
  setenv("NCCL_IB_TC", "41", 1);
  v::ServiceLevels s;
  const ncclResult_t res = v::resolveServiceLevels(v::processEnvLookup, &s);
  unsetenv("NCCL_MOE_IB_LL_SL");
  unsetenv("NCCL_IB_TC");
  ASSERT_EQ(ncclSuccess, res) << lastError();
  EXPECT_EQ(6, s.low_latency.sl);
  EXPECT_EQ(41, s.low_latency.traffic_class);

  // The LL set's QPs carry its values into RTR.
  v::QpConnectConfig c = roceConfig();
  c.sl = s.low_latency.sl;
  c.traffic_class = s.low_latency.traffic_class;
  v::QpTransition t;
  ASSERT_EQ(ncclSuccess, v::buildQpTransition(c, IBV_QPS_INIT, IBV_QPS_RTR, &t)) << lastError();
  EXPECT_EQ(6, t.attr.ah_attr.sl);
  EXPECT_EQ(41, t.attr.ah_attr.grh.traffic_class);
}

}  // namespace
