// Argument validation of every public entry point, on the CPU: each case breaks one argument of an otherwise
// valid call and checks the call returns the documented error with a message naming that argument, before
// anything touches a GPU. The communicator is a host-only stand-in (no buffers), which is enough because
// validation never reaches the device for a rejected argument.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/comm.h"
#include "core/handle.h"
#include "core/node_map.h"
#include "nccl_moe.h"

namespace {

struct FakeComm {
  ncclMoeComm comm;
  ncclMoeHandle handle;
  FakeComm() {
    comm.rank = 0;
    comm.num_ranks = 2;
    comm.device = 0;
    comm.num_device_sms = 132;
    comm.default_num_sms = 24;
    comm.config = NCCL_MOE_CONFIG_INITIALIZER;
    comm.config.num_experts = 16;
    comm.config.hidden = 1024;
    comm.config.max_topk = 8;
    comm.config.max_tokens_per_rank = 128;
    comm.config.ll_max_tokens_per_rank = 16;
    handle.comm = &comm;
    handle.ht.valid = true;
    handle.ht.num_tokens = 4;
    handle.ll.valid = true;
  }
};

// A device-looking pointer that is never dereferenced (validation fails before any launch).
void* fakePtr() { return reinterpret_cast<void*>(0x1000); }

struct Case {
  std::string name;
  std::function<ncclResult_t(FakeComm&)> call;
  ncclResult_t expected;
  std::string message_part;
};

ncclMoeLayoutArgs_t goodLayout() {
  ncclMoeLayoutArgs_t a = NCCL_MOE_LAYOUT_ARGS_INITIALIZER;
  a.topk_idx = fakePtr();
  a.num_tokens = 4;
  a.topk = 2;
  a.num_tokens_per_rank = static_cast<int*>(fakePtr());
  return a;
}
ncclMoeNotifyArgs_t goodNotify() {
  ncclMoeNotifyArgs_t a = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  a.topk_idx = fakePtr();
  a.num_tokens = 4;
  a.topk = 2;
  a.recv_capacity = 16;
  return a;
}
ncclMoeDispatchArgs_t goodDispatch() {
  ncclMoeDispatchArgs_t a = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  a.x = fakePtr();
  a.hidden = 512;
  a.recv_x = fakePtr();
  return a;
}
ncclMoeCombineArgs_t goodCombine() {
  ncclMoeCombineArgs_t a = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  a.x = fakePtr();
  a.hidden = 512;
  a.combined_x = fakePtr();
  return a;
}
ncclMoeLLDispatchArgs_t goodLlDispatch() {
  ncclMoeLLDispatchArgs_t a = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
  a.x = fakePtr();
  a.topk_idx = fakePtr();
  a.num_tokens = 4;
  a.hidden = 512;
  a.topk = 2;
  a.recv_x = fakePtr();
  a.recv_count = static_cast<int*>(fakePtr());
  return a;
}
ncclMoeLLCombineArgs_t goodLlCombine() {
  ncclMoeLLCombineArgs_t a = NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER;
  a.x = fakePtr();
  a.topk_idx = fakePtr();
  a.topk_weights = static_cast<const float*>(fakePtr());
  a.num_tokens = 4;
  a.hidden = 512;
  a.topk = 2;
  a.out = fakePtr();
  return a;
}

template <typename Args, typename Mut>
std::function<ncclResult_t(FakeComm&)> layoutCall(Args (*make)(), Mut mutate) {
  return [=](FakeComm& f) {
    Args a = make();
    mutate(a, f);
    return ncclMoeGetDispatchLayout(&f.comm, &a, nullptr);
  };
}
template <typename Mut>
std::function<ncclResult_t(FakeComm&)> notifyCall(Mut mutate) {
  return [=](FakeComm& f) {
    auto a = goodNotify();
    mutate(a, f);
    return ncclMoeDispatchNotify(&f.comm, &f.handle, &a, nullptr);
  };
}
template <typename Mut>
std::function<ncclResult_t(FakeComm&)> dispatchCall(Mut mutate) {
  return [=](FakeComm& f) {
    auto a = goodDispatch();
    mutate(a, f);
    return ncclMoeDispatch(&f.comm, &f.handle, &a, nullptr);
  };
}
template <typename Mut>
std::function<ncclResult_t(FakeComm&)> combineCall(Mut mutate) {
  return [=](FakeComm& f) {
    auto a = goodCombine();
    mutate(a, f);
    return ncclMoeCombine(&f.comm, &f.handle, &a, nullptr);
  };
}
template <typename Mut>
std::function<ncclResult_t(FakeComm&)> llDispatchCall(Mut mutate) {
  return [=](FakeComm& f) {
    auto a = goodLlDispatch();
    mutate(a, f);
    return ncclMoeLowLatencyDispatch(&f.comm, &f.handle, &a, nullptr);
  };
}
template <typename Mut>
std::function<ncclResult_t(FakeComm&)> llCombineCall(Mut mutate) {
  return [=](FakeComm& f) {
    auto a = goodLlCombine();
    mutate(a, f);
    return ncclMoeLowLatencyCombine(&f.comm, &f.handle, &a, nullptr);
  };
}

const ncclResult_t kArg = ncclInvalidArgument;
const ncclResult_t kUsage = ncclInvalidUsage;

std::vector<Case> cases() {
  using L = ncclMoeLayoutArgs_t;
  using N = ncclMoeNotifyArgs_t;
  using D = ncclMoeDispatchArgs_t;
  using C = ncclMoeCombineArgs_t;
  using LD = ncclMoeLLDispatchArgs_t;
  using LC = ncclMoeLLCombineArgs_t;
  return {
      // layout
      {"LayoutNullComm",
       [](FakeComm&) {
         auto a = goodLayout();
         return ncclMoeGetDispatchLayout(nullptr, &a, nullptr);
       },
       kArg, "comm is NULL"},
      {"LayoutNullArgs", [](FakeComm& f) { return ncclMoeGetDispatchLayout(&f.comm, nullptr, nullptr); }, kArg,
       "args is NULL"},
      {"LayoutStructSize", layoutCall(goodLayout, [](L& a, FakeComm&) { a.size = 8; }), kArg, "args->size"},
      {"LayoutVersion", layoutCall(goodLayout, [](L& a, FakeComm&) { a.version = 999999; }), kArg, "args->version"},
      {"LayoutIndexType", layoutCall(goodLayout, [](L& a, FakeComm&) { a.topk_idx_type = (ncclMoeIndexType_t)7; }),
       kArg, "topk_idx_type"},
      {"LayoutNegativeTokens", layoutCall(goodLayout, [](L& a, FakeComm&) { a.num_tokens = -1; }), kArg, "num_tokens"},
      {"LayoutTopkZero", layoutCall(goodLayout, [](L& a, FakeComm&) { a.topk = 0; }), kArg, "args->topk"},
      {"LayoutTopkOverMax", layoutCall(goodLayout, [](L& a, FakeComm&) { a.topk = 9; }), kArg,
       "args->topk is 9, expected 1..8"},
      {"LayoutNullTopkIdx", layoutCall(goodLayout, [](L& a, FakeComm&) { a.topk_idx = nullptr; }), kArg,
       "topk_idx is NULL"},
      {"LayoutNullPerRank", layoutCall(goodLayout, [](L& a, FakeComm&) { a.num_tokens_per_rank = nullptr; }), kArg,
       "num_tokens_per_rank"},
      // notify
      {"NotifyNullHandle",
       [](FakeComm& f) {
         auto a = goodNotify();
         return ncclMoeDispatchNotify(&f.comm, nullptr, &a, nullptr);
       },
       kArg, "handle is NULL"},
      {"NotifyForeignHandle", notifyCall([](N&, FakeComm& f) { f.handle.comm = nullptr; }), kArg,
       "another communicator"},
      {"NotifyNoHtCapacity", notifyCall([](N&, FakeComm& f) { f.comm.config.max_tokens_per_rank = 0; }), kUsage,
       "max_tokens_per_rank = 0"},
      {"NotifyTooManyTokens", notifyCall([](N& a, FakeComm&) { a.num_tokens = 129; }), kArg,
       "args->num_tokens is 129, expected 0..128"},
      {"NotifyTopk", notifyCall([](N& a, FakeComm&) { a.topk = 17; }), kArg, "args->topk"},
      {"NotifyNullTopkIdx", notifyCall([](N& a, FakeComm&) { a.topk_idx = nullptr; }), kArg, "topk_idx is NULL"},
      {"NotifyAlignment", notifyCall([](N& a, FakeComm&) { a.expert_alignment = 0; }), kArg, "expert_alignment"},
      {"NotifyCapacityNegative", notifyCall([](N& a, FakeComm&) { a.recv_capacity = -1; }), kArg, "recv_capacity"},
      {"NotifyCapacityTooLarge", notifyCall([](N& a, FakeComm&) { a.recv_capacity = 257; }), kArg,
       "recv_capacity is 257, expected 0 (host-count mode) .. 256"},
      {"NotifyHostCountNeedsOutput", notifyCall([](N& a, FakeComm&) { a.recv_capacity = 0; }), kArg,
       "num_recv_tokens is NULL"},
      {"NotifyIndexType", notifyCall([](N& a, FakeComm&) { a.topk_idx_type = (ncclMoeIndexType_t)-1; }), kArg,
       "topk_idx_type"},
      // dispatch
      {"DispatchWithoutNotify", dispatchCall([](D&, FakeComm& f) { f.handle.ht.valid = false; }), kUsage,
       "ncclMoeDispatchNotify"},
      {"DispatchDtype", dispatchCall([](D& a, FakeComm&) { a.dtype = (ncclMoeDataType_t)5; }), kArg, "args->dtype"},
      {"DispatchHiddenNotMultiple", dispatchCall([](D& a, FakeComm&) { a.hidden = 100; }), kArg, "args->hidden is 100"},
      {"DispatchHiddenTooLarge", dispatchCall([](D& a, FakeComm&) { a.hidden = 2048; }), kArg, "up to 1024"},
      {"DispatchFp8HiddenMultipleOf16", dispatchCall([](D& a, FakeComm&) {
         a.dtype = ncclMoeFp8E4M3;
         a.hidden = 520;
         a.x_scales = fakePtr();
         a.recv_x_scales = fakePtr();
       }),
       kArg, "multiple of 16"},
      {"DispatchNullX", dispatchCall([](D& a, FakeComm&) { a.x = nullptr; }), kArg, "args->x is NULL"},
      {"DispatchFp8NullScales", dispatchCall([](D& a, FakeComm&) {
         a.dtype = ncclMoeFp8E4M3;
         a.recv_x_scales = fakePtr();
       }),
       kArg, "x_scales is NULL"},
      {"DispatchFp8ScaleFormat", dispatchCall([](D& a, FakeComm&) {
         a.dtype = ncclMoeFp8E4M3;
         a.x_scales = fakePtr();
         a.recv_x_scales = fakePtr();
         a.scale_format = ncclMoeScaleFloatPow2;
       }),
       kArg, "scale_format"},
      {"DispatchFp8NegativeStride", dispatchCall([](D& a, FakeComm&) {
         a.dtype = ncclMoeFp8E4M3;
         a.x_scales = fakePtr();
         a.recv_x_scales = fakePtr();
         a.x_scales_token_stride = -4;
       }),
       kArg, "x_scales_token_stride"},
      {"DispatchFp8NullRecvScales", dispatchCall([](D& a, FakeComm&) {
         a.dtype = ncclMoeFp8E4M3;
         a.x_scales = fakePtr();
       }),
       kArg, "recv_x_scales is NULL"},
      {"DispatchNullRecvX", dispatchCall([](D& a, FakeComm&) { a.recv_x = nullptr; }), kArg, "recv_x is NULL"},
      {"DispatchRecvWeightsWithoutWeights",
       dispatchCall([](D& a, FakeComm&) { a.recv_topk_weights = static_cast<float*>(fakePtr()); }), kArg,
       "topk_weights is NULL"},
      {"DispatchSms", dispatchCall([](D& a, FakeComm&) { a.num_sms = 500; }), kArg, "args->num_sms is 500"},
      {"DispatchStructSize", dispatchCall([](D& a, FakeComm&) { a.size = sizeof(D) - 8; }), kArg,
       "NCCL_MOE_DISPATCH_ARGS_INITIALIZER"},
      // combine
      {"CombineWithoutDispatch", combineCall([](C&, FakeComm& f) { f.handle.ht.valid = false; }), kUsage,
       "handle holds no routing"},
      {"CombineHidden", combineCall([](C& a, FakeComm&) { a.hidden = 12; }), kArg, "args->hidden is 12"},
      {"CombineNullOut", combineCall([](C& a, FakeComm&) { a.combined_x = nullptr; }), kArg, "combined_x is NULL"},
      {"CombineWeightsWithoutOut",
       combineCall([](C& a, FakeComm&) { a.topk_weights = static_cast<const float*>(fakePtr()); }), kArg,
       "combined_topk_weights"},
      {"CombineBias1WithoutBias0", combineCall([](C& a, FakeComm&) { a.bias_1 = fakePtr(); }), kArg, "bias_1"},
      {"CombineSms", combineCall([](C& a, FakeComm&) { a.num_sms = -1; }), kArg, "num_sms"},
      // low-latency dispatch
      {"LlNoCapacity", llDispatchCall([](LD&, FakeComm& f) { f.comm.config.ll_max_tokens_per_rank = 0; }), kUsage,
       "ll_max_tokens_per_rank = 0"},
      {"LlPhase", llDispatchCall([](LD& a, FakeComm&) { a.phase = (ncclMoePhase_t)0; }), kArg, "args->phase"},
      {"LlTooManyTokens", llDispatchCall([](LD& a, FakeComm&) { a.num_tokens = 17; }), kArg,
       "args->num_tokens is 17, expected 0..16"},
      {"LlHiddenNot128", llDispatchCall([](LD& a, FakeComm&) { a.hidden = 520; }), kArg, "multiple of 128"},
      {"LlTopk", llDispatchCall([](LD& a, FakeComm&) { a.topk = 0; }), kArg, "args->topk"},
      {"LlUseFp8", llDispatchCall([](LD& a, FakeComm&) { a.use_fp8 = 2; }), kArg, "use_fp8"},
      {"LlScaleFormat", llDispatchCall([](LD& a, FakeComm&) { a.scale_format = (ncclMoeScaleFormat_t)9; }), kArg,
       "scale_format"},
      {"LlNullX", llDispatchCall([](LD& a, FakeComm&) { a.x = nullptr; }), kArg, "args->x is NULL"},
      {"LlNullTopkIdx", llDispatchCall([](LD& a, FakeComm&) { a.topk_idx = nullptr; }), kArg, "topk_idx is NULL"},
      {"LlNullRecvX", llDispatchCall([](LD& a, FakeComm&) { a.recv_x = nullptr; }), kArg, "recv_x is NULL"},
      {"LlNullRecvCount", llDispatchCall([](LD& a, FakeComm&) { a.recv_count = nullptr; }), kArg, "recv_count is NULL"},
      {"LlFp8NullScales", llDispatchCall([](LD& a, FakeComm&) { a.use_fp8 = 1; }), kArg, "recv_x_scales is NULL"},
      // low-latency combine
      {"LlCombineWithoutDispatch", llCombineCall([](LC&, FakeComm& f) { f.handle.ll.valid = false; }), kUsage,
       "no low-latency routing"},
      {"LlCombineZeroCopyFlag", llCombineCall([](LC& a, FakeComm&) { a.zero_copy = 3; }), kArg, "zero_copy"},
      {"LlCombineNullX", llCombineCall([](LC& a, FakeComm&) { a.x = nullptr; }), kArg, "args->x is NULL"},
      {"LlCombineNullWeights", llCombineCall([](LC& a, FakeComm&) { a.topk_weights = nullptr; }), kArg,
       "topk_weights is NULL"},
      {"LlCombineNullOut", llCombineCall([](LC& a, FakeComm&) { a.out = nullptr; }), kArg, "args->out is NULL"},
      {"LlCombineHidden", llCombineCall([](LC& a, FakeComm&) { a.hidden = 64; }), kArg, "args->hidden is 64"},
      {"LlCombineTokens", llCombineCall([](LC& a, FakeComm&) { a.num_tokens = -2; }), kArg, "num_tokens"},
      // misc entry points
      {"CombineBufferNullOut", [](FakeComm& f) { return ncclMoeLowLatencyCombineBuffer(&f.comm, &f.handle, nullptr); },
       kArg, "buffer is NULL"},
      {"LlSrcInfoNullOut", [](FakeComm& f) { return ncclMoeLowLatencyRecvSrcInfo(&f.comm, &f.handle, nullptr); }, kArg,
       "recv_src_info is NULL"},
      {"LlSrcInfoWithoutDispatch",
       [](FakeComm& f) {
         f.handle.ll.valid = false;
         const int* src = nullptr;
         return ncclMoeLowLatencyRecvSrcInfo(&f.comm, &f.handle, &src);
       },
       kUsage, "no low-latency dispatch"},
      {"CastHidden",
       [](FakeComm&) { return ncclMoeCastToFp8(fakePtr(), 4, 100, ncclMoeScaleFloat, fakePtr(), fakePtr(), nullptr); },
       kArg, "hidden is 100"},
      {"CastFormat",
       [](FakeComm&) {
         return ncclMoeCastToFp8(fakePtr(), 4, 128, (ncclMoeScaleFormat_t)4, fakePtr(), fakePtr(), nullptr);
       },
       kArg, "scale_format"},
      {"CastNullOutput",
       [](FakeComm&) { return ncclMoeCastToFp8(fakePtr(), 4, 128, ncclMoeScaleFloat, nullptr, fakePtr(), nullptr); },
       kArg, "out_fp8"},
      {"CastNegativeTokens",
       [](FakeComm&) { return ncclMoeCastToFp8(fakePtr(), -1, 128, ncclMoeScaleFloat, fakePtr(), fakePtr(), nullptr); },
       kArg, "num_tokens is -1"},
      {"HandleCreateNullOut", [](FakeComm& f) { return ncclMoeHandleCreate(&f.comm, nullptr); }, kArg,
       "handle is NULL"},
      {"VersionNull", [](FakeComm&) { return ncclMoeGetVersion(nullptr); }, kArg, "version is NULL"},
      // Rank masks: a communicator with masks gets a (never dereferenced) mask pointer.
      {"QueryMaskWithoutMasks",
       [](FakeComm& f) {
         int m[2];
         return ncclMoeQueryRankMask(&f.comm, m, 0, nullptr);
       },
       kUsage, "enable_rank_masks = 0"},
      {"QueryMaskNull",
       [](FakeComm& f) {
         f.comm.rank_mask = static_cast<int*>(fakePtr());
         return ncclMoeQueryRankMask(&f.comm, nullptr, 1, nullptr);
       },
       kArg, "mask is NULL"},
      {"QueryMaskWhere",
       [](FakeComm& f) {
         f.comm.rank_mask = static_cast<int*>(fakePtr());
         return ncclMoeQueryRankMask(&f.comm, static_cast<int*>(fakePtr()), 2, nullptr);
       },
       kArg, "mask_on_device is 2"},
      {"SetMaskNullComm",
       [](FakeComm&) {
         const int m[2] = {0, 1};
         return ncclMoeSetRankMask(nullptr, m, nullptr);
       },
       kArg, "comm is NULL"},
      {"SetMaskNull",
       [](FakeComm& f) {
         f.comm.rank_mask = static_cast<int*>(fakePtr());
         return ncclMoeSetRankMask(&f.comm, nullptr, nullptr);
       },
       kArg, "mask is NULL"},
      {"SetMaskWithoutMasks",
       [](FakeComm& f) {
         const int m[2] = {0, 1};
         return ncclMoeSetRankMask(&f.comm, m, nullptr);
       },
       kUsage, "enable_rank_masks = 0"},
      {"SetMaskValue",
       [](FakeComm& f) {
         f.comm.rank_mask = static_cast<int*>(fakePtr());
         const int m[2] = {0, 3};
         return ncclMoeSetRankMask(&f.comm, m, nullptr);
       },
       kArg, "mask[1] is 3"},
      {"SetMaskSelf",
       [](FakeComm& f) {
         f.comm.rank_mask = static_cast<int*>(fakePtr());
         const int m[2] = {1, 0};
         return ncclMoeSetRankMask(&f.comm, m, nullptr);
       },
       kArg, "does not mask itself"},
      {"SetMaskWithoutLl",
       [](FakeComm& f) {
         f.comm.rank_mask = static_cast<int*>(fakePtr());
         f.comm.config.ll_max_tokens_per_rank = 0;
         const int m[2] = {0, 1};
         return ncclMoeSetRankMask(&f.comm, m, nullptr);
       },
       kUsage, "no low-latency capacity"},
      {"ClearMaskWithoutMasks", [](FakeComm& f) { return ncclMoeClearRankMask(&f.comm, nullptr); }, kUsage,
       "enable_rank_masks = 0"},
      {"ClearMaskNullComm", [](FakeComm&) { return ncclMoeClearRankMask(nullptr, nullptr); }, kArg, "comm is NULL"},
  };
}

class ApiValidation : public ::testing::TestWithParam<Case> {};

TEST_P(ApiValidation, RejectsWithMessageNamingTheArgument) {
  FakeComm fake;
  const Case& c = GetParam();
  EXPECT_EQ(c.expected, c.call(fake)) << ncclMoeGetLastError(nullptr);
  const std::string message = ncclMoeGetLastError(nullptr);
  EXPECT_NE(std::string::npos, message.find(c.message_part)) << "message: " << message;
}

INSTANTIATE_TEST_SUITE_P(AllEntryPoints, ApiValidation, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// ---- config and size query ----

ncclMoeConfig_t goodConfig() {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = 256;
  c.hidden = 7168;
  c.max_tokens_per_rank = 4096;
  c.ll_max_tokens_per_rank = 128;
  return c;
}

TEST(ApiConfig, BufferSizeMatchesLayoutAndGrowsWithCapacity) {
  ncclMoeConfig_t c = goodConfig();
  size_t bytes2 = 0, bytes4 = 0, bytes_ht_only = 0;
  ASSERT_EQ(ncclSuccess, ncclMoeGetBufferSize(&c, 2, &bytes2));
  ASSERT_EQ(ncclSuccess, ncclMoeGetBufferSize(&c, 4, &bytes4));
  EXPECT_GT(bytes4, bytes2);
  // The HT region alone holds R x 4096 rows of 7168 bf16.
  EXPECT_GE(bytes2, 2ull * 4096 * 7168 * 2);
  c.ll_max_tokens_per_rank = 0;
  ASSERT_EQ(ncclSuccess, ncclMoeGetBufferSize(&c, 2, &bytes_ht_only));
  EXPECT_LT(bytes_ht_only, bytes2);
}

TEST(ApiConfig, RejectsEachBadField) {
  size_t bytes = 0;
  struct {
    std::function<void(ncclMoeConfig_t&)> mutate;
    const char* part;
  } bad[] = {
      {[](ncclMoeConfig_t& c) { c.num_experts = 0; }, "config->num_experts is 0"},
      {[](ncclMoeConfig_t& c) { c.num_experts = 255; }, "not a multiple of num_ranks"},
      {[](ncclMoeConfig_t& c) { c.hidden = 7170; }, "config->hidden is 7170"},
      {[](ncclMoeConfig_t& c) { c.hidden = 1000; }, "hidden % 128 == 0"},
      {[](ncclMoeConfig_t& c) { c.max_topk = 17; }, "config->max_topk is 17"},
      {[](ncclMoeConfig_t& c) { c.max_tokens_per_rank = -1; }, "config->max_tokens_per_rank is -1"},
      {[](ncclMoeConfig_t& c) { c.ll_max_tokens_per_rank = 5000; }, "config->ll_max_tokens_per_rank is 5000"},
      {[](ncclMoeConfig_t& c) {
         c.max_tokens_per_rank = 0;
         c.ll_max_tokens_per_rank = 0;
       },
       "both 0"},
      {[](ncclMoeConfig_t& c) { c.num_sms = -3; }, "config->num_sms is -3"},
      {[](ncclMoeConfig_t& c) { c.ll_num_sms = -1; }, "config->ll_num_sms is -1"},
      {[](ncclMoeConfig_t& c) { c.enable_rank_masks = 2; }, "config->enable_rank_masks is 2"},
      {[](ncclMoeConfig_t& c) { c.size = 4; }, "NCCL_MOE_CONFIG_INITIALIZER"},
  };
  for (auto& b : bad) {
    ncclMoeConfig_t c = goodConfig();
    b.mutate(c);
    EXPECT_EQ(ncclInvalidArgument, ncclMoeGetBufferSize(&c, 2, &bytes)) << b.part;
    EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find(b.part))
        << ncclMoeGetLastError(nullptr);
  }
  ncclMoeConfig_t c = goodConfig();
  EXPECT_EQ(ncclInvalidArgument, ncclMoeGetBufferSize(&c, 9, &bytes));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("num_ranks is 9"));
}

