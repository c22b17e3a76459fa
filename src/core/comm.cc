// ncclMoeComm lifetime: collective init over a bootstrap (src/core/bootstrap.h: the user's ncclComm_t or an
// in-process world) in two exchanges, identity then buffers; the node map and a transport per peer; peer
// mapping (src/transport/nvlink/); host-mapped error record; destroy. Also the host-side bounded wait and the
// translation of device errors.
//
// Init, on every rank:
//   1. identity exchange: status of the local checks, host identity, process, NCCL_MOE_EMULATE_NODES,
//      NCCL_MOE_NET / NCCL_MOE_NET_MODE, device, SMs, config;
//   2. the same decisions on every rank from the same table: configs agree, the network choice agrees, node map
//      (host identities, or NCCL_MOE_EMULATE_NODES for ranks of one process), transport per peer, the scale-out
//      plan (src/transport/net_choice.h: several nodes get the software NIC when NCCL_MOE_NET=emulated and the
//      ranks are threads of one process on one GPU, else they are refused naming what is missing), ranks sharing
//      each GPU;
//   3. local resources (buffer, error record, host scratch) and the buffer exchange;
//   4. mapping of the own node's buffers, and one agreement on its outcome;
//   5. several nodes only: the scale-out transport (src/transport/scaleout_setup.h setupScaleout, over the
//      software NIC, src/transport/emulated/comm_transport.h, or the verbs backend,
//      src/transport/rdma/verbs/comm_transport.h): local creation (NIC, windows, unconnected QPs of both sets), the
//      exchange of connection records, then connection (and the software NIC's executor), and one agreement.
// A failure on one rank is never returned before the exchange it would miss: the rank enters the exchange with
// its status, so every rank learns of it instead of waiting.
#include "core/comm.h"

#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/device_guard.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "core/plugin_bridge.h"
#include "ops/ops.h"
#include "topo/topo.h"
#include "transport/emulated/chaos.h"
#include "transport/emulated/comm_transport.h"
#include "transport/net_choice.h"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/proxy/gpu_proxy.h"
#include "transport/rdma/verbs/comm_transport.h"
#include "transport/scaleout_setup.h"

