// ncclMoeComm lifetime: collective init over the user's ncclComm_t (identity + buffer exchange with NCCL
// all-gathers), peer mapping (CUDA IPC across processes, peer access inside one), host-mapped error record,
// and the collective destroy. Also the host-side bounded wait and the translation of device errors.
#include "core/comm.h"

#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "core/env.h"
#include "core/error.h"
#include "core/log.h"
#include "core/plugin_bridge.h"
#include "core/comm_init.h"
#include "topo/topo.h"

namespace nccl_moe {

const char* phaseName(Phase phase) {
  switch (phase) {
    case Phase::kBarrier: return "barrier";
    case Phase::kHtNotify: return "ht-notify";
    case Phase::kHtDispatch: return "ht-dispatch";
    case Phase::kHtCombine: return "ht-combine";
    case Phase::kLlDispatchRecv: return "ll-dispatch-recv";
    case Phase::kLlCombineRecv: return "ll-combine-recv";
    default: return "none";
  }
}

namespace {

// What every rank publishes about itself during init (all-gathered through NCCL).
struct PeerInfo {
  int status;  // ncclResult_t of this rank's local setup; the other fields are valid only when it is ncclSuccess
  uint64_t host_hash;
  int pid;
  int device;
  int num_sms;
  char bus_id[32];
  cudaIpcMemHandle_t ipc;
  uint64_t buffer_addr;
  ncclMoeConfig_t config;
};

uint64_t hostHash() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (const char* p = host; *p != '\0'; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 1099511628211ull;
  return h;
}

bool sameConfig(const ncclMoeConfig_t& a, const ncclMoeConfig_t& b) {
  return a.num_experts == b.num_experts && a.hidden == b.hidden && a.max_topk == b.max_topk &&
         a.max_tokens_per_rank == b.max_tokens_per_rank && a.ll_max_tokens_per_rank == b.ll_max_tokens_per_rank;
}

// Makes `device` current for the scope and restores the previous device afterwards (init's identity exchange
// must run on the communicator's device even when the caller's current device is wrong).
class DeviceScope {
 public:
  DeviceScope(int device, int previous) : previous_(previous), switched_(device >= 0 && device != previous) {
    if (switched_) ok_ = cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceScope() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  bool ok() const { return ok_; }

 private:
  int previous_;
  bool switched_;
  bool ok_ = true;
};

// All-gather of `bytes` per rank through `dev` (device memory of bytes * num_ranks, allocated by the caller
// before anything that can fail on one rank only, so that such a rank can still take part).
ncclResult_t allGather(ncclMoeComm* comm, const void* mine, void* all, size_t bytes, void* dev) {
  ncclResult_t res = ncclSuccess;
  do {
    cudaError_t err = cudaMemcpyAsync(static_cast<uint8_t*>(dev) + bytes * comm->rank, mine, bytes,
                                      cudaMemcpyHostToDevice, comm->internal_stream);
    if (err != cudaSuccess) {
      res = setLastError(ncclUnhandledCudaError, "cudaMemcpyAsync (init all-gather) failed: %s", cudaGetErrorString(err));
      break;
    }
    ncclResult_t nres = ncclAllGather(static_cast<uint8_t*>(dev) + bytes * comm->rank, dev, bytes, ncclUint8,
                                      comm->nccl, comm->internal_stream);
    if (nres != ncclSuccess) {
      res = setLastError(nres, "ncclAllGather (ncclMoeCommInit identity exchange) failed: %s", ncclGetErrorString(nres));
      break;
    }
    err = cudaMemcpyAsync(all, dev, bytes * comm->num_ranks, cudaMemcpyDeviceToHost, comm->internal_stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(comm->internal_stream);
    if (err != cudaSuccess) {
      res = setLastError(ncclUnhandledCudaError, "init all-gather failed: %s", cudaGetErrorString(err));
    }
  } while (false);
  return res;
}

// Peer access is a property of the device's context, shared by every communicator of the process: enable each
// (device, peer) pair once, so repeated inits neither fail nor leave "already enabled" errors behind (which
// compute-sanitizer and cudaGetLastError users would see).
ncclResult_t enablePeerAccessOnce(int device, int peer_dev) {
  static std::mutex mutex;
  static std::set<std::pair<int, int>> enabled;
  std::lock_guard<std::mutex> lock(mutex);
  if (enabled.count({device, peer_dev}) != 0) return ncclSuccess;
  cudaError_t err = cudaDeviceEnablePeerAccess(peer_dev, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // enabled by someone else (NCCL, the application): fine
  } else if (err != cudaSuccess) {
    return setLastError(ncclUnhandledCudaError, "cudaDeviceEnablePeerAccess(%d) on device %d failed: %s", peer_dev,
                        device, cudaGetErrorString(err));
  }
  enabled.insert({device, peer_dev});
  return ncclSuccess;
}

// Maps every peer's buffer into this process. Nobody writes into a peer's buffer before the agreement
// all-reduce that follows, so every rank has zeroed and mapped its own by then.
ncclResult_t mapPeers(ncclMoeComm* comm, const std::vector<PeerInfo>& peers, const PeerInfo& mine) {
  for (int r = 0; r < comm->num_ranks; ++r) {
    if (r == comm->rank) {
      comm->peer_buffer[r] = comm->buffer;
      comm->peer_same_process[r] = true;
      continue;
    }
    if (peers[r].pid == mine.pid) {
      // Same process (threads mode): the peer's pointer is valid here once peer access is on.
      int peer_dev = -1;
      MOE_CUDA_CHECK(cudaDeviceGetByPCIBusId(&peer_dev, peers[r].bus_id));
      int can = 0;
      MOE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, comm->device, peer_dev));
      if (!can) {
        return setLastError(ncclSystemError, "ncclMoeCommInit: device %d cannot access peer device %d (rank %d) over "
                                             "NVLink/PCIe peer-to-peer", comm->device, peer_dev, r);
      }
      MOE_CHECK(enablePeerAccessOnce(comm->device, peer_dev));
      comm->peer_buffer[r] = reinterpret_cast<uint8_t*>(peers[r].buffer_addr);
      comm->peer_same_process[r] = true;
    } else {
      void* ptr = nullptr;
      cudaError_t err = cudaIpcOpenMemHandle(&ptr, peers[r].ipc, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        return setLastError(ncclUnhandledCudaError,
                            "ncclMoeCommInit: cudaIpcOpenMemHandle of rank %d's buffer failed: %s", r,
                            cudaGetErrorString(err));
      }
      comm->peer_buffer[r] = static_cast<uint8_t*>(ptr);
      comm->peer_via_ipc[r] = true;
    }
  }
  return ncclSuccess;
}

}  // namespace

ncclResult_t ncclAgree(ncclMoeComm* comm, int local_failed, int* any_failed) {
  int* dev = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&dev, sizeof(int)));
  cudaError_t err = cudaMemcpyAsync(dev, &local_failed, sizeof(int), cudaMemcpyHostToDevice, comm->internal_stream);
  ncclResult_t res = ncclAllReduce(dev, dev, 1, ncclInt32, ncclMax, comm->nccl, comm->internal_stream);
  if (err == cudaSuccess) err = cudaMemcpyAsync(any_failed, dev, sizeof(int), cudaMemcpyDeviceToHost, comm->internal_stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(comm->internal_stream);
  cudaFree(dev);
  if (res != ncclSuccess) return setLastError(res, "ncclAllReduce (barrier) failed: %s", ncclGetErrorString(res));
  if (err != cudaSuccess) return setLastError(ncclUnhandledCudaError, "barrier failed: %s", cudaGetErrorString(err));
  return ncclSuccess;
}

