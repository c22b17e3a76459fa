// NCCL_MOE_NET / NCCL_MOE_NET_MODE (src/transport/net_choice.h): parsing, the agreement of every rank's choice,
// and the scale-out decision communicator init takes from them, as pure functions.
#include "transport/net_choice.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"

namespace {

using nccl_moe::NetChoice;
using nccl_moe::NetKind;
using nccl_moe::NetMode;
using nccl_moe::ScaleoutFacts;
using nccl_moe::ScaleoutPlan;

std::string lastError() { return nccl_moe::threadLastError(); }

TEST(NetChoice, ParsesEveryAcceptedValueAndTheDefaults) {
  NetChoice c;
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("", "", &c));
  EXPECT_EQ(NetKind::kAuto, c.kind);
  EXPECT_EQ(NetMode::kIbgda, c.mode);
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("auto", "ibgda", &c));
  EXPECT_EQ(NetKind::kAuto, c.kind);
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("ib", "ibgda", &c));
  EXPECT_EQ(NetKind::kIb, c.kind);
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("emulated", "", &c));
  EXPECT_EQ(NetKind::kEmulated, c.kind);
  EXPECT_STREQ("emulated", nccl_moe::netKindName(c.kind));
  EXPECT_STREQ("ibgda", nccl_moe::netModeName(c.mode));
}

TEST(NetChoice, RejectsUnknownValuesNamingTheVariable) {
  NetChoice c;
  EXPECT_EQ(ncclInvalidArgument, nccl_moe::parseNetChoice("rdma", "ibgda", &c));
  EXPECT_NE(std::string::npos, lastError().find("NCCL_MOE_NET=\"rdma\"")) << lastError();
  EXPECT_NE(std::string::npos, lastError().find("auto, ib or emulated")) << lastError();
  EXPECT_EQ(ncclInvalidArgument, nccl_moe::parseNetChoice("auto", "gda", &c));
  EXPECT_NE(std::string::npos, lastError().find("NCCL_MOE_NET_MODE=\"gda\"")) << lastError();
}

TEST(NetChoice, ProxyAndDoorbellProxyModesParseAndASetModeIsExplicit) {
  NetChoice c;
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("emulated", "proxy", &c));
  EXPECT_EQ(NetMode::kProxy, c.mode);
  EXPECT_EQ(NetKind::kEmulated, c.kind);
  EXPECT_TRUE(c.mode_explicit);
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("ib", "dbproxy", &c));
  EXPECT_EQ(NetMode::kDbProxy, c.mode);
  EXPECT_STREQ("dbproxy", nccl_moe::netModeName(c.mode));
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("ib", "ibgda", &c));
  EXPECT_TRUE(c.mode_explicit) << "ibgda asked for: no fallback";
  ASSERT_EQ(ncclSuccess, nccl_moe::parseNetChoice("ib", "", &c));
  EXPECT_EQ(NetMode::kIbgda, c.mode);
  EXPECT_FALSE(c.mode_explicit) << "unset: ibgda with the doorbell-proxy fallback";
  EXPECT_EQ(ncclInvalidArgument, nccl_moe::parseNetChoice("ib", "db", &c));
  EXPECT_NE(std::string::npos, lastError().find("expected ibgda, dbproxy or proxy")) << lastError();
}

TEST(NetChoice, DisagreementNamesBothValuesAndTheRank) {
  NetChoice agreed;
  std::vector<NetChoice> same(4, NetChoice{NetKind::kEmulated, NetMode::kIbgda});
  ASSERT_EQ(ncclSuccess, nccl_moe::agreeNetChoice(same, &agreed));
  EXPECT_EQ(NetKind::kEmulated, agreed.kind);

  std::vector<NetChoice> differ = same;
  differ[2].kind = NetKind::kAuto;
  EXPECT_EQ(ncclInvalidUsage, nccl_moe::agreeNetChoice(differ, &agreed));
  EXPECT_NE(std::string::npos, lastError().find("NCCL_MOE_NET differs between ranks")) << lastError();
  EXPECT_NE(std::string::npos, lastError().find("rank 0 has emulated, rank 2 has auto")) << lastError();

  differ = same;
  differ[1].mode = NetMode::kProxy;
  differ[1].mode_explicit = true;
  EXPECT_EQ(ncclInvalidUsage, nccl_moe::agreeNetChoice(differ, &agreed));
  EXPECT_NE(std::string::npos, lastError().find("NCCL_MOE_NET_MODE differs")) << lastError();
  EXPECT_NE(std::string::npos, lastError().find("rank 0 has ibgda (unset), rank 1 has proxy;")) << lastError();

  differ = same;
  differ[2].mode_explicit = true;  // ibgda set on one rank, unset on the others: the fallback could differ
  EXPECT_EQ(ncclInvalidUsage, nccl_moe::agreeNetChoice(differ, &agreed));
  EXPECT_NE(std::string::npos, lastError().find("rank 0 has ibgda (unset), rank 2 has ibgda;")) << lastError();

  differ = same;
  differ[3].pure_rdma = true;
  EXPECT_EQ(ncclInvalidUsage, nccl_moe::agreeNetChoice(differ, &agreed));
  EXPECT_NE(std::string::npos, lastError().find("NCCL_MOE_NET_PURE_RDMA differs")) << lastError();
  EXPECT_NE(std::string::npos, lastError().find("rank 0 has 0, rank 3 has 1")) << lastError();
}