namespace nccl_moe {

const char* phaseName(Phase phase) {
  switch (phase) {
    case Phase::kBarrier:
      return "barrier";
    case Phase::kHtNotify:
      return "ht-notify";
    case Phase::kHtDispatch:
      return "ht-dispatch";
    case Phase::kHtCombine:
      return "ht-combine";
    case Phase::kLlDispatchRecv:
      return "ll-dispatch-recv";
    case Phase::kLayout:
      return "layout";
    case Phase::kLlDispatchSend:
      return "ll-dispatch-send";
    case Phase::kLlCombineRecv:
      return "ll-combine-recv";
    case Phase::kNetReserve:
      return "net-reserve";
    case Phase::kNetReady:
      return "net-ready";
    case Phase::kNetDoorbell:
      return "net-doorbell";
    case Phase::kNetQuiet:
      return "net-quiet";
    case Phase::kNetCqe:
      return "net-cqe";
    case Phase::kNetProxyCredit:
      return "net-proxy-credit";
    case Phase::kNetProxyQuiet:
      return "net-proxy-quiet";
    case Phase::kHtNetNotify:
      return "ht-net-notify";
    case Phase::kHtNetDispatch:
      return "ht-net-dispatch";
    case Phase::kHtNetCombine:
      return "ht-net-combine";
    default:
      return "none";
  }
}

namespace {

// Exchange 1: what every rank publishes about itself.
struct IdentityRecord {
  int status;  // ncclResult_t of this rank's local checks; the other fields are valid only when it is ncclSuccess
  int pid;
  int device;
  int num_sms;
  uint64_t host_hash;
  uint64_t machine_hash;   // machineHash(): the physical host, whatever NCCL_HOSTID says
  uint64_t process_token;  // processToken(): equal on the threads of one process
  int64_t emulate_nodes;   // NCCL_MOE_EMULATE_NODES as this rank read it
  int32_t net_kind;        // NetKind: NCCL_MOE_NET as this rank read it
  int32_t net_mode;        // NetMode: NCCL_MOE_NET_MODE
  int32_t net_mode_set;    // NCCL_MOE_NET_MODE was set (no automatic doorbell-proxy fallback)
  int32_t net_pure_rdma;   // NCCL_MOE_NET_PURE_RDMA != 0
  char bus_id[32];
  ncclMoeConfig_t config;
};

// Exchange 2: this rank's buffer.
struct BufferRecord {
  int status;  // ncclResult_t of this rank's allocations
  NvlinkBufferRecord nvl;
};

bool sameConfig(const ncclMoeConfig_t& a, const ncclMoeConfig_t& b) {
  return a.num_experts == b.num_experts && a.hidden == b.hidden && a.max_topk == b.max_topk &&
         a.max_tokens_per_rank == b.max_tokens_per_rank && a.ll_max_tokens_per_rank == b.ll_max_tokens_per_rank &&
         a.enable_rank_masks == b.enable_rank_masks;
}

// The checks of init that can fail on one rank only, and this rank's identity.
ncclResult_t identify(ncclMoeComm* comm, const ncclMoeConfig_t& config, int current, const NetChoice* net_override,
                      IdentityRecord* mine) {
  if (current != comm->device) {
    return setLastError(ncclInvalidUsage,
                        "ncclMoeCommInit: the calling thread's current CUDA device is %d but nccl_comm (rank %d) is "
                        "on device %d; call cudaSetDevice(%d) first",
                        current, comm->rank, comm->device, comm->device);
  }
  if (comm->num_ranks > kMaxRanks) {
    return setLastError(ncclInvalidArgument,
                        "ncclMoeCommInit: %d ranks; NCCL-MoE supports at most %d (NCCL_MOE_MAX_RANKS)", comm->num_ranks,
                        kMaxRanks);
  }
  if (config.num_experts % comm->num_ranks != 0) {
    return setLastError(
        ncclInvalidArgument,
        "ncclMoeCommInit: config->num_experts = %d is not a multiple of the %d ranks of the communicator",
        config.num_experts, comm->num_ranks);
  }
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&comm->num_device_sms, cudaDevAttrMultiProcessorCount, comm->device));
  mine->pid = getpid();
  mine->device = comm->device;
  mine->num_sms = comm->num_device_sms;
  mine->host_hash = hostIdentityHash();
  mine->machine_hash = machineHash();
  mine->process_token = processToken();
  mine->emulate_nodes = envInt("NCCL_MOE_EMULATE_NODES");
  NetChoice net;
  if (net_override != nullptr) {
    net = *net_override;
  } else {
    const ncclResult_t parsed = parseNetChoice(envString("NCCL_MOE_NET"), envString("NCCL_MOE_NET_MODE"), &net);
    if (parsed != ncclSuccess) {
      const std::string why = threadLastError();
      return setLastError(parsed, "ncclMoeCommInit: %s", why.c_str());
    }
  }
  mine->net_kind = static_cast<int32_t>(net.kind);
  mine->net_mode = static_cast<int32_t>(net.mode);
  mine->net_mode_set = net.mode_explicit ? 1 : 0;
  mine->net_pure_rdma = envInt("NCCL_MOE_NET_PURE_RDMA") != 0 ? 1 : 0;
  MOE_CUDA_CHECK(cudaDeviceGetPCIBusId(mine->bus_id, sizeof(mine->bus_id), comm->device));
  mine->config = config;
  return ncclSuccess;
}

