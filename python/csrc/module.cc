// nccl_moe._C: a thin nanobind mirror of include/nccl_moe.h, plus the few NCCL and CUDA runtime calls the Python
// package needs (a unique id and ncclCommInitRank for a communicator of its own, events for overlap).
//
// Contract of this module:
//   - It links the public C ABI only (libnccl_moe.so, libnccl.so.2, libcudart.so.13), never libtorch: one build
//     serves every torch version.
//   - Tensors cross as integers (device pointers from Tensor.data_ptr()) plus the shape values the C structs take;
//     streams cross as integers (cudaStream_t). No DLPack on the hot path.
//   - Every failing call raises nccl_moe.NcclMoeError (nccl_moe.NcclMoeArgumentError for ncclInvalidArgument)
//     carrying the ncclResult_t and ncclMoeGetLastError()'s text of the calling thread.
//   - The GIL is released around every call that may wait for other ranks (init, notify, destroy) and around every
//     collective launch, so the ranks of a one-process world can be driven from Python threads.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "nccl_moe.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// ------------------------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------------------------

// Python exception classes, registered by nccl_moe/_errors.py at import (nccl_moe._C._register_errors).
PyObject* g_error_class = nullptr;
PyObject* g_argument_error_class = nullptr;

// A failed call: the result code and the text that explains it (ncclMoeGetLastError, or the CUDA/NCCL error).
struct Failure {
  int code;
  std::string message;
};

[[noreturn]] void failMoe(ncclResult_t code, ncclMoeComm_t comm) {
  // The calling thread's record first (every API call sets it); the communicator keeps a copy.
  std::string text = ncclMoeGetLastError(nullptr);
  if (text.empty() && comm != nullptr) text = ncclMoeGetLastError(comm);
  if (text.empty()) text = ncclMoeGetErrorString(code);
  throw Failure{static_cast<int>(code), std::move(text)};
}

inline void checkMoe(ncclResult_t code, ncclMoeComm_t comm = nullptr) {
  if (code != ncclSuccess) failMoe(code, comm);
}

[[noreturn]] void failNccl(ncclResult_t code, const char* call, ncclComm_t comm) {
  std::string text = std::string(call) + " failed: " + ncclGetErrorString(code);
  const char* detail = ncclGetLastError(comm);
  if (detail != nullptr && detail[0] != '\0') text += std::string(" (") + detail + ")";
  throw Failure{static_cast<int>(code), std::move(text)};
}

[[noreturn]] void failCuda(cudaError_t err, const char* call) {
  throw Failure{static_cast<int>(ncclUnhandledCudaError),
                std::string(call) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err)};
}

#define PY_CUDA_CHECK(call)                         \
  do {                                              \
    cudaError_t err_ = (call);                      \
    if (err_ != cudaSuccess) failCuda(err_, #call); \
  } while (0)

void translateFailure(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const Failure& f) {
    PyObject* cls = f.code == static_cast<int>(ncclInvalidArgument) ? g_argument_error_class : g_error_class;
    if (cls == nullptr) cls = PyExc_RuntimeError;
    PyObject* args = Py_BuildValue("(is)", f.code, f.message.c_str());
    PyErr_SetObject(cls, args);
    Py_XDECREF(args);
  }
}

// Makes `device` current for the lifetime of the guard and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PY_CUDA_CHECK(cudaGetDevice(&saved_));
    if (device != saved_) PY_CUDA_CHECK(cudaSetDevice(device));
    changed_ = device != saved_;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(saved_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int saved_ = 0;
  bool changed_ = false;
};

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
inline cudaStream_t streamOf(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

ncclMoeConfig_t makeConfig(int num_experts, int hidden, int max_topk, int max_tokens_per_rank,
                           int ll_max_tokens_per_rank, int num_sms, int ll_num_sms, int enable_rank_masks) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = num_experts;
  c.hidden = hidden;
  c.max_topk = max_topk;
  c.max_tokens_per_rank = max_tokens_per_rank;
  c.ll_max_tokens_per_rank = ll_max_tokens_per_rank;
  c.num_sms = num_sms;
  c.ll_num_sms = ll_num_sms;
  c.enable_rank_masks = enable_rank_masks;
  return c;
}

// ------------------------------------------------------------------------------------------------------------------
// Communicator and handle
// ------------------------------------------------------------------------------------------------------------------