ScaleoutFacts twoNodes() {
  ScaleoutFacts f;
  f.num_ranks = 4;
  f.num_nodes = 2;
  f.nodes_text = "node 0: ranks 0 1; node 1: ranks 2 3";
  f.how_nodes = "nodes emulated by NCCL_MOE_EMULATE_NODES=2";
  return f;
}

TEST(NetChoice, OneNodeNeedsNoScaleout) {
  ScaleoutFacts f;
  f.num_ranks = 4;
  f.num_nodes = 1;
  f.one_process = false;
  f.one_device = false;
  ScaleoutPlan plan = ScaleoutPlan::kEmulated;
  for (NetKind k : {NetKind::kAuto, NetKind::kIb, NetKind::kEmulated}) {
    ASSERT_EQ(ncclSuccess, nccl_moe::decideScaleout(NetChoice{k, NetMode::kIbgda}, f, &plan));
    EXPECT_EQ(ScaleoutPlan::kNone, plan);
  }
}

// auto on one machine (nodes from host identities or NCCL_MOE_EMULATE_NODES): refused, naming the emulated NIC
// and ib (never the emulated NIC silently, never the NIC without being asked).
TEST(NetChoice, AutoOnOneMachineRefusesSeveralNodesNamingTheEmulatedNic) {
  ScaleoutPlan plan = ScaleoutPlan::kEmulated;
  EXPECT_EQ(ncclInvalidUsage, nccl_moe::decideScaleout(NetChoice{NetKind::kAuto, NetMode::kIbgda}, twoNodes(), &plan));
  EXPECT_EQ(ScaleoutPlan::kNone, plan);
  const std::string msg = lastError();
  EXPECT_NE(std::string::npos, msg.find("the 4 ranks form 2 nodes (node 0: ranks 0 1; node 1: ranks 2 3")) << msg;
  EXPECT_NE(std::string::npos, msg.find("scale-out")) << msg;
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_NET=auto")) << msg;
  EXPECT_NE(std::string::npos, msg.find("verbs")) << msg;
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_NET=emulated")) << msg;
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_NET=ib")) << msg;
}

// ib on several nodes, and auto across machines: the verbs backend, in ibgda or dbproxy mode (whether this host can
// run it is found when it is built). The request proxy over verbs QPs is refused by name.
TEST(NetChoice, IbAndAutoAcrossMachinesPickTheVerbsBackendInIbgdaOrDoorbellProxyMode) {
  ScaleoutFacts machines = twoNodes();
  machines.one_machine = false;
  machines.one_device = false;
  machines.one_process = false;
  const struct {
    NetKind kind;
    const ScaleoutFacts facts;
  } rows[] = {{NetKind::kIb, twoNodes()}, {NetKind::kIb, machines}, {NetKind::kAuto, machines}};
  for (const auto& row : rows) {
    ScaleoutPlan plan = ScaleoutPlan::kNone;
    ASSERT_EQ(ncclSuccess, nccl_moe::decideScaleout(NetChoice{row.kind, NetMode::kIbgda}, row.facts, &plan))
        << lastError();
    EXPECT_EQ(ScaleoutPlan::kVerbs, plan) << nccl_moe::netKindName(row.kind);
    plan = ScaleoutPlan::kNone;
    ASSERT_EQ(ncclSuccess, nccl_moe::decideScaleout(NetChoice{row.kind, NetMode::kDbProxy, true}, row.facts, &plan))
        << lastError();
    EXPECT_EQ(ScaleoutPlan::kVerbs, plan) << nccl_moe::netKindName(row.kind);
    plan = ScaleoutPlan::kVerbs;
    EXPECT_EQ(ncclInvalidUsage, nccl_moe::decideScaleout(NetChoice{row.kind, NetMode::kProxy}, row.facts, &plan));
    EXPECT_EQ(ScaleoutPlan::kNone, plan);
    EXPECT_NE(std::string::npos, lastError().find("NCCL_MOE_NET_MODE=proxy")) << lastError();
    EXPECT_NE(std::string::npos, lastError().find("use NCCL_MOE_NET_MODE=ibgda or dbproxy")) << lastError();
  }
}

TEST(NetChoice, EmulatedServesOneGpuInOneOrSeveralProcesses) {
  const NetChoice emu{NetKind::kEmulated, NetMode::kIbgda};
  ScaleoutPlan plan = ScaleoutPlan::kNone;
  ASSERT_EQ(ncclSuccess, nccl_moe::decideScaleout(emu, twoNodes(), &plan));
  EXPECT_EQ(ScaleoutPlan::kEmulated, plan);

  // Processes on one GPU: the software NIC reaches the other processes' buffers through CUDA IPC.
  ScaleoutFacts procs = twoNodes();
  procs.one_process = false;
  plan = ScaleoutPlan::kNone;
  ASSERT_EQ(ncclSuccess, nccl_moe::decideScaleout(NetChoice{NetKind::kEmulated, NetMode::kProxy}, procs, &plan));
  EXPECT_EQ(ScaleoutPlan::kEmulated, plan);

  ScaleoutFacts gpus = twoNodes();
  gpus.one_device = false;
  EXPECT_EQ(ncclInvalidUsage, nccl_moe::decideScaleout(emu, gpus, &plan));
  EXPECT_EQ(ScaleoutPlan::kNone, plan);
  EXPECT_NE(std::string::npos, lastError().find("one GPU")) << lastError();
  EXPECT_NE(std::string::npos, lastError().find("form 2 nodes")) << lastError();
}

}  // namespace
