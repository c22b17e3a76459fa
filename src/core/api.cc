// The public entry points (include/nccl_moe.h). Every argument is validated here, once, before anything is
// enqueued or sent; a rejected argument returns ncclInvalidArgument (or ncclInvalidUsage for a call that does
// not fit the communicator's state) with a message naming the argument and the expected value. Then the
// host operation (src/ops/ops.h) prepares and launches the work. The path of a call: api.cc (validation, once)
// -> ops/ (routing and state, the choice of kernels, Args) -> kernels/ (launch) -> device/ primitives.
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "core/bootstrap.h"
#include "core/comm.h"
#include "core/env.h"
#include "core/error.h"
#include "core/handle.h"
#include "core/log.h"
#include "nccl_moe.h"
#include "ops/ops.h"

#define NCCL_MOE_API extern "C" __attribute__((visibility("default")))

using nccl_moe::setLastError;

namespace nccl_moe {
namespace {

// Records the thread's last error into the communicator too, so ncclMoeGetLastError(comm) finds it.
ncclResult_t finish(ncclMoeComm* comm, ncclResult_t result) {
  if (comm != nullptr && result != ncclSuccess) {
    std::lock_guard<std::mutex> lock(comm->error_mutex);
    comm->last_error = threadLastError();
  }
  if (result != ncclSuccess) MOE_INFO("%s", threadLastError());
  return result;
}

// Struct header checks shared by every versioned argument struct.
template <typename T>
ncclResult_t checkHeader(const T* args, const char* api, const char* type, const char* initializer) {
  MOE_ARG_CHECK(args != nullptr, "%s: args is NULL", api);
  MOE_ARG_CHECK(args->size == sizeof(T), "%s: args->size is %zu, expected sizeof(%s) = %zu (initialise it with %s)",
                api, args->size, type, sizeof(T), initializer);
  MOE_ARG_CHECK(args->version / 100 == NCCL_MOE_VERSION_CODE / 100,
                "%s: args->version is %u, expected %d (NCCL_MOE_VERSION_CODE of this library; initialise with %s)", api,
                args->version, NCCL_MOE_VERSION_CODE, initializer);
  return ncclSuccess;
}

// A communicator that hit a device error stays failed; every call reports it.
ncclResult_t checkComm(ncclMoeComm* comm, const char* api) {
  MOE_ARG_CHECK(comm != nullptr, "%s: comm is NULL", api);
  MOE_CHECK(checkAsyncError(comm));
  if (comm->failed) {
    std::lock_guard<std::mutex> lock(comm->error_mutex);
    return setLastError(ncclInvalidUsage, "%s: the communicator failed earlier (%s); destroy it", api,
                        comm->last_error.c_str());
  }
  return ncclSuccess;
}

// Rank masks exist on single-node communicators only (the internode LL kernels have no masked variant).
ncclResult_t checkSingleNode(const ncclMoeComm* comm, const char* api) {
  if (comm->nodes.num_nodes <= 1) return ncclSuccess;
  return setLastError(ncclInvalidUsage,
                      "%s: this communicator spans %d nodes (%s); rank masks work on single-node communicators only",
                      api, comm->nodes.num_nodes, comm->nodes.describe().c_str());
}

// HT calls on several nodes run the internode HT kernels (src/kernels/ht_net/) over the scale-out transport; their
// rails need every node to hold the same number of ranks.
ncclResult_t checkHtNodes(const ncclMoeComm* comm, const char* api) {
  if (comm->nodes.num_nodes <= 1) return ncclSuccess;
  if (!comm->net_transport) {
    return setLastError(ncclInvalidUsage, "%s: this communicator spans %d nodes (%s) but has no scale-out transport",
                        api, comm->nodes.num_nodes, comm->nodes.describe().c_str());
  }
  const size_t per_node = comm->nodes.ranks_of[0].size();
  for (const auto& ranks : comm->nodes.ranks_of) {
    if (ranks.size() != per_node) {
      return setLastError(ncclInvalidUsage,
                          "%s: this communicator spans %d nodes of different sizes (%s); the internode "
                          "high-throughput kernels need the same number of ranks on every node (rails)",
                          api, comm->nodes.num_nodes, comm->nodes.describe().c_str());
    }
  }
  return ncclSuccess;
}

// LL calls on several nodes run the internode LL kernels over the communicator's scale-out transport.
ncclResult_t checkLlNodes(const ncclMoeComm* comm, const char* api) {
  if (comm->nodes.num_nodes <= 1 || comm->net_transport) return ncclSuccess;
  return setLastError(ncclInvalidUsage, "%s: this communicator spans %d nodes (%s) but has no scale-out transport", api,
                      comm->nodes.num_nodes, comm->nodes.describe().c_str());
}

ncclResult_t checkHandle(ncclMoeComm* comm, ncclMoeHandle* handle, const char* api) {
  MOE_ARG_CHECK(handle != nullptr, "%s: handle is NULL (create one with ncclMoeHandleCreate)", api);
  MOE_ARG_CHECK(handle->comm == comm, "%s: handle belongs to another communicator", api);
  return ncclSuccess;
}

ncclResult_t checkIndexType(ncclMoeIndexType_t type, const char* api) {
  MOE_ARG_CHECK(type == ncclMoeIndexInt64 || type == ncclMoeIndexInt32,
                "%s: args->topk_idx_type is %d, expected ncclMoeIndexInt64 (0) or ncclMoeIndexInt32 (1)", api,
                static_cast<int>(type));
  return ncclSuccess;
}

ncclResult_t checkTopk(const ncclMoeComm* comm, int topk, const char* api) {
  MOE_ARG_CHECK(topk >= 1 && topk <= comm->config.max_topk, "%s: args->topk is %d, expected 1..%d (config max_topk)",
                api, topk, comm->config.max_topk);
  return ncclSuccess;
}

ncclResult_t checkStream(cudaStream_t stream, bool may_capture, const char* api) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  MOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  MOE_ARG_CHECK(may_capture || status == cudaStreamCaptureStatusNone,
                "%s: stream is being captured into a CUDA graph but this call synchronises with the host "
                "(host-count mode); pass args->recv_capacity > 0 (worst-case mode) to capture it",
                api);
  return ncclSuccess;
}

ncclResult_t checkSms(const ncclMoeComm* comm, int num_sms, const char* api) {
  if (comm->ranks_on_device > 1) {
    MOE_ARG_CHECK(num_sms >= 0 && num_sms <= comm->rank_sms,
                  "%s: args->num_sms is %d, expected 0 (communicator default, %d) .. %d: %d ranks share this GPU of %d "
                  "SMs, and every rank's blocks must be resident at once (they wait for each other)",
                  api, num_sms, comm->default_num_sms, comm->rank_sms, comm->ranks_on_device, comm->num_device_sms);
  }
  MOE_ARG_CHECK(num_sms >= 0 && num_sms <= comm->num_device_sms,
                "%s: args->num_sms is %d, expected 0 (communicator default, %d) .. %d (SMs of this GPU)", api, num_sms,
                comm->default_num_sms, comm->num_device_sms);
  return ncclSuccess;
}

ncclResult_t checkConfig(const ncclMoeConfig_t* config, const char* api) {
  MOE_ARG_CHECK(config != nullptr, "%s: config is NULL", api);
  MOE_CHECK(checkHeader(config, api, "ncclMoeConfig_t", "NCCL_MOE_CONFIG_INITIALIZER"));
  MOE_ARG_CHECK(config->num_experts >= 1 && config->num_experts <= NCCL_MOE_MAX_EXPERTS,
                "%s: config->num_experts is %d, expected 1..%d (and a multiple of the rank count)", api,
                config->num_experts, NCCL_MOE_MAX_EXPERTS);
  MOE_ARG_CHECK(config->hidden > 0 && config->hidden % 8 == 0 && config->hidden <= 65536,
                "%s: config->hidden is %d, expected a positive multiple of 8 (16-byte bf16 rows) up to 65536", api,
                config->hidden);
  MOE_ARG_CHECK(config->max_topk >= 1 && config->max_topk <= NCCL_MOE_MAX_TOPK,
                "%s: config->max_topk is %d, expected 1..%d", api, config->max_topk, NCCL_MOE_MAX_TOPK);
  MOE_ARG_CHECK(config->max_tokens_per_rank >= 0 && config->max_tokens_per_rank < (1 << 24),
                "%s: config->max_tokens_per_rank is %d, expected 0 (no HT) .. %d", api, config->max_tokens_per_rank,
                (1 << 24) - 1);
  MOE_ARG_CHECK(config->ll_max_tokens_per_rank >= 0 && config->ll_max_tokens_per_rank <= 4096,
                "%s: config->ll_max_tokens_per_rank is %d, expected 0 (no LL) .. 4096", api,
                config->ll_max_tokens_per_rank);
  MOE_ARG_CHECK(config->max_tokens_per_rank > 0 || config->ll_max_tokens_per_rank > 0,
                "%s: config->max_tokens_per_rank and config->ll_max_tokens_per_rank are both 0; size at least one "
                "mode",
                api);
  MOE_ARG_CHECK(config->ll_max_tokens_per_rank == 0 || config->hidden % 128 == 0,
                "%s: config->hidden is %d; low-latency mode (ll_max_tokens_per_rank > 0) needs hidden %% 128 == 0", api,
                config->hidden);
  MOE_ARG_CHECK(config->num_sms >= 0, "%s: config->num_sms is %d, expected >= 0 (0 = automatic)", api, config->num_sms);
  MOE_ARG_CHECK(config->ll_num_sms >= 0, "%s: config->ll_num_sms is %d, expected >= 0 (0 = all of the rank's SMs)", api,
                config->ll_num_sms);
  MOE_ARG_CHECK(config->enable_rank_masks == 0 || config->enable_rank_masks == 1,
                "%s: config->enable_rank_masks is %d, expected 0 (off) or 1 (rank masks for low-latency calls)", api,
                config->enable_rank_masks);
  return ncclSuccess;
}

ncclResult_t checkLayoutArgs(ncclMoeComm* comm, const ncclMoeLayoutArgs_t* args) {
  const char* api = "ncclMoeGetDispatchLayout";
  MOE_CHECK(checkHeader(args, api, "ncclMoeLayoutArgs_t", "NCCL_MOE_LAYOUT_ARGS_INITIALIZER"));
  MOE_CHECK(checkIndexType(args->topk_idx_type, api));
  MOE_ARG_CHECK(args->num_tokens >= 0, "%s: args->num_tokens is %d, expected >= 0", api, args->num_tokens);
  MOE_CHECK(checkTopk(comm, args->topk, api));
  MOE_ARG_CHECK(args->num_tokens == 0 || args->topk_idx != nullptr,
                "%s: args->topk_idx is NULL but args->num_tokens is %d", api, args->num_tokens);
  MOE_ARG_CHECK(args->num_tokens_per_rank != nullptr, "%s: args->num_tokens_per_rank is NULL (expected [%d] int32)",
                api, comm->num_ranks);
  return ncclSuccess;
}

ncclResult_t checkHtCapacity(ncclMoeComm* comm, const char* api) {
  if (comm->config.max_tokens_per_rank <= 0) {
    return setLastError(ncclInvalidUsage,
                        "%s: this communicator has no high-throughput capacity (config max_tokens_per_rank = 0)", api);
  }
  return ncclSuccess;
}

ncclResult_t checkNotifyArgs(ncclMoeComm* comm, const ncclMoeNotifyArgs_t* args, cudaStream_t stream) {
  const char* api = "ncclMoeDispatchNotify";
  MOE_CHECK(checkHeader(args, api, "ncclMoeNotifyArgs_t", "NCCL_MOE_NOTIFY_ARGS_INITIALIZER"));
  MOE_CHECK(checkHtCapacity(comm, api));
  MOE_CHECK(checkIndexType(args->topk_idx_type, api));
  MOE_ARG_CHECK(args->num_tokens >= 0 && args->num_tokens <= comm->config.max_tokens_per_rank,
                "%s: args->num_tokens is %d, expected 0..%d (config max_tokens_per_rank; a larger batch needs a "
                "communicator created with max_tokens_per_rank >= %d)",
                api, args->num_tokens, comm->config.max_tokens_per_rank, args->num_tokens);
  MOE_CHECK(checkTopk(comm, args->topk, api));
  MOE_ARG_CHECK(args->num_tokens == 0 || args->topk_idx != nullptr,
                "%s: args->topk_idx is NULL but args->num_tokens is %d", api, args->num_tokens);
  MOE_ARG_CHECK(args->expert_alignment >= 1 && args->expert_alignment <= (1 << 20),
                "%s: args->expert_alignment is %d, expected 1..%d", api, args->expert_alignment, 1 << 20);
  const int max_recv = comm->num_ranks * comm->config.max_tokens_per_rank;
  MOE_ARG_CHECK(args->recv_capacity >= 0 && args->recv_capacity <= max_recv,
                "%s: args->recv_capacity is %d, expected 0 (host-count mode) .. %d (ranks x max_tokens_per_rank)", api,
                args->recv_capacity, max_recv);
  MOE_ARG_CHECK(args->recv_capacity > 0 || args->num_recv_tokens != nullptr,
                "%s: args->num_recv_tokens is NULL; host-count mode (recv_capacity = 0) returns the receive count "
                "there",
                api);
  MOE_CHECK(checkStream(stream, args->recv_capacity > 0, api));
  return ncclSuccess;
}

ncclResult_t checkDispatchArgs(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeDispatchArgs_t* args) {
  const char* api = "ncclMoeDispatch";
  MOE_CHECK(checkHeader(args, api, "ncclMoeDispatchArgs_t", "NCCL_MOE_DISPATCH_ARGS_INITIALIZER"));
  MOE_CHECK(checkHtCapacity(comm, api));
  if (!handle->ht.valid) {
    return setLastError(ncclInvalidUsage, "%s: handle holds no routing; call ncclMoeDispatchNotify with it first", api);
  }
  MOE_ARG_CHECK(args->dtype == ncclMoeBfloat16 || args->dtype == ncclMoeFp8E4M3,
                "%s: args->dtype is %d, expected ncclMoeBfloat16 (0) or ncclMoeFp8E4M3 (1)", api,
                static_cast<int>(args->dtype));
  const int elem_align = args->dtype == ncclMoeBfloat16 ? 8 : 16;
  MOE_ARG_CHECK(args->hidden > 0 && args->hidden % elem_align == 0 && args->hidden <= comm->config.hidden,
                "%s: args->hidden is %d, expected a positive multiple of %d (16-byte rows) up to %d (config hidden)",
                api, args->hidden, elem_align, comm->config.hidden);
  const int num_tokens = handle->ht.num_tokens;
  MOE_ARG_CHECK(num_tokens == 0 || args->x != nullptr, "%s: args->x is NULL but the notify had %d tokens", api,
                num_tokens);
  if (args->dtype == ncclMoeFp8E4M3) {
    MOE_ARG_CHECK(args->scale_format == ncclMoeScaleFloat || args->scale_format == ncclMoeScaleUe8m0,
                  "%s: args->scale_format is %d, expected ncclMoeScaleFloat (0) or ncclMoeScaleUe8m0 (2) for fp8 "
                  "dispatch",
                  api, static_cast<int>(args->scale_format));
    MOE_ARG_CHECK(num_tokens == 0 || args->x_scales != nullptr, "%s: args->x_scales is NULL with dtype fp8", api);
    MOE_ARG_CHECK(args->x_scales_token_stride >= 0 && args->x_scales_channel_stride >= 0,
                  "%s: args->x_scales_token_stride (%lld) and args->x_scales_channel_stride (%lld) must be >= 0", api,
                  static_cast<long long>(args->x_scales_token_stride),
                  static_cast<long long>(args->x_scales_channel_stride));
    MOE_ARG_CHECK(args->recv_x_scales != nullptr, "%s: args->recv_x_scales is NULL with dtype fp8", api);
  }
  MOE_ARG_CHECK(args->recv_x != nullptr, "%s: args->recv_x is NULL (expected [rows, %d] device memory)", api,
                args->hidden);
  MOE_ARG_CHECK(args->recv_topk_weights == nullptr || args->topk_weights != nullptr,
                "%s: args->recv_topk_weights is set but args->topk_weights is NULL", api);
  MOE_CHECK(checkSms(comm, args->num_sms, api));
  return ncclSuccess;
}

ncclResult_t checkCombineArgs(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeCombineArgs_t* args) {
  const char* api = "ncclMoeCombine";
  MOE_CHECK(checkHeader(args, api, "ncclMoeCombineArgs_t", "NCCL_MOE_COMBINE_ARGS_INITIALIZER"));
  MOE_CHECK(checkHtCapacity(comm, api));
  if (!handle->ht.valid) {
    return setLastError(ncclInvalidUsage,
                        "%s: handle holds no routing; combine reverses a dispatch made with this handle", api);
  }
  MOE_ARG_CHECK(args->hidden > 0 && args->hidden % 8 == 0 && args->hidden <= comm->config.hidden,
                "%s: args->hidden is %d, expected a positive multiple of 8 up to %d (config hidden)", api, args->hidden,
                comm->config.hidden);
  MOE_ARG_CHECK(args->x != nullptr || (handle->ht.recv_capacity == 0 && handle->ht.num_recv_tokens == 0),
                "%s: args->x is NULL (expected [N_recv, %d] bf16)", api, args->hidden);
  MOE_ARG_CHECK(handle->ht.num_tokens == 0 || args->combined_x != nullptr,
                "%s: args->combined_x is NULL (expected [%d, %d] bf16)", api, handle->ht.num_tokens, args->hidden);
  MOE_ARG_CHECK((args->topk_weights == nullptr) == (args->combined_topk_weights == nullptr),
                "%s: args->topk_weights and args->combined_topk_weights go together (one is NULL, the other not)", api);
  MOE_ARG_CHECK(args->bias_1 == nullptr || args->bias_0 != nullptr,
                "%s: args->bias_1 is set without args->bias_0; pass a single bias as bias_0", api);
  MOE_CHECK(checkSms(comm, args->num_sms, api));
  return ncclSuccess;
}

ncclResult_t checkLlCapacity(ncclMoeComm* comm, const char* api) {
  if (comm->config.ll_max_tokens_per_rank <= 0) {
    return setLastError(ncclInvalidUsage,
                        "%s: this communicator has no low-latency capacity (config ll_max_tokens_per_rank = 0)", api);
  }
  return ncclSuccess;
}

ncclResult_t checkPhase(ncclMoePhase_t phase, const char* api) {
  MOE_ARG_CHECK(phase == ncclMoePhaseBoth || phase == ncclMoePhaseSend || phase == ncclMoePhaseRecv,
                "%s: args->phase is %d, expected ncclMoePhaseBoth (3), ncclMoePhaseSend (1) or ncclMoePhaseRecv (2)",
                api, static_cast<int>(phase));
  return ncclSuccess;
}

ncclResult_t checkLlDispatchArgs(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLDispatchArgs_t* args) {
  const char* api = "ncclMoeLowLatencyDispatch";
  MOE_CHECK(checkHeader(args, api, "ncclMoeLLDispatchArgs_t", "NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER"));
  MOE_CHECK(checkLlCapacity(comm, api));
  MOE_CHECK(checkPhase(args->phase, api));
  MOE_CHECK(checkIndexType(args->topk_idx_type, api));
  MOE_ARG_CHECK(args->num_tokens >= 0 && args->num_tokens <= comm->config.ll_max_tokens_per_rank,
                "%s: args->num_tokens is %d, expected 0..%d (config ll_max_tokens_per_rank)", api, args->num_tokens,
                comm->config.ll_max_tokens_per_rank);
  MOE_ARG_CHECK(args->hidden > 0 && args->hidden % 128 == 0 && args->hidden <= comm->config.hidden,
                "%s: args->hidden is %d, expected a positive multiple of 128 up to %d (config hidden)", api,
                args->hidden, comm->config.hidden);
  MOE_CHECK(checkTopk(comm, args->topk, api));
  MOE_ARG_CHECK(args->use_fp8 == 0 || args->use_fp8 == 1, "%s: args->use_fp8 is %d, expected 0 or 1", api,
                args->use_fp8);
  MOE_ARG_CHECK(args->scale_format == ncclMoeScaleFloat || args->scale_format == ncclMoeScaleFloatPow2 ||
                    args->scale_format == ncclMoeScaleUe8m0,
                "%s: args->scale_format is %d, expected 0 (float), 1 (float pow2) or 2 (ue8m0)", api,
                static_cast<int>(args->scale_format));
  if (args->phase & ncclMoePhaseSend) {
    MOE_ARG_CHECK(args->num_tokens == 0 || args->x != nullptr, "%s: args->x is NULL but args->num_tokens is %d", api,
                  args->num_tokens);
    MOE_ARG_CHECK(args->num_tokens == 0 || args->topk_idx != nullptr,
                  "%s: args->topk_idx is NULL but args->num_tokens is %d", api, args->num_tokens);
  }
  if (args->phase & ncclMoePhaseRecv) {
    MOE_ARG_CHECK(args->recv_x != nullptr, "%s: args->recv_x is NULL (expected [%d, %d, %d])", api,
                  comm->config.num_experts / comm->num_ranks, comm->num_ranks * comm->config.ll_max_tokens_per_rank,
                  args->hidden);
    MOE_ARG_CHECK(args->recv_count != nullptr, "%s: args->recv_count is NULL (expected [%d] int32)", api,
                  comm->config.num_experts / comm->num_ranks);
    MOE_ARG_CHECK(!args->use_fp8 || args->recv_x_scales != nullptr, "%s: args->recv_x_scales is NULL with use_fp8",
                  api);
  }
  // The handle's phase state (after the arguments themselves are known to be valid).
  const LlRouting& r = handle->ll;
  const bool do_send = (args->phase & ncclMoePhaseSend) != 0;
  if (!do_send && !r.recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: phase is ncclMoePhaseRecv but this handle has no send half waiting for its receive "
                        "half (call it with ncclMoePhaseSend first)",
                        api);
  }
  if (do_send && r.recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: this handle's previous send half (ncclMoePhaseSend) has not been received yet; call "
                        "it with ncclMoePhaseRecv first",
                        api);
  }
  if (!do_send && (args->hidden != r.hidden || args->use_fp8 != r.use_fp8 || args->topk != r.topk ||
                   (args->use_fp8 && static_cast<int>(args->scale_format) != r.scale_format))) {
    return setLastError(ncclInvalidArgument,
                        "%s: the receive half's hidden/topk/use_fp8/scale_format (%d/%d/%d/%d) differ from its send "
                        "half's (%d/%d/%d/%d)",
                        api, args->hidden, args->topk, args->use_fp8, static_cast<int>(args->scale_format), r.hidden,
                        r.topk, r.use_fp8, r.scale_format);
  }
  return ncclSuccess;
}

