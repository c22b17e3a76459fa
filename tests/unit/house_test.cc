// The pieces of communicator setup that need no GPU: the node map from host identities or NCCL_MOE_EMULATE_NODES
// (and the refusals of emulation it cannot honour), the process token, the host identity's precedence
// (NCCL_MOE_HOSTID, NCCL_HOSTID, host name), the transport chosen per peer, and the in-process bootstrap
// of ncclMoeCommInitAll worlds (all-gather, agreement, bounded waits, deferred retirement).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/bootstrap.h"
#include "core/comm.h"
#include "core/error.h"
#include "core/node_map.h"
#include "harness/scoped_env.h"
#include "transport/transport.h"

namespace nccl_moe {
namespace {

TEST(NodeMap, RanksWithOneHostIdentityFormANodeInRankOrder) {
  const NodeMap m = buildNodeMap({7, 7, 9, 7, 9, 5});
  EXPECT_EQ(3, m.num_nodes);
  EXPECT_EQ((std::vector<int>{0, 0, 1, 0, 1, 2}), m.node_of);
  EXPECT_EQ((std::vector<int>{0, 1, 0, 2, 1, 0}), m.local_of);
  EXPECT_EQ((std::vector<int>{0, 1, 3}), m.ranks_of[0]);
  EXPECT_EQ((std::vector<int>{2, 4}), m.ranks_of[1]);
  EXPECT_EQ(3, m.maxRanksPerNode());
  EXPECT_EQ("node 0: ranks 0 1 3; node 1: ranks 2 4; node 2: ranks 5", m.describe());
  EXPECT_EQ("node 0: ranks 0-3", buildNodeMap({1, 1, 1, 1}).describe());
}

TEST(NodeMap, TransportPerPeerFollowsTheNodes) {
  const NodeMap m = buildNodeMap({1, 1, 2, 2});
  EXPECT_EQ((std::vector<Transport>{Transport::kSelf, Transport::kNvlink, Transport::kRdma, Transport::kRdma}),
            choosePeerTransports(m, 0));
  EXPECT_EQ((std::vector<Transport>{Transport::kRdma, Transport::kRdma, Transport::kNvlink, Transport::kSelf}),
            choosePeerTransports(m, 3));
  EXPECT_STREQ("nvlink", transportName(Transport::kNvlink));
}

TEST(NodeMap, EmulatedNodesAreConsecutiveRankGroups) {
  const NodeMap m = buildEmulatedNodeMap(8, 2);
  EXPECT_EQ(2, m.num_nodes);
  EXPECT_EQ(2, m.emulated_nodes);
  EXPECT_EQ((std::vector<int>{0, 0, 0, 0, 1, 1, 1, 1}), m.node_of);
  EXPECT_EQ((std::vector<int>{0, 1, 2, 3, 0, 1, 2, 3}), m.local_of);
  EXPECT_EQ("node 0: ranks 0-3; node 1: ranks 4-7", m.describe());
  EXPECT_EQ(4, m.maxRanksPerNode());
  // 2 x 2: rank 1 reaches rank 0 over NVLink, the other node only through RDMA.
  EXPECT_EQ((std::vector<Transport>{Transport::kNvlink, Transport::kSelf, Transport::kRdma, Transport::kRdma}),
            choosePeerTransports(buildEmulatedNodeMap(4, 2), 1));
  const NodeMap each = buildEmulatedNodeMap(4, 4);  // 4 x 1: every rank a node
  EXPECT_EQ((std::vector<int>{0, 1, 2, 3}), each.node_of);
  EXPECT_EQ((std::vector<int>{0, 0, 0, 0}), each.local_of);
  EXPECT_EQ(1, buildEmulatedNodeMap(4, 1).num_nodes);
  EXPECT_EQ(0, buildNodeMap({1, 1}).emulated_nodes);
}

// R ranks as init publishes them: host identities, one process token per rank, NCCL_MOE_EMULATE_NODES.
std::vector<NodeIdentity> identities(const std::vector<uint64_t>& hosts, const std::vector<uint64_t>& processes,
                                     int64_t emulate_nodes) {
  std::vector<NodeIdentity> ids;
  for (size_t r = 0; r < hosts.size(); ++r) ids.push_back({hosts[r], processes[r], emulate_nodes});
  return ids;
}

TEST(NodeMap, ChooseNodeMapFollowsHostIdentitiesUnlessEmulationIsAsked) {
  NodeMap m;
  // Not set: the host identities decide, whatever the processes.
  ASSERT_EQ(ncclSuccess, chooseNodeMap(identities({5, 5, 6, 6}, {1, 1, 2, 2}, 0), &m));
  EXPECT_EQ(2, m.num_nodes);
  EXPECT_EQ(0, m.emulated_nodes);
  ASSERT_EQ(ncclSuccess, chooseNodeMap(identities({5, 5, 5, 5}, {1, 1, 1, 1}, 0), &m));
  EXPECT_EQ(1, m.num_nodes);
  // One process, NCCL_MOE_EMULATE_NODES=2: consecutive groups (the host identity, equal on every thread, is not
  // consulted).
  ASSERT_EQ(ncclSuccess, chooseNodeMap(identities({5, 5, 5, 5}, {7, 7, 7, 7}, 2), &m));
  EXPECT_EQ(2, m.num_nodes);
  EXPECT_EQ(2, m.emulated_nodes);
  EXPECT_EQ((std::vector<int>{0, 0, 1, 1}), m.node_of);
  EXPECT_EQ("node 0: ranks 0 1; node 1: ranks 2 3", m.describe());
  ASSERT_EQ(ncclSuccess, chooseNodeMap(identities({5, 5, 5, 5}, {7, 7, 7, 7}, 4), &m));
  EXPECT_EQ(4, m.num_nodes);
  ASSERT_EQ(ncclSuccess, chooseNodeMap(identities({5, 5, 5, 5}, {7, 7, 7, 7}, 1), &m));
  EXPECT_EQ(1, m.num_nodes);
  ASSERT_EQ(ncclSuccess, chooseNodeMap(identities({5}, {7}, 1), &m));
  EXPECT_EQ(1, m.num_nodes);
}

TEST(NodeMap, ChooseNodeMapRefusesEmulationItCannotHonour) {
  NodeMap m;
  // R % n != 0.
  EXPECT_EQ(ncclInvalidArgument, chooseNodeMap(identities({5, 5, 5, 5}, {7, 7, 7, 7}, 3), &m));
  std::string msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_EMULATE_NODES=3")) << msg;
  EXPECT_NE(std::string::npos, msg.find("the 4 ranks")) << msg;
  EXPECT_NE(std::string::npos, msg.find("multiple")) << msg;
  EXPECT_EQ(ncclInvalidArgument, chooseNodeMap(identities({5, 5}, {7, 7}, 4), &m));  // more nodes than ranks
  // Negative.
  EXPECT_EQ(ncclInvalidArgument, chooseNodeMap(identities({5, 5}, {7, 7}, -2), &m));
  msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_EMULATE_NODES=-2")) << msg;
  // Several processes: per-process NCCL_HOSTID is the way there.
  EXPECT_EQ(ncclInvalidUsage, chooseNodeMap(identities({5, 5, 5, 5}, {7, 7, 8, 8}, 2), &m));
  msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("live in 2 processes")) << msg;
  EXPECT_NE(std::string::npos, msg.find("NCCL_HOSTID")) << msg;
  // Ranks that read different values.
  std::vector<NodeIdentity> ids = identities({5, 5, 5, 5}, {7, 7, 7, 7}, 2);
  ids[3].emulate_nodes = 0;
  EXPECT_EQ(ncclInvalidUsage, chooseNodeMap(ids, &m));
  msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("rank 0 has 2, rank 3 has 0")) << msg;
}

