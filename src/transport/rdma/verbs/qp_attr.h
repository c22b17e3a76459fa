// The RC QP state machine as data: the (struct ibv_qp_attr, attr_mask) pairs that ibv_modify_qp takes for
// RESET -> INIT -> RTR -> RTS (and to RESET / ERR), built from one plain config, plus the service level and
// traffic class the QP sets use, resolved from the environment.
//
// Contract
//   - <infiniband/verbs.h> is included for its TYPES only. Nothing here calls an ibv_* function (the library will
//     reach libibverbs through dlopen); the verbs layer passes the result to ibv_modify_qp unchanged.
//   - Every entry point returns an ncclResult_t; on failure the message (naming the field or the variable) is
//     recorded with setLastError() (src/core/error.h). Nothing logs: callers log the resolved values at INFO.
//   - Attributes follow NCCL's ncclIbQpInit/Rtr/Rts (net_ib/connect.cc) with two differences: max_rd_atomic and
//     max_dest_rd_atomic come from the config (set them to the device maximum: every fetch-add is a read-like
//     request, and with 1 outstanding a QP serialises on one round trip per signal), and a QP is routed with a
//     GRH on RoCE always and on InfiniBand only when asked (across subnets).
//   - SL goes to ah_attr.sl (IB: the subnet manager maps it to a virtual lane; RoCE: the mlx5 driver uses
//     SL & 7 as the Ethernet priority), TC to ah_attr.grh.traffic_class (only with a GRH; RoCE v2 puts TC >> 2
//     in the DSCP field).
#pragma once

#include <infiniband/verbs.h>
#include <nccl.h>

#include <cstdint>
#include <functional>

namespace nccl_moe::verbs {

enum class LinkLayer : uint8_t { kInfiniBand, kEthernet };

// One side of an RC connection: the local port and the remote QP it is connected to.
struct QpConnectConfig {
  LinkLayer link_layer = LinkLayer::kInfiniBand;
  uint8_t port_num = 1;
  uint16_t pkey_index = 0;
  uint8_t gid_index = 0;            // source GID table index (used with a GRH)
  bool ib_use_grh = false;          // InfiniBand only: route with a GRH (RoCE always does)
  ibv_mtu path_mtu = IBV_MTU_4096;  // min of both ports' active MTU
  uint8_t sl = 0;                   // 0..15 (ServiceLevels below)
  uint8_t traffic_class = 0;        // 0..255
  uint8_t hop_limit = 255;
  uint8_t timeout = 20;             // local ACK timeout 4.096 us * 2^timeout, 0..31
  uint8_t retry_cnt = 7;            // 0..7
  uint8_t rnr_retry = 7;            // 0..7 (7 = retry forever)
  uint8_t min_rnr_timer = 12;       // 0..31
  uint8_t max_rd_atomic = 16;       // READ/atomic requests this QP keeps outstanding as requester, >= 1
  uint8_t max_dest_rd_atomic = 16;  // ... it accepts as responder, >= 1
  unsigned access_flags =           // what the remote QP may do to this side's windows through this QP
      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;
  uint32_t sq_psn = 0;  // this QP's first PSN (24 bits)
  // The remote QP (from its connection record).
  uint32_t remote_qpn = 0;      // 24 bits, not 0
  uint16_t remote_lid = 0;      // InfiniBand: the remote port's LID, not 0
  uint8_t remote_gid[16] = {};  // with a GRH: the remote GID (raw bytes of union ibv_gid), not all zero
  uint32_t rq_psn = 0;          // the remote QP's first PSN (its sq_psn), 24 bits
};

struct QpTransition {
  ibv_qp_attr attr;
  int attr_mask;
};

const char* qpStateName(ibv_qp_state state);

// The IB state machine for ibv_modify_qp (IB spec vol. 1, 10.3): RESET -> INIT -> RTR -> RTS, INIT -> INIT,
// RTS <-> SQD, SQE -> RTS, RTS -> RTS and SQD -> SQD (attribute changes), and any state -> RESET or ERR.
bool isLegalQpTransition(ibv_qp_state from, ibv_qp_state to);

// Checks the fields the transitions use (ranges, a remote address for the link layer).
ncclResult_t validateQpConfig(const QpConnectConfig& config);

// Attributes and mask for from -> to. Built: RESET -> INIT, INIT -> RTR, RTR -> RTS, and any -> RESET / ERR (state
// only). Other legal transitions are rejected as not used by this transport; illegal ones name both states.
ncclResult_t buildQpTransition(const QpConnectConfig& config, ibv_qp_state from, ibv_qp_state to, QpTransition* out);

// ---- Service level / traffic class of the QP sets ----

// Returns the value of an environment variable, or nullptr when it is unset. Empty values count as unset.
using EnvLookup = std::function<const char*(const char* name)>;
// The process environment (std::getenv).
const char* processEnvLookup(const char* name);

struct ServiceLevel {
  uint8_t sl = 0;
  uint8_t traffic_class = 0;
  const char* sl_source = "default";  // the variable that decided the SL, or "default"
  const char* tc_source = "default";
};
struct ServiceLevels {
  ServiceLevel general;      // every QP set except the low-latency one (high-throughput data + signals)
  ServiceLevel low_latency;  // the low-latency kernels' QP set
};

// general SL:     NCCL_MOE_IB_SL,    else NCCL_IB_SL, else 0        (0..15)
// general TC:     NCCL_MOE_IB_TC,    else NCCL_IB_TC, else 0        (0..255)
// low-latency SL: NCCL_MOE_IB_LL_SL, else the general SL
// low-latency TC: NCCL_MOE_IB_LL_TC, else the general TC
// Values are integers as NCCL reads its own parameters (strtoll base 0: decimal, 0x hex, leading-0 octal) with no
// trailing characters. The first set variable of each chain decides, and a malformed or out-of-range value there
// is an error naming the variable (a variable it overrides is not read).
ncclResult_t resolveServiceLevels(const EnvLookup& lookup, ServiceLevels* out);

}  // namespace nccl_moe::verbs