// The decisions every rank takes from the same identity table (so every rank takes the same ones).
ncclResult_t decide(ncclMoeComm* comm, const std::vector<IdentityRecord>& ids) {
  const int R = comm->num_ranks;
  for (int r = 0; r < R; ++r) {
    const ncclMoeConfig_t& c = ids[r].config;
    if (!sameConfig(c, comm->config)) {
      return setLastError(ncclInvalidArgument,
                          "ncclMoeCommInit: config differs between ranks: rank %d has num_experts=%d hidden=%d "
                          "max_topk=%d max_tokens_per_rank=%d ll_max_tokens_per_rank=%d enable_rank_masks=%d, rank %d "
                          "has %d/%d/%d/%d/%d/%d",
                          comm->rank, comm->config.num_experts, comm->config.hidden, comm->config.max_topk,
                          comm->config.max_tokens_per_rank, comm->config.ll_max_tokens_per_rank,
                          comm->config.enable_rank_masks, r, c.num_experts, c.hidden, c.max_topk, c.max_tokens_per_rank,
                          c.ll_max_tokens_per_rank, c.enable_rank_masks);
    }
  }
  std::vector<NetChoice> nets;
  for (const IdentityRecord& id : ids)
    nets.push_back({static_cast<NetKind>(id.net_kind), static_cast<NetMode>(id.net_mode), id.net_mode_set != 0,
                    id.net_pure_rdma != 0});
  MOE_CHECK(agreeNetChoice(nets, &comm->net));
  std::vector<NodeIdentity> node_ids;
  for (const IdentityRecord& id : ids) node_ids.push_back({id.host_hash, id.process_token, id.emulate_nodes});
  MOE_CHECK(chooseNodeMap(node_ids, &comm->nodes));
  comm->transport = choosePeerTransports(comm->nodes, comm->rank);
  ScaleoutFacts facts;
  facts.num_ranks = R;
  facts.num_nodes = comm->nodes.num_nodes;
  facts.nodes_text = comm->nodes.describe();
  facts.how_nodes = comm->nodes.emulated_nodes > 0
                        ? "nodes emulated by NCCL_MOE_EMULATE_NODES=" + std::to_string(comm->nodes.emulated_nodes) +
                              ": consecutive ranks of this one process"
                        : "a node = the ranks with one host identity: NCCL_MOE_HOSTID, else NCCL_HOSTID, else the "
                          "host; this rank's is " +
                              hostIdentityText();
  for (const IdentityRecord& id : ids) {
    facts.one_process = facts.one_process && id.process_token == ids[0].process_token;
    facts.one_device =
        facts.one_device && id.machine_hash == ids[0].machine_hash && std::strcmp(id.bus_id, ids[0].bus_id) == 0;
    facts.one_machine = facts.one_machine && id.machine_hash == ids[0].machine_hash;
  }
  MOE_CHECK(decideScaleout(comm->net, facts, &comm->scaleout_plan));
  if (comm->config.enable_rank_masks && comm->nodes.num_nodes > 1) {
    // The masks live in the intranode LL kernels; the internode ones (src/kernels/low_latency_net/) have none yet.
    return setLastError(ncclInvalidUsage,
                        "ncclMoeCommInit: enable_rank_masks = 1 on a communicator of %d nodes (%s); rank masks exist "
                        "for single-node communicators only so far",
                        comm->nodes.num_nodes, comm->nodes.describe().c_str());
  }
  if (comm->nodes.maxRanksPerNode() > kMaxNvlPeers) {
    return setLastError(ncclInvalidUsage,
                        "ncclMoeCommInit: %d ranks on one node (%s); at most %d per node (NCCL_MOE_MAX_NVL_PEERS)",
                        comm->nodes.maxRanksPerNode(), comm->nodes.describe().c_str(), kMaxNvlPeers);
  }
  // Ranks on this rank's GPU split its SMs: each rank's grids must be resident alongside the others'.
  const IdentityRecord& me = ids[comm->rank];
  comm->ranks_on_device = 0;
  for (const IdentityRecord& id : ids)
    if (id.host_hash == me.host_hash && std::strcmp(id.bus_id, me.bus_id) == 0) ++comm->ranks_on_device;
  comm->rank_sms = comm->num_device_sms / comm->ranks_on_device;
  return ncclSuccess;
}