// One ncclMoeComm_t. Destroyed only by destroy(): for communicators made over an ncclComm_t destroy is collective
// (a barrier over that communicator), which a garbage collector cannot promise. Communicators of a one-process
// world (init_all) are not collective to destroy and are released when the object goes.
class Comm {
 public:
  Comm(ncclMoeComm_t c, bool world, const ncclMoeConfig_t& config) : comm_(c), world_(world), config_(config) {
    checkMoe(ncclMoeCommRank(c, &rank_), c);
    checkMoe(ncclMoeCommCount(c, &num_ranks_), c);
    checkMoe(ncclMoeCommCuDevice(c, &device_), c);
  }
  ~Comm() {
    if (comm_ != nullptr && world_) ncclMoeCommDestroy(comm_);
  }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  ncclMoeComm_t get() const {
    if (comm_ == nullptr) throw Failure{static_cast<int>(ncclInvalidUsage), "the communicator was destroyed"};
    return comm_;
  }
  void destroy() {
    if (comm_ == nullptr) return;
    ncclMoeComm_t c = comm_;
    comm_ = nullptr;
    ncclResult_t res;
    {
      nb::gil_scoped_release release;
      res = ncclMoeCommDestroy(c);
    }
    checkMoe(res);
  }
  // (code, message): ncclSuccess and "" while healthy.
  std::pair<int, std::string> asyncError() const {
    ncclResult_t err = ncclSuccess;
    checkMoe(ncclMoeCommGetAsyncError(get(), &err), comm_);
    return {static_cast<int>(err), err == ncclSuccess ? std::string() : std::string(ncclMoeGetLastError(comm_))};
  }

  bool destroyed() const { return comm_ == nullptr; }
  bool world() const { return world_; }
  int rank() const { return rank_; }
  int numRanks() const { return num_ranks_; }
  int device() const { return device_; }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(comm_); }
  const ncclMoeConfig_t& config() const { return config_; }

 private:
  ncclMoeComm_t comm_ = nullptr;
  bool world_ = false;
  ncclMoeConfig_t config_{};
  int rank_ = -1, num_ranks_ = 0, device_ = -1;
};

// One ncclMoeHandle_t (routing of one dispatch). Destroying it frees device memory, which waits for the device:
// the Python layer pools handles and destroys them with their communicator, not from a garbage collector.
class Handle {
 public:
  explicit Handle(Comm& comm) : comm_(comm.get()), device_(comm.device()) {
    ncclResult_t res;
    {
      nb::gil_scoped_release release;
      DeviceGuard guard(device_);
      res = ncclMoeHandleCreate(comm_, &handle_);
    }
    checkMoe(res, comm_);
  }
  ~Handle() { destroy(); }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  ncclMoeHandle_t get() const {
    if (handle_ == nullptr) throw Failure{static_cast<int>(ncclInvalidUsage), "the handle was destroyed"};
    return handle_;
  }
  void destroy() {
    if (handle_ == nullptr) return;
    ncclMoeHandle_t h = handle_;
    handle_ = nullptr;
    nb::gil_scoped_release release;
    ncclMoeHandleDestroy(h);
  }
  // Device pointers of the HT routing (valid while the handle lives): (recv_count [1], recv_count_per_expert [E_l],
  // recv_src_info [R * max_tokens_per_rank]).
  std::tuple<uintptr_t, uintptr_t, uintptr_t> htDevicePointers() const {
    const int* count = nullptr;
    const int* per_expert = nullptr;
    const int* src_info = nullptr;
    checkMoe(ncclMoeHandleRecvCountDevice(get(), &count, &per_expert, &src_info));
    return {reinterpret_cast<uintptr_t>(count), reinterpret_cast<uintptr_t>(per_expert),
            reinterpret_cast<uintptr_t>(src_info)};
  }

 private:
  ncclMoeComm_t comm_ = nullptr;
  int device_ = 0;
  ncclMoeHandle_t handle_ = nullptr;
};

