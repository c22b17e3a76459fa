#include "transport/rdma/verbs/comm_transport.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/error.h"
#include "core/log.h"

namespace nccl_moe::verbs {

namespace {

// The CUDA call of a CudaOps table, as MOE_CUDA_CHECK words it.
ncclResult_t cudaStep(const CudaOps& cuda, cudaError_t err, const char* call, const std::string& what) {
  if (err == cudaSuccess) return ncclSuccess;
  return setLastError(ncclUnhandledCudaError, "%s failed for %s: %s", call, what.c_str(), cuda.error_string(err));
}

}  // namespace

bool decideDoorbellProxy(const std::vector<CommTransportRecordHeader>& headers, std::string* text) {
  std::string failed;
  bool asked = false;
  for (size_t r = 0; r < headers.size(); ++r) {
    if (headers[r].uar_failed != 0) failed += " " + std::to_string(r);
    asked = asked || headers[r].doorbell_proxy != 0;
  }
  if (!failed.empty()) {
    *text = "doorbell proxy on every rank: ranks" + failed +
            " could not map their UAR pages to the GPU (see their WARN lines; NCCL_MOE_NET_MODE=ibgda makes that an "
            "error)";
    return true;
  }
  if (asked) {
    *text = "doorbell proxy on every rank (NCCL_MOE_NET_MODE=dbproxy)";
    return true;
  }
  *text = "GPU doorbells (the UAR mapped on every rank)";
  return false;
}

ncclResult_t CommTransport::create(const CommTransportSpec& spec, std::unique_ptr<CommTransport>* out, uint8_t* mine) {
  const int num_ranks = static_cast<int>(spec.nodes.node_of.size());
  MOE_ARG_CHECK(out != nullptr && mine != nullptr, "verbs transport: no output");
  MOE_ARG_CHECK(spec.rank >= 0 && spec.rank < num_ranks, "verbs transport: rank %d of %d ranks", spec.rank, num_ranks);
  MOE_ARG_CHECK(spec.buffer != nullptr && spec.buffer_bytes > 0 && spec.dev_error != nullptr && spec.timeout_ns > 0,
                "verbs transport: rank %d has no buffer, error record or timeout", spec.rank);
  out->reset(new CommTransport());
  CommTransport* t = out->get();
  t->spec_ = spec;
  t->spec_.device.topology = nullptr;  // the caller's, valid during create only (Device::open below reads `spec`)
  t->cuda_ = spec.device.cuda != nullptr ? spec.device.cuda : &CudaOps::runtime();
  const std::string who = "verbs transport of rank " + std::to_string(spec.rank);
  // Every failure below is this rank's error, prefixed with who and what the backend is.
  auto fail = [&](ncclResult_t res, const char* hint) {
    const std::string why = threadLastError();
    return setLastError(res,
                        "%s (NCCL_MOE_NET=ib/auto: hardware RC QPs through rdma-core, never run on a NIC yet): %s%s",
                        who.c_str(), why.c_str(), hint);
  };
  const char* const kNoNic =
      "; this rank's host needs rdma-core 28+ (libibverbs1, ibverbs-providers) and an mlx5 (ConnectX) NIC with an "
      "active port; for one-host testing set NCCL_MOE_NET=emulated";

  ncclResult_t res = resolveServiceLevels(spec.device.env, &t->levels_);
  if (res != ncclSuccess) return fail(res, "");
  const IbvApi* ibv = spec.ibv;
  const Mlx5Api* dv = spec.mlx5;
  if (ibv == nullptr && (res = ibverbs(&ibv)) != ncclSuccess) return fail(res, kNoNic);
  if (dv == nullptr && (res = mlx5(&dv)) != ncclSuccess) return fail(res, kNoNic);
  if ((res = Device::open(*ibv, dv, spec.device, &t->device_)) != ncclSuccess) return fail(res, kNoNic);
  Device& device = *t->device_;

  RegistrationSpec data;
  data.addr = spec.buffer;
  data.bytes = spec.buffer_bytes;
  data.access = rdma::kAccessAllRemote;
  data.relaxed_ordering = true;
  data.force_peer_memory = spec.force_peer_memory;
  data.what = "communication buffer (data window)";
  if ((res = MemoryRegion::create(device, data, &t->data_)) != ncclSuccess) return fail(res, "");
  RegistrationSpec signal = data;
  signal.flags = rdma::kWindowSignal;
  signal.relaxed_ordering = false;
  signal.what = "communication buffer (signal window)";
  if ((res = MemoryRegion::create(device, signal, &t->signal_)) != ncclSuccess) return fail(res, "");

  t->remote_peers_ = qpPeers(spec.nodes, spec.rank, spec.pure_rdma);
  const size_t num_qps = t->remote_peers_.size() * rdma::kNumQpSets;
  std::vector<QpnsBySet> qpn_of(num_ranks, QpnsBySet{});
  for (auto& set : t->qps_) set.resize(num_ranks);
  if (num_qps > 0) {
    const CudaOps& cuda = *t->cuda_;
    const size_t state_bytes = sizeof(ibgda::GpuQpState) * num_qps;
    void* state = nullptr;
    if ((res = cudaStep(cuda, cuda.device_alloc(&state, state_bytes), "cudaMalloc", "the QPs' GPU state")) !=
        ncclSuccess)
      return fail(res, "");
    t->dev_state_ = static_cast<ibgda::GpuQpState*>(state);
    if ((res = cudaStep(cuda, cuda.set_device(state, 0, state_bytes), "cudaMemset", "the QPs' GPU state")) !=
        ncclSuccess)
      return fail(res, "");
    RegistrationSpec results;
    results.addr = state;
    results.bytes = state_bytes;
    results.access = rdma::kAccessLocalWrite;  // the fetch-adds' previous values land here
    results.relaxed_ordering = false;
    results.force_peer_memory = spec.force_peer_memory;
    results.what = "QP state (fetch-add results)";
    if ((res = MemoryRegion::create(device, results, &t->state_window_)) != ncclSuccess) return fail(res, "");
    // One mailbox per QP (64 bytes apart), whatever the mode: which doorbell the GPU rings is decided at connect.
    const size_t mailbox_bytes = (num_qps * 64 + 4095) / 4096 * 4096;
    t->mailboxes_ = static_cast<uint64_t*>(std::aligned_alloc(4096, mailbox_bytes));
    if (t->mailboxes_ == nullptr)
      return fail(setLastError(ncclSystemError, "no memory for %zu bytes of doorbell mailboxes", mailbox_bytes), "");
    std::memset(t->mailboxes_, 0, mailbox_bytes);
    bool map_uar = spec.doorbell != DoorbellPath::kProxy;
    for (int set = 0; set < rdma::kNumQpSets; ++set) {
      for (size_t i = 0; i < t->remote_peers_.size(); ++i) {
        const int p = t->remote_peers_[i];
        const size_t qp_index = static_cast<size_t>(set) * t->remote_peers_.size() + i;
        RcQpSpec q;
        q.mailbox = t->mailboxes_ + qp_index * 8;
        q.map_uar = map_uar;
        q.uar_optional = spec.doorbell == DoorbellPath::kGpuElseProxy;
        q.max_send_wr = spec.max_send_wr;
        q.dev_state = t->dev_state_ + qp_index;
        q.src_lkey = t->data_->window().lkey;
        q.result_lkey = t->state_window_->window().lkey;
        q.rank = spec.rank;
        q.peer = p;
        q.timeout_ns = spec.timeout_ns;
        q.dev_error = spec.dev_error;
        if ((res = RcQp::create(device, q, &t->qps_[set][p])) != ncclSuccess) return fail(res, "");
        qpn_of[p][set] = t->qps_[set][p]->qpn();
        if (map_uar && !t->qps_[set][p]->uarMapped()) {  // the rest need not try: the proxy rings every QP
          t->uar_failed_ = true;
          map_uar = false;
          MOE_WARN(
              "%s: the UAR doorbell page cannot be mapped to the GPU (%s); every rank falls back to the doorbell "
              "proxy (NCCL_MOE_NET_MODE=dbproxy)",
              who.c_str(), t->qps_[set][p]->uarError().c_str());
        }
      }
    }
  }

  CommTransportRecordHeader header{};
  header.num_records = num_ranks;
  header.uar_failed = t->uar_failed_ ? 1 : 0;
  header.doorbell_proxy = spec.doorbell == DoorbellPath::kProxy || t->uar_failed_ ? 1 : 0;
  std::memcpy(mine, &header, sizeof(header));
  const std::vector<rdma::ConnWindow> windows = {t->data_->connWindow(), t->signal_->connWindow()};
  for (int p = 0; p < num_ranks; ++p) {
    rdma::ConnRecord rec = scaleoutConnRecord(spec.rank, p, spec.nodes, qpn_of[p], windows, t->levels_);
    fillConnRecordIdentity(device.identity(), &rec);
    rec.first_psn = spec.first_psn;
    uint8_t* conn = mine + sizeof(CommTransportRecordHeader) + static_cast<size_t>(p) * rdma::kConnRecordBytes;
    if ((res = rdma::packConnRecord(rec, conn)) != ncclSuccess) return fail(res, "");
  }
  return ncclSuccess;
}

ncclResult_t CommTransport::connect(const uint8_t* all) {
  const int num_ranks = static_cast<int>(spec_.nodes.node_of.size());
  const int me = spec_.rank;
  const std::string who = "verbs transport of rank " + std::to_string(me);
  const size_t stride = commTransportRecordBytes(num_ranks);
  std::vector<CommTransportRecordHeader> headers(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    std::memcpy(&headers[r], all + stride * r, sizeof(CommTransportRecordHeader));
    if (headers[r].num_records != num_ranks)
      return setLastError(ncclInvalidUsage, "%s: rank %d published %d records; the communicator has %d", who.c_str(), r,
                          headers[r].num_records, num_ranks);
  }
  std::vector<rdma::ConnRecord> records;
  std::vector<PeerWindow> window_of_peer;
  MOE_CHECK(readPeerRecords(all, stride, sizeof(CommTransportRecordHeader), spec_.nodes, me, remote_peers_, who,
                            &records, &window_of_peer));
  const bool doorbell_proxy = decideDoorbellProxy(headers, &doorbell_text_);
  if (doorbell_proxy && spec_.doorbell == DoorbellPath::kGpu)  // an explicit ibgda rank mapped its UAR, others not
    return setLastError(ncclInvalidUsage,
                        "%s: NCCL_MOE_NET_MODE=ibgda, but %s; set NCCL_MOE_NET_MODE the same on every rank",
                        who.c_str(), doorbell_text_.c_str());
  if (me == 0) MOE_INFO("verbs transport: %s", doorbell_text_.c_str());
  auto fail = [&](ncclResult_t res) {
    const std::string why = threadLastError();
    return setLastError(res, "%s: %s", who.c_str(), why.c_str());
  };
  QpsBySet<ibgda::GpuQp> qp_of_peer;
  ncclResult_t res = ncclSuccess;
  for (int set = 0; set < rdma::kNumQpSets; ++set) {
    qp_of_peer[set].assign(num_ranks, nullptr);
    const ServiceLevel& service = serviceLevelOf(levels_, set);
    for (int p : remote_peers_) {
      QpConnectConfig config;
      if ((res = buildConnectConfig(device_->identity(), spec_.first_psn, records[p], set, 0, service, &config)) !=
              ncclSuccess ||
          (res = qps_[set][p]->connect(config, service)) != ncclSuccess)
        return fail(res);
      if (doorbell_proxy && (res = qps_[set][p]->useMailbox()) != ncclSuccess) return fail(res);
      qp_of_peer[set][p] = &qps_[set][p]->view();
    }
  }
  std::vector<ScaleoutPeer> table;
  const std::string why = buildScaleoutTable(spec_.nodes, me, qp_of_peer, window_of_peer, &table, spec_.pure_rdma);
  if (!why.empty()) return setLastError(ncclInternalError, "%s: %s", who.c_str(), why.c_str());
  const size_t bytes = sizeof(ScaleoutPeer) * table.size();
  void* dev = nullptr;
  if ((res = cudaStep(*cuda_, cuda_->device_alloc(&dev, bytes), "cudaMalloc", "the scale-out table")) != ncclSuccess)
    return fail(res);
  dev_table_ = static_cast<ScaleoutPeer*>(dev);
  if ((res = cudaStep(*cuda_, cuda_->copy_to_device(dev, table.data(), bytes), "cudaMemcpy", "the scale-out table")) !=
      ncclSuccess)
    return fail(res);
  if (doorbell_proxy && numQps() > 0) {
    doorbells_ = std::make_unique<dbproxy::DoorbellProxy>(me);
    for (const auto& set : qps_)
      for (const auto& q : set)
        if (q && (res = doorbells_->add(q->route())) != ncclSuccess) return fail(res);
    if ((res = doorbells_->start()) != ncclSuccess) return fail(res);
  }
  return ncclSuccess;
}

std::string CommTransport::drain() {
  if (!doorbells_ || !doorbells_->running()) return "";
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    if (doorbells_->pending() == 0) return "";
    if (std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(spec_.timeout_ns))
      return "rank " + std::to_string(spec_.rank) + ": doorbells not forwarded: " + doorbells_->describe(true);
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void CommTransport::stop() {
  if (doorbells_) doorbells_->stop();
}

CommTransport::~CommTransport() {
  stop();  // the doorbell proxy rings the QPs' UARs: it stops before they go
  doorbells_.reset();
  if (dev_table_ != nullptr) cuda_->device_free(dev_table_);
  for (auto& set : qps_) set.clear();  // GPU mappings, QP, CQ
  state_window_.reset();
  signal_.reset();
  data_.reset();
  if (dev_state_ != nullptr) cuda_->device_free(dev_state_);  // after its registration
  device_.reset();
  std::free(mailboxes_);  // after the QPs unmapped them
}

int CommTransport::numQps() const {
  int n = 0;
  for (const auto& set : qps_)
    for (const auto& q : set) n += q ? 1 : 0;
  return n;
}

const rdma::Window& CommTransport::window() const {
  static const rdma::Window kNone{};
  return data_ ? data_->window() : kNone;
}

std::string CommTransport::describe() const {
  std::string peers;
  for (int p : remote_peers_) peers += " " + std::to_string(p);
  return "rank " + std::to_string(spec_.rank) + ": verbs " + (device_ ? device_->where() : std::string("(no device)")) +
         ", " + std::to_string(numQps()) + " GPU-driven RC QPs (2 sets) to peers" + peers + ", " +
         (doorbell_text_.empty() ? std::string("doorbells not decided yet") : doorbell_text_) + ", data window " +
         (data_ ? registrationPathName(data_->path()) : "-") + " (relaxed ordering), signal window " +
         (signal_ ? registrationPathName(signal_->path()) : "-") + " (strongly ordered)";
}

}  // namespace nccl_moe::verbs