// This rank's resources, from the decisions above; fills its buffer record.
ncclResult_t allocate(ncclMoeComm* comm, const ncclMoeConfig_t& config, BufferRecord* mine) {
  comm->params = LayoutParams{comm->num_ranks, config.num_experts,         config.hidden,
                              config.max_topk, config.max_tokens_per_rank, config.ll_max_tokens_per_rank};
  comm->params.num_nodes = comm->nodes.num_nodes;  // several: the internode LL region too
  for (int r = 0; r < kMaxRanks; ++r)
    comm->same_node_index[r] = static_cast<int16_t>(
        r < comm->num_ranks && comm->nodes.node_of[r] == comm->node() ? comm->nodes.local_of[r] : -1);
  comm->layout = BufferLayout::make(comm->params);
  const int64_t timeout_s = envInt("NCCL_MOE_TIMEOUT_S");
  comm->timeout_ns = static_cast<uint64_t>(timeout_s > 0 ? timeout_s : 1) * 1000000000ull;
  int64_t sms = config.num_sms > 0 ? config.num_sms : envInt("NCCL_MOE_NUM_SMS");
  if (sms <= 0) sms = 24;  // measured sweet spot of the HT kernels on H200 (docs/performance.md)
  comm->default_num_sms = static_cast<int>(sms < comm->rank_sms ? sms : comm->rank_sms);
  comm->ll_sms = config.ll_num_sms > 0 && config.ll_num_sms < comm->rank_sms ? config.ll_num_sms : comm->rank_sms;
  // Two LL kernels per call where the grid may not be resident at once: ranks share the GPU, other work was
  // given SMs (an LL budget), or asked for.
  comm->ll_split_launch =
      comm->ranks_on_device > 1 || comm->ll_sms < comm->rank_sms || envInt("NCCL_MOE_LL_SPLIT_LAUNCH") > 0;

  // Lazy module loading would otherwise load a kernel at its first launch, waiting for a device where a peer's
  // kernel may spin until this rank's next call (src/ops/load.cc).
  MOE_CHECK(loadKernels(comm->device));
  MOE_CUDA_CHECK(cudaMalloc(&comm->buffer, comm->layout.total_bytes));
  MOE_CUDA_CHECK(cudaMemset(comm->buffer, 0, comm->layout.total_bytes));
  if (config.enable_rank_masks) {  // every rank active (src/kernels/low_latency/masks.cuh)
    MOE_CUDA_CHECK(cudaMalloc(&comm->rank_mask, sizeof(int) * comm->num_ranks));
    MOE_CUDA_CHECK(cudaMemset(comm->rank_mask, 0, sizeof(int) * comm->num_ranks));
  }
  MOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&comm->host_error), sizeof(ErrorRecord),
                               cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(comm->host_error, 0, sizeof(ErrorRecord));
  MOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&comm->dev_error), comm->host_error, 0));
  comm->host_scratch_ints = 64 + config.num_experts / comm->num_ranks + kMaxNvlPeers * kMaxNvlPeers;
  MOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&comm->host_scratch), sizeof(int) * comm->host_scratch_ints,
                               cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(comm->host_scratch, 0, sizeof(int) * comm->host_scratch_ints);
  MOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&comm->dev_scratch), comm->host_scratch, 0));
  MOE_CUDA_CHECK(cudaDeviceSynchronize());

  mine->nvl.pid = getpid();
  mine->nvl.device = comm->device;
  MOE_CUDA_CHECK(cudaDeviceGetPCIBusId(mine->nvl.bus_id, sizeof(mine->nvl.bus_id), comm->device));
  MOE_CUDA_CHECK(cudaIpcGetMemHandle(&mine->nvl.ipc, comm->buffer));
  mine->nvl.addr = reinterpret_cast<uint64_t>(comm->buffer);
  return ncclSuccess;
}

// One exchange: every rank's record with its status first; a failure anywhere fails every rank.
template <typename Record>
ncclResult_t exchange(ncclMoeComm* comm, Record* mine, ncclResult_t local, std::vector<Record>* all, const char* what) {
  const std::string local_error = local == ncclSuccess ? std::string() : std::string(threadLastError());
  mine->status = static_cast<int>(local);
  all->resize(comm->num_ranks);
  MOE_CHECK(comm->bootstrap->allGather(mine, all->data(), sizeof(Record)));
  if (local != ncclSuccess) return setLastError(local, "%s", local_error.c_str());
  for (int r = 0; r < comm->num_ranks; ++r) {
    if ((*all)[r].status != ncclSuccess) {
      return setLastError(ncclRemoteError, "ncclMoeCommInit: rank %d failed its %s (%s); see that rank's error", r,
                          what, ncclGetErrorString(static_cast<ncclResult_t>((*all)[r].status)));
    }
  }
  return ncclSuccess;
}

