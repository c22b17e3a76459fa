// Top-k ids outside [-1, num_experts) in device memory become the communicator's asynchronous error, naming the
// phase, the token, the slot and the id (device/routing.cuh load_topk_id_checked), in every kernel that takes the
// caller's ids first: layout, HT notify and LL dispatch. -1 stays an unused slot and is no error. One rank on GPU 0
// (ncclMoeCommInitAll), so no peer is involved.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gpu_world.h"
#include "harness/device_array.h"
#include "nccl_moe.h"

namespace {

using harness::DeviceBytes;

constexpr int kExperts = 16, kTopk = 4, kTokens = 8, kHidden = 128;

// One rank on device 0, HT and LL sized.
struct OneRank {
  ncclMoeComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  OneRank() {
    ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
    config.num_experts = kExperts;
    config.hidden = kHidden;
    config.max_topk = kTopk;
    config.max_tokens_per_rank = kTokens;
    config.ll_max_tokens_per_rank = kTokens;
    const int device = 0;
    EXPECT_EQ(ncclSuccess, ncclMoeCommInitAll(&comm, 1, &device, &config)) << ncclMoeGetLastError(nullptr);
    EXPECT_EQ(cudaSuccess, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  ~OneRank() {
    if (comm != nullptr) ncclMoeCommDestroy(comm);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
  // The asynchronous error after the stream drained, and its message.
  ncclResult_t asyncError(std::string* message) {
    EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
    ncclResult_t async = ncclSuccess;
    EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(comm, &async));
    *message = ncclMoeGetLastError(comm);
    return async;
  }
};

// [kTokens, kTopk] ids, every slot valid or -1, with `bad` at (token, slot) when token >= 0.
std::vector<int64_t> ids(int token, int slot, int64_t bad) {
  std::vector<int64_t> v(kTokens * kTopk);
  for (int t = 0; t < kTokens; ++t)
    for (int k = 0; k < kTopk; ++k) v[t * kTopk + k] = (t + k) % 3 == 0 ? -1 : (t * 5 + k * 3) % kExperts;
  if (token >= 0) v[token * kTopk + slot] = bad;
  return v;
}
std::vector<int32_t> ids32(const std::vector<int64_t>& v) { return std::vector<int32_t>(v.begin(), v.end()); }

void expectNamed(ncclResult_t async, const std::string& message, const char* phase, int token, int slot, int64_t bad) {
  EXPECT_EQ(ncclInvalidArgument, async) << message;
  EXPECT_NE(std::string::npos, message.find(std::string("phase ") + phase)) << message;
  EXPECT_NE(std::string::npos, message.find("top-k id " + std::to_string(bad) + " of token " + std::to_string(token) +
                                            ", slot " + std::to_string(slot)))
      << message;
}

ncclResult_t layout(OneRank& r, const DeviceBytes& idx, ncclMoeIndexType_t type) {
  DeviceBytes per_rank(64), per_expert(kExperts * 4), in_rank(kTokens * 4);
  ncclMoeLayoutArgs_t a = NCCL_MOE_LAYOUT_ARGS_INITIALIZER;
  a.topk_idx = idx.get();
  a.topk_idx_type = type;
  a.num_tokens = kTokens;
  a.topk = kTopk;
  a.num_tokens_per_rank = per_rank.as<int>();
  a.num_tokens_per_expert = per_expert.as<int>();
  a.is_token_in_rank = in_rank.as<uint8_t>();
  const ncclResult_t res = ncclMoeGetDispatchLayout(r.comm, &a, r.stream);
  EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(r.stream));
  return res;
}

TEST(BadExpertId, LayoutNamesTokenAndSlot) {
  if (gpu_test::gpuCount() == 0) GTEST_SKIP() << "no GPU";
  {  // control: valid ids and -1 are no error
    OneRank r;
    ASSERT_NE(nullptr, r.comm);
    DeviceBytes idx(kTokens * kTopk * 8);
    idx.uploadBytes(ids(-1, 0, 0));
    ASSERT_EQ(ncclSuccess, layout(r, idx, ncclMoeIndexInt64)) << ncclMoeGetLastError(r.comm);
    std::string message;
    EXPECT_EQ(ncclSuccess, r.asyncError(&message)) << message;
  }
  OneRank r;
  ASSERT_NE(nullptr, r.comm);
  DeviceBytes idx(kTokens * kTopk * 8);
  idx.uploadBytes(ids(3, 1, kExperts));  // one past the last expert
  ASSERT_EQ(ncclSuccess, layout(r, idx, ncclMoeIndexInt64)) << ncclMoeGetLastError(r.comm);
  std::string message;
  const ncclResult_t async = r.asyncError(&message);
  expectNamed(async, message, "layout", 3, 1, kExperts);
}

TEST(BadExpertId, HtNotifyNamesTokenAndSlot) {
  if (gpu_test::gpuCount() == 0) GTEST_SKIP() << "no GPU";
  OneRank r;
  ASSERT_NE(nullptr, r.comm);
  ncclMoeHandle_t handle = nullptr;
  ASSERT_EQ(ncclSuccess, ncclMoeHandleCreate(r.comm, &handle));
  DeviceBytes idx(kTokens * kTopk * 4);
  idx.uploadBytes(ids32(ids(5, 0, -5)));  // int32 ids, a negative one other than -1
  ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  na.topk_idx = idx.get();
  na.topk_idx_type = ncclMoeIndexInt32;
  na.num_tokens = kTokens;
  na.topk = kTopk;
  na.recv_capacity = kTokens;  // worst-case mode: no host wait
  EXPECT_EQ(ncclSuccess, ncclMoeDispatchNotify(r.comm, handle, &na, r.stream)) << ncclMoeGetLastError(r.comm);
  std::string message;
  const ncclResult_t async = r.asyncError(&message);
  expectNamed(async, message, "ht-notify", 5, 0, -5);
  ncclMoeHandleDestroy(handle);
}

TEST(BadExpertId, LlDispatchNamesTokenAndSlot) {
  if (gpu_test::gpuCount() == 0) GTEST_SKIP() << "no GPU";
  OneRank r;
  ASSERT_NE(nullptr, r.comm);
  ncclMoeHandle_t handle = nullptr;
  ASSERT_EQ(ncclSuccess, ncclMoeHandleCreate(r.comm, &handle));
  const int64_t bad = int64_t{1} << 40;  // an int64 id that a 32-bit truncation would bring into range
  DeviceBytes idx(kTokens * kTopk * 8), x(kTokens * kHidden * 2), recv_x(kExperts * kTokens * kHidden * 2),
      recv_count(kExperts * 4);
  idx.uploadBytes(ids(7, 3, bad));
  x.uploadBytes(std::vector<uint16_t>(kTokens * kHidden, 0x3f80));
  ncclMoeLLDispatchArgs_t la = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
  la.x = x.get();
  la.topk_idx = idx.get();
  la.topk_idx_type = ncclMoeIndexInt64;
  la.num_tokens = kTokens;
  la.hidden = kHidden;
  la.topk = kTopk;
  la.recv_x = recv_x.get();
  la.recv_count = recv_count.as<int>();
  EXPECT_EQ(ncclSuccess, ncclMoeLowLatencyDispatch(r.comm, handle, &la, r.stream)) << ncclMoeGetLastError(r.comm);
  std::string message;
  const ncclResult_t async = r.asyncError(&message);
  expectNamed(async, message, "ll-dispatch-send", 7, 3, bad);
  ncclMoeHandleDestroy(handle);
}

}  // namespace