// A CUDA event without timing (cheaper than torch.cuda.Event: ~0.2 us to create and record).
class Event {
 public:
  explicit Event(int device) : device_(device) {
    DeviceGuard guard(device);
    PY_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  }
  ~Event() {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(uintptr_t stream) { PY_CUDA_CHECK(cudaEventRecord(event_, streamOf(stream))); }
  void wait(uintptr_t stream) { PY_CUDA_CHECK(cudaStreamWaitEvent(streamOf(stream), event_, 0)); }
  bool query() const {
    cudaError_t err = cudaEventQuery(event_);
    if (err == cudaErrorNotReady) return false;
    if (err != cudaSuccess) failCuda(err, "cudaEventQuery");
    return true;
  }
  void synchronize() {
    cudaError_t err;
    {
      nb::gil_scoped_release release;
      err = cudaEventSynchronize(event_);
    }
    if (err != cudaSuccess) failCuda(err, "cudaEventSynchronize");
  }
  int device() const { return device_; }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(event_); }

 private:
  int device_ = 0;
  cudaEvent_t event_ = nullptr;
};

// ------------------------------------------------------------------------------------------------------------------
// Operations: one function per C entry point, the argument struct filled here from integers
// ------------------------------------------------------------------------------------------------------------------

void layout(Comm& comm, uintptr_t topk_idx, int topk_idx_type, int num_tokens, int topk, uintptr_t num_tokens_per_rank,
            uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclMoeLayoutArgs_t a = NCCL_MOE_LAYOUT_ARGS_INITIALIZER;
  a.topk_idx = ptr<const void>(topk_idx);
  a.topk_idx_type = static_cast<ncclMoeIndexType_t>(topk_idx_type);
  a.num_tokens = num_tokens;
  a.topk = topk;
  a.num_tokens_per_rank = ptr<int>(num_tokens_per_rank);
  a.num_tokens_per_expert = ptr<int>(num_tokens_per_expert);
  a.is_token_in_rank = ptr<uint8_t>(is_token_in_rank);
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeGetDispatchLayout(c, &a, streamOf(stream));
  }
  checkMoe(res, c);
}

// Returns (num_recv_tokens, num_recv_tokens_per_expert): both known on the host only in host-count mode
// (recv_capacity == 0); (-1, []) in worst-case mode.
std::pair<int, std::vector<int>> htNotify(Comm& comm, Handle& handle, uintptr_t topk_idx, int topk_idx_type,
                                          int num_tokens, int topk, int expert_alignment, int recv_capacity,
                                          uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclMoeHandle_t h = handle.get();
  const int num_local_experts = comm.config().num_experts / comm.numRanks();
  std::vector<int> per_expert;
  int num_recv = -1;
  ncclMoeNotifyArgs_t a = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  a.topk_idx = ptr<const void>(topk_idx);
  a.topk_idx_type = static_cast<ncclMoeIndexType_t>(topk_idx_type);
  a.num_tokens = num_tokens;
  a.topk = topk;
  a.expert_alignment = expert_alignment;
  a.recv_capacity = recv_capacity;
  if (recv_capacity == 0) {
    per_expert.resize(num_local_experts);
    a.num_recv_tokens = &num_recv;
    a.num_recv_tokens_per_expert = per_expert.data();
  }
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeDispatchNotify(c, h, &a, streamOf(stream));
  }
  checkMoe(res, c);
  return {num_recv, std::move(per_expert)};
}

void htDispatch(Comm& comm, Handle& handle, uintptr_t x, int dtype, int hidden, uintptr_t x_scales, int scale_format,
                int64_t x_scales_token_stride, int64_t x_scales_channel_stride, uintptr_t topk_weights,
                uintptr_t recv_x, uintptr_t recv_x_scales, uintptr_t recv_topk_idx, uintptr_t recv_topk_weights,
                int num_sms, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclMoeHandle_t h = handle.get();
  ncclMoeDispatchArgs_t a = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  a.x = ptr<const void>(x);
  a.dtype = static_cast<ncclMoeDataType_t>(dtype);
  a.hidden = hidden;
  a.x_scales = ptr<const void>(x_scales);
  a.scale_format = static_cast<ncclMoeScaleFormat_t>(scale_format);
  a.x_scales_token_stride = x_scales_token_stride;
  a.x_scales_channel_stride = x_scales_channel_stride;
  a.topk_weights = ptr<const float>(topk_weights);
  a.recv_x = ptr<void>(recv_x);
  a.recv_x_scales = ptr<void>(recv_x_scales);
  a.recv_topk_idx = ptr<void>(recv_topk_idx);
  a.recv_topk_weights = ptr<float>(recv_topk_weights);
  a.num_sms = num_sms;
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeDispatch(c, h, &a, streamOf(stream));
  }
  checkMoe(res, c);
}

