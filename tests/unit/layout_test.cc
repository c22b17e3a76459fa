// The one buffer-layout definition (src/mem/): regions are ordered, aligned and disjoint, the last element of
// every HT and LL array ends inside its region, and ncclMoeGetBufferSize reports exactly the layout's size, for
// every rank count the kernels support (1..8, so the 8-rank layout is checked without 8 GPUs).
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "mem/buffer_layout.h"
#include "nccl_moe.h"

namespace {

using nccl_moe::BufferLayout;
using nccl_moe::LayoutParams;

struct Shape {
  int experts, hidden, topk, ht_tokens, ll_tokens;
};

const Shape kShapes[] = {
    {256, 7168, 8, 4096, 128}, {288, 7168, 8, 0, 128}, {64, 136, 16, 100, 0},
    {1024, 2048, 1, 17, 3},    {16, 8, 2, 1, 0},       {8, 128, 4, 0, 1},
};

TEST(Layout, RegionsAreOrderedAlignedAndDisjointForEveryRankCount) {
  for (const Shape& s : kShapes) {
    for (int R = 1; R <= 8; ++R) {
      if (s.experts % R != 0) continue;
      const LayoutParams p{R, s.experts, s.hidden, s.topk, s.ht_tokens, s.ll_tokens};
      const BufferLayout b = BufferLayout::make(p);
      SCOPED_TRACE(testing::Message() << "R=" << R << " E=" << s.experts << " H=" << s.hidden);
      EXPECT_EQ(0u, b.ht_offset % nccl_moe::kRegionAlign);
      EXPECT_EQ(0u, b.ll_offset % nccl_moe::kRegionAlign);
      EXPECT_LE(b.ht_offset + b.ht_bytes, b.ll_offset);
      EXPECT_EQ(b.ll_offset + 2 * b.ll_half_bytes, b.total_bytes);
      EXPECT_EQ(s.ht_tokens > 0, b.ht_bytes > 0);
      EXPECT_EQ(s.ll_tokens > 0, b.ll_half_bytes > 0);

      if (s.ht_tokens > 0) {
        const auto& h = b.ht;
        const int last_src = R - 1, last_row = s.ht_tokens - 1;
        // Sub-regions in order, each array's last element inside the HT region.
        EXPECT_LE(h.notify(last_src) + h.notify_slot_bytes, h.src_idx_offset);
        EXPECT_LE(h.src_idx(last_src, last_row) + 4, h.row_flag_offset);
        EXPECT_LE(h.row_flag(last_src, last_row) + 8, h.x_offset);
        EXPECT_LE(h.x(last_src, last_row, 2 * static_cast<size_t>(s.hidden)) + 2 * static_cast<size_t>(s.hidden),
                  h.meta_offset);
        EXPECT_LE(h.meta(last_src, last_row) + h.meta_stride_bytes, b.ht_bytes);
        // A row's metadata holds K ids, K weights and the scales.
        EXPECT_GE(h.meta_stride_bytes, 4u * (2 * s.topk + (s.hidden + 127) / 128));
        EXPECT_EQ(0u, h.x(last_src, 1, 2 * static_cast<size_t>(s.hidden)) % 16) << "16-byte row alignment";
      }
      if (s.ll_tokens > 0) {
        const auto& l = b.ll;
        // The accessors return offsets from the start of a half.
        EXPECT_LE(l.dispatch_msg(R - 1, s.ll_tokens - 1) + l.msg_bytes, b.ll_half_bytes);
        EXPECT_LE(
            l.combine_buffer() + static_cast<size_t>(s.experts / R) * l.slab_rows() * 2 * static_cast<size_t>(s.hidden),
            b.ll_half_bytes);
        EXPECT_EQ(0u, l.dispatch_msg(R - 1, s.ll_tokens - 1) % nccl_moe::kLlMsgAlign)
            << "every message slot starts on a 128-byte line";
        EXPECT_GE(l.ready_offset, l.control_offset + sizeof(nccl_moe::LlControl));
        EXPECT_LE(l.expert_ready(s.experts / R - 1) + sizeof(long long), l.dispatch_offset);
        EXPECT_LT(l.ready_offset, l.comb_buffer_offset) << "the ready words are zeroed by ncclMoeLowLatencyReset";
      }

      ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
      c.num_experts = s.experts;
      c.hidden = s.hidden;
      c.max_topk = s.topk;
      c.max_tokens_per_rank = s.ht_tokens;
      c.ll_max_tokens_per_rank = s.ll_tokens;
      size_t bytes = 0;
      ASSERT_EQ(ncclSuccess, ncclMoeGetBufferSize(&c, R, &bytes)) << ncclMoeGetLastError(nullptr);
      EXPECT_EQ(b.total_bytes, bytes);
    }
  }
}

TEST(Layout, HtRegionGrowsLinearlyWithCapacity) {
  const LayoutParams small{4, 256, 7168, 8, 1024, 0};
  const LayoutParams large{4, 256, 7168, 8, 2048, 0};
  const size_t a = BufferLayout::make(small).ht_bytes, b = BufferLayout::make(large).ht_bytes;
  // Doubling the capacity doubles the per-row arrays: at least R * 1024 more rows of 2*H bytes.
  EXPECT_GE(b - a, 4ull * 1024 * 2 * 7168);
  EXPECT_LT(b, 2 * a + 2 * nccl_moe::kRegionAlign * 8);
}

// The LL header's slot words (ll_layout.h): each 64-bit word carries the dispatch tag and the local experts of two
// slots, as the send kernel builds them from a pair of int16 ids in shared memory and the receivers decode them.
TEST(Layout, LlSlotWordsCarryTagAndTwoExperts) {
  using nccl_moe::ll_slot_expert;
  using nccl_moe::ll_slot_tag;
  using nccl_moe::ll_slot_word;
  const uint32_t tags[] = {1u, 2u, 0x7fffffffu, 0xfffffffeu};
  const int16_t ids[] = {-1, 0, 1, 143, 32767};
  for (uint32_t tag : tags) {
    for (int16_t a : ids) {
      for (int16_t b : ids) {
        const int16_t pair_ids[2] = {a, b};  // slot 2i, slot 2i + 1, as in the kernel's s_ids row
        uint32_t pair = 0;
        std::memcpy(&pair, pair_ids, sizeof(pair));
        const uint64_t w = ll_slot_word(tag, pair);
        EXPECT_EQ(tag, ll_slot_tag(w));
        EXPECT_EQ(a, ll_slot_expert(w, 0)) << "tag " << tag << " slots " << a << "," << b;
        EXPECT_EQ(b, ll_slot_expert(w, 1)) << "tag " << tag << " slots " << a << "," << b;
        EXPECT_NE(tag, ll_slot_tag(ll_slot_word(tag - 1, pair))) << "an earlier dispatch's word is not this one's";
      }
    }
  }
  // Zeroed messages (ncclMoeLowLatencyReset) carry tag 0, which no dispatch uses (tags start at 1).
  EXPECT_EQ(0u, ll_slot_tag(0));
  // The receivers' stand-in for slots past K: tagged, no expert.
  EXPECT_EQ(-1, ll_slot_expert(ll_slot_word(5, 0xffffffffu), 0));
  EXPECT_EQ(-1, ll_slot_expert(ll_slot_word(5, 0xffffffffu), 1));
  // Eight words for the 16 slots, then the 16 weights: 128 bytes, the weights where the combine reads them.
  EXPECT_EQ(64u, offsetof(nccl_moe::LlMsgHeader, weight));
  EXPECT_EQ(nccl_moe::kLlHeaderBytes, sizeof(nccl_moe::LlMsgHeader));
}

}  // namespace

