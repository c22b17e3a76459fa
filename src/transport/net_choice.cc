#include "transport/net_choice.h"

#include "core/error.h"

namespace nccl_moe {

const char* netKindName(NetKind kind) {
  switch (kind) {
    case NetKind::kAuto:
      return "auto";
    case NetKind::kIb:
      return "ib";
    case NetKind::kEmulated:
      return "emulated";
  }
  return "unknown";
}

const char* netModeName(NetMode mode) {
  switch (mode) {
    case NetMode::kIbgda:
      return "ibgda";
    case NetMode::kDbProxy:
      return "dbproxy";
    case NetMode::kProxy:
      return "proxy";
  }
  return "unknown";
}

ncclResult_t parseNetChoice(const std::string& net, const std::string& mode, NetChoice* out) {
  NetChoice c;
  if (net.empty() || net == "auto") {
    c.kind = NetKind::kAuto;
  } else if (net == "ib") {
    c.kind = NetKind::kIb;
  } else if (net == "emulated") {
    c.kind = NetKind::kEmulated;
  } else {
    return setLastError(ncclInvalidArgument, "NCCL_MOE_NET=\"%s\": expected auto, ib or emulated", net.c_str());
  }
  c.mode_explicit = !mode.empty();
  if (mode.empty() || mode == "ibgda") {
    c.mode = NetMode::kIbgda;
  } else if (mode == "proxy") {
    c.mode = NetMode::kProxy;
  } else if (mode == "dbproxy") {
    c.mode = NetMode::kDbProxy;
  } else {
    return setLastError(ncclInvalidArgument, "NCCL_MOE_NET_MODE=\"%s\": expected ibgda, dbproxy or proxy",
                        mode.c_str());
  }
  *out = c;
  return ncclSuccess;
}

ncclResult_t agreeNetChoice(const std::vector<NetChoice>& per_rank, NetChoice* agreed) {
  if (per_rank.empty()) return setLastError(ncclInternalError, "agreeNetChoice: no ranks");
  const NetChoice& ref = per_rank[0];
  for (size_t r = 1; r < per_rank.size(); ++r) {
    const NetChoice& c = per_rank[r];
    if (c.kind != ref.kind) {
      return setLastError(ncclInvalidUsage,
                          "ncclMoeCommInit: NCCL_MOE_NET differs between ranks: rank 0 has %s, rank %zu has %s; set "
                          "the same value on every rank",
                          netKindName(ref.kind), r, netKindName(c.kind));
    }
    if (c.pure_rdma != ref.pure_rdma) {
      return setLastError(ncclInvalidUsage,
                          "ncclMoeCommInit: NCCL_MOE_NET_PURE_RDMA differs between ranks: rank 0 has %d, rank %zu has "
                          "%d; set the same value on every rank",
                          ref.pure_rdma ? 1 : 0, r, c.pure_rdma ? 1 : 0);
    }
    if (c.mode != ref.mode || c.mode_explicit != ref.mode_explicit) {
      return setLastError(
          ncclInvalidUsage,
          "ncclMoeCommInit: NCCL_MOE_NET_MODE differs between ranks: rank 0 has %s%s, rank %zu has %s%s; "
          "set the same value on every rank (or leave it unset on every rank)",
          netModeName(ref.mode), ref.mode_explicit ? "" : " (unset)", r, netModeName(c.mode),
          c.mode_explicit ? "" : " (unset)");
    }
  }
  *agreed = ref;
  return ncclSuccess;
}

ncclResult_t decideScaleout(const NetChoice& net, const ScaleoutFacts& facts, ScaleoutPlan* plan) {
  *plan = ScaleoutPlan::kNone;
  if (facts.num_nodes <= 1) return ncclSuccess;
  const std::string head = "ncclMoeCommInit: the " + std::to_string(facts.num_ranks) + " ranks form " +
                           std::to_string(facts.num_nodes) + " nodes (" + facts.nodes_text + "; " + facts.how_nodes +
                           "). Ranks on other nodes need the scale-out (RDMA) transport";
  if (net.kind != NetKind::kEmulated) {
    if (net.kind == NetKind::kAuto && facts.one_machine) {
      return setLastError(
          ncclInvalidUsage,
          "%s: NCCL_MOE_NET=auto uses the verbs (InfiniBand/RoCE) backend only for ranks on several "
          "machines, and these share one; for testing on one host set NCCL_MOE_NET=emulated (software "
          "NIC, correctness only; ranks on one GPU, split by NCCL_MOE_EMULATE_NODES or NCCL_HOSTID), or "
          "NCCL_MOE_NET=ib to drive this machine's NIC in loopback",
          head.c_str());
    }
    if (net.mode == NetMode::kProxy) {
      return setLastError(ncclInvalidUsage,
                          "%s: NCCL_MOE_NET=%s with NCCL_MOE_NET_MODE=%s: the verbs backend builds GPU-driven QPs "
                          "only (the request proxy posts through the software NIC's queues, not through verbs QPs, "
                          "yet); use NCCL_MOE_NET_MODE=ibgda or dbproxy",
                          head.c_str(), netKindName(net.kind), netModeName(net.mode));
    }
    *plan = ScaleoutPlan::kVerbs;
    return ncclSuccess;
  }
  if (!facts.one_device) {
    return setLastError(ncclInvalidUsage,
                        "%s: NCCL_MOE_NET=emulated works for ranks on one GPU only (the software NIC's CUDA memory "
                        "backend reaches device memory of one GPU: of its own process, and of other processes "
                        "through CUDA IPC); put every rank on one device",
                        head.c_str());
  }
  *plan = ScaleoutPlan::kEmulated;
  return ncclSuccess;
}

}  // namespace nccl_moe
