// Nodes of a communicator: ranks with the same host identity form a node. The host identity is computed the way
// NCCL does, with one more variable in front:
//   NCCL_MOE_HOSTID (when set and not empty), else NCCL_HOSTID (when set and not empty), else the host name and
//   the kernel's boot id.
// NCCL_MOE_HOSTID lets several processes on one GPU look like one node to NCCL-MoE while NCCL, which refuses two
// ranks on one GPU of one host, sees distinct hosts through their NCCL_HOSTID (../scripts/two-procs-one-gpu.sh).
//
// Emulated nodes: threads of one process share every host identity, so a single-process world (ncclMoeCommInitAll,
// or ncclMoeCommInit over an ncclCommInitAll communicator driven from threads) cannot be split by them.
// NCCL_MOE_EMULATE_NODES=n splits such a communicator's R ranks into n nodes of R / n consecutive ranks instead
// (R % n == 0). A communicator whose ranks live in several processes refuses the variable: there every process gets
// its own NCCL_HOSTID (and NCCL_MOE_HOSTID stays empty), as NCCL itself does.
#pragma once

#include <nccl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe {

// This process's host identity (hash of the string above).
uint64_t hostIdentityHash();
// The string it hashes (for messages): "NCCL_MOE_HOSTID=x", "NCCL_HOSTID=x" or "host name h".
std::string hostIdentityText();
// The machine this process runs on, whatever the variables say (host name and boot id): ranks with the same machine
// hash and PCI bus id share a physical GPU even when their host identities differ (processes on one GPU that NCCL
// sees as distinct hosts through their NCCL_HOSTID).
uint64_t machineHash();
// A random 64-bit value per process (another one in a child of fork()): two ranks have the same one exactly when
// they are threads of one process. Process ids alone repeat across containers of one host.
uint64_t processToken();

struct NodeMap {
  int num_nodes = 0;
  std::vector<int> node_of;                // [rank] node index (nodes numbered by their first rank)
  std::vector<int> local_of;               // [rank] index among the ranks of its node (rank order)
  std::vector<std::vector<int>> ranks_of;  // [node] its ranks, ascending
  int emulated_nodes = 0;                  // NCCL_MOE_EMULATE_NODES that formed the nodes; 0: host identities
  int maxRanksPerNode() const;
  // One line per node: "node 0: ranks 0-3" / "node 1: ranks 4 5 7".
  std::string describe() const;
};

// From every rank's host identity (index = rank).
NodeMap buildNodeMap(const std::vector<uint64_t>& host_of_rank);
// num_nodes nodes of num_ranks / num_nodes consecutive ranks (num_ranks % num_nodes == 0, checked by the caller).
NodeMap buildEmulatedNodeMap(int num_ranks, int num_nodes);

// What decides a rank's node, as that rank published it in init's identity exchange.
struct NodeIdentity {
  uint64_t host_hash = 0;      // hostIdentityHash()
  uint64_t process_token = 0;  // processToken()
  int64_t emulate_nodes = 0;   // NCCL_MOE_EMULATE_NODES as the rank read it (0: not set)
};

// The node map of a communicator from every rank's identity (index = rank). Every rank computes it from the same
// table, so every rank gets the same map or the same error:
//   NCCL_MOE_EMULATE_NODES 0 on every rank   ranks with one host identity form a node (buildNodeMap);
//   n >= 1, all ranks in one process          n nodes of consecutive ranks (buildEmulatedNodeMap);
//   else ncclInvalidUsage (the value differs between ranks, the ranks live in several processes) or
//   ncclInvalidArgument (n < 0, R % n != 0), with the message recorded by setLastError().
ncclResult_t chooseNodeMap(const std::vector<NodeIdentity>& ids, NodeMap* out);

}  // namespace nccl_moe
