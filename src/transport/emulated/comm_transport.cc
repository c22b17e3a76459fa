#include "transport/emulated/comm_transport.h"

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace nccl_moe::emulated {

rdma::ConnRecord emulatedConnRecord(int rank, int peer, const NodeMap& nodes, const QpnsBySet& qpns,
                                    const rdma::ConnWindow& window, const verbs::ServiceLevels& levels) {
  rdma::ConnRecord r = scaleoutConnRecord(rank, peer, nodes, qpns, {window}, levels);
  std::snprintf(r.nic_name, sizeof(r.nic_name), "emulated-%d", rank);
  r.nic_guid = 0xe1e1000000000000ull | static_cast<uint64_t>(rank);
  r.port = 1;
  r.link_layer = 0;  // InfiniBand
  return r;
}

ncclResult_t CommTransport::create(const CommTransportSpec& spec, std::unique_ptr<CommTransport>* out, uint8_t* mine) {
  const int num_ranks = static_cast<int>(spec.nodes.node_of.size());
  MOE_ARG_CHECK(spec.rank >= 0 && spec.rank < num_ranks && num_ranks <= kMaxRanks,
                "emulated transport: rank %d of %d ranks (at most %d)", spec.rank, num_ranks, kMaxRanks);
  MOE_ARG_CHECK(spec.buffer != nullptr && spec.buffer_bytes > 0 && spec.dev_error != nullptr && spec.timeout_ns > 0,
                "emulated transport: rank %d has no buffer, error record or timeout", spec.rank);
  MOE_ARG_CHECK(!(spec.proxy && spec.doorbell_proxy), "emulated transport: rank %d: request proxy and doorbell proxy",
                spec.rank);
  std::unique_ptr<CommTransport> t(new CommTransport());
  t->spec_ = spec;
  MOE_CHECK(verbs::resolveServiceLevels(spec.env, &t->levels_));
  t->registry_ = std::make_unique<rdma::WindowRegistry>(static_cast<uint8_t>(0x40 + spec.rank));
  MOE_CHECK(t->registry_->registerWindow(reinterpret_cast<uint64_t>(spec.buffer), spec.buffer_bytes,
                                         rdma::kAccessAllRemote, rdma::kWindowSignal, &t->window_));
  CudaBackendOptions bo;
  bo.device = spec.device;
  bo.complete_timeout_s = static_cast<double>(spec.timeout_ns) * 1e-9;
  bo.one_stream = true;  // few streams per process (cuda_backend.h)
  MOE_CHECK(CudaMemoryBackend::create(bo, &t->backend_));
  NicConfig nc;
  nc.rank = spec.rank;
  nc.chaos.seed = spec.chaos_seed != 0 ? spec.chaos_seed + static_cast<uint64_t>(spec.rank) : 0;
  nc.max_chunk_bytes = bo.max_chunk_bytes;
  t->nic_ = std::make_unique<SoftNic>(nc, t->backend_.get(), t->registry_.get());

  t->remote_peers_ = qpPeers(spec.nodes, spec.rank, spec.pure_rdma);
  std::vector<QpnsBySet> qpn_of(num_ranks, QpnsBySet{});
  for (int set = 0; set < rdma::kNumQpSets; ++set) {
    t->qps_[set].resize(num_ranks);
    if (spec.proxy) {
      if (t->remote_peers_.empty()) continue;
      GpuProxySpec ps;
      ps.nic = t->nic_.get();
      ps.backend = t->backend_.get();
      ps.local_windows = t->registry_.get();
      for (int p : t->remote_peers_) {
        Responder r;
        r.peer = p;  // connected in connect(), once the peer's record is known
        ps.qps.push_back(r);
      }
      ps.connect = false;
      ps.num_slots = spec.proxy_slots;
      ps.wqe_cnt = spec.wqe_cnt;
      ps.cqe_cnt = spec.wqe_cnt;
      ps.src_lkey = t->window_.lkey;
      ps.rank = spec.rank;
      ps.device = spec.device;
      ps.timeout_ns = spec.timeout_ns;
      ps.dev_error = spec.dev_error;
      MOE_CHECK(EmulatedGpuProxy::create(ps, &t->proxies_[set]));
      for (size_t i = 0; i < t->remote_peers_.size(); ++i) qpn_of[t->remote_peers_[i]][set] = t->proxies_[set]->qpn(i);
      continue;
    }
    for (int p : t->remote_peers_) {
      GpuQpSpec q;
      q.nic = t->nic_.get();
      q.backend = t->backend_.get();
      q.local_windows = t->registry_.get();
      q.responder.peer = p;  // connected in connect(), once the peer's record is known
      q.wqe_cnt = spec.wqe_cnt;
      q.cqe_cnt = spec.wqe_cnt;
      q.src_lkey = t->window_.lkey;
      q.rank = spec.rank;
      q.timeout_ns = spec.timeout_ns;
      q.dev_error = spec.dev_error;
      q.connect = false;
      q.doorbell_proxy = spec.doorbell_proxy;
      MOE_CHECK(EmulatedGpuQp::create(q, &t->qps_[set][p]));
      qpn_of[p][set] = t->qps_[set][p]->qpn();
    }
  }

  CommTransportRecordHeader header{};
  header.num_records = num_ranks;
  header.registry = reinterpret_cast<uint64_t>(t->registry_.get());
  header.process_token = spec.process_token;
  MOE_CUDA_CHECK(cudaIpcGetMemHandle(&header.buffer_ipc, spec.buffer));
  std::memcpy(mine, &header, sizeof(header));
  rdma::ConnWindow w;
  w.addr = t->window_.addr;
  w.bytes = t->window_.bytes;
  w.rkey = t->window_.rkey;
  for (int p = 0; p < num_ranks; ++p) {
    uint8_t* conn = mine + sizeof(CommTransportRecordHeader) + static_cast<size_t>(p) * rdma::kConnRecordBytes;
    MOE_CHECK(rdma::packConnRecord(emulatedConnRecord(spec.rank, p, spec.nodes, qpn_of[p], w, t->levels_), conn));
  }
  *out = std::move(t);
  return ncclSuccess;
}

ncclResult_t CommTransport::connect(const uint8_t* all) {
  const int num_ranks = static_cast<int>(spec_.nodes.node_of.size());
  const int me = spec_.rank;
  const size_t stride = commTransportRecordBytes(num_ranks);
  std::vector<CommTransportRecordHeader> headers(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    std::memcpy(&headers[r], all + stride * r, sizeof(CommTransportRecordHeader));
    if (headers[r].num_records != num_ranks)
      return setLastError(ncclInvalidUsage, "emulated transport: rank %d published %d records; the communicator has %d",
                          r, headers[r].num_records, num_ranks);
  }
  std::vector<rdma::ConnRecord> records;
  std::vector<PeerWindow> window_of_peer;
  MOE_CHECK(readPeerRecords(all, stride, sizeof(CommTransportRecordHeader), spec_.nodes, me, remote_peers_,
                            "emulated transport of rank " + std::to_string(me), &records, &window_of_peer));

  QpsBySet<ibgda::GpuQp> qp_of_peer;
  QpsBySet<proxy::GpuProxyQp> proxy_of_peer;
  std::array<std::vector<Responder>, rdma::kNumQpSets> responders;  // proxy mode: [set][i] for remote_peers_[i]
  for (int set = 0; set < rdma::kNumQpSets; ++set) {
    qp_of_peer[set].assign(num_ranks, nullptr);
    proxy_of_peer[set].assign(num_ranks, nullptr);
  }
  for (int p : remote_peers_) {
    const rdma::ConnRecord& rec = records[p];
    if (headers[p].registry == 0)
      return setLastError(ncclInvalidUsage, "emulated transport: rank %d published no window registry", p);
    Responder responder;
    if (headers[p].process_token == spec_.process_token) {
      responder.windows = reinterpret_cast<const rdma::WindowRegistry*>(headers[p].registry);
    } else {
      MOE_CHECK(mapOtherProcess(p, rec, headers[p].buffer_ipc, &responder.windows));
    }
    responder.peer = p;
    for (int set = 0; set < rdma::kNumQpSets; ++set) {
      responder.remote_qpn = rec.qpn[set][0];  // this QP's peer is the peer's QP of the same set
      if (spec_.proxy) {
        responders[set].push_back(responder);
      } else {
        MOE_CHECK(nic_->connect(qps_[set][p]->qp(), responder));
        qp_of_peer[set][p] = &qps_[set][p]->view();
      }
    }
  }
  std::vector<ScaleoutPeer> table;
  std::string why;
  if (spec_.proxy) {
    for (int set = 0; set < rdma::kNumQpSets; ++set) {
      if (!proxies_[set]) continue;
      MOE_CHECK(proxies_[set]->connect(responders[set]));
      for (size_t i = 0; i < remote_peers_.size(); ++i) proxy_of_peer[set][remote_peers_[i]] = &proxies_[set]->view(i);
    }
    why = buildProxyScaleoutTable(spec_.nodes, me, proxy_of_peer, window_of_peer, &table, spec_.pure_rdma);
  } else {
    why = buildScaleoutTable(spec_.nodes, me, qp_of_peer, window_of_peer, &table, spec_.pure_rdma);
  }
  if (!why.empty()) return setLastError(ncclInternalError, "emulated transport of rank %d: %s", me, why.c_str());
  const size_t bytes = sizeof(ScaleoutPeer) * table.size();
  MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dev_table_), bytes));
  MOE_CUDA_CHECK(cudaMemcpy(dev_table_, table.data(), bytes, cudaMemcpyHostToDevice));
  MOE_CHECK(nic_->start());
  for (auto& ring : proxies_)
    if (ring) MOE_CHECK(ring->start());
  if (spec_.doorbell_proxy) {
    doorbells_ = std::make_unique<dbproxy::DoorbellProxy>(me);
    for (const auto& set : qps_)
      for (const auto& q : set)
        if (q) MOE_CHECK(doorbells_->add(q->route()));
    MOE_CHECK(doorbells_->start());
  }
  return ncclSuccess;
}

