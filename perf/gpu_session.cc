// The MoE communicator and handle of one mode (contract in gpu_session.h).
#include "gpu_session.h"

namespace nccl_moe::perf {

std::string apiError(const char* fn, ncclResult_t r, ncclMoeComm_t comm) {
  std::string s = std::string(fn) + " returned " + ncclMoeGetErrorString(r);
  const char* detail = ncclMoeGetLastError(comm);
  if (detail != nullptr && *detail != '\0') s += ": " + std::string(detail);
  return s;
}

void MoeSession::init(const RankDevice& rd, Collective& col, const ModeConfig& cfg, int capacity) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = cfg.experts;
  c.hidden = cfg.hidden;
  c.max_topk = cfg.topk;
  if (cfg.mode == Mode::kHt) {
    c.max_tokens_per_rank = capacity;
  } else {
    c.ll_max_tokens_per_rank = capacity;
  }
  if (ncclMoeGetBufferSize(&c, rd.num_ranks, &buffer_bytes) != ncclSuccess) buffer_bytes = 0;
  ncclResult_t r = ncclMoeCommInit(&comm, rd.comm, &c);
  std::string err = r == ncclSuccess ? "" : apiError("ncclMoeCommInit", r, nullptr);
  if (!col.agree(r == ncclSuccess)) {
    // A rank that succeeded while another failed cannot destroy collectively: leave its communicator alone.
    comm = nullptr;
    error = err.empty() ? kOtherRank : err;
    return;
  }
  r = ncclMoeHandleCreate(comm, &handle);
  err = r == ncclSuccess ? "" : apiError("ncclMoeHandleCreate", r, comm);
  if (!col.agree(r == ncclSuccess)) {
    if (handle != nullptr) ncclMoeHandleDestroy(handle);
    handle = nullptr;
    ncclMoeCommDestroy(comm);
    comm = nullptr;
    error = err.empty() ? kOtherRank : err;
    return;
  }
  usable = true;
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

void MoeSession::destroy() {
  if (handle != nullptr) ncclMoeHandleDestroy(handle);
  if (comm != nullptr) ncclMoeCommDestroy(comm);
  handle = nullptr;
  comm = nullptr;
}

}  // namespace nccl_moe::perf