ncclResult_t ncclBarrier(ncclMoeComm* comm) {
  int any_failed = 0;
  return ncclAgree(comm, 0, &any_failed);
}

void releaseCommResources(ncclMoeComm* comm) {
  // A failed init may leave the caller's device current while the stream and buffer live on comm->device.
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) current = -1;
  const DeviceScope scope(current >= 0 ? comm->device : -1, current);
  for (int r = 0; r < comm->num_ranks && r < kMaxRanks; ++r) {
    if (comm->peer_via_ipc[r] && comm->peer_buffer[r] != nullptr) cudaIpcCloseMemHandle(comm->peer_buffer[r]);
    comm->peer_buffer[r] = nullptr;
    comm->peer_via_ipc[r] = false;
  }
  if (comm->buffer != nullptr) cudaFree(comm->buffer);
  comm->buffer = nullptr;
  if (comm->host_error != nullptr) cudaFreeHost(comm->host_error);
  comm->host_error = nullptr;
  if (comm->host_scratch != nullptr) cudaFreeHost(comm->host_scratch);
  comm->host_scratch = nullptr;
  if (comm->internal_stream != nullptr) cudaStreamDestroy(comm->internal_stream);
  comm->internal_stream = nullptr;
}

namespace {

// Everything of init that can fail on one rank only (the caller's current device, limits that depend on the
// rank count, allocations, the IPC handle). Fills this rank's identity in *mine.
ncclResult_t localSetup(ncclMoeComm* comm, const ncclMoeConfig_t& config, int current, PeerInfo* mine) {
  if (current != comm->device) {
    return setLastError(ncclInvalidUsage,
                        "ncclMoeCommInit: the calling thread's current CUDA device is %d but nccl_comm (rank %d) is "
                        "on device %d; call cudaSetDevice(%d) first",
                        current, comm->rank, comm->device, comm->device);
  }
  if (comm->num_ranks > kMaxRanks) {
    return setLastError(ncclInvalidArgument,
                        "ncclMoeCommInit: nccl_comm has %d ranks; NCCL-MoE's intranode kernels support at most %d",
                        comm->num_ranks, kMaxRanks);
  }
  if (config.num_experts % comm->num_ranks != 0) {
    return setLastError(ncclInvalidArgument,
                        "ncclMoeCommInit: config->num_experts = %d is not a multiple of the %d ranks of nccl_comm",
                        config.num_experts, comm->num_ranks);
  }
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&comm->num_device_sms, cudaDevAttrMultiProcessorCount, comm->device));

  comm->params = LayoutParams{comm->num_ranks, config.num_experts, config.hidden, config.max_topk,
                              config.max_tokens_per_rank, config.ll_max_tokens_per_rank};
  comm->layout = BufferLayout::make(comm->params);
  const int64_t timeout_s = envInt("NCCL_MOE_TIMEOUT_S");
  comm->timeout_ns = static_cast<uint64_t>(timeout_s > 0 ? timeout_s : 1) * 1000000000ull;
  int64_t sms = config.num_sms > 0 ? config.num_sms : envInt("NCCL_MOE_NUM_SMS");
  if (sms <= 0) sms = 24;  // measured sweet spot of the HT kernels on H200 (docs/performance.md)
  comm->default_num_sms = static_cast<int>(sms < comm->num_device_sms ? sms : comm->num_device_sms);

  MOE_CUDA_CHECK(cudaMalloc(&comm->buffer, comm->layout.total_bytes));
  MOE_CUDA_CHECK(cudaMemset(comm->buffer, 0, comm->layout.total_bytes));
  MOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&comm->host_error), sizeof(ErrorRecord),
                               cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(comm->host_error, 0, sizeof(ErrorRecord));
  MOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&comm->dev_error), comm->host_error, 0));
  comm->host_scratch_ints = 64 + config.num_experts / comm->num_ranks + kMaxRanks * kMaxRanks;
  MOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&comm->host_scratch), sizeof(int) * comm->host_scratch_ints,
                               cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(comm->host_scratch, 0, sizeof(int) * comm->host_scratch_ints);
  MOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&comm->dev_scratch), comm->host_scratch, 0));
  MOE_CUDA_CHECK(cudaDeviceSynchronize());

  mine->host_hash = hostHash();
  mine->pid = getpid();
  mine->device = comm->device;
  mine->num_sms = comm->num_device_sms;
  MOE_CUDA_CHECK(cudaDeviceGetPCIBusId(mine->bus_id, sizeof(mine->bus_id), comm->device));
  MOE_CUDA_CHECK(cudaIpcGetMemHandle(&mine->ipc, comm->buffer));
  mine->buffer_addr = reinterpret_cast<uint64_t>(comm->buffer);
  mine->config = config;
  return ncclSuccess;
}

}  // namespace

