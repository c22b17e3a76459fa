// Where a transport plugs in: every peer of a communicator gets a transport kind at init, from the node map.
//   self     the rank itself
//   nvlink   a rank of the same node: its buffer is mapped here (src/transport/nvlink/) and kernels store into it
//            over NVLink (or plainly, for a rank on the same GPU)
//   rdma     a rank of another node: reached only through the scale-out transport. The only backend so far is the
//            software NIC (NCCL_MOE_NET=emulated, ranks of one process on one GPU; src/transport/net_choice.h,
//            src/transport/emulated/comm_transport.h); other communicators with rdma peers are refused at init
//            with a message saying what is missing.
// The device side of each kind lives in DeviceComm (src/device/device_comm.h): nvlink peers in `scaleup`,
// rdma peers in `scaleout`.
#pragma once

#include <vector>

#include "core/node_map.h"

namespace nccl_moe {

enum class Transport : int { kSelf = 0, kNvlink = 1, kRdma = 2 };

const char* transportName(Transport t);

// The transport of every peer of `rank` (index = peer rank).
std::vector<Transport> choosePeerTransports(const NodeMap& nodes, int rank);

}  // namespace nccl_moe