// The internode LL region: absent on one node (single-node buffers keep their size), two halves after the LL
// halves on several nodes, its regions in order, aligned and disjoint, signal words [kind][src] inside their
// region, and a message slot large enough for either payload.
TEST(Layout, LlNetRegionOnlyOnSeveralNodes) {
  nccl_moe::LayoutParams p{4, 32, 7168, 8, 128, 64};
  const nccl_moe::BufferLayout one = nccl_moe::BufferLayout::make(p);
  EXPECT_EQ(0u, one.ll_net_half_bytes);
  EXPECT_EQ(one.ll_offset + 2 * one.ll_half_bytes, one.total_bytes);
  p.num_nodes = 2;
  const nccl_moe::BufferLayout two = nccl_moe::BufferLayout::make(p);
  EXPECT_EQ(one.ll_offset + 2 * one.ll_half_bytes, two.ll_net_offset) << "the intranode regions do not move";
  EXPECT_EQ(two.ll_net_offset + 2 * two.ll_net_half_bytes, two.total_bytes);
  EXPECT_EQ(0u, two.ll_net_half_bytes % nccl_moe::kRegionAlign);
  const nccl_moe::LlNetLayout& L = two.ll_net;
  const size_t starts[] = {L.control_offset,    L.persist_offset, L.signals_offset, L.count_stage_offset,
                           L.flag_stage_offset, L.plan_offset,    L.send_offset,    L.wstage_offset,
                           L.dispatch_offset,   L.weights_offset, L.cstage_offset,  L.comb_recv_offset,
                           L.total_bytes};
  for (size_t i = 0; i + 1 < sizeof(starts) / sizeof(starts[0]); ++i) {
    EXPECT_LT(starts[i], starts[i + 1]) << "region " << i;
    EXPECT_EQ(0u, starts[i] % nccl_moe::kRegionAlign) << "region " << i;
  }
  EXPECT_EQ(L.signals_offset, L.signal(0, 0));
  EXPECT_LT(L.signal(nccl_moe::kLlNetSignalKinds - 1, 3) + 8, L.count_stage_offset + 1);
  EXPECT_EQ(L.signals_offset + L.signals_bytes(), L.signal(nccl_moe::kNetBarrier, 0))
      << "a reset zeroes every signal row but the barrier's";
  EXPECT_GE(L.msg_bytes, L.msg_used_bytes(false));
  EXPECT_GE(L.msg_bytes, L.msg_used_bytes(true));
  EXPECT_EQ(0u, L.msg_bytes % 128);
  EXPECT_EQ(0u, L.msg_used_bytes(true) % 16) << "receivers copy whole 16-byte vectors";
  EXPECT_EQ(L.dispatch_msg(1, 0), L.dispatch_msg(0, 63) + L.msg_bytes);
  EXPECT_EQ(L.comb_recv_row(3, 63) + 2 * 7168, L.comb_recv_offset + 4 * 64 * 2 * 7168);
}