// Step 5: this rank's scale-out transport -- the software NIC (NCCL_MOE_NET=emulated) or the verbs backend --
// through setupScaleout (local creation, the exchange of connection records, connection, one agreement).
ncclResult_t buildScaleout(ncclMoeComm* comm, const std::vector<IdentityRecord>& ids) {
  const int R = comm->num_ranks;
  std::string qp_sets;
  if (comm->scaleout_plan == ScaleoutPlan::kEmulated) {
    emulated::CommTransportSpec spec;
    spec.rank = comm->rank;
    spec.device = comm->device;
    spec.nodes = comm->nodes;
    spec.buffer = comm->buffer;
    spec.buffer_bytes = comm->layout.total_bytes;
    spec.dev_error = comm->dev_error;
    spec.timeout_ns = comm->timeout_ns;
    spec.chaos_seed = emulated::chaosSeedFromEnvironment();
    spec.proxy = comm->net.mode == NetMode::kProxy;
    spec.doorbell_proxy = comm->net.mode == NetMode::kDbProxy;
    spec.process_token = processToken();
    spec.pure_rdma = comm->net.pure_rdma;
    const auto create = [&](uint8_t* mine, std::unique_ptr<ScaleoutTransport>* out) {
      std::unique_ptr<emulated::CommTransport> t;
      const ncclResult_t res = emulated::CommTransport::create(spec, &t, mine);
      *out = std::move(t);
      return res;
    };
    MOE_CHECK(setupScaleout(*comm->bootstrap, "software NIC", emulated::commTransportRecordBytes(R), create,
                            &comm->net_transport, &qp_sets));
    if (comm->rank == 0) {
      MOE_WARN(
          "ncclMoeCommInit: NCCL_MOE_NET=emulated: ranks of other nodes are reached through the software NIC "
          "(software NIC: correctness only; its timings say nothing about a network), %d nodes, mode %s",
          comm->nodes.num_nodes, netModeName(comm->net.mode));
    }
  } else {
    verbs::CommTransportSpec spec;
    spec.rank = comm->rank;
    spec.doorbell = comm->net.mode == NetMode::kDbProxy ? verbs::DoorbellPath::kProxy
                    : comm->net.mode_explicit           ? verbs::DoorbellPath::kGpu
                                                        : verbs::DoorbellPath::kGpuElseProxy;
    spec.nodes = comm->nodes;
    spec.pure_rdma = comm->net.pure_rdma;
    spec.buffer = comm->buffer;
    spec.buffer_bytes = comm->layout.total_bytes;
    spec.dev_error = comm->dev_error;
    spec.timeout_ns = comm->timeout_ns;
    // The NIC nearest this rank's GPU (hwloc); without a topology, NCCL_MOE_IB_HCA or the first device.
    topo::Topology topology;
    if (topo::discover({ids[comm->rank].bus_id}, &topology) == ncclSuccess && !topology.gpus.empty()) {
      spec.device.topology = &topology;
      spec.device.gpu_idx = 0;
    }
    const auto create = [&](uint8_t* mine, std::unique_ptr<ScaleoutTransport>* out) {
      std::unique_ptr<verbs::CommTransport> t;
      const ncclResult_t res = verbs::CommTransport::create(spec, &t, mine);
      *out = std::move(t);
      return res;
    };
    MOE_CHECK(setupScaleout(*comm->bootstrap, "verbs", verbs::commTransportRecordBytes(R), create, &comm->net_transport,
                            &qp_sets));
  }
  MOE_INFO("ncclMoeCommInit: scale-out %s", comm->net_transport->describe().c_str());
  // The records agreed on every set's SL / TC (checkConnRecords), so rank 0's values are every rank's.
  if (comm->rank == 0) MOE_INFO("ncclMoeCommInit: scale-out QP sets: %s", qp_sets.c_str());
  return ncclSuccess;
}

