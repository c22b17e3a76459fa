// Virtual-node worlds of the internode GPU tests (ll_net_test.cc, ht_net_test.cc): all ranks are threads of this
// process on GPU 0 (ncclMoeCommInitAll), split into nodes by NCCL_MOE_EMULATE_NODES, with the software NIC as the
// scale-out transport (NCCL_MOE_NET=emulated) and its chaos mode on (NCCL_MOE_EMU_CHAOS: writes split and reordered,
// sources read late, QPs interleaved). The suites are parameterized by the shape (nodes x ranks per node).
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <ostream>
#include <string>
#include <vector>

#include "gpu_world.h"
#include "harness/scoped_env.h"

namespace net_test {

struct Shape {
  int nodes;
  int per_node;
  int ranks() const { return nodes * per_node; }
};
inline void PrintTo(const Shape& s, std::ostream* os) { *os << s.nodes << "x" << s.per_node; }
inline std::string shapeName(const ::testing::TestParamInfo<Shape>& info) {
  return std::to_string(info.param.nodes) + "x" + std::to_string(info.param.per_node);
}
// The shapes every internode suite is instantiated with.
inline std::vector<Shape> shapes() { return {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}, Shape{2, 4}}; }

// The environment of a virtual-node world of `s` with the software NIC, chaos on (chaos nullptr: off).
struct NetEnv {
  // NCCL_MOE_NET_TEST_CHAOS overrides the seed (0: chaos off), to tell a protocol failure from a chaos one.
  explicit NetEnv(const Shape& s, const char* chaos = "20261202")
      : nodes_text(std::to_string(s.nodes)),
        override_chaos(std::getenv("NCCL_MOE_NET_TEST_CHAOS") != nullptr ? std::getenv("NCCL_MOE_NET_TEST_CHAOS") : ""),
        net("NCCL_MOE_NET", "emulated"),
        mode("NCCL_MOE_NET_MODE", nullptr),
        emulate("NCCL_MOE_EMULATE_NODES", nodes_text.c_str()),
        chaos_env("NCCL_MOE_EMU_CHAOS", override_chaos.empty() ? chaos : override_chaos.c_str()) {}
  std::string nodes_text, override_chaos;
  harness::ScopedEnv net, mode, emulate, chaos_env;
};

// Why the shape's world cannot run on this machine ("" when it can): it needs GPU 0 with kMinSmsPerRank SMs per rank.
inline std::string cannotRun(const Shape& s) {
  if (gpu_test::gpuCount() < 1) return "needs a GPU";
  if (gpu_test::deviceSms(0) / s.ranks() < gpu_test::kMinSmsPerRank) return "too few SMs on GPU 0";
  return "";
}

}  // namespace net_test
