// Virtual-node worlds of the internode GPU tests (ll_net_test.cc, ht_net_test.cc): all ranks are threads of this
// process on GPU 0 (ncclMoeCommInitAll), split into nodes by NCCL_MOE_EMULATE_NODES, with the software NIC as the
// scale-out transport (NCCL_MOE_NET=emulated) and its chaos mode on (NCCL_MOE_EMU_CHAOS: writes split and reordered,
// sources read late, QPs interleaved). The suites are parameterized by the shape (nodes x ranks per node) and the
// transport mode: ibgda (the kernels write WQEs), proxy (NCCL_MOE_NET_MODE=proxy: the kernels write descriptors
// into a ring, a CPU thread per rank posts the WQEs) or dbproxy (the kernels write WQEs and ring a mailbox a CPU
// thread per rank forwards to the NIC), names "2x2", "2x2_proxy", "2x2_dbproxy"; "2x2_pure" adds
// NCCL_MOE_NET_PURE_RDMA=1 (the LL kernels reach same-node ranks through the NIC too).
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
  const char* mode = nullptr;  // NCCL_MOE_NET_MODE (nullptr: unset, ibgda)
  bool pure_rdma = false;      // NCCL_MOE_NET_PURE_RDMA=1: same-node ranks through the NIC too (LL)
  int ranks() const { return nodes * per_node; }
  std::string name() const {
    return std::to_string(nodes) + "x" + std::to_string(per_node) + (mode != nullptr ? std::string("_") + mode : "") +
           (pure_rdma ? "_pure" : "");
  }
};
inline void PrintTo(const Shape& s, std::ostream* os) { *os << s.name(); }
inline std::string shapeName(const ::testing::TestParamInfo<Shape>& info) { return info.param.name(); }
// The shapes every internode suite is instantiated with: 2x1, 2x2, 4x1, 2x4 in modes ibgda and proxy, 2x1, 2x2 and
// 4x1 in mode dbproxy (the GPU side is ibgda's), and the shapes with several ranks per node in pure-RDMA mode (ibgda).
inline std::vector<Shape> shapes() {
  std::vector<Shape> out;
  for (const char* mode : {static_cast<const char*>(nullptr), "proxy"})
    for (const Shape& s : {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}, Shape{2, 4}})
      out.push_back(Shape{s.nodes, s.per_node, mode});
  for (const Shape& s : {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}}) out.push_back(Shape{s.nodes, s.per_node, "dbproxy"});
  out.push_back(Shape{2, 2, nullptr, true});
  out.push_back(Shape{2, 4, nullptr, true});
  return out;
}

// The environment of a virtual-node world of `s` with the software NIC, chaos on (chaos nullptr: off).
struct NetEnv {
  // NCCL_MOE_NET_TEST_CHAOS overrides the seed (0: chaos off), to tell a protocol failure from a chaos one.
  explicit NetEnv(const Shape& s, const char* chaos = "20261202")
      : nodes_text(std::to_string(s.nodes)),
        override_chaos(std::getenv("NCCL_MOE_NET_TEST_CHAOS") != nullptr ? std::getenv("NCCL_MOE_NET_TEST_CHAOS") : ""),
        net("NCCL_MOE_NET", "emulated"),
        mode("NCCL_MOE_NET_MODE", s.mode),
        emulate("NCCL_MOE_EMULATE_NODES", nodes_text.c_str()),
        chaos_env("NCCL_MOE_EMU_CHAOS", override_chaos.empty() ? chaos : override_chaos.c_str()),
        pure_rdma("NCCL_MOE_NET_PURE_RDMA", s.pure_rdma ? "1" : nullptr) {}
  std::string nodes_text, override_chaos;
  harness::ScopedEnv net, mode, emulate, chaos_env, pure_rdma;
};

// Why the shape's world cannot run on this machine ("" when it can): it needs GPU 0 with kMinSmsPerRank SMs per rank.
inline std::string cannotRun(const Shape& s) {
  if (gpu_test::gpuCount() < 1) return "needs a GPU";
  if (gpu_test::deviceSms(0) / s.ranks() < gpu_test::kMinSmsPerRank) return "too few SMs on GPU 0";
  return "";
}

}  // namespace net_test