ncclResult_t CommTransport::mapOtherProcess(int peer, const rdma::ConnRecord& rec, const cudaIpcMemHandle_t& ipc,
                                            const rdma::WindowRegistry** windows) {
  std::vector<rdma::Window> remote;
  for (uint32_t w = 0; w < rec.num_windows; ++w) {
    rdma::Window win;
    win.addr = rec.windows[w].addr;
    win.bytes = rec.windows[w].bytes;
    win.rkey = rec.windows[w].rkey;
    remote.push_back(win);
  }
  std::unique_ptr<rdma::WindowRegistry> mirror(new rdma::WindowRegistry(static_cast<uint8_t>(0x40 + peer)));
  MOE_CHECK(mirror->mirror(remote, rdma::kAccessAllRemote));
  void* local = nullptr;
  const cudaError_t err = cudaIpcOpenMemHandle(&local, ipc, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    return setLastError(ncclUnhandledCudaError,
                        "emulated transport of rank %d: cudaIpcOpenMemHandle of rank %d's buffer (another process) "
                        "failed: %s; the software NIC reaches other processes' ranks only on the same GPU",
                        spec_.rank, peer, cudaGetErrorString(err));
  }
  ipc_buffers_.push_back(local);
  MOE_CHECK(backend_->mapPeer(peer, rec.windows[0].addr, rec.windows[0].bytes, local));
  *windows = mirror.get();
  mirrors_.push_back(std::move(mirror));
  return ncclSuccess;
}

