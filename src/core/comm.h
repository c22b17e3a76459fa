// The host object behind ncclMoeComm_t. Owns the communication buffer, the peer mappings, the host-mapped
// error record and the bootstrap; hands kernels a DeviceComm (src/device/device_comm.h). Its fields change only
// in init/destroy (comm.cc) and in the host operations (src/ops/), never in kernel files.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/bootstrap.h"
#include "core/node_map.h"
#include "device/device_comm.h"
#include "mem/buffer_layout.h"
#include "nccl_moe.h"
#include "transport/emulated/comm_transport.h"
#include "transport/net_choice.h"
#include "transport/nvlink/peers.h"
#include "transport/scaleout_setup.h"
#include "transport/scaleout_table.h"
#include "transport/transport.h"

struct ncclMoeComm {
  int rank = -1;
  int num_ranks = 0;
  int device = -1;
  int num_device_sms = 0;  // multiprocessors of this rank's GPU
  // [rank] its index on this rank's node (the scaleup buffer index), -1 for a rank of another node; set at init
  // (the internode LL kernels take it per call).
  int16_t same_node_index[nccl_moe::kMaxRanks] = {};
  int ranks_on_device = 1;  // ranks of this communicator on this rank's GPU (same node, same bus id)
  int rank_sms = 0;         // SMs this rank's kernels may occupy at once: num_device_sms / ranks_on_device
  // An LL call with both phases runs as two kernels (send, then receive): set when ranks share the GPU or
  // NCCL_MOE_LL_SPLIT_LAUNCH=1 (src/ops/ll.cc).
  bool ll_split_launch = false;
  int ll_sms = 0;           // SMs of this rank's LL kernels: config.ll_num_sms capped at rank_sms (0 there: rank_sms)
  int default_num_sms = 0;  // HT SM budget when a call passes 0
  ncclMoeConfig_t config{};
  nccl_moe::LayoutParams params{};
  nccl_moe::BufferLayout layout{};
  nccl_moe::NodeMap nodes;                         // node and local index of every rank
  std::vector<nccl_moe::Transport> transport;      // [peer] chosen at init (src/transport/transport.h)
  std::unique_ptr<nccl_moe::Bootstrap> bootstrap;  // the collective steps of init and destroy
  nccl_moe::NetChoice net;                         // NCCL_MOE_NET / NCCL_MOE_NET_MODE, agreed by every rank
  nccl_moe::ScaleoutPlan scaleout_plan = nccl_moe::ScaleoutPlan::kNone;  // decided at init from the above
  // Multi-node communicators: the scale-out transport of this rank (NCCL_MOE_NET=emulated: the software NIC,
  // emulated::CommTransport; ib, or auto across machines: the verbs backend, verbs::CommTransport); null for one
  // node. Released before the buffer (its windows cover it).
  std::unique_ptr<nccl_moe::ScaleoutTransport> net_transport;

  uint8_t* buffer = nullptr;  // this rank's communication buffer
  nccl_moe::NvlinkPeers nvl;  // the own node's buffers as mapped here, by local index

  nccl_moe::ErrorRecord* host_error = nullptr;  // host-mapped error record: host view
  nccl_moe::ErrorRecord* dev_error = nullptr;   //                           device view
  int* rank_mask = nullptr;     // config.enable_rank_masks: [num_ranks] int32 device memory, 1 = masked; else null
  int* host_scratch = nullptr;  // host-mapped ints the notify kernel publishes counts into
  int* dev_scratch = nullptr;
  int host_scratch_ints = 0;

  uint64_t timeout_ns = 0;
  // Operation state (changed by src/ops/ only):
  int ll_next_half = 0;  // LL double buffering: which half the next LL dispatch uses
  int ht_host_seq = 0;   // HT host-count notify: sequence the kernel publishes in host_scratch[0]
  unsigned long long* ll_dispatch_trace = nullptr;  // diagnostics only: see src/kernels/low_latency/trace.h

  std::mutex error_mutex;
  std::string last_error;  // last failure of a call on this communicator
  std::atomic<bool> failed{false};

  int node() const { return nodes.node_of[rank]; }
  int localRank() const { return nodes.local_of[rank]; }
  nccl_moe::DeviceComm deviceComm() const {
    nccl_moe::DeviceComm d{};
    d.rank = rank;
    d.num_ranks = num_ranks;
    d.scaleup.local_rank = localRank();
    d.scaleup.num_local_ranks = nvl.num_local;
    for (int i = 0; i < nccl_moe::kMaxNvlPeers; ++i) d.scaleup.buffer[i] = nvl.buffer[i];
    d.scaleout.node = node();
    d.scaleout.num_nodes = nodes.num_nodes;
    d.scaleout.peers = net_transport ? net_transport->deviceTable() : nullptr;
    d.error = dev_error;
    d.timeout_ns = timeout_ns;
    d.rank_mask = rank_mask;
    return d;
  }
};

namespace nccl_moe {

// Collective init of one rank over `bootstrap` on `device`; on failure the caller releases with
// releaseCommResources() and deletes the comm. `args_status` is the caller's check of the arguments: when it failed
// (its message in the thread's last error), this rank still joins the identity exchange with that status, so the
// other ranks fail too instead of waiting. `net_override` (tests): this rank's network choice instead of
// NCCL_MOE_NET / NCCL_MOE_NET_MODE, so that threads of one process can disagree.
ncclResult_t commInit(ncclMoeComm* comm, std::unique_ptr<Bootstrap> bootstrap, int device,
                      const ncclMoeConfig_t& config, ncclResult_t args_status, const NetChoice* net_override = nullptr);
// Waits for this rank's device work, then retires the comm through its bootstrap (collective or deferred, see
// Bootstrap::retire). Deletes `comm`.
ncclResult_t commDestroy(ncclMoeComm* comm);
void releaseCommResources(ncclMoeComm* comm);

// Checks the host-mapped error record; if a device wait failed, formats "phase X: rank r waited for peer p,
// counter c (expected e)" ("... for a block of its own" when the wait was local) into the comm's last error and
// returns the matching error.
ncclResult_t checkAsyncError(ncclMoeComm* comm);
// Waits (bounded by comm->timeout_ns) until *flag >= target, polling host-mapped memory.
ncclResult_t hostWaitGeq(ncclMoeComm* comm, const volatile int* flag, int target, const char* what);

}  // namespace nccl_moe