ncclResult_t checkLlCombineArgs(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLCombineArgs_t* args) {
  const char* api = "ncclMoeLowLatencyCombine";
  MOE_CHECK(checkHeader(args, api, "ncclMoeLLCombineArgs_t", "NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER"));
  MOE_CHECK(checkLlCapacity(comm, api));
  MOE_CHECK(checkPhase(args->phase, api));
  const LlRouting& r = handle->ll;
  if (!r.valid) {
    return setLastError(ncclInvalidUsage,
                        "%s: handle holds no low-latency routing; combine reverses a low-latency dispatch made with "
                        "this handle",
                        api);
  }
  MOE_ARG_CHECK(args->zero_copy == 0 || args->zero_copy == 1, "%s: args->zero_copy is %d, expected 0 or 1", api,
                args->zero_copy);
  MOE_ARG_CHECK(args->num_tokens >= 0 && args->num_tokens <= comm->config.ll_max_tokens_per_rank,
                "%s: args->num_tokens is %d, expected 0..%d (config ll_max_tokens_per_rank)", api, args->num_tokens,
                comm->config.ll_max_tokens_per_rank);
  MOE_ARG_CHECK(args->hidden > 0 && args->hidden % 128 == 0 && args->hidden <= comm->config.hidden,
                "%s: args->hidden is %d, expected a positive multiple of 128 up to %d (config hidden)", api,
                args->hidden, comm->config.hidden);
  MOE_CHECK(checkTopk(comm, args->topk, api));
  // The send half reduces each token's expert outputs per rank with the token's weights (pushed by the
  // token's owner), so it needs the weights; the receive half reads topk_idx to know which ranks hold parts.
  if (args->phase & ncclMoePhaseSend) {
    MOE_ARG_CHECK(args->zero_copy || args->x != nullptr,
                  "%s: args->x is NULL without zero_copy (expected [E_l, R*max, %d] bf16)", api, args->hidden);
    // NULL weights: the ones the dispatch carried in its messages (ncclMoeLLDispatchArgs_t::topk_weights).
    MOE_ARG_CHECK(args->num_tokens == 0 || args->topk_weights != nullptr || handle->ll.dispatch_weights,
                  "%s: args->topk_weights is NULL but args->num_tokens is %d and the dispatch carried no weights", api,
                  args->num_tokens);
  }
  if (args->phase & ncclMoePhaseRecv) {
    MOE_ARG_CHECK(args->num_tokens == 0 || args->topk_idx != nullptr,
                  "%s: args->topk_idx is NULL but args->num_tokens is %d", api, args->num_tokens);
    MOE_ARG_CHECK(args->num_tokens == 0 || args->out != nullptr, "%s: args->out is NULL (expected [%d, %d] bf16)", api,
                  args->num_tokens, args->hidden);
  }
  // The handle's phase state (after the arguments themselves are known to be valid).
  if (r.recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: the handle's dispatch has not been received yet (call ncclMoeLowLatencyDispatch with "
                        "ncclMoePhaseRecv first)",
                        api);
  }
  const bool do_send = (args->phase & ncclMoePhaseSend) != 0;
  if (!do_send && !r.combine_recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: phase is ncclMoePhaseRecv but this handle has no combine send half waiting for its "
                        "receive half",
                        api);
  }
  if (do_send && r.combine_recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: this handle's previous combine send half has not been received yet; call it with "
                        "ncclMoePhaseRecv first",
                        api);
  }
  if (args->num_tokens != r.num_tokens || args->topk != r.topk || args->hidden != r.hidden) {
    return setLastError(ncclInvalidArgument,
                        "%s: args->num_tokens/topk/hidden are %d/%d/%d, expected the dispatch's %d/%d/%d", api,
                        args->num_tokens, args->topk, args->hidden, r.num_tokens, r.topk, r.hidden);
  }
  return ncclSuccess;
}

}  // namespace
}  // namespace nccl_moe

