#include "transport/rdma/verbs/qp_attr.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace nccl_moe::verbs {

namespace {

constexpr uint32_t kMax24 = 0xffffff;

bool allZero(const uint8_t* bytes, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (bytes[i] != 0) return false;
  return true;
}

bool usesGrh(const QpConnectConfig& c) { return c.link_layer == LinkLayer::kEthernet || c.ib_use_grh; }

}  // namespace

const char* qpStateName(ibv_qp_state state) {
  switch (state) {
    case IBV_QPS_RESET:
      return "RESET";
    case IBV_QPS_INIT:
      return "INIT";
    case IBV_QPS_RTR:
      return "RTR";
    case IBV_QPS_RTS:
      return "RTS";
    case IBV_QPS_SQD:
      return "SQD";
    case IBV_QPS_SQE:
      return "SQE";
    case IBV_QPS_ERR:
      return "ERR";
    default:
      return "UNKNOWN";
  }
}

bool isLegalQpTransition(ibv_qp_state from, ibv_qp_state to) {
  switch (from) {
    case IBV_QPS_RESET:
    case IBV_QPS_INIT:
    case IBV_QPS_RTR:
    case IBV_QPS_RTS:
    case IBV_QPS_SQD:
    case IBV_QPS_SQE:
    case IBV_QPS_ERR:
      break;
    default:
      return false;  // IBV_QPS_UNKNOWN or garbage
  }
  if (to == IBV_QPS_RESET || to == IBV_QPS_ERR) return true;
  switch (from) {
    case IBV_QPS_RESET:
      return to == IBV_QPS_INIT;
    case IBV_QPS_INIT:
      return to == IBV_QPS_INIT || to == IBV_QPS_RTR;
    case IBV_QPS_RTR:
      return to == IBV_QPS_RTS;
    case IBV_QPS_RTS:
      return to == IBV_QPS_RTS || to == IBV_QPS_SQD;
    case IBV_QPS_SQD:
      return to == IBV_QPS_SQD || to == IBV_QPS_RTS;
    case IBV_QPS_SQE:
      return to == IBV_QPS_RTS;
    default:
      return false;
  }
}

ncclResult_t validateQpConfig(const QpConnectConfig& c) {
  const char* what = "QP config";
  if (c.port_num == 0) return setLastError(ncclInvalidArgument, "%s: port_num 0 (ports count from 1)", what);
  if (c.path_mtu < IBV_MTU_256 || c.path_mtu > IBV_MTU_4096)
    return setLastError(ncclInvalidArgument, "%s: path_mtu %d is not an ibv_mtu (IBV_MTU_256..IBV_MTU_4096)", what,
                        static_cast<int>(c.path_mtu));
  if (c.sl > 15) return setLastError(ncclInvalidArgument, "%s: sl %u out of range 0..15", what, unsigned{c.sl});
  if (c.timeout > 31)
    return setLastError(ncclInvalidArgument, "%s: timeout %u out of range 0..31", what, unsigned{c.timeout});
  if (c.retry_cnt > 7)
    return setLastError(ncclInvalidArgument, "%s: retry_cnt %u out of range 0..7", what, unsigned{c.retry_cnt});
  if (c.rnr_retry > 7)
    return setLastError(ncclInvalidArgument, "%s: rnr_retry %u out of range 0..7", what, unsigned{c.rnr_retry});
  if (c.min_rnr_timer > 31)
    return setLastError(ncclInvalidArgument, "%s: min_rnr_timer %u out of range 0..31", what,
                        unsigned{c.min_rnr_timer});
  if (c.max_rd_atomic == 0 || c.max_dest_rd_atomic == 0)
    return setLastError(ncclInvalidArgument,
                        "%s: max_rd_atomic %u / max_dest_rd_atomic %u: both must be >= 1 (signals are atomics)", what,
                        unsigned{c.max_rd_atomic}, unsigned{c.max_dest_rd_atomic});
  if (c.sq_psn > kMax24 || c.rq_psn > kMax24)
    return setLastError(ncclInvalidArgument, "%s: sq_psn 0x%x / rq_psn 0x%x: PSNs are 24 bits", what, c.sq_psn,
                        c.rq_psn);
  if (c.remote_qpn == 0 || c.remote_qpn > kMax24)
    return setLastError(ncclInvalidArgument, "%s: remote_qpn 0x%x is not a 24-bit QP number (and not 0)", what,
                        c.remote_qpn);
  if (c.link_layer == LinkLayer::kInfiniBand && c.remote_lid == 0)
    return setLastError(ncclInvalidArgument, "%s: InfiniBand needs the remote LID (remote_lid is 0)", what);
  if (usesGrh(c) && allZero(c.remote_gid, sizeof(c.remote_gid)))
    return setLastError(ncclInvalidArgument, "%s: %s needs the remote GID (remote_gid is all zero)", what,
                        c.link_layer == LinkLayer::kEthernet ? "RoCE" : "InfiniBand with a GRH");
  return ncclSuccess;
}