void logInit(ncclMoeComm* comm, const std::vector<IdentityRecord>& ids) {
  if (comm->ranks_on_device > 1) {
    MOE_INFO(
        "ncclMoeCommInit: rank %d shares GPU %s with %d other rank(s): its kernels use %d of its %d SMs; "
        "timings of ranks sharing a GPU say nothing about NVLink",
        comm->rank, ids[comm->rank].bus_id, comm->ranks_on_device - 1, comm->rank_sms, comm->num_device_sms);
  }
  // The tuner plugin (if NCCL loaded it) announced the communicators it saw; NCCL exposes no communicator
  // hash, so match on size and device and say what was found.
  if (pluginAttached()) {
    RegisteredComm registered;
    const int matches = findRegisteredComms(comm->num_ranks, comm->device, &registered);
    if (matches == 0) {
      MOE_INFO("ncclMoeCommInit: the tuner plugin saw no %d-rank communicator on device %d", comm->num_ranks,
               comm->device);
    } else if (matches == 1) {
      MOE_INFO("ncclMoeCommInit: tuner plugin registry: comm %016llx, %d ranks, %d nodes, %d NVLink domains",
               static_cast<unsigned long long>(registered.comm_hash), registered.num_ranks, registered.num_nodes,
               registered.num_nvl_domains);
      if (registered.num_nodes != comm->nodes.num_nodes) {
        MOE_INFO("ncclMoeCommInit: NCCL reports %d nodes for this communicator, NCCL-MoE %d (%s)", registered.num_nodes,
                 comm->nodes.num_nodes,
                 comm->nodes.emulated_nodes > 0 ? "NCCL_MOE_EMULATE_NODES splits the ranks of this process"
                                                : "NCCL_MOE_HOSTID groups ranks of several NCCL hosts into one node");
      }
    } else {
      MOE_INFO("ncclMoeCommInit: %d registered %d-rank communicators on device %d; cannot tell which is this one",
               matches, comm->num_ranks, comm->device);
    }
  }
  if (comm->rank != 0) return;
  std::string transports;
  for (size_t p = 0; p < comm->transport.size(); ++p)
    transports += std::string(p > 0 ? " " : "") + transportName(comm->transport[p]);
  MOE_INFO("ncclMoeCommInit: %d ranks (bootstrap: %s), %d node(s)%s: %s; rank 0's peers: %s", comm->num_ranks,
           comm->bootstrap->name(), comm->nodes.num_nodes,
           comm->nodes.emulated_nodes > 0 ? " (NCCL_MOE_EMULATE_NODES)" : "", comm->nodes.describe().c_str(),
           transports.c_str());
  MOE_INFO(
      "ncclMoeCommInit: %d experts, hidden %d, buffer %.1f MiB per rank (HT %.1f, LL 2x%.1f), default %d SMs, "
      "timeout %llds",
      comm->config.num_experts, comm->config.hidden, comm->layout.total_bytes / 1048576.0,
      comm->layout.ht_bytes / 1048576.0, comm->layout.ll_half_bytes / 1048576.0, comm->default_num_sms,
      static_cast<long long>(comm->timeout_ns / 1000000000ull));
  if (logEnabled(LogLevel::kInfo)) {
    std::vector<std::string> bus_ids;
    for (const IdentityRecord& id : ids) bus_ids.emplace_back(id.bus_id);
    topo::Topology topology;
    if (topo::discover(bus_ids, &topology) == ncclSuccess) MOE_INFO("%s", topo::formatTopology(topology).c_str());
  }
}

}  // namespace

void releaseCommResources(ncclMoeComm* comm) {
  // A failed init may leave the caller's device current while the buffer lives on comm->device.
  const DeviceGuard guard(comm->device);
  comm->net_transport.reset();  // stops its executor first; its window covers the buffer
  unmapNvlinkPeers(&comm->nvl);
  if (comm->buffer != nullptr) cudaFree(comm->buffer);
  comm->buffer = nullptr;
  if (comm->rank_mask != nullptr) cudaFree(comm->rank_mask);
  comm->rank_mask = nullptr;
  if (comm->host_error != nullptr) cudaFreeHost(comm->host_error);
  comm->host_error = nullptr;
  if (comm->host_scratch != nullptr) cudaFreeHost(comm->host_scratch);
  comm->host_scratch = nullptr;
}