void htCombine(Comm& comm, Handle& handle, uintptr_t x, int hidden, uintptr_t topk_weights, uintptr_t bias_0,
               uintptr_t bias_1, uintptr_t combined_x, uintptr_t combined_topk_weights, int num_sms, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclMoeHandle_t h = handle.get();
  ncclMoeCombineArgs_t a = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  a.x = ptr<const void>(x);
  a.hidden = hidden;
  a.topk_weights = ptr<const float>(topk_weights);
  a.bias_0 = ptr<const void>(bias_0);
  a.bias_1 = ptr<const void>(bias_1);
  a.combined_x = ptr<void>(combined_x);
  a.combined_topk_weights = ptr<float>(combined_topk_weights);
  a.num_sms = num_sms;
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeCombine(c, h, &a, streamOf(stream));
  }
  checkMoe(res, c);
}

// Returns whether `stream` was being captured into a CUDA graph when the call was enqueued (the torch layer pins
// such handles), queried here right before the call instead of by a separate stream_is_capturing() from Python: one
// Python-to-C crossing less on the LL hot path. A failed query raises before anything is enqueued.
bool llDispatch(Comm& comm, Handle& handle, uintptr_t x, uintptr_t topk_idx, int topk_idx_type, int num_tokens,
                int hidden, int topk, int use_fp8, int scale_format, uintptr_t recv_x, uintptr_t recv_x_scales,
                uintptr_t recv_count, uintptr_t cumulative_recv_stats, int phase, uintptr_t topk_weights,
                uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclMoeHandle_t h = handle.get();
  ncclMoeLLDispatchArgs_t a = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
  a.x = ptr<const void>(x);
  a.topk_idx = ptr<const void>(topk_idx);
  a.topk_idx_type = static_cast<ncclMoeIndexType_t>(topk_idx_type);
  a.num_tokens = num_tokens;
  a.hidden = hidden;
  a.topk = topk;
  a.use_fp8 = use_fp8;
  a.scale_format = static_cast<ncclMoeScaleFormat_t>(scale_format);
  a.recv_x = ptr<void>(recv_x);
  a.recv_x_scales = ptr<void>(recv_x_scales);
  a.recv_count = ptr<int>(recv_count);
  a.cumulative_recv_stats = ptr<int>(cumulative_recv_stats);
  a.phase = static_cast<ncclMoePhase_t>(phase);
  a.topk_weights = ptr<const float>(topk_weights);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t capture_err;
  ncclResult_t res = ncclSuccess;
  {
    nb::gil_scoped_release release;
    capture_err = cudaStreamIsCapturing(streamOf(stream), &capture);
    if (capture_err == cudaSuccess) res = ncclMoeLowLatencyDispatch(c, h, &a, streamOf(stream));
  }
  if (capture_err != cudaSuccess) failCuda(capture_err, "cudaStreamIsCapturing(stream, &status)");
  checkMoe(res, c);
  return capture != cudaStreamCaptureStatusNone;
}

void llCombine(Comm& comm, Handle& handle, uintptr_t x, int zero_copy, uintptr_t topk_idx, uintptr_t topk_weights,
               int num_tokens, int hidden, int topk, uintptr_t out, int phase, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclMoeHandle_t h = handle.get();
  ncclMoeLLCombineArgs_t a = NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER;
  a.x = ptr<const void>(x);
  a.zero_copy = zero_copy;
  a.topk_idx = ptr<const void>(topk_idx);
  a.topk_weights = ptr<const float>(topk_weights);
  a.num_tokens = num_tokens;
  a.hidden = hidden;
  a.topk = topk;
  a.out = ptr<void>(out);
  a.phase = static_cast<ncclMoePhase_t>(phase);
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeLowLatencyCombine(c, h, &a, streamOf(stream));
  }
  checkMoe(res, c);
}

uintptr_t llCombineBuffer(Comm& comm, Handle& handle) {
  ncclMoeComm_t c = comm.get();
  void* buffer = nullptr;
  checkMoe(ncclMoeLowLatencyCombineBuffer(c, handle.get(), &buffer), c);
  return reinterpret_cast<uintptr_t>(buffer);
}