ncclResult_t buildQpTransition(const QpConnectConfig& c, ibv_qp_state from, ibv_qp_state to, QpTransition* out) {
  if (out == nullptr) return setLastError(ncclInvalidArgument, "buildQpTransition: out is NULL");
  if (!isLegalQpTransition(from, to))
    return setLastError(ncclInvalidArgument, "QP transition %s -> %s is not legal", qpStateName(from), qpStateName(to));
  std::memset(&out->attr, 0, sizeof(out->attr));
  out->attr.qp_state = to;
  out->attr_mask = IBV_QP_STATE;
  if (to == IBV_QPS_RESET || to == IBV_QPS_ERR) return ncclSuccess;

  ibv_qp_attr& a = out->attr;
  if (from == IBV_QPS_RESET && to == IBV_QPS_INIT) {
    if (c.port_num == 0) return setLastError(ncclInvalidArgument, "QP config: port_num 0 (ports count from 1)");
    a.pkey_index = c.pkey_index;
    a.port_num = c.port_num;
    a.qp_access_flags = c.access_flags;
    out->attr_mask |= IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
    return ncclSuccess;
  }
  if (from == IBV_QPS_INIT && to == IBV_QPS_RTR) {
    MOE_CHECK(validateQpConfig(c));
    a.path_mtu = c.path_mtu;
    a.dest_qp_num = c.remote_qpn;
    a.rq_psn = c.rq_psn;
    a.max_dest_rd_atomic = c.max_dest_rd_atomic;
    a.min_rnr_timer = c.min_rnr_timer;
    a.ah_attr.sl = c.sl;
    a.ah_attr.src_path_bits = 0;
    a.ah_attr.port_num = c.port_num;
    if (c.link_layer == LinkLayer::kInfiniBand) a.ah_attr.dlid = c.remote_lid;
    if (usesGrh(c)) {
      a.ah_attr.is_global = 1;
      std::memcpy(a.ah_attr.grh.dgid.raw, c.remote_gid, sizeof(c.remote_gid));
      a.ah_attr.grh.flow_label = 0;
      a.ah_attr.grh.sgid_index = c.gid_index;
      a.ah_attr.grh.hop_limit = c.hop_limit;
      a.ah_attr.grh.traffic_class = c.traffic_class;
    }
    out->attr_mask |= IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                      IBV_QP_MIN_RNR_TIMER;
    return ncclSuccess;
  }
  if (from == IBV_QPS_RTR && to == IBV_QPS_RTS) {
    MOE_CHECK(validateQpConfig(c));
    a.timeout = c.timeout;
    a.retry_cnt = c.retry_cnt;
    a.rnr_retry = c.rnr_retry;
    a.sq_psn = c.sq_psn;
    a.max_rd_atomic = c.max_rd_atomic;
    out->attr_mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC;
    return ncclSuccess;
  }
  return setLastError(ncclInvalidArgument, "QP transition %s -> %s is legal but not one this transport builds",
                      qpStateName(from), qpStateName(to));
}

const char* processEnvLookup(const char* name) { return std::getenv(name); }

namespace {

struct Chain {
  const char* names[3];  // highest precedence first; nullptr ends the chain
};

// The first set variable of `chain` decides: *value and *source; none set keeps *value / *source as they are.
ncclResult_t resolveOne(const EnvLookup& lookup, const Chain& chain, long long max_value, const char* what,
                        uint8_t* value, const char** source) {
  for (const char* name : chain.names) {
    if (name == nullptr) break;
    const char* text = lookup(name);
    if (text == nullptr || *text == '\0') continue;
    errno = 0;
    char* end = nullptr;
    const long long parsed = std::strtoll(text, &end, 0);
    if (end == text || *end != '\0')
      return setLastError(ncclInvalidArgument, "%s=\"%s\" is not an integer (%s)", name, text, what);
    if (errno == ERANGE || parsed < 0 || parsed > max_value)
      return setLastError(ncclInvalidArgument, "%s=%s is out of range: %s is 0..%lld", name, text, what, max_value);
    *value = static_cast<uint8_t>(parsed);
    *source = name;
    return ncclSuccess;
  }
  return ncclSuccess;
}

}  // namespace

ncclResult_t resolveServiceLevels(const EnvLookup& lookup, ServiceLevels* out) {
  if (out == nullptr) return setLastError(ncclInvalidArgument, "resolveServiceLevels: out is NULL");
  if (!lookup) return setLastError(ncclInvalidArgument, "resolveServiceLevels: lookup is empty");
  ServiceLevels r;
  MOE_CHECK(resolveOne(lookup, Chain{{"NCCL_MOE_IB_SL", "NCCL_IB_SL", nullptr}}, 15, "an InfiniBand service level",
                       &r.general.sl, &r.general.sl_source));
  MOE_CHECK(resolveOne(lookup, Chain{{"NCCL_MOE_IB_TC", "NCCL_IB_TC", nullptr}}, 255, "a traffic class",
                       &r.general.traffic_class, &r.general.tc_source));
  r.low_latency = r.general;
  MOE_CHECK(resolveOne(lookup, Chain{{"NCCL_MOE_IB_LL_SL", nullptr, nullptr}}, 15, "an InfiniBand service level",
                       &r.low_latency.sl, &r.low_latency.sl_source));
  MOE_CHECK(resolveOne(lookup, Chain{{"NCCL_MOE_IB_LL_TC", nullptr, nullptr}}, 255, "a traffic class",
                       &r.low_latency.traffic_class, &r.low_latency.tc_source));
  *out = r;
  return ncclSuccess;
}

}  // namespace nccl_moe::verbs
