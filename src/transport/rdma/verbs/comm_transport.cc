#include "transport/rdma/verbs/comm_transport.h"

#include <cstring>

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
    for (int set = 0; set < rdma::kNumQpSets; ++set) {
      for (size_t i = 0; i < t->remote_peers_.size(); ++i) {
        const int p = t->remote_peers_[i];
        RcQpSpec q;
        q.max_send_wr = spec.max_send_wr;
        q.dev_state = t->dev_state_ + static_cast<size_t>(set) * t->remote_peers_.size() + i;
        q.src_lkey = t->data_->window().lkey;
        q.result_lkey = t->state_window_->window().lkey;
        q.rank = spec.rank;
        q.peer = p;
        q.timeout_ns = spec.timeout_ns;
        q.dev_error = spec.dev_error;
        if ((res = RcQp::create(device, q, &t->qps_[set][p])) != ncclSuccess) return fail(res, "");
        qpn_of[p][set] = t->qps_[set][p]->qpn();
      }
    }
  }

  ScaleoutRecordHead header{};
  header.num_records = num_ranks;
  std::memcpy(mine, &header, sizeof(header));
  const std::vector<rdma::ConnWindow> windows = {t->data_->connWindow(), t->signal_->connWindow()};
  for (int p = 0; p < num_ranks; ++p) {
    rdma::ConnRecord rec = scaleoutConnRecord(spec.rank, p, spec.nodes, qpn_of[p], windows, t->levels_);
    fillConnRecordIdentity(device.identity(), &rec);
    rec.first_psn = spec.first_psn;
    uint8_t* conn = mine + sizeof(ScaleoutRecordHead) + static_cast<size_t>(p) * rdma::kConnRecordBytes;
    if ((res = rdma::packConnRecord(rec, conn)) != ncclSuccess) return fail(res, "");
  }
  return ncclSuccess;
}

ncclResult_t CommTransport::connect(const uint8_t* all) {
  const int num_ranks = static_cast<int>(spec_.nodes.node_of.size());
  const int me = spec_.rank;
  const std::string who = "verbs transport of rank " + std::to_string(me);
  const size_t stride = commTransportRecordBytes(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    ScaleoutRecordHead h;
    std::memcpy(&h, all + stride * r, sizeof(h));
    if (h.num_records != num_ranks)
      return setLastError(ncclInvalidUsage, "%s: rank %d published %d records; the communicator has %d", who.c_str(), r,
                          h.num_records, num_ranks);
  }
  std::vector<rdma::ConnRecord> records;
  std::vector<PeerWindow> window_of_peer;
  MOE_CHECK(readPeerRecords(all, stride, sizeof(ScaleoutRecordHead), spec_.nodes, me, remote_peers_, who, &records,
                            &window_of_peer));
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
  return ncclSuccess;
}

CommTransport::~CommTransport() {
  if (dev_table_ != nullptr) cuda_->device_free(dev_table_);
  for (auto& set : qps_) set.clear();  // GPU mappings, QP, CQ
  state_window_.reset();
  signal_.reset();
  data_.reset();
  if (dev_state_ != nullptr) cuda_->device_free(dev_state_);  // after its registration
  device_.reset();
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
         ", " + std::to_string(numQps()) + " GPU-driven RC QPs (2 sets) to peers" + peers + ", data window " +
         (data_ ? registrationPathName(data_->path()) : "-") + " (relaxed ordering), signal window " +
         (signal_ ? registrationPathName(signal_->path()) : "-") + " (strongly ordered)";
}

}  // namespace nccl_moe::verbs
