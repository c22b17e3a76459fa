// ncclMoeGetDispatchLayout on every rank and the bf16 -> fp8 cast helper against the CPU reference, bitwise.
#include <gtest/gtest.h>

#include "ht_harness.h"
#include "reference/testing/generators.h"

namespace ht_test {
namespace {

// The layout is local; it runs on every rank of a world of R ranks (one per GPU or all on one GPU).
class HtLayout : public ::testing::TestWithParam<int> {};

TEST_P(HtLayout, MatchesReference) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  const int E = 64, K = 6;
  ref::RoutingSpec spec;
  spec.num_ranks = n;
  spec.num_experts = E;
  spec.topk = K;
  spec.num_tokens = 1000;
  spec.masked_fraction = 0.2;
  spec.num_zero_token_ranks = 1;
  spec.skew = 2.0;
  spec.seed = 77;
  const ref::Routing routing = ref::make_routing(spec);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = E;
  config.hidden = 128;
  config.max_topk = K;
  config.max_tokens_per_rank = 1000;
  world.runWithComms(config, [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    const ref::RankRouting& rr = routing.ranks[rank];
    const int T = rr.num_tokens;
    const ref::DispatchLayout want = ref::get_dispatch_layout(rr.topk_idx.data(), T, K, E, n);
    for (int idx64 = 0; idx64 < 2; ++idx64) {
      DeviceBytes idx(rr.topk_idx.size() * 8 + 16), per_rank(4 * n), per_expert(4 * E),
          in_rank(static_cast<size_t>(T) * n + 16);
      if (idx64)
        idx.uploadBytes(rr.topk_idx);
      else
        idx.uploadBytes(toInt32(rr.topk_idx));
      per_rank.fill(0x33);
      per_expert.fill(0x33);
      ncclMoeLayoutArgs_t la = NCCL_MOE_LAYOUT_ARGS_INITIALIZER;
      la.topk_idx = idx.get();
      la.topk_idx_type = idx64 ? ncclMoeIndexInt64 : ncclMoeIndexInt32;
      la.num_tokens = T;
      la.topk = K;
      la.num_tokens_per_rank = per_rank.as<int>();
      la.num_tokens_per_expert = per_expert.as<int>();
      la.is_token_in_rank = in_rank.as<uint8_t>();
      EXPECT_EQ(ncclSuccess, ncclMoeGetDispatchLayout(comm, &la, stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
      EXPECT_EQ(want.num_tokens_per_rank, per_rank.download<int>(n)) << "rank " << rank;
      EXPECT_EQ(want.num_tokens_per_expert, per_expert.download<int>(E)) << "rank " << rank;
      EXPECT_EQ(want.is_token_in_rank, in_rank.download<uint8_t>(static_cast<size_t>(T) * n)) << "rank " << rank;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, HtLayout, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);

TEST(HtCast, MatchesReferenceForEveryFormat) {
  if (gpu_test::gpuCount() < 1) GTEST_SKIP() << "needs a GPU";
  cudaSetDevice(0);
  const int T = 37;
  for (int hidden : {16, 128, 144, 2064, 7168}) {  // the cast needs H % 16 == 0
    const auto x = ref::make_bf16_rows(91, 0, T, hidden, ref::ValueKind::kWide);
    for (auto format : {ref::ScaleFormat::kFloat, ref::ScaleFormat::kFloatPow2, ref::ScaleFormat::kUe8m0}) {
      SCOPED_TRACE("hidden " + std::to_string(hidden) + " format " + std::to_string(static_cast<int>(format)));
      const ref::Rows want = ref::cast_to_fp8(x, T, hidden, format);
      DeviceBytes dx(x.size() * 2), dq(static_cast<size_t>(T) * hidden),
          ds(static_cast<size_t>(T) * ref::num_scale_groups(hidden) * 4);
      dx.uploadBytes(x);
      ASSERT_EQ(ncclSuccess, ncclMoeCastToFp8(dx.get(), T, hidden, static_cast<ncclMoeScaleFormat_t>(format), dq.get(),
                                              ds.get(), nullptr))
          << ncclMoeGetLastError(nullptr);
      ASSERT_EQ(cudaSuccess, cudaDeviceSynchronize());
      auto q = dq.download<uint8_t>(want.fp8.size());
      const long long i = firstDiff(q.data(), want.fp8.data(), q.size());
      EXPECT_EQ(-1, i) << "row " << (i < 0 ? -1 : i / hidden) << " channel " << (i < 0 ? -1 : i % hidden);
      if (format == ref::ScaleFormat::kUe8m0) {
        auto s = ds.download<int32_t>(want.packed_scales.size());
        EXPECT_EQ(-1, firstDiff(s.data(), want.packed_scales.data(), s.size())) << "packed scales";
      } else {
        auto s = ds.download<float>(want.scales.size());
        EXPECT_EQ(-1, firstDiff(s.data(), want.scales.data(), s.size())) << "scales";
      }
    }
  }
}

}  // namespace
}  // namespace ht_test