// The handle's [E_l, R * ll_max_tokens_per_rank] int32 device array of (source rank << 24 | source token) per row
// its LL dispatch received (rows j < recv_count[e] of local expert e). A host-side accessor like llCombineBuffer: it
// neither waits nor launches, so the GIL is kept.
uintptr_t llRecvSrcInfo(Comm& comm, Handle& handle) {
  ncclMoeComm_t c = comm.get();
  const int* src_info = nullptr;
  checkMoe(ncclMoeLowLatencyRecvSrcInfo(c, handle.get(), &src_info), c);
  return reinterpret_cast<uintptr_t>(src_info);
}

void llReset(Comm& comm, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeLowLatencyReset(c, streamOf(stream));
  }
  checkMoe(res, c);
}

// Rank masks (config.enable_rank_masks = 1; include/nccl_moe.h "Rank masks"). The query into device memory is
// stream-ordered and capturable; the host variant waits for the stream's earlier work. Set and clear are collective
// over the ranks the new mask holds active. The GIL is released around all four.
void queryRankMask(Comm& comm, uintptr_t mask, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeQueryRankMask(c, ptr<int>(mask), /*mask_on_device=*/1, streamOf(stream));
  }
  checkMoe(res, c);
}

std::vector<int> queryRankMaskHost(Comm& comm, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  std::vector<int> mask(static_cast<size_t>(comm.numRanks()), 0);
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeQueryRankMask(c, mask.data(), /*mask_on_device=*/0, streamOf(stream));
  }
  checkMoe(res, c);
  return mask;
}

// mask: [R] host ints, each 0 (active) or 1 (masked); the library checks the values and mask[this rank] == 0.
void setRankMask(Comm& comm, const std::vector<int>& mask, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  if (static_cast<int>(mask.size()) != comm.numRanks()) {
    throw Failure{static_cast<int>(ncclInvalidArgument), "set_rank_mask: mask has " + std::to_string(mask.size()) +
                                                             " entries, expected " + std::to_string(comm.numRanks())};
  }
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeSetRankMask(c, mask.data(), streamOf(stream));
  }
  checkMoe(res, c);
}

void clearRankMask(Comm& comm, uintptr_t stream) {
  ncclMoeComm_t c = comm.get();
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeClearRankMask(c, streamOf(stream));
  }
  checkMoe(res, c);
}

void castToFp8(uintptr_t x, int num_tokens, int hidden, int scale_format, uintptr_t out_fp8, uintptr_t out_scales,
               uintptr_t stream) {
  checkMoe(ncclMoeCastToFp8(ptr<const void>(x), num_tokens, hidden, static_cast<ncclMoeScaleFormat_t>(scale_format),
                            ptr<void>(out_fp8), ptr<void>(out_scales), streamOf(stream)));
}

// ------------------------------------------------------------------------------------------------------------------
// Communicator creation
// ------------------------------------------------------------------------------------------------------------------

Comm* commInit(uintptr_t nccl_comm, int device, int num_experts, int hidden, int max_topk, int max_tokens_per_rank,
               int ll_max_tokens_per_rank, int num_sms, int ll_num_sms, int enable_rank_masks) {
  const ncclMoeConfig_t config = makeConfig(num_experts, hidden, max_topk, max_tokens_per_rank, ll_max_tokens_per_rank,
                                            num_sms, ll_num_sms, enable_rank_masks);
  ncclMoeComm_t c = nullptr;
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    DeviceGuard guard(device);
    res = ncclMoeCommInit(&c, reinterpret_cast<ncclComm_t>(nccl_comm), &config);
  }
  checkMoe(res);
  return new Comm(c, /*world=*/false, config);
}

nb::list commInitAll(const std::vector<int>& devices, int num_experts, int hidden, int max_topk,
                     int max_tokens_per_rank, int ll_max_tokens_per_rank, int num_sms, int ll_num_sms,
                     int enable_rank_masks) {
  const ncclMoeConfig_t config = makeConfig(num_experts, hidden, max_topk, max_tokens_per_rank, ll_max_tokens_per_rank,
                                            num_sms, ll_num_sms, enable_rank_masks);
  std::vector<ncclMoeComm_t> comms(devices.size(), nullptr);
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclMoeCommInitAll(comms.data(), static_cast<int>(devices.size()), devices.data(), &config);
  }
  checkMoe(res);
  nb::list out;
  for (ncclMoeComm_t c : comms)
    out.append(nb::cast(new Comm(c, /*world=*/true, config), nb::rv_policy::take_ownership));
  return out;
}

