// Which scale-out network a communicator uses, and whether it can have one: NCCL_MOE_NET and NCCL_MOE_NET_MODE
// (src/core/env.cc), read by every rank at init, published in the identity exchange and decided identically on
// every rank from the same table (src/core/comm.cc). Pure functions: tests/unit/net_choice_test.cc.
//
//   NCCL_MOE_NET       auto      the verbs backend (a real mlx5 NIC, src/transport/rdma/verbs/comm_transport.h) when
//                                the ranks span several machines; ranks of one machine split into nodes are refused
//                                (emulated is never chosen silently)
//                      ib        the verbs backend, asked for explicitly: also for nodes of one machine (the NIC in
//                                loopback: first bring-up)
//                      emulated  the software NIC (src/transport/emulated/): correctness only, never chosen
//                                silently; single-process worlds on one GPU only (the CUDA memory backend reaches
//                                device memory of this process; ranks in other processes need an IPC backend)
//   NCCL_MOE_NET_MODE  ibgda     the GPU writes WQEs and rings the doorbell (src/transport/rdma/ibgda/)
//                      proxy     the GPU writes descriptors into a mapped ring, a CPU thread of the rank turns them
//                                into WQEs and rings the doorbells (src/transport/rdma/proxy/)
//                      dbproxy   as ibgda, but the GPU rings a mailbox in host memory and a CPU thread of the rank
//                                forwards it to the NIC's doorbell (src/transport/rdma/dbproxy/): for machines where
//                                the doorbell page cannot be mapped to the GPU. Unset on every rank, the verbs backend
//                                falls back to it on every rank when any rank cannot map its doorbell page (logged).
#pragma once

#include <nccl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe {

enum class NetKind : int32_t { kAuto = 0, kIb = 1, kEmulated = 2 };
enum class NetMode : int32_t { kIbgda = 0, kDbProxy = 1, kProxy = 2 };

const char* netKindName(NetKind kind);  // "auto", "ib", "emulated"
const char* netModeName(NetMode mode);  // "ibgda", "dbproxy", "proxy"

struct NetChoice {
  NetKind kind = NetKind::kAuto;
  NetMode mode = NetMode::kIbgda;
  bool mode_explicit = false;  // NCCL_MOE_NET_MODE was set (else ibgda with the automatic doorbell-proxy fallback)
  bool pure_rdma = false;      // NCCL_MOE_NET_PURE_RDMA: same-node peers through the NIC too (internode LL kernels)
};

// Parses the two variables' values (as read; "" = the default). Unknown values: ncclInvalidArgument naming the
// variable, the value and the accepted ones. The message goes to setLastError().
ncclResult_t parseNetChoice(const std::string& net, const std::string& mode, NetChoice* out);

// Every rank's choice (index = rank) must be the same, NCCL_MOE_NET_MODE set or unset alike (the automatic fallback
// applies only where no rank chose): else ncclInvalidUsage naming the first rank that differs from rank 0, both
// values and the variable. Every rank computes this from the same table, so every rank fails
// alike. `*agreed` = rank 0's choice.
ncclResult_t agreeNetChoice(const std::vector<NetChoice>& per_rank, NetChoice* agreed);

// What a communicator of several nodes gets.
enum class ScaleoutPlan : int { kNone = 0, kEmulated = 1, kVerbs = 2 };

// The facts the decision needs, identical on every rank.
struct ScaleoutFacts {
  int num_ranks = 0;
  int num_nodes = 1;
  std::string nodes_text;   // NodeMap::describe()
  std::string how_nodes;    // how the nodes were formed (for the message)
  bool one_process = true;  // every rank a thread of one process
  bool one_device = true;   // every rank on one physical GPU (same machine, same bus id), whatever the processes
  bool one_machine = true;  // every rank on one physical machine (machineHash), whatever NCCL_HOSTID says
};

// One node: kNone, success. Several nodes: kEmulated when NCCL_MOE_NET=emulated and every rank is on one GPU;
// kVerbs for ib, and for auto when the ranks span several machines, in mode ibgda or dbproxy; otherwise
// ncclInvalidUsage with a message that names the nodes and what is missing (emulated across GPUs; auto on one
// machine, naming NCCL_MOE_NET=emulated for one-host testing and ib for the NIC in loopback; the request proxy over
// verbs QPs, not built). Whether the verbs backend can run (rdma-core, an mlx5 NIC) is found when it is built, on every
// rank (setupScaleout). Messages start "ncclMoeCommInit: the R ranks form N nodes".
ncclResult_t decideScaleout(const NetChoice& net, const ScaleoutFacts& facts, ScaleoutPlan* plan);

}  // namespace nccl_moe