TEST(ApiConfig, CommInitRejectsNullsBeforeTouchingNccl) {
  ncclMoeConfig_t c = goodConfig();
  ncclMoeComm_t comm = reinterpret_cast<ncclMoeComm_t>(0x1);
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInit(nullptr, reinterpret_cast<ncclComm_t>(0x1), &c));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInit(&comm, nullptr, &c));
  EXPECT_EQ(nullptr, comm);
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("nccl_comm is NULL"));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInit(&comm, reinterpret_cast<ncclComm_t>(0x1), nullptr));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("config is NULL"));
}

TEST(ApiMisc, VersionAndErrorStrings) {
  int v = 0;
  ASSERT_EQ(ncclSuccess, ncclMoeGetVersion(&v));
  EXPECT_EQ(NCCL_MOE_VERSION_CODE, v);
  EXPECT_STREQ("no error", ncclMoeGetErrorString(ncclSuccess));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetErrorString(ncclInvalidArgument)).find("invalid argument"));
  EXPECT_NE(nullptr, ncclMoeGetLastError(nullptr));
}

TEST(ApiMisc, FailedCommunicatorRejectsEveryLaterCall) {
  FakeComm fake;
  nccl_moe::ErrorRecord record{};
  record.code = nccl_moe::kErrTimeout;
  record.phase = static_cast<int>(nccl_moe::Phase::kHtDispatch);
  record.rank = 0;
  record.peer = 1;
  record.counter = 3;
  record.expected = 4;
  fake.comm.host_error = &record;
  fake.comm.timeout_ns = 5000000000ull;
  auto a = goodDispatch();
  EXPECT_EQ(ncclRemoteError, ncclMoeDispatch(&fake.comm, &fake.handle, &a, nullptr));
  const std::string message = ncclMoeGetLastError(&fake.comm);
  EXPECT_NE(std::string::npos, message.find("ht-dispatch")) << message;
  EXPECT_NE(std::string::npos, message.find("rank 0 waited for peer 1, counter 3 (expected 4)")) << message;
  ncclResult_t async = ncclSuccess;
  ASSERT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(&fake.comm, &async));
  EXPECT_EQ(ncclRemoteError, async);
  fake.comm.host_error = nullptr;
}