using namespace nccl_moe;

NCCL_MOE_API ncclResult_t ncclMoeGetVersion(int* version) {
  MOE_ARG_CHECK(version != nullptr, "ncclMoeGetVersion: version is NULL");
  *version = NCCL_MOE_VERSION_CODE;
  return ncclSuccess;
}

NCCL_MOE_API const char* ncclMoeGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error (run with NCCL_MOE_DEBUG=INFO for details)";
    case ncclSystemError:
      return "unhandled system error (run with NCCL_MOE_DEBUG=INFO for details)";
    case ncclInternalError:
      return "internal error - please report this issue to the NCCL-MoE developers";
    case ncclInvalidArgument:
      return "invalid argument (run with NCCL_MOE_DEBUG=WARN for details)";
    case ncclInvalidUsage:
      return "invalid usage (run with NCCL_MOE_DEBUG=WARN for details)";
    case ncclRemoteError:
      return "remote process exited, timed out or there was a network error";
    case ncclInProgress:
      return "NCCL-MoE operation in progress";
    default:
      return "unknown result code";
  }
}

NCCL_MOE_API const char* ncclMoeGetLastError(ncclMoeComm_t comm) {
  if (comm == nullptr) return threadLastError();
  std::lock_guard<std::mutex> lock(comm->error_mutex);
  // The string lives in the comm; valid until the next failing call on it.
  return comm->last_error.c_str();
}

