#include "core/node_map.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "core/env.h"

namespace nccl_moe {
namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string nonEmptyEnv(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}

}  // namespace

std::string hostIdentityText() {
  const std::string moe = envString("NCCL_MOE_HOSTID");
  if (!moe.empty()) return "NCCL_MOE_HOSTID=" + moe;
  const std::string nccl = nonEmptyEnv("NCCL_HOSTID");
  if (!nccl.empty()) return "NCCL_HOSTID=" + nccl;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  std::string boot_id;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  if (f) std::getline(f, boot_id);
  return std::string("host name ") + host + (boot_id.empty() ? "" : ", boot id " + boot_id);
}

uint64_t hostIdentityHash() { return fnv1a(hostIdentityText()); }

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

}  // namespace nccl_moe