TEST(ApiMisc, TimeoutOfALocalWaitSaysSo) {
  // A wait on a word of the rank's own blocks (the LL receive teams' placement word) records peer -1.
  FakeComm fake;
  nccl_moe::ErrorRecord record{};
  record.code = nccl_moe::kErrTimeout;
  record.phase = static_cast<int>(nccl_moe::Phase::kLlDispatchRecv);
  record.rank = 2;
  record.peer = -1;
  record.counter = 0;
  record.expected = 4294967296ll;
  fake.comm.host_error = &record;
  fake.comm.timeout_ns = 5000000000ull;
  auto a = goodDispatch();
  EXPECT_EQ(ncclRemoteError, ncclMoeDispatch(&fake.comm, &fake.handle, &a, nullptr));
  const std::string message = ncclMoeGetLastError(&fake.comm);
  EXPECT_NE(std::string::npos, message.find("ll-dispatch-recv: rank 2 waited for a block of its own")) << message;
  EXPECT_EQ(std::string::npos, message.find("peer -1")) << message;
  fake.comm.host_error = nullptr;
}

}  // namespace

TEST(ApiMisc, LlRecvSrcInfoReturnsTheHandlesArray) {
  FakeComm f;
  int storage[4] = {0, 0, 0, 0};
  f.handle.ll.recv_src_info = storage;
  const int* src = nullptr;
  ASSERT_EQ(ncclSuccess, ncclMoeLowLatencyRecvSrcInfo(&f.comm, &f.handle, &src)) << ncclMoeGetLastError(&f.comm);
  EXPECT_EQ(storage, src);
  f.handle.ll.recv_src_info = nullptr;  // the fake handle owns no device memory
}