TEST(NodeMap, ProcessTokenIsOnePerProcess) {
  const uint64_t mine = processToken();
  uint64_t other_thread = 0;
  std::thread([&] { other_thread = processToken(); }).join();
  EXPECT_EQ(mine, other_thread) << "threads of one process share it";
  int fds[2];
  ASSERT_EQ(0, pipe(fds));
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // the child inherits the parent's seed, not its pid
    const uint64_t token = processToken();
    _exit(write(fds[1], &token, sizeof(token)) == sizeof(token) ? 0 : 1);
  }
  close(fds[1]);
  uint64_t child_token = mine;
  EXPECT_EQ(static_cast<ssize_t>(sizeof(child_token)), read(fds[0], &child_token, sizeof(child_token)));
  close(fds[0]);
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_NE(mine, child_token) << "a forked child is another process";
}

TEST(NodeMap, HostIdentityPrefersNcclMoeHostidThenNcclHostidThenTheHost) {
  harness::ScopedEnv g1("NCCL_MOE_HOSTID"), g2("NCCL_HOSTID");
  setenv("NCCL_MOE_HOSTID", "moe-node", 1);
  setenv("NCCL_HOSTID", "nccl-node", 1);
  EXPECT_EQ("NCCL_MOE_HOSTID=moe-node", hostIdentityText());
  const uint64_t moe = hostIdentityHash();
  setenv("NCCL_MOE_HOSTID", "", 1);  // set but empty: NCCL's own identity
  EXPECT_EQ("NCCL_HOSTID=nccl-node", hostIdentityText());
  EXPECT_NE(moe, hostIdentityHash());
  unsetenv("NCCL_HOSTID");
  EXPECT_EQ(0u, hostIdentityText().rfind("host name ", 0)) << hostIdentityText();
  setenv("NCCL_MOE_HOSTID", "moe-node", 1);
  EXPECT_EQ(moe, hostIdentityHash()) << "the identity is a function of the text";
}

