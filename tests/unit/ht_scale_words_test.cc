// htScaleWords (src/ops/ops.h): the scale words an HT dispatch's kernels read per fp8 row, and the caller's strides,
// shared by the intranode and internode host operations.
#include <gtest/gtest.h>

#include "nccl_moe.h"
#include "ops/ops.h"

namespace {

ncclMoeDispatchArgs_t fp8Args(int hidden, ncclMoeScaleFormat_t format) {
  ncclMoeDispatchArgs_t a = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  a.dtype = ncclMoeFp8E4M3;
  a.hidden = hidden;
  a.scale_format = format;
  return a;
}

TEST(HtScaleWords, FloatAndUe8m0WordsAndDefaultStrides) {
  // H 7168: 56 groups of 128 channels; UE8M0 packs 4 exponent bytes per word: 14 words.
  nccl_moe::HtScaleWords f = nccl_moe::htScaleWords(fp8Args(7168, ncclMoeScaleFloat));
  EXPECT_EQ(56, f.words);
  EXPECT_EQ(56, f.token_stride);  // 0 in the arguments: rows packed
  EXPECT_EQ(1, f.word_stride);
  const nccl_moe::HtScaleWords u = nccl_moe::htScaleWords(fp8Args(7168, ncclMoeScaleUe8m0));
  EXPECT_EQ(14, u.words);
  EXPECT_EQ(14, u.token_stride);
  // A partial last group counts (H 1152: 9 groups; UE8M0: 3 words).
  EXPECT_EQ(9, nccl_moe::htScaleWords(fp8Args(1152, ncclMoeScaleFloat)).words);
  EXPECT_EQ(3, nccl_moe::htScaleWords(fp8Args(1152, ncclMoeScaleUe8m0)).words);
}

TEST(HtScaleWords, CallerStridesAreKeptAndBf16HasNone) {
  ncclMoeDispatchArgs_t a = fp8Args(512, ncclMoeScaleFloat);
  a.x_scales_token_stride = 1;  // column-major: words of one token 1000 apart
  a.x_scales_channel_stride = 1000;
  const nccl_moe::HtScaleWords s = nccl_moe::htScaleWords(a);
  EXPECT_EQ(4, s.words);
  EXPECT_EQ(1, s.token_stride);
  EXPECT_EQ(1000, s.word_stride);
  ncclMoeDispatchArgs_t b = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  b.dtype = ncclMoeBfloat16;
  b.hidden = 7168;
  const nccl_moe::HtScaleWords none = nccl_moe::htScaleWords(b);
  EXPECT_EQ(0, none.words);
  EXPECT_EQ(0, none.token_stride);
  EXPECT_EQ(0, none.word_stride);
}

}  // namespace