// ---- multi-node communicators ----

// A communicator of 2 nodes x 2 ranks without a scale-out transport: every HT and LL call is refused at the
// boundary (ncclInvalidUsage, naming the missing transport), before any argument is read, so nothing is launched that
// would wait for ranks it cannot reach; the buffer-size query still answers.
TEST(ApiMultiNode, HtAndLlCallsAreRefusedNamingWhatIsMissing) {
  FakeComm f;
  f.comm.num_ranks = 4;
  f.comm.nodes = nccl_moe::buildEmulatedNodeMap(4, 2);
  const std::vector<std::pair<const char*, std::function<ncclResult_t()>>> calls = {
      {"ncclMoeDispatchNotify", [&] { return ncclMoeDispatchNotify(&f.comm, &f.handle, nullptr, nullptr); }},
      {"ncclMoeDispatch", [&] { return ncclMoeDispatch(&f.comm, &f.handle, nullptr, nullptr); }},
      {"ncclMoeCombine", [&] { return ncclMoeCombine(&f.comm, &f.handle, nullptr, nullptr); }},
      {"ncclMoeLowLatencyDispatch", [&] { return ncclMoeLowLatencyDispatch(&f.comm, &f.handle, nullptr, nullptr); }},
      {"ncclMoeLowLatencyCombine", [&] { return ncclMoeLowLatencyCombine(&f.comm, &f.handle, nullptr, nullptr); }},
      {"ncclMoeLowLatencyCombineBuffer",
       [&] {
         void* b = nullptr;
         return ncclMoeLowLatencyCombineBuffer(&f.comm, &f.handle, &b);
       }},
      {"ncclMoeLowLatencyRecvSrcInfo",
       [&] {
         const int* s = nullptr;
         return ncclMoeLowLatencyRecvSrcInfo(&f.comm, &f.handle, &s);
       }},
      {"ncclMoeLowLatencyReset", [&] { return ncclMoeLowLatencyReset(&f.comm, nullptr); }},
  };
  for (const auto& c : calls) {
    EXPECT_EQ(ncclInvalidUsage, c.second()) << c.first;
    const std::string msg = ncclMoeGetLastError(&f.comm);
    EXPECT_NE(std::string::npos, msg.find(std::string(c.first) + ": this communicator spans 2 nodes")) << msg;
    EXPECT_NE(std::string::npos, msg.find("but has no scale-out transport")) << msg;
  }
  size_t bytes = 0;
  ncclMoeConfig_t c = goodConfig();
  EXPECT_EQ(ncclSuccess, ncclMoeGetBufferSize(&c, 4, &bytes));
  EXPECT_GT(bytes, 0u);
}