// Runs fn(rank, bootstrap) on one thread per rank of an in-process world.
template <typename Fn>
void runWorld(int n, unsigned long long timeout_ns, Fn fn) {
  std::vector<std::unique_ptr<Bootstrap>> b(n);
  ASSERT_EQ(ncclSuccess, makeWorldBootstraps(n, timeout_ns, b.data()));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) threads.emplace_back([&, r] { fn(r, *b[r]); });
  for (auto& t : threads) t.join();
}

TEST(WorldBootstrap, AllGatherAndAgreementAcrossRankThreads) {
  const int n = 5;
  runWorld(n, 10000000000ull, [&](int r, Bootstrap& b) {
    EXPECT_EQ(r, b.rank());
    EXPECT_EQ(n, b.size());
    for (int round = 0; round < 50; ++round) {  // repeated rounds reuse the slots safely
      const long long mine[2] = {r * 1000 + round, -r};
      std::vector<long long> all(2 * n);
      ASSERT_EQ(ncclSuccess, b.allGather(mine, all.data(), sizeof(mine)));
      for (int s = 0; s < n; ++s) {
        ASSERT_EQ(s * 1000 + round, all[2 * s]);
        ASSERT_EQ(-s, all[2 * s + 1]);
      }
      bool any = true;
      ASSERT_EQ(ncclSuccess, b.agree(round % 7 == 3 && r == 2, &any));
      EXPECT_EQ(round % 7 == 3, any) << "round " << round;
    }
    EXPECT_EQ(ncclSuccess, b.barrier());
  });
}

TEST(WorldBootstrap, ARankThatNeverArrivesFailsTheOthersWithinTheTimeout) {
  const auto start = std::chrono::steady_clock::now();
  std::vector<ncclResult_t> res(3, ncclSuccess);
  runWorld(3, 300000000ull, [&](int r, Bootstrap& b) {
    if (r == 2) return;  // never enters the exchange
    int mine = r, all[3];
    res[r] = b.allGather(&mine, all, sizeof(int));
    EXPECT_NE(std::string::npos, std::string(threadLastError()).find("gave up")) << threadLastError();
  });
  EXPECT_EQ(ncclSystemError, res[0]);
  EXPECT_EQ(ncclSystemError, res[1]);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
}

TEST(WorldBootstrap, RetiredCommunicatorsAreReleasedWithTheLastOne) {
  const int n = 3;
  std::vector<std::unique_ptr<Bootstrap>> b(n);
  ASSERT_EQ(ncclSuccess, makeWorldBootstraps(n, 1000000000ull, b.data()));
  // Communicators without resources (no GPU here): retiring them must only free the host objects, at the end.
  std::vector<ncclMoeComm*> comms(n);
  for (int r = 0; r < n; ++r) {
    comms[r] = new ncclMoeComm();
    comms[r]->bootstrap = std::move(b[r]);
  }
  Bootstrap* last = comms[2]->bootstrap.get();
  EXPECT_EQ(ncclSuccess, comms[0]->bootstrap->retire(comms[0]));
  EXPECT_EQ(ncclSuccess, comms[1]->bootstrap->retire(comms[1]));
  EXPECT_EQ(ncclSuccess, last->retire(comms[2]));  // releases and deletes all three (leak-checked by sanitizers)
}

// ncclMoeCommInitAll rejects its arguments before it touches CUDA (so also on a machine without a GPU).
TEST(CommInitAllArgs, RejectedBeforeAnyDeviceIsTouched) {
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = 16;
  config.hidden = 256;
  config.max_tokens_per_rank = 8;
  ncclMoeComm_t comms[2] = {reinterpret_cast<ncclMoeComm_t>(0x1), reinterpret_cast<ncclMoeComm_t>(0x1)};
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(nullptr, 2, nullptr, &config));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("comms is NULL"));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms, 0, nullptr, &config));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("num_ranks is 0"));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms, NCCL_MOE_MAX_RANKS + 1, nullptr, &config));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms, 2, nullptr, nullptr));
  EXPECT_EQ(nullptr, comms[0]) << "outputs are cleared once num_ranks is known";
  EXPECT_EQ(nullptr, comms[1]);
  ncclMoeConfig_t bad = config;
  bad.hidden = 100;
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms, 2, nullptr, &bad));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("config->hidden is 100"));
}

}  // namespace
}  // namespace nccl_moe
