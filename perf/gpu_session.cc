// The MoE communicator and handle of one mode (contract in gpu_session.h).
#include "gpu_session.h"

namespace nccl_moe::perf {

std::string apiError(const char* fn, ncclResult_t r, ncclMoeComm_t comm) {
  std::string s = std::string(fn) + " returned " + ncclMoeGetErrorString(r);
  const char* detail = ncclMoeGetLastError(comm);
  if (detail != nullptr && *detail != '\0') s += ": " + std::string(detail);
  return s;
}

std::string probeWorldNodes(const std::vector<int>& devices, int* num_nodes) {
  *num_nodes = 1;
  const int R = static_cast<int>(devices.size());
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = R;  // one expert per rank, the smallest world the config checks accept
  c.hidden = 128;
  c.max_topk = 1;
  c.ll_max_tokens_per_rank = 1;
  std::vector<ncclMoeComm_t> comms(devices.size(), nullptr);
  const ncclResult_t r = ncclMoeCommInitAll(comms.data(), R, devices.data(), &c);
  if (r != ncclSuccess) return apiError("ncclMoeCommInitAll", r, nullptr);
  std::string err;
  const ncclResult_t q = ncclMoeCommNodeCount(comms[0], num_nodes);
  if (q != ncclSuccess) {
    err = apiError("ncclMoeCommNodeCount", q, comms[0]);
    *num_nodes = 1;
  }
  // No kernel ran on this world: its communicators may be destroyed one by one from this thread.
  for (ncclMoeComm_t comm : comms) ncclMoeCommDestroy(comm);
  return err;
}

void MoeSession::init(const RankDevice& rd, Collective& col, const ModeConfig& cfg, int capacity,
                      SharedGpuWorld* world) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = cfg.experts;
  c.hidden = cfg.hidden;
  c.max_topk = cfg.topk;
  if (cfg.mode == Mode::kHt) {
    c.max_tokens_per_rank = capacity;
  } else {
    c.ll_max_tokens_per_rank = capacity;
    c.ll_num_sms = cfg.sms.empty() ? 0 : cfg.sms[0];  // --ll-sms: the communicator's LL budget
  }
  if (ncclMoeGetBufferSize(&c, rd.num_ranks, &buffer_bytes) != ncclSuccess) buffer_bytes = 0;
  ncclResult_t r = ncclSuccess;
  std::string err;
  col.quiesce();  // ranks sharing a GPU: nobody allocates while a peer's kernel waits for it
  if (world == nullptr) {
    r = ncclMoeCommInit(&comm, rd.comm, &c);
    if (r != ncclSuccess) err = apiError("ncclMoeCommInit", r, nullptr);
  } else {
    if (rd.rank == 0) {
      world->comms.assign(world->devices.size(), nullptr);
      world->result =
          ncclMoeCommInitAll(world->comms.data(), static_cast<int>(world->devices.size()), world->devices.data(), &c);
      world->error = world->result == ncclSuccess ? "" : apiError("ncclMoeCommInitAll", world->result, nullptr);
    }
    col.quiesce();  // rank 0's writes to `world` are visible to every rank after this meeting
    r = world->result;
    err = world->error;
    comm = r == ncclSuccess ? world->comms[static_cast<size_t>(rd.rank)] : nullptr;
  }
  if (!col.agree(r == ncclSuccess)) {
    // A rank that succeeded while another failed cannot destroy collectively: leave its communicator alone. (An
    // ncclMoeCommInitAll world fails as a whole: no rank has a communicator then.)
    comm = nullptr;
    error = err.empty() ? kOtherRank : err;
    col.quiesce();
    return;
  }
  r = ncclMoeHandleCreate(comm, &handle);
  err = r == ncclSuccess ? "" : apiError("ncclMoeHandleCreate", r, comm);
  const bool handles_ok = col.agree(r == ncclSuccess);
  if (!handles_ok) {
    if (handle != nullptr) ncclMoeHandleDestroy(handle);
    handle = nullptr;
    ncclMoeCommDestroy(comm);
    comm = nullptr;
    error = err.empty() ? kOtherRank : err;
  }
  // 0 = unknown (the query cannot fail on a live communicator; rankMain would refuse the session then).
  if (handles_ok && ncclMoeCommNodeCount(comm, &num_nodes) != ncclSuccess) num_nodes = 0;
  col.quiesce();  // every rank's allocations are done before any rank launches a kernel that waits for its peers
  usable = handles_ok;
}

bool MoeSession::checkAsync(Collective& col, std::string* err) {
  if (comm == nullptr) return false;
  ncclResult_t async = ncclSuccess;
  const ncclResult_t r = ncclMoeCommGetAsyncError(comm, &async);
  const bool ok = r == ncclSuccess && async == ncclSuccess;
  std::string local;
  if (!ok) local = apiError("asynchronous error", r != ncclSuccess ? r : async, comm);
  if (col.agree(ok)) return true;
  *err = local.empty() ? kOtherRank : local;
  usable = false;
  error = *err;
  return false;
}

void MoeSession::destroy(Collective& col) {
  col.quiesce();  // ranks sharing a GPU: no peer's kernel is left waiting while this rank frees
  if (handle != nullptr) ncclMoeHandleDestroy(handle);
  if (comm != nullptr) ncclMoeCommDestroy(comm);
  handle = nullptr;
  comm = nullptr;
  col.quiesce();
}

}  // namespace nccl_moe::perf