ncclResult_t commInit(ncclMoeComm* comm, std::unique_ptr<Bootstrap> bootstrap, int device,
                      const ncclMoeConfig_t& config, ncclResult_t args_status, const NetChoice* net_override) {
  comm->bootstrap = std::move(bootstrap);
  comm->rank = comm->bootstrap->rank();
  comm->num_ranks = comm->bootstrap->size();
  comm->device = device;
  comm->config = config;
  // What the exchanges need is the bootstrap (made by the caller) and the device; only their failure leaves
  // before the first exchange.
  const DeviceGuard guard(device);
  if (!guard.ok()) return setLastError(ncclUnhandledCudaError, "ncclMoeCommInit: cudaSetDevice(%d) failed", device);

  IdentityRecord me{};
  std::vector<IdentityRecord> ids;
  const ncclResult_t checked =
      args_status != ncclSuccess ? args_status : identify(comm, config, guard.previous(), net_override, &me);
  MOE_CHECK(exchange(comm, &me, checked, &ids, "local setup before the identity exchange"));
  // Every rank sees the same table, so every rank takes the same decisions (and returns the same error).
  MOE_CHECK(decide(comm, ids));

  BufferRecord buf{};
  std::vector<BufferRecord> bufs;
  MOE_CHECK(exchange(comm, &buf, allocate(comm, config, &buf), &bufs, "allocation of its communication buffer"));

  // The own node's buffers, by local index. Mapping can fail on one rank only; one agreement tells every rank.
  const std::vector<int>& local = comm->nodes.ranks_of[comm->node()];
  std::vector<NvlinkBufferRecord> node_records;
  for (int r : local) node_records.push_back(bufs[r].nvl);
  const ncclResult_t mapped = mapNvlinkPeers(comm->device, node_records.data(), static_cast<int>(local.size()),
                                             comm->localRank(), comm->buffer, &comm->nvl);
  const std::string map_error = mapped == ncclSuccess ? std::string() : std::string(threadLastError());
  bool any_failed = false;
  MOE_CHECK(comm->bootstrap->agree(mapped != ncclSuccess, &any_failed));
  if (mapped != ncclSuccess) return setLastError(mapped, "%s", map_error.c_str());
  if (any_failed) {
    return setLastError(ncclRemoteError,
                        "ncclMoeCommInit: another rank failed to map the communication buffers "
                        "(see that rank's error)");
  }
  if (comm->scaleout_plan != ScaleoutPlan::kNone) MOE_CHECK(buildScaleout(comm, ids));
  logInit(comm, ids);
  return ncclSuccess;
}

ncclResult_t commDestroy(ncclMoeComm* comm) {
  ncclResult_t res = ncclSuccess;
  {
    const DeviceGuard guard(comm->device);
    if (!guard.ok() || cudaDeviceSynchronize() != cudaSuccess) {
      res = setLastError(ncclUnhandledCudaError, "ncclMoeCommDestroy: device work failed: %s",
                         cudaGetErrorString(cudaGetLastError()));
    }
  }
  // This rank's kernels are done, but their last WQEs may not be: the NIC first carries out everything posted
  // (bounded; a peer may be waiting for these signals), then stops, so when an in-process world releases all its
  // ranks at the last retirement, no executor still runs against memory being freed.
  if (comm->net_transport) {
    const std::string busy = comm->net_transport->drain();
    if (!busy.empty())
      MOE_WARN("ncclMoeCommDestroy: the scale-out transport did not finish its work: %s", busy.c_str());
    comm->net_transport->stop();
  }
  if (comm->bootstrap == nullptr) {
    releaseCommResources(comm);
    delete comm;
    return res;
  }
  const ncclResult_t retired = comm->bootstrap->retire(comm);  // deletes comm
  return res != ncclSuccess ? res : retired;
}

