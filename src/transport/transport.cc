#include "transport/transport.h"

namespace nccl_moe {

const char* transportName(Transport t) {
  switch (t) {
    case Transport::kSelf:
      return "self";
    case Transport::kNvlink:
      return "nvlink";
    case Transport::kRdma:
      return "rdma";
  }
  return "unknown";
}

std::vector<Transport> choosePeerTransports(const NodeMap& nodes, int rank) {
  std::vector<Transport> t(nodes.node_of.size(), Transport::kRdma);
  for (size_t p = 0; p < t.size(); ++p) {
    if (static_cast<int>(p) == rank)
      t[p] = Transport::kSelf;
    else if (nodes.node_of[p] == nodes.node_of[rank])
      t[p] = Transport::kNvlink;
  }
  return t;
}

}  // namespace nccl_moe