NCCL_MOE_API ncclResult_t ncclMoeGetBufferSize(const ncclMoeConfig_t* config, int num_ranks, size_t* bytes) {
  clearThreadLastError();
  MOE_CHECK(checkConfig(config, "ncclMoeGetBufferSize"));
  MOE_ARG_CHECK(num_ranks >= 1 && num_ranks <= NCCL_MOE_MAX_NVL_PEERS,
                "ncclMoeGetBufferSize: num_ranks is %d, expected 1..%d (NCCL_MOE_MAX_NVL_PEERS: the ranks of one node; "
                "buffers of several nodes need the scale-out transport, not in this build)",
                num_ranks, NCCL_MOE_MAX_NVL_PEERS);
  MOE_ARG_CHECK(config->num_experts % num_ranks == 0,
                "ncclMoeGetBufferSize: config->num_experts = %d is not a multiple of num_ranks = %d",
                config->num_experts, num_ranks);
  MOE_ARG_CHECK(bytes != nullptr, "ncclMoeGetBufferSize: bytes is NULL");
  const LayoutParams params{num_ranks,        config->num_experts,         config->hidden,
                            config->max_topk, config->max_tokens_per_rank, config->ll_max_tokens_per_rank};
  *bytes = BufferLayout::make(params).total_bytes;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeCommInit(ncclMoeComm_t* comm, ncclComm_t nccl_comm, const ncclMoeConfig_t* config) {
  clearThreadLastError();
  MOE_ARG_CHECK(comm != nullptr, "ncclMoeCommInit: comm is NULL");
  *comm = nullptr;
  MOE_ARG_CHECK(nccl_comm != nullptr, "ncclMoeCommInit: nccl_comm is NULL");
  MOE_ARG_CHECK(config != nullptr, "ncclMoeCommInit: config is NULL");
  // NULL pointers return at once (before touching NCCL). A bad config content on one rank must not leave the
  // others waiting in the collective init: the rank joins the init's identity exchange with its error (a
  // config whose size field is not this library's is replaced by zeros there, its fields are not read).
  const ncclResult_t args_status = checkConfig(config, "ncclMoeCommInit");
  ncclMoeConfig_t usable{};
  if (config->size == sizeof(ncclMoeConfig_t)) usable = *config;
  int device = -1;
  MOE_NCCL_CHECK(ncclCommCuDevice(nccl_comm, &device));
  std::unique_ptr<Bootstrap> bootstrap;
  ncclResult_t res = makeNcclBootstrap(nccl_comm, device, &bootstrap);
  if (res != ncclSuccess) return res;
  auto* c = new (std::nothrow) ncclMoeComm();
  if (c == nullptr) return setLastError(ncclSystemError, "ncclMoeCommInit: out of host memory");
  res = commInit(c, std::move(bootstrap), device, usable, args_status);
  if (res != ncclSuccess) {
    releaseCommResources(c);
    delete c;
    MOE_WARN("%s", threadLastError());
    return res;
  }
  *comm = c;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeCommInitAll(ncclMoeComm_t* comms, int num_ranks, const int* devices,
                                             const ncclMoeConfig_t* config) {
  clearThreadLastError();
  const char* api = "ncclMoeCommInitAll";
  MOE_ARG_CHECK(comms != nullptr, "%s: comms is NULL", api);
  MOE_ARG_CHECK(num_ranks >= 1 && num_ranks <= NCCL_MOE_MAX_RANKS, "%s: num_ranks is %d, expected 1..%d", api,
                num_ranks, NCCL_MOE_MAX_RANKS);
  for (int r = 0; r < num_ranks; ++r) comms[r] = nullptr;
  // One process: a bad argument fails here, before any rank starts (nobody waits for a missing rank).
  MOE_CHECK(checkConfig(config, api));
  int count = 0;
  MOE_CUDA_CHECK(cudaGetDeviceCount(&count));
  std::vector<int> dev(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    dev[r] = devices != nullptr ? devices[r] : r;
    MOE_ARG_CHECK(dev[r] >= 0 && dev[r] < count, "%s: %s[%d] is %d, expected 0..%d (CUDA devices of this process)", api,
                  devices != nullptr ? "devices" : "rank (devices is NULL: rank r on device r)", r, dev[r], count - 1);
  }
  const int64_t timeout_s = envInt("NCCL_MOE_TIMEOUT_S");
  std::vector<std::unique_ptr<Bootstrap>> bootstraps(num_ranks);
  MOE_CHECK(makeWorldBootstraps(
      num_ranks, static_cast<unsigned long long>(timeout_s > 0 ? timeout_s : 1) * 1000000000ull, bootstraps.data()));
  // Every rank's init on its own thread: the exchanges of the ranks meet in the world.
  std::vector<ncclMoeComm*> made(num_ranks, nullptr);
  std::vector<ncclResult_t> results(num_ranks, ncclSuccess);
  std::vector<std::string> errors(num_ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < num_ranks; ++r) {
    threads.emplace_back([&, r] {
      clearThreadLastError();
      auto* c = new (std::nothrow) ncclMoeComm();
      if (c == nullptr) {
        results[r] = setLastError(ncclSystemError, "%s: out of host memory", api);
      } else {
        // The init's current-device check is about the caller's thread; this thread makes the rank's device
        // current itself.
        results[r] =
            cudaSetDevice(dev[r]) == cudaSuccess
                ? commInit(c, std::move(bootstraps[r]), dev[r], *config, ncclSuccess)
                : setLastError(ncclUnhandledCudaError, "%s: cudaSetDevice(%d) failed for rank %d", api, dev[r], r);
        if (results[r] == ncclSuccess) {
          made[r] = c;
        } else {
          releaseCommResources(c);
          delete c;
        }
      }
      if (results[r] != ncclSuccess) errors[r] = threadLastError();
    });
  }
  for (auto& t : threads) t.join();
  int failed = -1;  // the first rank that failed by itself (not because another did)
  for (int r = 0; r < num_ranks; ++r)
    if (results[r] != ncclSuccess && (failed < 0 || results[failed] == ncclRemoteError)) failed = r;
  if (failed >= 0) {
    // No rank has run a kernel: release the others directly (the world never completes its retirement).
    for (ncclMoeComm* c : made) {
      if (c == nullptr) continue;
      releaseCommResources(c);
      delete c;
    }
    return setLastError(results[failed], "%s: rank %d (device %d): %s", api, failed, dev[failed],
                        errors[failed].c_str());
  }
  int max_shared = 1;
  for (ncclMoeComm* c : made) max_shared = c->ranks_on_device > max_shared ? c->ranks_on_device : max_shared;
  const char* conn = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  const int wanted = 4 * max_shared < 32 ? 4 * max_shared : 32;
  if (max_shared > 1 && (conn == nullptr || std::atoi(conn) < wanted)) {
    MOE_WARN(
        "%s: up to %d ranks share one GPU and CUDA_DEVICE_MAX_CONNECTIONS is %s: if two ranks' streams share "
        "a hardware queue, a kernel that waits for its peer can queue behind that peer's kernel and time out; "
        "set CUDA_DEVICE_MAX_CONNECTIONS=32 before the process first uses CUDA",
        api, max_shared, conn != nullptr ? conn : "unset (8)");
  }
  for (int r = 0; r < num_ranks; ++r) comms[r] = made[r];
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t comm) {
  clearThreadLastError();
  if (comm == nullptr) return ncclSuccess;
  return commDestroy(comm);
}

NCCL_MOE_API ncclResult_t ncclMoeCommRank(ncclMoeComm_t comm, int* rank) {
  MOE_ARG_CHECK(comm != nullptr && rank != nullptr, "ncclMoeCommRank: comm or rank is NULL");
  *rank = comm->rank;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeCommCount(ncclMoeComm_t comm, int* num_ranks) {
  MOE_ARG_CHECK(comm != nullptr && num_ranks != nullptr, "ncclMoeCommCount: comm or num_ranks is NULL");
  *num_ranks = comm->num_ranks;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeCommCuDevice(ncclMoeComm_t comm, int* device) {
  MOE_ARG_CHECK(comm != nullptr && device != nullptr, "ncclMoeCommCuDevice: comm or device is NULL");
  *device = comm->device;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeCommNodeCount(ncclMoeComm_t comm, int* num_nodes) {
  MOE_ARG_CHECK(comm != nullptr, "ncclMoeCommNodeCount: comm is NULL");
  MOE_ARG_CHECK(num_nodes != nullptr, "ncclMoeCommNodeCount: num_nodes is NULL");
  // A communicator whose node map was never built (a stand-in without init) counts as one node.
  *num_nodes = comm->nodes.num_nodes > 0 ? comm->nodes.num_nodes : 1;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeCommGetAsyncError(ncclMoeComm_t comm, ncclResult_t* async_error) {
  MOE_ARG_CHECK(comm != nullptr && async_error != nullptr, "ncclMoeCommGetAsyncError: comm or async_error is NULL");
  *async_error = checkAsyncError(comm);
  finish(comm, *async_error);
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeHandleCreate(ncclMoeComm_t comm, ncclMoeHandle_t* handle) {
  clearThreadLastError();
  MOE_ARG_CHECK(comm != nullptr, "ncclMoeHandleCreate: comm is NULL");
  MOE_ARG_CHECK(handle != nullptr, "ncclMoeHandleCreate: handle is NULL");
  *handle = nullptr;
  auto* h = new (std::nothrow) ncclMoeHandle();
  if (h == nullptr) return setLastError(ncclSystemError, "ncclMoeHandleCreate: out of host memory");
  h->comm = comm;
  ncclResult_t res = ncclSuccess;
  if (comm->config.max_tokens_per_rank > 0) res = htRoutingAlloc(comm, &h->ht);
  if (res == ncclSuccess && comm->config.ll_max_tokens_per_rank > 0) res = llRoutingAlloc(comm, &h->ll);
  if (res != ncclSuccess) {
    htRoutingFree(&h->ht);
    llRoutingFree(&h->ll);
    delete h;
    return finish(comm, res);
  }
  *handle = h;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeHandleDestroy(ncclMoeHandle_t handle) {
  if (handle == nullptr) return ncclSuccess;
  htRoutingFree(&handle->ht);
  llRoutingFree(&handle->ll);
  delete handle;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeHandleRecvCountDevice(ncclMoeHandle_t handle, const int** recv_count,
                                                       const int** recv_count_per_expert, const int** recv_src_info) {
  MOE_ARG_CHECK(handle != nullptr, "ncclMoeHandleRecvCountDevice: handle is NULL");
  if (recv_count != nullptr) *recv_count = handle->ht.recv_count;
  if (recv_count_per_expert != nullptr) *recv_count_per_expert = handle->ht.recv_count_per_expert;
  if (recv_src_info != nullptr) *recv_src_info = handle->ht.recv_src_info;
  return ncclSuccess;
}

NCCL_MOE_API ncclResult_t ncclMoeGetDispatchLayout(ncclMoeComm_t comm, const ncclMoeLayoutArgs_t* args,
                                                   cudaStream_t stream) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeGetDispatchLayout");
  if (res == ncclSuccess) res = checkLayoutArgs(comm, args);
  if (res == ncclSuccess) res = opDispatchLayout(comm, *args, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeDispatchNotify(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                const ncclMoeNotifyArgs_t* args, cudaStream_t stream) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeDispatchNotify");
  if (res == ncclSuccess) res = checkHtNodes(comm, "ncclMoeDispatchNotify");
  if (res == ncclSuccess) res = checkHandle(comm, handle, "ncclMoeDispatchNotify");
  if (res == ncclSuccess) res = checkNotifyArgs(comm, args, stream);
  if (res == ncclSuccess) res = opHtNotify(comm, handle, *args, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeDispatch(ncclMoeComm_t comm, ncclMoeHandle_t handle, const ncclMoeDispatchArgs_t* args,
                                          cudaStream_t stream) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeDispatch");
  if (res == ncclSuccess) res = checkHtNodes(comm, "ncclMoeDispatch");
  if (res == ncclSuccess) res = checkHandle(comm, handle, "ncclMoeDispatch");
  if (res == ncclSuccess) res = checkDispatchArgs(comm, handle, args);
  if (res == ncclSuccess) res = opHtDispatch(comm, handle, *args, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeCombine(ncclMoeComm_t comm, ncclMoeHandle_t handle, const ncclMoeCombineArgs_t* args,
                                         cudaStream_t stream) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeCombine");
  if (res == ncclSuccess) res = checkHtNodes(comm, "ncclMoeCombine");
  if (res == ncclSuccess) res = checkHandle(comm, handle, "ncclMoeCombine");
  if (res == ncclSuccess) res = checkCombineArgs(comm, handle, args);
  if (res == ncclSuccess) res = opHtCombine(comm, handle, *args, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeLowLatencyDispatch(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                    const ncclMoeLLDispatchArgs_t* args, cudaStream_t stream) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeLowLatencyDispatch");
  if (res == ncclSuccess) res = checkLlNodes(comm, "ncclMoeLowLatencyDispatch");
  if (res == ncclSuccess) res = checkHandle(comm, handle, "ncclMoeLowLatencyDispatch");
  if (res == ncclSuccess) res = checkLlDispatchArgs(comm, handle, args);
  if (res == ncclSuccess) res = opLlDispatch(comm, handle, *args, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeLowLatencyCombine(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                   const ncclMoeLLCombineArgs_t* args, cudaStream_t stream) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeLowLatencyCombine");
  if (res == ncclSuccess) res = checkLlNodes(comm, "ncclMoeLowLatencyCombine");
  if (res == ncclSuccess) res = checkHandle(comm, handle, "ncclMoeLowLatencyCombine");
  if (res == ncclSuccess) res = checkLlCombineArgs(comm, handle, args);
  if (res == ncclSuccess) res = opLlCombine(comm, handle, *args, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeLowLatencyCombineBuffer(ncclMoeComm_t comm, ncclMoeHandle_t handle, void** buffer) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeLowLatencyCombineBuffer");
  if (res == ncclSuccess) res = checkLlNodes(comm, "ncclMoeLowLatencyCombineBuffer");
  if (res == ncclSuccess) res = checkHandle(comm, handle, "ncclMoeLowLatencyCombineBuffer");
  if (res == ncclSuccess) res = checkLlCapacity(comm, "ncclMoeLowLatencyCombineBuffer");
  if (res == ncclSuccess && buffer == nullptr) {
    res = setLastError(ncclInvalidArgument, "ncclMoeLowLatencyCombineBuffer: buffer is NULL");
  }
  if (res == ncclSuccess && !handle->ll.valid) {
    res = setLastError(ncclInvalidUsage,
                       "ncclMoeLowLatencyCombineBuffer: handle holds no low-latency dispatch; the buffer belongs to "
                       "the dispatch recorded in the handle");
  }
  if (res == ncclSuccess) res = opLlCombineBuffer(comm, handle, buffer);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeLowLatencyRecvSrcInfo(ncclMoeComm_t comm, ncclMoeHandle_t handle,
                                                       const int** recv_src_info) {
  clearThreadLastError();
  const char* api = "ncclMoeLowLatencyRecvSrcInfo";
  ncclResult_t res = checkComm(comm, api);
  if (res == ncclSuccess) res = checkLlNodes(comm, api);
  if (res == ncclSuccess) res = checkHandle(comm, handle, api);
  if (res == ncclSuccess) res = checkLlCapacity(comm, api);
  if (res == ncclSuccess && recv_src_info == nullptr)
    res = setLastError(ncclInvalidArgument, "%s: recv_src_info is NULL", api);
  if (res == ncclSuccess && !handle->ll.valid)
    res = setLastError(ncclInvalidUsage,
                       "%s: handle holds no low-latency dispatch; issue ncclMoeLowLatencyDispatch first", api);
  if (res == ncclSuccess) *recv_src_info = handle->ll.recv_src_info;
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeLowLatencyReset(ncclMoeComm_t comm, cudaStream_t stream) {
  clearThreadLastError();
  ncclResult_t res = checkComm(comm, "ncclMoeLowLatencyReset");
  if (res == ncclSuccess) res = checkLlNodes(comm, "ncclMoeLowLatencyReset");
  if (res == ncclSuccess) res = checkLlCapacity(comm, "ncclMoeLowLatencyReset");
  if (res == ncclSuccess) res = opLlReset(comm, stream);
  return finish(comm, res);
}

namespace nccl_moe {
namespace {

ncclResult_t checkRankMasks(ncclMoeComm* comm, const char* api) {
  if (comm->rank_mask == nullptr) {
    return setLastError(ncclInvalidUsage,
                        "%s: this communicator was created without rank masks (config enable_rank_masks = 0)", api);
  }
  return ncclSuccess;
}

// The checks of ncclMoeSetRankMask / ncclMoeClearRankMask; *masked_bits = the mask as bits (bit r: rank r masked).
ncclResult_t checkSetRankMask(ncclMoeComm* comm, const int* mask, const char* api, uint32_t* masked_bits) {
  MOE_CHECK(checkComm(comm, api));
  MOE_CHECK(checkSingleNode(comm, api));
  MOE_CHECK(checkRankMasks(comm, api));
  MOE_CHECK(checkLlCapacity(comm, api));
  *masked_bits = 0;
  if (mask == nullptr) return ncclSuccess;  // clear
  for (int r = 0; r < comm->num_ranks; ++r) {
    MOE_ARG_CHECK(mask[r] == 0 || mask[r] == 1, "%s: mask[%d] is %d, expected 0 (active) or 1 (masked)", api, r,
                  mask[r]);
    if (mask[r]) *masked_bits |= 1u << r;
  }
  MOE_ARG_CHECK(mask[comm->rank] == 0,
                "%s: mask[%d] is 1 but this is rank %d; a rank does not mask itself (ranks masked in the new mask do "
                "not call ncclMoeSetRankMask)",
                api, comm->rank, comm->rank);
  return ncclSuccess;
}

}  // namespace
}  // namespace nccl_moe

NCCL_MOE_API ncclResult_t ncclMoeQueryRankMask(ncclMoeComm_t comm, int* mask, int mask_on_device, cudaStream_t stream) {
  clearThreadLastError();
  const char* api = "ncclMoeQueryRankMask";
  ncclResult_t res = checkComm(comm, api);
  if (res == ncclSuccess) res = checkRankMasks(comm, api);
  if (res == ncclSuccess && mask == nullptr)
    res = setLastError(ncclInvalidArgument, "%s: mask is NULL (expected [%d] int32)", api, comm->num_ranks);
  if (res == ncclSuccess && mask_on_device != 0 && mask_on_device != 1)
    res = setLastError(ncclInvalidArgument, "%s: mask_on_device is %d, expected 0 (host memory) or 1 (device memory)",
                       api, mask_on_device);
  if (res == ncclSuccess && mask_on_device == 0) res = checkStream(stream, false, api);
  if (res == ncclSuccess) res = opLlQueryMask(comm, mask, mask_on_device == 1, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeSetRankMask(ncclMoeComm_t comm, const int* mask, cudaStream_t stream) {
  clearThreadLastError();
  const char* api = "ncclMoeSetRankMask";
  uint32_t masked_bits = 0;
  ncclResult_t res = comm == nullptr ? setLastError(ncclInvalidArgument, "%s: comm is NULL", api) : ncclSuccess;
  if (res == ncclSuccess && mask == nullptr)
    res = setLastError(ncclInvalidArgument,
                       "%s: mask is NULL (expected [%d] int32 host memory; "
                       "ncclMoeClearRankMask clears)",
                       api, comm->num_ranks);
  if (res == ncclSuccess) res = checkSetRankMask(comm, mask, api, &masked_bits);
  if (res == ncclSuccess) res = opLlSetMask(comm, masked_bits, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeClearRankMask(ncclMoeComm_t comm, cudaStream_t stream) {
  clearThreadLastError();
  const char* api = "ncclMoeClearRankMask";
  uint32_t masked_bits = 0;
  ncclResult_t res = comm == nullptr ? setLastError(ncclInvalidArgument, "%s: comm is NULL", api) : ncclSuccess;
  if (res == ncclSuccess) res = checkSetRankMask(comm, nullptr, api, &masked_bits);
  if (res == ncclSuccess) res = opLlSetMask(comm, 0, stream);
  return finish(comm, res);
}

NCCL_MOE_API ncclResult_t ncclMoeCastToFp8(const void* x, int num_tokens, int hidden, ncclMoeScaleFormat_t scale_format,
                                           void* out_fp8, void* out_scales, cudaStream_t stream) {
  clearThreadLastError();
  const char* api = "ncclMoeCastToFp8";
  MOE_ARG_CHECK(num_tokens >= 0, "%s: num_tokens is %d, expected >= 0", api, num_tokens);
  MOE_ARG_CHECK(hidden > 0 && hidden % 16 == 0, "%s: hidden is %d, expected a positive multiple of 16", api, hidden);
  MOE_ARG_CHECK(
      scale_format == ncclMoeScaleFloat || scale_format == ncclMoeScaleFloatPow2 || scale_format == ncclMoeScaleUe8m0,
      "%s: scale_format is %d, expected 0 (float), 1 (float pow2) or 2 (ue8m0)", api, static_cast<int>(scale_format));
  MOE_ARG_CHECK(num_tokens == 0 || (x != nullptr && out_fp8 != nullptr && out_scales != nullptr),
                "%s: x, out_fp8 and out_scales must be device pointers (one is NULL)", api);
  if (num_tokens == 0) return ncclSuccess;
  return opCastToFp8(x, num_tokens, hidden, scale_format, out_fp8, out_scales, stream);
}
