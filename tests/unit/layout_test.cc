// The one buffer-layout definition (src/mem/): regions are ordered, aligned and disjoint, the last element of
// every HT and LL array ends inside its region, and ncclMoeGetBufferSize reports exactly the layout's size, for
// every rank count the kernels support (1..8, so the 8-rank layout is checked without 8 GPUs).
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
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
  EXPECT_EQ(two.ll_net_offset + 2 * two.ll_net_half_bytes, two.ht_net_offset) << "then the internode HT region";
  EXPECT_EQ(two.ht_net_offset + two.ht_net_bytes, two.total_bytes);
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

// The internode HT region (ht_net_layout.h): absent on one node and without HT capacity, last on several nodes
// (after the internode LL halves, which do not move), its regions in order, aligned and disjoint, every array's last
// element inside its region, and a slot of C records large enough for either dispatch payload and the combine record.
TEST(Layout, HtNetRegionOnlyOnSeveralNodes) {
  using nccl_moe::HtNetLayout;
  nccl_moe::LayoutParams p{8, 64, 7168, 8, 256, 32};
  const BufferLayout one = BufferLayout::make(p);
  EXPECT_EQ(0u, one.ht_net_bytes);
  EXPECT_EQ(0u, one.ht_net.total_bytes);
  EXPECT_EQ(one.ht_net_offset, one.total_bytes);
  for (int nodes : {2, 4, 8}) {
    SCOPED_TRACE(testing::Message() << "nodes=" << nodes);
    p.num_nodes = nodes;
    const BufferLayout b = BufferLayout::make(p);
    EXPECT_EQ(b.ll_net_offset + 2 * b.ll_net_half_bytes, b.ht_net_offset) << "after the internode LL halves";
    EXPECT_EQ(b.ht_net_offset + b.ht_net_bytes, b.total_bytes);
    EXPECT_EQ(0u, b.ht_net_offset % nccl_moe::kRegionAlign);
    EXPECT_EQ(0u, b.ht_net_bytes % nccl_moe::kRegionAlign);
    EXPECT_EQ(one.ll_net_offset, b.ll_net_offset) << "the single-node regions do not move";
    const HtNetLayout& L = b.ht_net;
    const int S = nodes - 1, C = p.ht_tokens;
    EXPECT_EQ(S, L.num_slots);
    EXPECT_EQ(8 / nodes, L.ranks_per_node);
    const int R = p.num_ranks;
    EXPECT_EQ(R, L.num_ranks);
    const size_t starts[] = {L.control_offset,      L.counters_offset,     L.signals_offset,
                             L.notify_words_offset, L.notify_stage_offset, L.notify_recv_offset,
                             L.send_offset,         L.recv_offset,         L.total_bytes};
    for (size_t i = 0; i + 1 < sizeof(starts) / sizeof(starts[0]); ++i) {
      EXPECT_LT(starts[i], starts[i + 1]) << "region " << i;
      EXPECT_EQ(0u, starts[i] % nccl_moe::kRegionAlign) << "region " << i;
    }
    EXPECT_GE(L.counters_offset, L.control() + sizeof(nccl_moe::HtNetControl));
    EXPECT_LE(L.counter(nccl_moe::kHtNetCounterKinds - 1, S - 1) + 8, L.signals_offset);
    EXPECT_LE(L.signal(nccl_moe::kHtNetSignalKinds - 1, S - 1) + 8, L.notify_words_offset);
    EXPECT_LE(L.notify_word(nccl_moe::kHtNetNotifyWords - 1, R - 1) + 8, L.notify_stage_offset);
    EXPECT_LE(L.notify_stage(R - 1) + L.notify_record_bytes, L.notify_recv_offset);
    EXPECT_LE(L.notify_recv(R - 1) + L.notify_record_bytes, L.send_offset);
    EXPECT_LE(L.send_record(S - 1, C - 1, L.record_bytes) + L.record_bytes, L.recv_offset);
    EXPECT_LE(L.recv_record(S - 1, C - 1, L.record_bytes) + L.record_bytes, L.total_bytes);
    // A notify record (one per rank pair) holds the counts of the receiver's E_l experts.
    EXPECT_GE(L.notify_record_bytes, offsetof(nccl_moe::HtNetNotifyRecord, expert_count) + 4u * (64 / R));
    EXPECT_EQ(L.notify_word(1, 0), L.notify_word(0, R - 1) + 8);
    // Word [kind][slot] and record [slot][q]: slots of one kind are adjacent words, slots of a window C records
    // apart at the largest stride, records of a slot packed at the call's stride.
    EXPECT_EQ(L.signal(1, 0), L.signal(0, S - 1) + 8);
    EXPECT_EQ(L.send_record(S - 1, 0, 7), L.send_offset + static_cast<size_t>(S - 1) * C * L.record_bytes);
    EXPECT_EQ(L.recv_record(0, 3, 96), L.recv_offset + 3 * 96);
  }
  // No HT capacity: no HT net region on several nodes either.
  p.ht_tokens = 0;
  p.num_nodes = 2;
  EXPECT_EQ(0u, BufferLayout::make(p).ht_net_bytes);
}