std::string CommTransport::drain() {
  if (!nic_ || !nic_->running()) return "";
  const auto start = std::chrono::steady_clock::now();
  const auto bound = std::chrono::nanoseconds(spec_.timeout_ns);
  for (;;) {
    std::string busy;
    for (int set = 0; set < rdma::kNumQpSets; ++set) {
      const EmulatedGpuProxy* ring = proxies_[set].get();
      if (!ring) continue;
      // Every descriptor the GPU reserved was completed at the NIC (or the ring failed: nothing more completes).
      uint32_t produced = 0;
      if (ring->ringError() == 0 && !proxies_[set]->thread().failed() &&
          (ring->producerIndex(&produced) != ncclSuccess || ring->completed() != produced))
        busy += std::string(" (") + rdma::qpSetName(set) + " request proxy: completed " +
                std::to_string(ring->completed()) + " of " + std::to_string(produced) + " descriptors)";
    }
    for (int set = 0; set < rdma::kNumQpSets; ++set) {
      for (size_t p = 0; p < qps_[set].size(); ++p) {
        if (!qps_[set][p]) continue;
        const uint32_t qp = qps_[set][p]->qp();
        if (nic_->qpState(qp) != QpState::kReady) continue;  // in error: flushed, nothing more will execute
        // The doorbell record holds the producer's last announced index (16 bits); retired counts the NIC's progress.
        const uint32_t announced = nic_->qpDbrValue(qp) & 0xffffu, retired = nic_->qpRetired(qp) & 0xffffu;
        if (announced != retired)
          busy += " " + std::to_string(p) + " (" + rdma::qpSetName(set) + ", " +
                  std::to_string((announced - retired) & 0xffffu) + " WQEBBs)";
      }
    }
    if (busy.empty()) return "";
    if (std::chrono::steady_clock::now() - start > bound)
      return "rank " + std::to_string(spec_.rank) + ": QPs to peers" + busy + " still had work" +
             (doorbells_ ? "; " + doorbells_->describe(true) : std::string());
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void CommTransport::stop() {
  if (doorbells_) doorbells_->stop();
  for (auto& ring : proxies_)  // the proxy threads post to the NIC: they stop first
    if (ring) ring->stop();
  if (nic_) nic_->stop();
}

CommTransport::~CommTransport() {
  stop();
  doorbells_.reset();
  for (auto& ring : proxies_) ring.reset();  // host queues and the rings, after the NIC stopped reading them
  for (auto& set : qps_) set.clear();        // before the registry: each deregisters its result word
  nic_.reset();                              // frees staging through the backend
  backend_.reset();
  for (void* b : ipc_buffers_) cudaIpcCloseMemHandle(b);
  if (dev_table_ != nullptr) cudaFree(dev_table_);
  registry_.reset();
}

int CommTransport::numQps() const {
  int n = 0;
  for (int set = 0; set < rdma::kNumQpSets; ++set) {
    if (spec_.proxy) {
      n += proxies_[set] ? static_cast<int>(proxies_[set]->numQps()) : 0;
      continue;
    }
    for (const auto& q : qps_[set]) n += q ? 1 : 0;
  }
  return n;
}

std::string CommTransport::describe() const {
  std::string peers;
  for (int p : remote_peers_) peers += " " + std::to_string(p);
  return "rank " + std::to_string(spec_.rank) + ": " + nic_->describe() + ", " + std::to_string(numQps()) +
         (spec_.proxy ? " request-proxy QPs (2 sets, a ring each) to peers" : " QPs (2 sets) to peers") + peers +
         ", backend " + (backend_->failed() ? backend_->error() : std::string("ok")) +
         (doorbells_ ? ", " + doorbells_->describe(true) : std::string());
}

}  // namespace nccl_moe::emulated