ncclResult_t commInit(ncclMoeComm* comm, ncclComm_t nccl, const ncclMoeConfig_t& config, ncclResult_t args_status) {
  // The caller's argument check failed: this rank still takes part in the exchange, with that status.
  const std::string args_error = args_status == ncclSuccess ? std::string() : std::string(threadLastError());
  comm->nccl = nccl;
  comm->config = config;
  MOE_NCCL_CHECK(ncclCommCount(nccl, &comm->num_ranks));
  MOE_NCCL_CHECK(ncclCommUserRank(nccl, &comm->rank));
  MOE_NCCL_CHECK(ncclCommCuDevice(nccl, &comm->device));
  int current = -1;
  MOE_CUDA_CHECK(cudaGetDevice(&current));
  // A failure of the arguments or the local setup on one rank is not returned at once: the rank still enters
  // the identity exchange with its status, so every rank learns of it instead of waiting in an all-gather that
  // the failed rank never enters. What the exchange itself needs (the comm's device, a stream, a buffer) is
  // set up first; only its failure leaves before the exchange.
  const DeviceScope scope(comm->device, current);
  if (!scope.ok()) {
    return setLastError(ncclUnhandledCudaError, "ncclMoeCommInit: cudaSetDevice(%d) failed", comm->device);
  }
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&comm->internal_stream, cudaStreamNonBlocking));
  void* exchange = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&exchange, sizeof(PeerInfo) * comm->num_ranks));
  struct FreeOnExit {
    void* p;
    ~FreeOnExit() { cudaFree(p); }
  } free_exchange{exchange};
  PeerInfo mine{};
  const ncclResult_t local = args_status != ncclSuccess ? args_status : localSetup(comm, config, current, &mine);
  const std::string local_error =
      local == ncclSuccess ? std::string() : (args_status != ncclSuccess ? args_error : std::string(threadLastError()));
  mine.status = static_cast<int>(local);
  std::vector<PeerInfo> peers(comm->num_ranks);
  MOE_CHECK(allGather(comm, &mine, peers.data(), sizeof(PeerInfo), exchange));
  if (local != ncclSuccess) return setLastError(local, "%s", local_error.c_str());
  for (int r = 0; r < comm->num_ranks; ++r) {
    if (peers[r].status != ncclSuccess) {
      return setLastError(ncclRemoteError,
                          "ncclMoeCommInit: rank %d failed its local setup (%s) before the identity exchange; see "
                          "that rank's error",
                          r, ncclGetErrorString(static_cast<ncclResult_t>(peers[r].status)));
    }
  }

  // Every rank sees the same gathered table, so every rank takes the same decision below.
  for (int r = 0; r < comm->num_ranks; ++r) {
    if (!sameConfig(peers[r].config, config)) {
      return setLastError(ncclInvalidArgument,
                          "ncclMoeCommInit: config differs between ranks: rank %d has num_experts=%d hidden=%d "
                          "max_topk=%d max_tokens_per_rank=%d ll_max_tokens_per_rank=%d, rank %d has %d/%d/%d/%d/%d",
                          comm->rank, config.num_experts, config.hidden, config.max_topk, config.max_tokens_per_rank,
                          config.ll_max_tokens_per_rank, r, peers[r].config.num_experts, peers[r].config.hidden,
                          peers[r].config.max_topk, peers[r].config.max_tokens_per_rank,
                          peers[r].config.ll_max_tokens_per_rank);
    }
    if (peers[r].host_hash != mine.host_hash) {
      return setLastError(ncclInvalidUsage,
                          "ncclMoeCommInit: rank %d is on another host; this build supports ranks of one NVLink "
                          "machine only (scale-out transport not implemented yet)",
                          r);
    }
  }
  // Mapping can fail on one rank only; every rank then learns it through one agreement all-reduce, so no
  // rank is left waiting in a collective the others never enter.
  const ncclResult_t mapped = mapPeers(comm, peers, mine);
  std::string map_error = mapped == ncclSuccess ? std::string() : std::string(threadLastError());
  int any_failed = 0;
  MOE_CHECK(ncclAgree(comm, mapped != ncclSuccess, &any_failed));
  if (mapped != ncclSuccess) return setLastError(mapped, "%s", map_error.c_str());
  if (any_failed) {
    return setLastError(ncclRemoteError, "ncclMoeCommInit: another rank failed to map the communication buffers "
                                         "(see that rank's error)");
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
      if (registered.num_nodes > 1) {
        MOE_WARN("ncclMoeCommInit: NCCL reports %d nodes for this communicator but NCCL-MoE found one host",
                 registered.num_nodes);
      }
    } else {
      MOE_INFO("ncclMoeCommInit: %d registered %d-rank communicators on device %d; cannot tell which is this one",
               matches, comm->num_ranks, comm->device);
    }
  }
  if (comm->rank == 0) {
    MOE_INFO("ncclMoeCommInit: %d ranks, %d experts, hidden %d, buffer %.1f MiB per rank (HT %.1f, LL 2x%.1f), "
             "default %d SMs, timeout %llds",
             comm->num_ranks, config.num_experts, config.hidden, comm->layout.total_bytes / 1048576.0,
             comm->layout.ht_bytes / 1048576.0, comm->layout.ll_half_bytes / 1048576.0, comm->default_num_sms,
             static_cast<long long>(comm->timeout_ns / 1000000000ull));
    if (logEnabled(LogLevel::kInfo)) {
      std::vector<std::string> bus_ids;
      for (const PeerInfo& p : peers) bus_ids.emplace_back(p.bus_id);
      topo::Topology topology;
      if (topo::discover(bus_ids, &topology) == ncclSuccess) MOE_INFO("%s", topo::formatTopology(topology).c_str());
    }
  }
  return ncclSuccess;
}