// Record strides of a call (what a chunk WRITE carries per record), and the node slots.
TEST(Layout, HtNetRecordStridesAndSlots) {
  using nccl_moe::HtNetLayout;
  // H 7168, K 8: header 40 B + 8 int16 ids + 8 float weights = 88 -> 96 B; fp8 7168 + 56 float scales = 7392 B.
  EXPECT_EQ(96u, HtNetLayout::header_bytes(8));
  EXPECT_EQ(7488u, HtNetLayout::dispatch_record_bytes(7168, 8, true, 56));
  EXPECT_EQ(96u + 7232, HtNetLayout::dispatch_record_bytes(7168, 8, true, 14));  // packed UE8M0: 14 words
  EXPECT_EQ(14432u, HtNetLayout::dispatch_record_bytes(7168, 8, false, 0));
  EXPECT_EQ(14336u, HtNetLayout::combine_record_bytes(7168, 8, false));
  EXPECT_EQ(14368u, HtNetLayout::combine_record_bytes(7168, 8, true));
  EXPECT_EQ(0u, HtNetLayout::dispatch_record_bytes(136, 3, true, 2) % 16);
  // Every stride of a call fits the slot's record size (the communicator's largest H and K).
  for (int H : {8, 136, 2064, 7168}) {
    for (int K : {1, 3, 8, 16}) {
      const nccl_moe::LayoutParams p{16, 256, H, K, 4, 0, 2};
      const HtNetLayout L = HtNetLayout::make(p);
      const int G = (H + 127) / 128;
      SCOPED_TRACE(testing::Message() << "H=" << H << " K=" << K);
      for (int k = 1; k <= K; ++k) {
        EXPECT_LE(HtNetLayout::dispatch_record_bytes(H, k, false, 0), L.record_bytes);
        EXPECT_LE(HtNetLayout::dispatch_record_bytes(H, k, true, G), L.record_bytes);
        EXPECT_LE(HtNetLayout::combine_record_bytes(H, k, true), L.record_bytes);
      }
    }
  }
  // peer_slot numbers the other nodes 0..N-2 and slot_node inverts it.
  for (int N = 2; N <= 8; ++N) {
    for (int own = 0; own < N; ++own) {
      int next = 0;
      for (int m = 0; m < N; ++m) {
        if (m == own) continue;
        EXPECT_EQ(next, HtNetLayout::peer_slot(m, own));
        EXPECT_EQ(m, HtNetLayout::slot_node(next, own));
        ++next;
      }
    }
  }
}

// What the buffer costs on several nodes, printed so it is visible in the test output: EP16 (2 x 8), EP32 (4 x 8)
// and EP64 (8 x 8) with DeepSeek-V3's shape (hidden 7168, top-8 of 256 experts), 4096 HT tokens and 128 LL tokens.
TEST(Layout, HtNetCostAtTheTargetShapes) {
  const double MiB = 1024.0 * 1024.0;
  for (int nodes : {2, 4, 8}) {
    const nccl_moe::LayoutParams p{8 * nodes, 256, 7168, 8, 4096, 128, nodes};
    const BufferLayout b = BufferLayout::make(p);
    const nccl_moe::HtNetLayout& L = b.ht_net;
    std::printf(
        "[layout] EP%d (%d x 8), H 7168, K 8, 4096 HT / 128 LL tokens per rank: HT %.1f MiB, LL 2 x %.1f MiB, "
        "LL net 2 x %.1f MiB, HT net %.1f MiB (send %.1f + recv %.1f, record %zu B), total %.1f MiB per rank\n",
        8 * nodes, nodes, b.ht_bytes / MiB, b.ll_half_bytes / MiB, b.ll_net_half_bytes / MiB, b.ht_net_bytes / MiB,
        (L.recv_offset - L.send_offset) / MiB, (L.total_bytes - L.recv_offset) / MiB, L.record_bytes,
        b.total_bytes / MiB);
    // Two windows of (N - 1) * C records, then two notify records per rank (stage and receive: counts and the list
    // of up to C tokens sent to that rank), plus a few control pages.
    const size_t windows = 2ull * (nodes - 1) * 4096 * L.record_bytes;
    const size_t notify = 2ull * (8 * nodes) * L.notify_record_bytes;
    EXPECT_EQ(L.notify_record_used(4096), L.notify_record_bytes);
    EXPECT_GE(b.ht_net_bytes, windows + notify);
    EXPECT_LE(b.ht_net_bytes, windows + notify + 8 * nccl_moe::kRegionAlign);
  }
}