ncclResult_t checkAsyncError(ncclMoeComm* comm) {
  const volatile ErrorRecord* rec = comm->host_error;
  if (rec == nullptr) return ncclSuccess;
  const int code = rec->code;
  if (code <= 0) return ncclSuccess;  // -1: a writer is filling the record right now
  char message[512];
  ncclResult_t result = ncclSystemError;
  const Phase phase = static_cast<Phase>(rec->phase);
  const bool net_phase = phase == Phase::kNetReserve || phase == Phase::kNetReady || phase == Phase::kNetDoorbell ||
                         phase == Phase::kNetQuiet || phase == Phase::kNetCqe;
  const bool proxy_wait_phase = phase == Phase::kNetProxyCredit || phase == Phase::kNetProxyQuiet;
  // The transport's describe functions take a plain copy of the record.
  ErrorRecord copy{};
  std::memcpy(&copy, const_cast<const ErrorRecord*>(rec), sizeof(copy));
  if (code == kErrNetProxy || (code == kErrTimeout && proxy_wait_phase)) {
    // The request proxy's errors name the ring's state (src/transport/rdma/proxy/gpu_proxy.h).
    std::snprintf(message, sizeof(message), "%s; the communicator is unusable, destroy it",
                  proxy::describeProxyError(copy, comm->timeout_ns).c_str());
    result = ncclRemoteError;
  } else if (code == kErrNetCqe || (code == kErrTimeout && net_phase)) {
    // The scale-out transport's errors name the QP (src/transport/rdma/ibgda/gpu_qp.h).
    std::snprintf(message, sizeof(message), "%s; the communicator is unusable, destroy it",
                  ibgda::describeNetError(copy, comm->timeout_ns).c_str());
    result = ncclRemoteError;
  } else if (code == kErrTimeout) {
    char whom[32];
    if (rec->peer >= 0)
      std::snprintf(whom, sizeof(whom), "peer %d", rec->peer);
    else
      std::snprintf(whom, sizeof(whom), "a block of its own");
    // A wait on a rank of another node (internode LL) names the QP its signal travels on.
    char qp[48] = "";
    if (rec->qpn > 0) std::snprintf(qp, sizeof(qp), " (another node: signal on QP 0x%x)", rec->qpn);  // QPN 0: none
    std::snprintf(message, sizeof(message),
                  "device wait timed out in phase %s: rank %d waited for %s%s, counter %lld (expected %lld) "
                  "after NCCL_MOE_TIMEOUT_S=%llds; the communicator is unusable, destroy it",
                  phaseName(static_cast<Phase>(rec->phase)), rec->rank, whom, qp, rec->counter, rec->expected,
                  static_cast<long long>(comm->timeout_ns / 1000000000ull));
    result = ncclRemoteError;
  } else if (code == kErrCapacity) {
    std::snprintf(message, sizeof(message),
                  "phase %s on rank %d: %lld rows arrived but the caller's capacity is %lld rows (recv_capacity); "
                  "rows past the capacity were dropped; the communicator is unusable, destroy it",
                  phaseName(static_cast<Phase>(rec->phase)), rec->rank, rec->counter, rec->expected);
    result = ncclInvalidUsage;
  } else if (code == kErrBadExpertId) {
    std::snprintf(message, sizeof(message),
                  "phase %s on rank %d: top-k id %lld of token %lld, slot %lld is neither -1 nor in [0, %d) "
                  "(num_experts); the slot was read as unused; the communicator is unusable, destroy it",
                  phaseName(static_cast<Phase>(rec->phase)), rec->rank, rec->value, rec->counter, rec->expected,
                  comm->config.num_experts);
    result = ncclInvalidArgument;
  } else {
    std::snprintf(message, sizeof(message), "phase %s on rank %d: unknown device error code %d (peer %d, counter %lld)",
                  phaseName(static_cast<Phase>(rec->phase)), rec->rank, code, rec->peer, rec->counter);
    result = ncclInternalError;
  }
  comm->failed = true;
  return setLastError(result, "%s", message);
}

ncclResult_t hostWaitGeq(ncclMoeComm* comm, const volatile int* flag, int target, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  const auto limit = std::chrono::nanoseconds(comm->timeout_ns);
  uint32_t spins = 0;
  while (*flag < target) {
    if ((++spins & 1023u) == 0) {
      MOE_CHECK(checkAsyncError(comm));
      if (std::chrono::steady_clock::now() - start > limit) {
        comm->failed = true;
        return setLastError(ncclRemoteError,
                            "%s: host wait timed out on rank %d: counter %d (expected >= %d) after "
                            "NCCL_MOE_TIMEOUT_S=%llds; the communicator is unusable, destroy it",
                            what, comm->rank, *flag, target, static_cast<long long>(comm->timeout_ns / 1000000000ull));
      }
      sched_yield();
    }
  }
  return checkAsyncError(comm);
}

}  // namespace nccl_moe
