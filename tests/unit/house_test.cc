// The pieces of communicator setup that need no GPU: the node map from host identities, the host identity's
// precedence (NCCL_MOE_HOSTID, NCCL_HOSTID, host name), the transport chosen per peer, and the in-process bootstrap
// of ncclMoeCommInitAll worlds (all-gather, agreement, bounded waits, deferred retirement).
#include <gtest/gtest.h>

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

// Restores an environment variable when the scope ends.
class EnvGuard {
 public:
  explicit EnvGuard(const char* name) : name_(name) {
    const char* v = std::getenv(name);
    had_ = v != nullptr;
    if (had_) value_ = v;
  }
  ~EnvGuard() {
    if (had_)
      setenv(name_, value_.c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string value_;
};

TEST(NodeMap, HostIdentityPrefersNcclMoeHostidThenNcclHostidThenTheHost) {
  EnvGuard g1("NCCL_MOE_HOSTID"), g2("NCCL_HOSTID");
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
