// Nodes of a communicator: ranks with the same host identity form a node. The host identity is computed the way
// NCCL does, with one more variable in front:
//   NCCL_MOE_HOSTID (when set and not empty), else NCCL_HOSTID (when set and not empty), else the host name and
//   the kernel's boot id.
// NCCL_MOE_HOSTID lets several processes on one GPU look like one node to NCCL-MoE while NCCL, which refuses two
// ranks on one GPU of one host, sees distinct hosts through their NCCL_HOSTID (../scripts/two-procs-one-gpu.sh).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe {

// This process's host identity (hash of the string above).
uint64_t hostIdentityHash();
// The string it hashes (for messages): "NCCL_MOE_HOSTID=x", "NCCL_HOSTID=x" or "host name h".
std::string hostIdentityText();

struct NodeMap {
  int num_nodes = 0;
  std::vector<int> node_of;                // [rank] node index (nodes numbered by their first rank)
  std::vector<int> local_of;               // [rank] index among the ranks of its node (rank order)
  std::vector<std::vector<int>> ranks_of;  // [node] its ranks, ascending
  int maxRanksPerNode() const;
  // One line per node: "node 0: ranks 0-3" / "node 1: ranks 4 5 7".
  std::string describe() const;
};

// From every rank's host identity (index = rank).
NodeMap buildNodeMap(const std::vector<uint64_t>& host_of_rank);

}  // namespace nccl_moe
