#include "transport/rdma/verbs/rc_qp.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "core/error.h"
#include "core/log.h"
#include "transport/rdma/mlx5/cqe.h"
#include "transport/rdma/mlx5/ring.h"
#include "transport/rdma/mlx5/wqe.h"

namespace nccl_moe::verbs {

namespace m = nccl_moe::mlx5;

static_assert(kRcQpMaxInlineBytes == m::kMaxInlineWriteBytes, "the QP's inline size is the inline WRITE's");

namespace {

int errnoOf(int rc) { return rc > 0 ? rc : errno; }

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

ncclResult_t buildConnectConfig(const PortIdentity& local, uint32_t local_psn, const rdma::ConnRecord& remote,
                                int qp_set, int qp_idx, const ServiceLevel& service, QpConnectConfig* out) {
  MOE_ARG_CHECK(
      out != nullptr && qp_set >= 0 && qp_set < rdma::kNumQpSets && qp_idx >= 0 && qp_idx < rdma::kConnMaxQpsPerSet,
      "buildConnectConfig: QP set %d / index %d out of range", qp_set, qp_idx);
  if (remote.link_layer != static_cast<uint8_t>(local.link_layer))
    return setLastError(
        ncclInvalidUsage, "rank %d's NIC %s port %u is %s but this rank's %s port %u is %s: RC QPs need one link layer",
        remote.rank, remote.nic_name, unsigned{remote.port},
        remote.link_layer == static_cast<uint8_t>(LinkLayer::kEthernet) ? "RoCE" : "InfiniBand", local.name.c_str(),
        unsigned{local.port}, local.link_layer == LinkLayer::kEthernet ? "RoCE" : "InfiniBand");
  const uint32_t remote_qpn = remote.qpn[qp_set][qp_idx];
  if (qp_idx >= remote.num_qps[qp_set] || remote_qpn == 0)
    return setLastError(ncclInvalidUsage, "rank %d's record for rank %d lists no %s QP %d (it has %u)", remote.rank,
                        remote.peer, rdma::qpSetName(qp_set), qp_idx, unsigned{remote.num_qps[qp_set]});
  QpConnectConfig c;
  c.link_layer = local.link_layer;
  c.port_num = local.port;
  c.gid_index = local.gid_index;
  const ibv_mtu remote_mtu = static_cast<ibv_mtu>(remote.active_mtu);
  c.path_mtu = remote_mtu < local.active_mtu ? remote_mtu : local.active_mtu;
  c.sl = service.sl;
  c.traffic_class = service.traffic_class;
  c.max_rd_atomic = local.max_rd_atomic;
  c.max_dest_rd_atomic = local.max_dest_rd_atomic;
  c.sq_psn = local_psn;
  c.remote_qpn = remote_qpn;
  c.remote_lid = remote.lid;
  std::memcpy(c.remote_gid, remote.gid, sizeof(c.remote_gid));
  c.rq_psn = remote.first_psn;
  MOE_CHECK(validateQpConfig(c));
  *out = c;
  return ncclSuccess;
}

ncclResult_t RcQp::create(Device& device, const RcQpSpec& spec, std::unique_ptr<RcQp>* out) {
  MOE_ARG_CHECK(out != nullptr && spec.max_send_wr != 0, "RcQp::create: no output or max_send_wr 0");
  const IbvApi& ibv = device.ibv();
  const Mlx5Api* dv = device.mlx5();
  MOE_ARG_CHECK(dv != nullptr && dv->init_obj != nullptr, "RcQp::create on %s: libmlx5 is not loaded",
                device.where().c_str());
  std::unique_ptr<RcQp> q(new RcQp(device));
  device.retain();
  q->retained_ = true;

  const uint32_t cqe_asked = spec.cqe_cnt != 0 ? spec.cqe_cnt : 4 * spec.max_send_wr;
  errno = 0;
  q->cq_ = ibv.create_cq(device.context(), static_cast<int>(cqe_asked), nullptr, nullptr, 0);
  if (q->cq_ == nullptr)
    return verbsFailure("ibv_create_cq", device.where(), errno, " (" + std::to_string(cqe_asked) + " entries)");

  ibv_qp_init_attr init;
  std::memset(&init, 0, sizeof(init));
  init.send_cq = q->cq_;
  init.recv_cq = q->cq_;
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;
  init.cap.max_send_wr = spec.max_send_wr;
  init.cap.max_recv_wr = 0;
  init.cap.max_send_sge = 1;
  init.cap.max_recv_sge = 0;
  init.cap.max_inline_data = kRcQpMaxInlineBytes;
  errno = 0;
  q->qp_ = ibv.create_qp(device.pd(), &init);
  if (q->qp_ == nullptr)
    return verbsFailure("ibv_create_qp", device.where(), errno,
                        " (RC, " + std::to_string(spec.max_send_wr) + " send WRs, inline " +
                            std::to_string(kRcQpMaxInlineBytes) + " B)");
  if (init.cap.max_inline_data < kRcQpMaxInlineBytes)
    return setLastError(ncclSystemError, "ibv_create_qp on %s gave max_inline_data %u < %u (the inline WRITE's size)",
                        device.where().c_str(), init.cap.max_inline_data, kRcQpMaxInlineBytes);

  mlx5dv_obj obj;
  std::memset(&obj, 0, sizeof(obj));
  obj.qp.in = q->qp_;
  obj.qp.out = &q->dv_qp_;
  obj.cq.in = q->cq_;
  obj.cq.out = &q->dv_cq_;
  const int rc = dv->init_obj(&obj, MLX5DV_OBJ_QP | MLX5DV_OBJ_CQ);
  if (rc != 0) return verbsFailure("mlx5dv_init_obj", device.where(), errnoOf(rc), " (QP and CQ)");

  const mlx5dv_qp& dq = q->dv_qp_;
  const mlx5dv_cq& dc = q->dv_cq_;
  const std::string where = device.where() + ", QP " + hex(q->qp_->qp_num);
  auto refuse = [&](const std::string& what) {
    return setLastError(ncclSystemError, "mlx5dv_init_obj on %s: %s", where.c_str(), what.c_str());
  };
  if (dq.sq.buf == nullptr || dq.dbrec == nullptr || dq.bf.reg == nullptr || dc.buf == nullptr || dc.dbrec == nullptr)
    return refuse("a queue address is null (sq.buf, dbrec, bf.reg, cq.buf, cq.dbrec)");
  if (dq.sq.stride != m::kWqebbBytes) return refuse("SQ stride " + std::to_string(dq.sq.stride) + ", expected 64");
  if (!m::is_valid_wqe_cnt(dq.sq.wqe_cnt))
    return refuse("SQ of " + std::to_string(dq.sq.wqe_cnt) + " WQEBBs is not a power of two up to " +
                  std::to_string(m::kMaxWqeCnt));
  if (dc.cqe_size != m::kCqeBytes)
    return refuse("CQE size " + std::to_string(dc.cqe_size) +
                  ": the GPU poller reads 64-byte CQEs (unset MLX5_CQE_SIZE)");
  if (!m::is_valid_cqe_cnt(dc.cqe_cnt)) return refuse("CQ of " + std::to_string(dc.cqe_cnt) + " entries is not valid");
  if (dc.cqe_cnt < dq.sq.wqe_cnt)
    return refuse("CQ of " + std::to_string(dc.cqe_cnt) + " entries < SQ of " + std::to_string(dq.sq.wqe_cnt) +
                  " WQEBBs: every GPU WQE is signaled, so it could overrun; ask for more CQ entries");
  if ((q->qp_->qp_num & ~m::kQpnMask) != 0 || q->qp_->qp_num == 0) return refuse("QPN is not a 24-bit number");
  const uint8_t* cqes = static_cast<const uint8_t*>(dc.buf);
  for (uint32_t i = 0; i < dc.cqe_cnt; ++i) {
    const uint8_t op_own = cqes[static_cast<size_t>(i) * m::kCqeBytes + m::kCqeBytes - 1];
    if (op_own != m::kCqeInitialOpOwn)
      return refuse("CQE " + std::to_string(i) + " starts with op_own " + hex(op_own) + ", expected " +
                    hex(m::kCqeInitialOpOwn) + " (INVALID, owner 0)");
  }

  MOE_CHECK(q->mapQueues(spec));
  *out = std::move(q);
  return ncclSuccess;
}

ncclResult_t RcQp::mapQueues(const RcQpSpec& spec) {
  HostMapper& mapper = device_.mapper();
  auto map = [&](void* host, size_t bytes, bool io, const char* what, void** dev) -> ncclResult_t {
    MOE_CHECK(mapper.map(host, bytes, io, what, dev));
    mapped_.push_back(host);
    return ncclSuccess;
  };
  ibgda::GpuQpQueues g;
  void* dev = nullptr;
  MOE_CHECK(map(dv_qp_.sq.buf, static_cast<size_t>(dv_qp_.sq.wqe_cnt) * dv_qp_.sq.stride, false, "send queue", &dev));
  g.sq = static_cast<uint8_t*>(dev);
  g.wqe_cnt = dv_qp_.sq.wqe_cnt;
  MOE_CHECK(map(dv_qp_.dbrec, 2 * sizeof(uint32_t), false, "QP doorbell record", &dev));
  g.sq_dbrec = static_cast<uint32_t*>(dev);
  if (spec.mailbox != nullptr) {
    MOE_CHECK(map(spec.mailbox, sizeof(uint64_t), false, "doorbell-proxy mailbox", &mailbox_dev_));
    mailbox_ = spec.mailbox;
  }
  if (spec.map_uar) {
    const ncclResult_t uar = map(dv_qp_.bf.reg, sizeof(uint64_t), true, "UAR doorbell (BlueFlame register)", &dev);
    if (uar == ncclSuccess) {
      uar_dev_ = dev;
    } else if (spec.uar_optional && mailbox_ != nullptr) {
      uar_error_ = threadLastError();  // the doorbell proxy rings it instead
    } else {
      return uar;
    }
  }
  if (uar_dev_ == nullptr && mailbox_dev_ == nullptr)
    return setLastError(ncclInvalidArgument, "RcQp::create on %s, QP 0x%x: neither the UAR nor a mailbox to ring",
                        device_.where().c_str(), qpn());
  g.doorbell = static_cast<uint64_t*>(uar_dev_ != nullptr ? uar_dev_ : mailbox_dev_);
  MOE_CHECK(map(dv_cq_.buf, static_cast<size_t>(dv_cq_.cqe_cnt) * dv_cq_.cqe_size, false, "CQ buffer", &dev));
  g.cq = static_cast<uint8_t*>(dev);
  g.cqe_cnt = dv_cq_.cqe_cnt;
  MOE_CHECK(map(dv_cq_.dbrec, 2 * sizeof(uint32_t), false, "CQ doorbell record", &dev));
  g.cq_dbrec = static_cast<uint32_t*>(dev);
  g.state = spec.dev_state;
  ibgda::GpuQpBinding b;
  b.qpn = qpn();
  b.src_lkey = spec.src_lkey;
  b.result_lkey = spec.result_lkey;
  b.rank = spec.rank;
  b.peer = spec.peer;
  b.timeout_ns = spec.timeout_ns;
  b.error = spec.dev_error;
  const std::string why = ibgda::buildGpuQp(g, b, &view_);
  if (!why.empty())
    return setLastError(ncclInvalidArgument, "RcQp::create on %s, QP 0x%x: the GPU view: %s", device_.where().c_str(),
                        qpn(), why.c_str());
  return ncclSuccess;
}

uint32_t RcQp::qpn() const { return qp_ != nullptr ? qp_->qp_num : 0; }

ncclResult_t RcQp::useMailbox() {
  if (mailbox_dev_ == nullptr)
    return setLastError(ncclInternalError, "RcQp::useMailbox on %s, QP 0x%x: the QP was created without a mailbox",
                        device_.where().c_str(), qpn());
  view_.doorbell = static_cast<uint64_t*>(mailbox_dev_);
  return ncclSuccess;
}

dbproxy::DoorbellRoute RcQp::route() const {
  dbproxy::DoorbellRoute r;
  r.mailbox = mailbox_;
  r.doorbell = static_cast<uint64_t*>(dv_qp_.bf.reg);
  r.target = dbproxy::DoorbellTarget::kMmio;
  r.peer = view_.peer;
  r.qpn = qpn();
  return r;
}

ncclResult_t RcQp::connect(const QpConnectConfig& config, const ServiceLevel& service) {
  if (state_ != IBV_QPS_RESET)
    return setLastError(ncclInvalidUsage, "RcQp::connect on %s, QP 0x%x: the QP is in %s, not RESET",
                        device_.where().c_str(), qpn(), qpStateName(state_));
  const ibv_qp_state path[] = {IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS};
  for (const ibv_qp_state to : path) {
    QpTransition t;
    MOE_CHECK(buildQpTransition(config, state_, to, &t));
    if (to == IBV_QPS_RTR)
      MOE_INFO(
          "verbs: %s QP 0x%x -> RTR: remote QPN 0x%x, path MTU %d, SL %u (%s), TC %u (%s), GID index %u%s, "
          "max_dest_rd_atomic %u, max_rd_atomic %u at RTS",
          device_.where().c_str(), qpn(), config.remote_qpn, 128 << static_cast<int>(config.path_mtu),
          unsigned{config.sl}, service.sl_source, unsigned{config.traffic_class}, service.tc_source,
          unsigned{config.gid_index}, t.attr.ah_attr.is_global ? " (GRH)" : "", unsigned{config.max_dest_rd_atomic},
          unsigned{config.max_rd_atomic});
    const int rc = device_.ibv().modify_qp(qp_, &t.attr, t.attr_mask);
    if (rc != 0) {
      char detail[128];
      std::snprintf(detail, sizeof(detail), " (QP 0x%x %s -> %s, attr_mask 0x%x)", qpn(), qpStateName(state_),
                    qpStateName(to), static_cast<unsigned>(t.attr_mask));
      return verbsFailure("ibv_modify_qp", device_.where(), errnoOf(rc), detail);
    }
    state_ = to;
  }
  return ncclSuccess;
}

RcQp::~RcQp() {
  for (void* host : mapped_) device_.mapper().unmap(host);
  mapped_.clear();
  const IbvApi& ibv = device_.ibv();
  if (qp_ != nullptr) {
    const int rc = ibv.destroy_qp(qp_);
    if (rc != 0) MOE_WARN("ibv_destroy_qp failed on %s: %s", device_.where().c_str(), std::strerror(errnoOf(rc)));
  }
  if (cq_ != nullptr) {
    const int rc = ibv.destroy_cq(cq_);
    if (rc != 0) MOE_WARN("ibv_destroy_cq failed on %s: %s", device_.where().c_str(), std::strerror(errnoOf(rc)));
  }
  if (retained_) device_.release();
}

}  // namespace nccl_moe::verbs