size_t bufferSize(int num_experts, int hidden, int max_topk, int max_tokens_per_rank, int ll_max_tokens_per_rank,
                  int num_sms, int ll_num_sms, int enable_rank_masks, int num_ranks) {
  const ncclMoeConfig_t config = makeConfig(num_experts, hidden, max_topk, max_tokens_per_rank, ll_max_tokens_per_rank,
                                            num_sms, ll_num_sms, enable_rank_masks);
  size_t bytes = 0;
  checkMoe(ncclMoeGetBufferSize(&config, num_ranks, &bytes));
  return bytes;
}

// NCCL: a communicator of the package's own (when the caller's group is not an NCCL process group).
nb::bytes newNcclUniqueId() {
  ncclUniqueId id;
  ncclResult_t res = ncclGetUniqueId(&id);
  if (res != ncclSuccess) failNccl(res, "ncclGetUniqueId", nullptr);
  return nb::bytes(id.internal, sizeof(id.internal));
}

uintptr_t ncclCommInitRankOnDevice(int num_ranks, nb::bytes unique_id, int rank, int device) {
  if (unique_id.size() != sizeof(ncclUniqueId)) {
    throw Failure{static_cast<int>(ncclInvalidArgument), "nccl_comm_init_rank: unique_id has " +
                                                             std::to_string(unique_id.size()) + " bytes, expected " +
                                                             std::to_string(sizeof(ncclUniqueId))};
  }
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.c_str(), sizeof(id.internal));
  ncclComm_t comm = nullptr;
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    DeviceGuard guard(device);
    res = ncclCommInitRank(&comm, num_ranks, id, rank);
  }
  if (res != ncclSuccess) failNccl(res, "ncclCommInitRank", nullptr);
  return reinterpret_cast<uintptr_t>(comm);
}

void ncclCommDestroyPtr(uintptr_t comm) {
  ncclResult_t res;
  {
    nb::gil_scoped_release release;
    res = ncclCommDestroy(reinterpret_cast<ncclComm_t>(comm));
  }
  if (res != ncclSuccess) failNccl(res, "ncclCommDestroy", nullptr);
}

// (ranks, this rank, CUDA device) of an ncclComm_t, e.g. one borrowed from torch.
std::tuple<int, int, int> ncclCommInfo(uintptr_t comm) {
  ncclComm_t c = reinterpret_cast<ncclComm_t>(comm);
  int count = 0, rank = 0, device = 0;
  ncclResult_t res = ncclCommCount(c, &count);
  if (res != ncclSuccess) failNccl(res, "ncclCommCount", c);
  res = ncclCommUserRank(c, &rank);
  if (res != ncclSuccess) failNccl(res, "ncclCommUserRank", c);
  res = ncclCommCuDevice(c, &device);
  if (res != ncclSuccess) failNccl(res, "ncclCommCuDevice", c);
  return {count, rank, device};
}

int ncclLibraryVersion() {
  int version = 0;
  ncclResult_t res = ncclGetVersion(&version);
  if (res != ncclSuccess) failNccl(res, "ncclGetVersion", nullptr);
  return version;
}

int moeVersion() {
  int version = 0;
  checkMoe(ncclMoeGetVersion(&version));
  return version;
}

// CUDA devices this process sees; 0 without a driver or a GPU (never raises).
int deviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