// The single-node layout is byte for byte what it was before the internode HT region existed: per shape and rank
// count, the HT region's size, an LL half's size and the total (golden values from the layout at 925c31e).
TEST(Layout, SingleNodeLayoutIsUnchanged) {
  struct Golden {
    int R, experts, hidden, topk, ht_tokens, ll_tokens;
    size_t ht_bytes, ll_half_bytes, total_bytes;
  };
  const Golden kGolden[] = {
      {1, 256, 7168, 8, 4096, 128, 59953152ull, 473497600ull, 1006948352ull},
      {2, 256, 7168, 8, 4096, 128, 119902208ull, 477220864ull, 1074343936ull},
      {4, 256, 7168, 8, 4096, 128, 239800320ull, 484667392ull, 1209135104ull},
      {8, 256, 7168, 8, 4096, 128, 479596544ull, 499560448ull, 1478717440ull},
      {1, 288, 7168, 8, 0, 128, 0ull, 532217856ull, 1064435712ull},
      {2, 288, 7168, 8, 0, 128, 0ull, 535941120ull, 1071882240ull},
      {3, 288, 7168, 8, 0, 128, 0ull, 539664384ull, 1079328768ull},
      {4, 288, 7168, 8, 0, 128, 0ull, 543387648ull, 1086775296ull},
      {6, 288, 7168, 8, 0, 128, 0ull, 550834176ull, 1101668352ull},
      {8, 288, 7168, 8, 0, 128, 0ull, 558280704ull, 1116561408ull},
      {1, 64, 136, 16, 100, 0, 49152ull, 0ull, 49152ull},
      {2, 64, 136, 16, 100, 0, 94208ull, 0ull, 94208ull},
      {4, 64, 136, 16, 100, 0, 180224ull, 0ull, 180224ull},
      {8, 64, 136, 16, 100, 0, 352256ull, 0ull, 352256ull},
      {1, 1024, 2048, 1, 17, 3, 81920ull, 12632064ull, 25346048ull},
      {2, 1024, 2048, 1, 17, 3, 151552ull, 12652544ull, 25456640ull},
      {4, 1024, 2048, 1, 17, 3, 294912ull, 12701696ull, 25698304ull},
      {8, 1024, 2048, 1, 17, 3, 577536ull, 12804096ull, 26185728ull},
      {1, 16, 8, 2, 1, 0, 12288ull, 0ull, 12288ull},
      {2, 16, 8, 2, 1, 0, 12288ull, 0ull, 12288ull},
      {4, 16, 8, 2, 1, 0, 12288ull, 0ull, 12288ull},
      {8, 16, 8, 2, 1, 0, 12288ull, 0ull, 12288ull},
      {1, 8, 128, 4, 0, 1, 0ull, 28672ull, 57344ull},
      {2, 8, 128, 4, 0, 1, 0ull, 28672ull, 57344ull},
      {4, 8, 128, 4, 0, 1, 0ull, 28672ull, 57344ull},
      {8, 8, 128, 4, 0, 1, 0ull, 28672ull, 57344ull},
  };
  for (const Golden& g : kGolden) {
    const LayoutParams p{g.R, g.experts, g.hidden, g.topk, g.ht_tokens, g.ll_tokens};
    const BufferLayout b = BufferLayout::make(p);
    SCOPED_TRACE(testing::Message() << "R=" << g.R << " E=" << g.experts << " H=" << g.hidden);
    EXPECT_EQ(0u, b.ht_offset);
    EXPECT_EQ(g.ht_bytes, b.ht_bytes);
    EXPECT_EQ(g.ht_bytes, b.ll_offset);
    EXPECT_EQ(g.ll_half_bytes, b.ll_half_bytes);
    EXPECT_EQ(0u, b.ll_net_half_bytes);
    EXPECT_EQ(0u, b.ht_net_bytes);
    EXPECT_EQ(g.total_bytes, b.total_bytes);
    EXPECT_EQ(g.ht_bytes + 2 * g.ll_half_bytes, b.total_bytes);
  }
}