ncclResult_t commDestroy(ncclMoeComm* comm) {
  ncclResult_t res = ncclSuccess;
  if (cudaSetDevice(comm->device) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    res = setLastError(ncclUnhandledCudaError, "ncclMoeCommDestroy: device work failed: %s",
                       cudaGetErrorString(cudaGetLastError()));
  }
  // Peers may still read or write this rank's buffer until they too are done.
  if (res == ncclSuccess) res = ncclBarrier(comm);
  releaseCommResources(comm);
  return res;
}

ncclResult_t checkAsyncError(ncclMoeComm* comm) {
  const volatile ErrorRecord* rec = comm->host_error;
  if (rec == nullptr) return ncclSuccess;
  const int code = rec->code;
  if (code <= 0) return ncclSuccess;  // -1: a writer is filling the record right now
  char message[512];
  ncclResult_t result = ncclSystemError;
  if (code == kErrTimeout) {
    char whom[32];
    if (rec->peer >= 0)
      std::snprintf(whom, sizeof(whom), "peer %d", rec->peer);
    else
      std::snprintf(whom, sizeof(whom), "a block of its own");
    std::snprintf(message, sizeof(message),
                  "device wait timed out in phase %s: rank %d waited for %s, counter %lld (expected %lld) "
                  "after NCCL_MOE_TIMEOUT_S=%llds; the communicator is unusable, destroy it",
                  phaseName(static_cast<Phase>(rec->phase)), rec->rank, whom, rec->counter, rec->expected,
                  static_cast<long long>(comm->timeout_ns / 1000000000ull));
    result = ncclRemoteError;
  } else if (code == kErrCapacity) {
    std::snprintf(message, sizeof(message),
                  "phase %s on rank %d: %lld rows arrived but the caller's capacity is %lld rows (recv_capacity); "
                  "rows past the capacity were dropped; the communicator is unusable, destroy it",
                  phaseName(static_cast<Phase>(rec->phase)), rec->rank, rec->counter, rec->expected);
    result = ncclInvalidUsage;
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