bool streamIsCapturing(uintptr_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  PY_CUDA_CHECK(cudaStreamIsCapturing(streamOf(stream), &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "NCCL-MoE: the public C ABI (include/nccl_moe.h) as integers in, integers out";
  nb::register_exception_translator(translateFailure);

  m.def(
      "_register_errors",
      [](nb::handle error, nb::handle argument_error) {
        Py_XDECREF(g_error_class);
        Py_XDECREF(g_argument_error_class);
        g_error_class = error.inc_ref().ptr();
        g_argument_error_class = argument_error.inc_ref().ptr();
      },
      "error"_a = nb::none(), "argument_error"_a = nb::none());

  m.attr("HEADER_VERSION_CODE") = NCCL_MOE_VERSION_CODE;
  m.attr("MAX_RANKS") = NCCL_MOE_MAX_RANKS;
  m.attr("MAX_NVL_PEERS") = NCCL_MOE_MAX_NVL_PEERS;
  m.attr("MAX_TOPK") = NCCL_MOE_MAX_TOPK;
  m.attr("MAX_EXPERTS") = NCCL_MOE_MAX_EXPERTS;
  m.attr("BFLOAT16") = static_cast<int>(ncclMoeBfloat16);
  m.attr("FP8_E4M3") = static_cast<int>(ncclMoeFp8E4M3);
  m.attr("SCALE_FLOAT") = static_cast<int>(ncclMoeScaleFloat);
  m.attr("SCALE_FLOAT_POW2") = static_cast<int>(ncclMoeScaleFloatPow2);
  m.attr("SCALE_UE8M0") = static_cast<int>(ncclMoeScaleUe8m0);
  m.attr("INDEX_INT64") = static_cast<int>(ncclMoeIndexInt64);
  m.attr("INDEX_INT32") = static_cast<int>(ncclMoeIndexInt32);
  m.attr("PHASE_BOTH") = static_cast<int>(ncclMoePhaseBoth);
  m.attr("PHASE_SEND") = static_cast<int>(ncclMoePhaseSend);
  m.attr("PHASE_RECV") = static_cast<int>(ncclMoePhaseRecv);

  m.def("version", &moeVersion, "NCCL_MOE_VERSION_CODE of the loaded libnccl_moe");
  m.def(
      "error_string", [](int code) { return std::string(ncclMoeGetErrorString(static_cast<ncclResult_t>(code))); },
      "code"_a);
  m.def(
      "last_error", []() { return std::string(ncclMoeGetLastError(nullptr)); },
      "ncclMoeGetLastError(NULL): the calling thread's last failure");
  m.def("buffer_size", &bufferSize, "num_experts"_a, "hidden"_a, "max_topk"_a, "max_tokens_per_rank"_a,
        "ll_max_tokens_per_rank"_a, "num_sms"_a, "ll_num_sms"_a, "enable_rank_masks"_a, "num_ranks"_a,
        "ncclMoeGetBufferSize: bytes of one rank's buffer");
  m.def("device_count", &deviceCount);
  m.def("stream_is_capturing", &streamIsCapturing, "stream"_a);

  m.def("nccl_version", &ncclLibraryVersion, "ncclGetVersion of the libnccl this process uses");
  m.def("nccl_unique_id", &newNcclUniqueId);
  m.def("nccl_comm_init_rank", &ncclCommInitRankOnDevice, "num_ranks"_a, "unique_id"_a, "rank"_a, "device"_a);
  m.def("nccl_comm_destroy", &ncclCommDestroyPtr, "comm"_a);
  m.def("nccl_comm_info", &ncclCommInfo, "comm"_a);

  nb::class_<Comm>(m, "Comm")
      .def_static("init", &commInit, "nccl_comm"_a, "device"_a, "num_experts"_a, "hidden"_a, "max_topk"_a,
                  "max_tokens_per_rank"_a, "ll_max_tokens_per_rank"_a, "num_sms"_a, "ll_num_sms"_a,
                  "enable_rank_masks"_a, nb::rv_policy::take_ownership)
      .def_static("init_all", &commInitAll, "devices"_a, "num_experts"_a, "hidden"_a, "max_topk"_a,
                  "max_tokens_per_rank"_a, "ll_max_tokens_per_rank"_a, "num_sms"_a, "ll_num_sms"_a,
                  "enable_rank_masks"_a)
      .def("destroy", &Comm::destroy)
      .def("async_error", &Comm::asyncError)
      .def_prop_ro("destroyed", &Comm::destroyed)
      .def_prop_ro("world", &Comm::world)
      .def_prop_ro("rank", &Comm::rank)
      .def_prop_ro("num_ranks", &Comm::numRanks)
      .def_prop_ro("device", &Comm::device)
      .def_prop_ro("address", &Comm::address)
      .def_prop_ro("num_experts", [](const Comm& c) { return c.config().num_experts; })
      .def_prop_ro("hidden", [](const Comm& c) { return c.config().hidden; })
      .def_prop_ro("max_topk", [](const Comm& c) { return c.config().max_topk; })
      .def_prop_ro("max_tokens_per_rank", [](const Comm& c) { return c.config().max_tokens_per_rank; })
      .def_prop_ro("ll_max_tokens_per_rank", [](const Comm& c) { return c.config().ll_max_tokens_per_rank; })
      .def_prop_ro("num_sms", [](const Comm& c) { return c.config().num_sms; })
      .def_prop_ro("ll_num_sms", [](const Comm& c) { return c.config().ll_num_sms; })
      .def_prop_ro("enable_rank_masks", [](const Comm& c) { return c.config().enable_rank_masks; });

  nb::class_<Handle>(m, "Handle")
      .def(nb::init<Comm&>(), "comm"_a, nb::keep_alive<1, 2>())
      .def("destroy", &Handle::destroy)
      .def("ht_device_pointers", &Handle::htDevicePointers);

  nb::class_<Event>(m, "Event")
      .def(nb::init<int>(), "device"_a)
      .def("record", &Event::record, "stream"_a)
      .def("wait", &Event::wait, "stream"_a)
      .def("query", &Event::query)
      .def("synchronize", &Event::synchronize)
      .def_prop_ro("device", &Event::device)
      .def_prop_ro("address", &Event::address);

  m.def("layout", &layout, "comm"_a, "topk_idx"_a, "topk_idx_type"_a, "num_tokens"_a, "topk"_a, "num_tokens_per_rank"_a,
        "num_tokens_per_expert"_a, "is_token_in_rank"_a, "stream"_a);
  m.def("ht_notify", &htNotify, "comm"_a, "handle"_a, "topk_idx"_a, "topk_idx_type"_a, "num_tokens"_a, "topk"_a,
        "expert_alignment"_a, "recv_capacity"_a, "stream"_a);
  m.def("ht_dispatch", &htDispatch, "comm"_a, "handle"_a, "x"_a, "dtype"_a, "hidden"_a, "x_scales"_a, "scale_format"_a,
        "x_scales_token_stride"_a, "x_scales_channel_stride"_a, "topk_weights"_a, "recv_x"_a, "recv_x_scales"_a,
        "recv_topk_idx"_a, "recv_topk_weights"_a, "num_sms"_a, "stream"_a);
  m.def("ht_combine", &htCombine, "comm"_a, "handle"_a, "x"_a, "hidden"_a, "topk_weights"_a, "bias_0"_a, "bias_1"_a,
        "combined_x"_a, "combined_topk_weights"_a, "num_sms"_a, "stream"_a);
  m.def("ll_dispatch", &llDispatch, "comm"_a, "handle"_a, "x"_a, "topk_idx"_a, "topk_idx_type"_a, "num_tokens"_a,
        "hidden"_a, "topk"_a, "use_fp8"_a, "scale_format"_a, "recv_x"_a, "recv_x_scales"_a, "recv_count"_a,
        "cumulative_recv_stats"_a, "phase"_a, "topk_weights"_a, "stream"_a);
  m.def("ll_combine", &llCombine, "comm"_a, "handle"_a, "x"_a, "zero_copy"_a, "topk_idx"_a, "topk_weights"_a,
        "num_tokens"_a, "hidden"_a, "topk"_a, "out"_a, "phase"_a, "stream"_a);
  m.def("ll_combine_buffer", &llCombineBuffer, "comm"_a, "handle"_a);
  m.def("ll_recv_src_info", &llRecvSrcInfo, "comm"_a, "handle"_a,
        "ncclMoeLowLatencyRecvSrcInfo: device address of the handle's [E_l, R*M] int32 (rank << 24 | token) rows");
  m.def("ll_reset", &llReset, "comm"_a, "stream"_a);
  m.def("query_rank_mask", &queryRankMask, "comm"_a, "mask"_a, "stream"_a,
        "ncclMoeQueryRankMask into device memory: mask = data_ptr of an [R] int32 tensor, stream-ordered");
  m.def("query_rank_mask_host", &queryRankMaskHost, "comm"_a, "stream"_a,
        "ncclMoeQueryRankMask into host memory: waits for the stream's earlier work, returns [R] ints (1 = masked)");
  m.def("set_rank_mask", &setRankMask, "comm"_a, "mask"_a, "stream"_a,
        "ncclMoeSetRankMask: collective over the ranks with mask[r] == 0; mask is [R] ints, each 0 or 1");
  m.def("clear_rank_mask", &clearRankMask, "comm"_a, "stream"_a, "ncclMoeClearRankMask: collective over all ranks");
  m.def("cast_to_fp8", &castToFp8, "x"_a, "num_tokens"_a, "hidden"_a, "scale_format"_a, "out_fp8"_a, "out_scales"_a,
        "stream"_a);
}
