#include "core/node_map.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <set>

#include "core/env.h"
#include "core/error.h"

namespace nccl_moe {
namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Drawn once per process image: the OS's random source, with the clock and an address in case it is unavailable.
uint64_t processSeed() {
  uint64_t seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  seed ^= static_cast<uint64_t>(reinterpret_cast<uintptr_t>(&seed));
  try {
    std::random_device rd;
    seed ^= (static_cast<uint64_t>(rd()) << 32) | rd();
  } catch (...) {
  }
  return seed;
}

std::string nonEmptyEnv(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}

}  // namespace

std::string machineText() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  std::string boot_id;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  if (f) std::getline(f, boot_id);
  return std::string("host name ") + host + (boot_id.empty() ? "" : ", boot id " + boot_id);
}

std::string hostIdentityText() {
  const std::string moe = envString("NCCL_MOE_HOSTID");
  if (!moe.empty()) return "NCCL_MOE_HOSTID=" + moe;
  const std::string nccl = nonEmptyEnv("NCCL_HOSTID");
  if (!nccl.empty()) return "NCCL_HOSTID=" + nccl;
  return machineText();
}

uint64_t hostIdentityHash() { return fnv1a(hostIdentityText()); }
uint64_t machineHash() { return fnv1a(machineText()); }

uint64_t processToken() {
  // A child of fork() inherits the seed but not the pid.
  static const uint64_t seed = processSeed();
  return splitmix64(seed ^ splitmix64(static_cast<uint64_t>(getpid())));
}

int NodeMap::maxRanksPerNode() const {
  size_t m = 0;
  for (const auto& r : ranks_of) m = r.size() > m ? r.size() : m;
  return static_cast<int>(m);
}

std::string NodeMap::describe() const {
  std::string out;
  for (int n = 0; n < num_nodes; ++n) {
    const std::vector<int>& r = ranks_of[n];
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%snode %d: ranks", n > 0 ? "; " : "", n);
    out += buf;
    const bool contiguous = !r.empty() && r.back() - r.front() + 1 == static_cast<int>(r.size());
    if (contiguous && r.size() > 2) {
      std::snprintf(buf, sizeof(buf), " %d-%d", r.front(), r.back());
      out += buf;
    } else {
      for (int x : r) out += " " + std::to_string(x);
    }
  }
  return out;
}

NodeMap buildNodeMap(const std::vector<uint64_t>& host_of_rank) {
  NodeMap m;
  std::vector<uint64_t> hosts;  // [node] identity
  for (size_t r = 0; r < host_of_rank.size(); ++r) {
    int node = -1;
    for (size_t n = 0; n < hosts.size(); ++n)
      if (hosts[n] == host_of_rank[r]) node = static_cast<int>(n);
    if (node < 0) {
      node = static_cast<int>(hosts.size());
      hosts.push_back(host_of_rank[r]);
      m.ranks_of.emplace_back();
    }
    m.node_of.push_back(node);
    m.local_of.push_back(static_cast<int>(m.ranks_of[node].size()));
    m.ranks_of[node].push_back(static_cast<int>(r));
  }
  m.num_nodes = static_cast<int>(hosts.size());
  return m;
}

NodeMap buildEmulatedNodeMap(int num_ranks, int num_nodes) {
  NodeMap m;
  const int per_node = num_ranks / num_nodes;
  m.num_nodes = num_nodes;
  m.emulated_nodes = num_nodes;
  m.ranks_of.resize(num_nodes);
  for (int r = 0; r < num_ranks; ++r) {
    m.node_of.push_back(r / per_node);
    m.local_of.push_back(r % per_node);
    m.ranks_of[r / per_node].push_back(r);
  }
  return m;
}

ncclResult_t chooseNodeMap(const std::vector<NodeIdentity>& ids, NodeMap* out) {
  const int num_ranks = static_cast<int>(ids.size());
  const long long n = ids.empty() ? 0 : ids[0].emulate_nodes;
  for (int r = 1; r < num_ranks; ++r) {
    if (ids[r].emulate_nodes != n) {
      return setLastError(ncclInvalidUsage,
                          "ncclMoeCommInit: NCCL_MOE_EMULATE_NODES differs between ranks: rank 0 has %lld, rank %d "
                          "has %lld (0: not set); set it alike for every rank",
                          n, r, static_cast<long long>(ids[r].emulate_nodes));
    }
  }
  if (n == 0) {
    std::vector<uint64_t> hosts;
    for (const NodeIdentity& id : ids) hosts.push_back(id.host_hash);
    *out = buildNodeMap(hosts);
    return ncclSuccess;
  }
  if (n < 0) {
    return setLastError(ncclInvalidArgument,
                        "ncclMoeCommInit: NCCL_MOE_EMULATE_NODES=%lld; expected a number of nodes >= 1 (0 or unset: "
                        "nodes from the host identity)",
                        n);
  }
  std::set<uint64_t> processes;
  for (const NodeIdentity& id : ids) processes.insert(id.process_token);
  if (processes.size() > 1) {
    return setLastError(ncclInvalidUsage,
                        "ncclMoeCommInit: NCCL_MOE_EMULATE_NODES=%lld splits the ranks of one process into nodes, but "
                        "the %d ranks of this communicator live in %zu processes; to make nodes of processes, give "
                        "each process its own NCCL_HOSTID, leave NCCL_MOE_HOSTID empty and NCCL_MOE_EMULATE_NODES "
                        "unset",
                        n, num_ranks, processes.size());
  }
  if (num_ranks % n != 0) {
    return setLastError(ncclInvalidArgument,
                        "ncclMoeCommInit: NCCL_MOE_EMULATE_NODES=%lld does not split the %d ranks of this "
                        "communicator into nodes of equal size (the rank count must be a multiple of it)",
                        n, num_ranks);
  }
  *out = buildEmulatedNodeMap(num_ranks, static_cast<int>(n));
  return ncclSuccess;
}

}  // namespace nccl_moe