// The node count query answers on any communicator (single or multi-node) and names a NULL argument.
TEST(ApiMultiNode, NodeCountQuery) {
  FakeComm f;
  int nodes = -1;
  f.comm.nodes = nccl_moe::buildEmulatedNodeMap(2, 1);
  ASSERT_EQ(ncclSuccess, ncclMoeCommNodeCount(&f.comm, &nodes)) << ncclMoeGetLastError(nullptr);
  EXPECT_EQ(1, nodes);
  f.comm.num_ranks = 4;
  f.comm.nodes = nccl_moe::buildEmulatedNodeMap(4, 2);
  ASSERT_EQ(ncclSuccess, ncclMoeCommNodeCount(&f.comm, &nodes)) << ncclMoeGetLastError(nullptr);
  EXPECT_EQ(2, nodes);
  f.comm.num_ranks = 8;
  f.comm.nodes = nccl_moe::buildEmulatedNodeMap(8, 4);
  ASSERT_EQ(ncclSuccess, ncclMoeCommNodeCount(&f.comm, &nodes));
  EXPECT_EQ(4, nodes);
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommNodeCount(nullptr, &nodes));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("ncclMoeCommNodeCount: comm is NULL"));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommNodeCount(&f.comm, nullptr));
  EXPECT_NE(std::string::npos,
            std::string(ncclMoeGetLastError(nullptr)).find("ncclMoeCommNodeCount: num_nodes is NULL"));
  EXPECT_EQ(4, nodes);  // untouched by a refused call
}
