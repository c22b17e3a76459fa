// Tests of the CPU reference (src/reference): numerics against independent brute-force conversions, every
// operation against the brute-force per-token model over a seeded sweep of the mode space, the written
// accumulation-order contracts, provenance of every received row, generator properties, determinism hashes.
#include "reference/reference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "reference/testing/brute.h"
#include "reference/testing/compare.h"
#include "reference/testing/generators.h"
#include "reference/testing/traffic.h"

namespace nccl_moe::ref {
namespace {

uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bitsf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ------------------------------------------------------------------------------------------------
// Independent conversions: nearest representable value by exhaustive search in double precision.
// ------------------------------------------------------------------------------------------------

// Nearest finite e4m3 code to x (ties to the code with an even mantissa LSB), |x| beyond 448 saturates.
uint8_t brute_fp8(float x) {
  if (std::isnan(x)) return std::signbit(x) ? 0xff : 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return 0x7e | sign;
  int best = 0;
  double best_err = 1e300;
  for (int c = 0; c <= 0x7e; ++c) {
    const double v = fp8_e4m3_to_float(static_cast<uint8_t>(c));
    const double err = std::fabs(v - a);
    if (err < best_err || (err == best_err && (c & 1) == 0)) {
      best = c;
      best_err = err;
    }
  }
  return static_cast<uint8_t>(best | sign);
}

// float -> bf16 by comparing the two neighbours in double precision.
uint16_t brute_bf16(float x) {
  if (std::isnan(x)) return 0x7fff;
  const uint32_t u = fbits(x);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  if ((u & 0xffff) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);  // next magnitude (may be Inf)
  const double dx = std::fabs(static_cast<double>(x));
  const double dlo = std::fabs(static_cast<double>(bf16_to_float(lo)));
  // Upper neighbour of the largest finite bf16 is Inf: treat it as 2^128 for the distance.
  const double dhi = (hi & 0x7fff) == 0x7f80 ? std::ldexp(1.0, 128) : std::fabs(static_cast<double>(bf16_to_float(hi)));
  const double elo = dx - dlo, ehi = dhi - dx;
  if (elo < ehi) return lo;
  if (ehi < elo) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(ReferenceNumerics, Bf16RoundTripAllCodes) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    EXPECT_EQ(fbits(f), b << 16);
    if (std::isnan(f))
      EXPECT_EQ(float_to_bf16(f), 0x7fff);
    else
      EXPECT_EQ(float_to_bf16(f), b) << b;
  }
}

TEST(ReferenceNumerics, Bf16RneEdges) {
  EXPECT_EQ(float_to_bf16(bitsf(0x3f808000)), 0x3f80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(bitsf(0x3f818000)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(bitsf(0x3f808001)), 0x3f81);  // just above the tie
  EXPECT_EQ(float_to_bf16(bitsf(0x3f807fff)), 0x3f80);  // just below the tie
  EXPECT_EQ(float_to_bf16(bitsf(0xbf818000)), 0xbf82);  // negative tie
  EXPECT_EQ(float_to_bf16(bitsf(0x7f7fffff)), 0x7f80);  // rounds past the largest bf16 -> Inf
  EXPECT_EQ(float_to_bf16(bitsf(0x7f7f7fff)), 0x7f7f);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(bitsf(0x00008000)), 0x0000);  // subnormal tie -> even (0)
  EXPECT_EQ(float_to_bf16(bitsf(0x00018000)), 0x0002);  // subnormal tie -> even (2)
  EXPECT_EQ(float_to_bf16(bitsf(0x7fc00001)), 0x7fff);  // NaN stays NaN (canonical)
  EXPECT_EQ(float_to_bf16(bitsf(0xff800001)), 0x7fff);  // signalling negative NaN: no carry into Inf
  Rng rng(7);
  for (int i = 0; i < 200000; ++i) {
    const float f = bitsf(static_cast<uint32_t>(rng.next()));
    ASSERT_EQ(float_to_bf16(f), brute_bf16(f)) << std::hex << fbits(f);
  }
}

TEST(ReferenceNumerics, Fp8DecodeTable) {
  EXPECT_EQ(fp8_e4m3_to_float(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(fp8_e4m3_to_float(0x80)));
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_float(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0xfe), -448.0f);
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_float(0xff)));
  EXPECT_EQ(fp8_e4m3_to_float(0x78), 256.0f);  // exponent field 15 is a normal binade in e4m3fn
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    const float v = fp8_e4m3_to_float(static_cast<uint8_t>(c));
    EXPECT_EQ(float_to_fp8_e4m3(v), c) << c;  // round trip of every finite code (incl. -0)
  }
}

TEST(ReferenceNumerics, Fp8EncodeEdges) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(float_to_fp8_e4m3(448.0f), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(463.99f), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(464.0f), 0x7e);  // tie between 448 and (non-existent) 480: even code
  EXPECT_EQ(float_to_fp8_e4m3(500.0f), 0x7e);  // satfinite
  EXPECT_EQ(float_to_fp8_e4m3(1e30f), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(inf), 0x7e);
  EXPECT_EQ(float_to_fp8_e4m3(-inf), 0xfe);
  EXPECT_EQ(float_to_fp8_e4m3(std::nanf("")), 0x7f);
  EXPECT_EQ(float_to_fp8_e4m3(-std::nanf("")), 0xff);
  EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.0f, -10)), 0x00);  // half the smallest subnormal: tie to 0
  EXPECT_EQ(float_to_fp8_e4m3(-std::ldexp(1.0f, -10)), 0x80);
  EXPECT_EQ(float_to_fp8_e4m3(std::nextafter(std::ldexp(1.0f, -10), 1.0f)), 0x01);
  EXPECT_EQ(float_to_fp8_e4m3(3 * std::ldexp(1.0f, -10)), 0x02);   // 1.5 * 2^-9: tie -> even (2)
  EXPECT_EQ(float_to_fp8_e4m3(5 * std::ldexp(1.0f, -10)), 0x02);   // 2.5 * 2^-9: tie -> even (2)
  EXPECT_EQ(float_to_fp8_e4m3(15 * std::ldexp(1.0f, -10)), 0x08);  // 7.5 * 2^-9 -> 8 = smallest normal
  EXPECT_EQ(float_to_fp8_e4m3(1.0625f), 0x38);                     // 1 + 1/16: tie between 1 and 1.125 -> even (1)
  EXPECT_EQ(float_to_fp8_e4m3(1.1875f), 0x3a);                     // 1.125 + 1/16: tie -> 1.25 (even)
  EXPECT_EQ(float_to_fp8_e4m3(std::ldexp(1.0f, -40)), 0x00);
  EXPECT_EQ(float_to_fp8_e4m3(bitsf(0x00000001)), 0x00);  // float subnormal
}

TEST(ReferenceNumerics, Fp8EncodeMatchesExhaustiveSearch) {
  // Every bf16 value, every midpoint between neighbouring codes and one float ulp around it, random floats.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_fp8_e4m3(f), brute_fp8(f)) << f;
  }
  for (int c = 0; c < 0x7e; ++c) {
    const float mid = (fp8_e4m3_to_float(static_cast<uint8_t>(c)) + fp8_e4m3_to_float(static_cast<uint8_t>(c + 1))) / 2;
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f)}) {
      ASSERT_EQ(float_to_fp8_e4m3(f), brute_fp8(f)) << f;
      ASSERT_EQ(float_to_fp8_e4m3(-f), brute_fp8(-f)) << -f;
    }
  }
  Rng rng(11);
  for (int i = 0; i < 100000; ++i) {
    const float f = static_cast<float>((rng.uniform() * 2 - 1) * std::ldexp(1.0, static_cast<int>(rng.below(30)) - 14));
    ASSERT_EQ(float_to_fp8_e4m3(f), brute_fp8(f)) << f;
  }
}

TEST(ReferenceNumerics, GroupScales) {
  EXPECT_EQ(fp8_group_scale(0.0f, ScaleFormat::kFloat), 1e-4f / 448.0f);
  EXPECT_EQ(fp8_group_scale(448.0f, ScaleFormat::kFloat), 1.0f);
  EXPECT_EQ(fp8_group_scale(448.0f, ScaleFormat::kFloatPow2), 1.0f);  // already a power of two
  EXPECT_EQ(fp8_group_scale(449.0f, ScaleFormat::kFloatPow2), 2.0f);  // rounded up
  EXPECT_EQ(fp8_group_scale(224.0f, ScaleFormat::kUe8m0), 0.5f);
  EXPECT_EQ(ue8m0_from_scale(1.0f), 127);
  EXPECT_EQ(ue8m0_from_scale(2.0f), 128);
  EXPECT_EQ(ue8m0_from_scale(0.5f), 126);
  EXPECT_EQ(ue8m0_to_scale(127), 1.0f);
  EXPECT_EQ(ue8m0_to_scale(120), std::ldexp(1.0f, -7));
  Rng rng(3);
  for (int i = 0; i < 10000; ++i) {
    const float amax = static_cast<float>(std::ldexp(rng.uniform(), static_cast<int>(rng.below(60)) - 30));
    const float f = fp8_group_scale(amax, ScaleFormat::kFloat);
    const float p = fp8_group_scale(amax, ScaleFormat::kFloatPow2);
    EXPECT_EQ(f, std::fmax(amax, 1e-4f) / 448.0f);
    EXPECT_EQ(fbits(p) & 0x7fffff, 0u);
    EXPECT_GE(p, f);
    EXPECT_LT(p, 2 * f);
    EXPECT_EQ(p, fp8_group_scale(amax, ScaleFormat::kUe8m0));
    EXPECT_EQ(ue8m0_to_scale(ue8m0_from_scale(p)), p);
  }
}

TEST(ReferenceNumerics, CastRowFormatsAndPacking) {
  for (int H : {8, 128, 136, 640, 1024}) {
    const std::vector<uint16_t> x = make_bf16_rows(5, 1, 3, H, ValueKind::kWide);
    const int G = num_scale_groups(H), P = num_packed_scales(H);
    const Rows f = cast_to_fp8(x, 3, H, ScaleFormat::kFloat);
    const Rows p2 = cast_to_fp8(x, 3, H, ScaleFormat::kFloatPow2);
    const Rows u = cast_to_fp8(x, 3, H, ScaleFormat::kUe8m0);
    ASSERT_EQ(f.scales.size(), 3u * G);
    ASSERT_TRUE(f.packed_scales.empty());
    ASSERT_EQ(u.packed_scales.size(), 3u * P);
    ASSERT_TRUE(u.scales.empty());
    EXPECT_EQ(p2.fp8, u.fp8);  // same power-of-two scales, same codes
    for (int t = 0; t < 3; ++t) {
      for (int g = 0; g < G; ++g) {
        float amax = 0;
        for (int c = g * 128; c < std::min(H, g * 128 + 128); ++c)
          amax = std::max(amax, std::fabs(bf16_to_float(x[t * H + c])));
        EXPECT_EQ(f.scales[t * G + g], std::max(amax, 1e-4f) / 448.0f);
        const uint8_t b = ue8m0_byte(&u.packed_scales[t * P], g);
        EXPECT_EQ(ue8m0_to_scale(b), p2.scales[t * G + g]);
        // byte g sits in word g/4 at bits 8*(g%4)
        EXPECT_EQ((static_cast<uint32_t>(u.packed_scales[t * P + g / 4]) >> (8 * (g % 4))) & 0xff, b);
      }
      for (int g = G; g < 4 * P; ++g) EXPECT_EQ(ue8m0_byte(&u.packed_scales[t * P], g), 0) << "padding byte";
      for (int c = 0; c < H; ++c) {
        const float v = bf16_to_float(x[t * H + c]);
        const float inv = 1.0f / f.scales[t * G + c / 128];
        EXPECT_EQ(f.fp8[t * H + c], float_to_fp8_e4m3(v * inv));
        EXPECT_LE(std::fabs(fp8_e4m3_to_float(f.fp8[t * H + c])), 448.0f);
        // Dequantised value within e4m3 precision (2^-4 relative) or the subnormal step.
        for (const Rows* r : {&f, &p2, &u}) {
          const float dq = r->value(t, c);
          const float step = (r == &f ? f.scales[t * G + c / 128] : p2.scales[t * G + c / 128]) * std::ldexp(1.0f, -9);
          EXPECT_LE(std::fabs(dq - v), std::max(std::fabs(v) / 16, step)) << H << " " << c;
        }
      }
    }
    // The element that sets amax maps to +-448 with float scales.
    bool saw_max = false;
    for (uint8_t q : f.fp8) saw_max |= (q & 0x7f) == 0x7e;
    EXPECT_TRUE(saw_max);
  }
}

// ------------------------------------------------------------------------------------------------
// Operations against the brute-force model
// ------------------------------------------------------------------------------------------------

struct Case {
  RoutingSpec spec;
  int hidden = 8;
  int alignment = 1;
  std::string name() const {
    return "R=" + std::to_string(spec.num_ranks) + " E=" + std::to_string(spec.num_experts) +
           " K=" + std::to_string(spec.topk) + " T=" + std::to_string(spec.num_tokens) +
           " H=" + std::to_string(hidden) + " skew=" + std::to_string(spec.skew) +
           " mask=" + std::to_string(spec.masked_fraction) + " empty=" + std::to_string(spec.empty_token_fraction) +
           " zero_ranks=" + std::to_string(spec.num_zero_token_ranks) + " align=" + std::to_string(alignment) +
           " seed=" + std::to_string(spec.seed);
  }
};

// A seeded sweep over ranks, experts, top-k, hidden sizes, masking, empty tokens, zero-token ranks, skew.
std::vector<Case> sweep() {
  std::vector<Case> cases;
  Rng rng(2024);
  const int ranks[] = {1, 2, 3, 4, 8};
  const int hiddens[] = {8, 136, 256, 7168};
  for (int R : ranks) {
    for (int i = 0; i < 24; ++i) {
      Case c;
      c.spec.num_ranks = R;
      const int local_choices[] = {1, 2, 3, 8, 32, 128};
      int El = local_choices[rng.below(6)];
      while (R * El > 1024) El /= 2;
      c.spec.num_experts = R * El;
      c.spec.topk = std::min<int>(1 + static_cast<int>(rng.below(16)), c.spec.num_experts);
      c.hidden = hiddens[rng.below(4)];
      c.spec.num_tokens = c.hidden >= 7168 ? 1 + static_cast<int>(rng.below(12)) : static_cast<int>(rng.below(80));
      c.spec.skew = (i % 3 == 0) ? 1.0 : 1.0 + 8.0 * rng.uniform();
      c.spec.masked_fraction = (i % 2) ? 0.3 * rng.uniform() : 0.0;
      c.spec.empty_token_fraction = (i % 4 == 1) ? 0.2 : 0.0;
      c.spec.num_zero_token_ranks =
          (R > 1 && i % 5 == 2) ? 1 + static_cast<int>(rng.below(static_cast<uint32_t>(R - 1))) : 0;
      if (i % 6 == 4) {  // uneven token counts per rank
        for (int s = 0; s < R; ++s) c.spec.tokens_per_rank.push_back(static_cast<int>(rng.below(60)));
      }
      c.alignment = (i % 3 == 1) ? 1 + static_cast<int>(rng.below(128)) : 1;
      c.spec.seed = rng.next();
      cases.push_back(c);
    }
  }
  // Heavy imbalance: everything lands on rank 0's experts.
  Case heavy;
  heavy.spec.num_ranks = 8;
  heavy.spec.num_experts = 64;
  heavy.spec.topk = 8;
  heavy.spec.num_tokens = 64;
  heavy.spec.skew = 1e6;
  heavy.hidden = 136;
  heavy.spec.seed = 99;
  cases.push_back(heavy);
  return cases;
}

TEST(ReferenceOps, LayoutMatchesBruteForce) {
  for (const Case& c : sweep()) {
    const Routing r = make_routing(c.spec);
    for (int s = 0; s < r.num_ranks; ++s) {
      const RankRouting& rr = r.ranks[s];
      const DispatchLayout a =
          get_dispatch_layout(rr.topk_idx.data(), rr.num_tokens, r.topk, r.num_experts, r.num_ranks);
      const DispatchLayout b =
          brute::get_dispatch_layout(rr.topk_idx.data(), rr.num_tokens, r.topk, r.num_experts, r.num_ranks);
      ASSERT_EQ(diff(a, b), "") << c.name();
    }
  }
}

// Checks every received HT row against the generator: provenance (rows encode source rank/token/channel).
void check_ht_provenance(const HtDispatch& d, uint64_t seed, int H) {
  for (int r = 0; r < d.num_ranks; ++r) {
    const HtRankRecv& rv = d.recv[r];
    for (int i = 0; i < rv.num_recv; ++i) {
      ASSERT_EQ(rv.src_info[i], (rv.src_rank[i] << 24) | rv.src_token[i]);
      if (i > 0) {  // order: source rank ascending, then token ascending
        ASSERT_TRUE(rv.src_rank[i - 1] < rv.src_rank[i] ||
                    (rv.src_rank[i - 1] == rv.src_rank[i] && rv.src_token[i - 1] < rv.src_token[i]));
      }
      for (int ch = 0; ch < H; ++ch)
        ASSERT_EQ(rv.x.bf16[static_cast<size_t>(i) * H + ch],
                  pattern_bf16(seed, rv.src_rank[i], rv.src_token[i], ch, ValueKind::kExact));
    }
  }
}

TEST(ReferenceOps, HtDispatchAndCombineMatchBruteForce) {
  for (const Case& c : sweep()) {
    SCOPED_TRACE(c.name());
    const Routing r = make_routing(c.spec);
    const int H = c.hidden, R = r.num_ranks, K = r.topk;
    const uint64_t seed = c.spec.seed ^ 0x55;
    const auto xb = make_bf16_rows_all(r, seed, H, ValueKind::kExact);
    std::vector<Rows> x;
    for (int s = 0; s < R; ++s) x.push_back(Rows::from_bf16(xb[s], r.ranks[s].num_tokens, H));

    const HtDispatch a = ht_dispatch(r, c.alignment, &x);
    const HtDispatch b = brute::ht_dispatch(r, c.alignment, &x);
    ASSERT_EQ(diff(a, b), "");
    check_ht_provenance(a, seed, H);

    // Counts: traffic matrix columns are the receive counts; aligned counts are multiples of the alignment.
    const std::vector<int64_t> m = traffic_matrix(r);
    for (int d = 0; d < R; ++d) {
      int64_t col = 0;
      for (int s = 0; s < R; ++s) col += m[s * R + d];
      ASSERT_EQ(col, a.recv[d].num_recv);
      for (int j = 0; j < r.num_local_experts(); ++j) {
        ASSERT_EQ(a.recv[d].num_recv_per_expert[j] % c.alignment, 0);
        ASSERT_LT(a.recv[d].num_recv_per_expert[j] - a.recv[d].num_recv_per_expert_unaligned[j], c.alignment);
      }
    }

    // Combine the received rows unchanged, with weights and 0/1/2 biases.
    std::vector<std::vector<uint16_t>> back;
    std::vector<std::vector<float>> w;
    for (int d = 0; d < R; ++d) {
      back.push_back(a.recv[d].x.bf16);
      w.push_back(a.recv[d].topk_weights);
    }
    const auto bias0 = make_bf16_rows_all(r, seed + 1, H, ValueKind::kExact);
    const auto bias1 = make_bf16_rows_all(r, seed + 2, H, ValueKind::kExact);
    for (int nb = 0; nb < 3; ++nb) {
      const auto* b0 = nb >= 1 ? &bias0 : nullptr;
      const auto* b1 = nb >= 2 ? &bias1 : nullptr;
      const HtCombineResult ca = ht_combine(a, back, H, &w, b0, b1);
      const HtCombineResult cb = brute::ht_combine(a, back, H, &w, b0, b1);
      ASSERT_EQ(hash(ca), hash(cb)) << "biases " << nb;
      ASSERT_EQ(ca.x, cb.x);
      // Exact values: out = n_ranks * x + biases, exactly; weights come back unchanged where valid.
      for (int s = 0; s < R; ++s) {
        for (int t = 0; t < r.ranks[s].num_tokens; ++t) {
          int n = 0;
          for (int d = 0; d < R; ++d) n += a.send_pos[s][t * R + d] >= 0;
          for (int ch = 0; ch < H; ch += 7) {
            float want = n * bf16_to_float(xb[s][t * H + ch]);
            if (b0) want += bf16_to_float(bias0[s][t * H + ch]);
            if (b1) want += bf16_to_float(bias1[s][t * H + ch]);
            ASSERT_EQ(bf16_to_float(ca.x[s][t * H + ch]), want);
          }
          for (int k = 0; k < K; ++k) {
            const bool valid = r.ranks[s].topk_idx[t * K + k] >= 0;
            ASSERT_EQ(ca.topk_weights[s][t * K + k], valid ? r.ranks[s].topk_weights[t * K + k] : 0.0f);
          }
        }
      }
    }
  }
}

TEST(ReferenceOps, HtDispatchFp8RowsCopiedBitwise) {
  for (ScaleFormat fmt : {ScaleFormat::kFloat, ScaleFormat::kUe8m0}) {
    RoutingSpec spec;
    spec.num_ranks = 4;
    spec.num_experts = 32;
    spec.topk = 6;
    spec.num_tokens = 40;
    spec.masked_fraction = 0.2;
    spec.seed = 17;
    const Routing r = make_routing(spec);
    const int H = 640;  // 5 groups: the last packed word is partial
    std::vector<Rows> x;
    for (int s = 0; s < 4; ++s)
      x.push_back(
          cast_to_fp8(make_bf16_rows(3, s, r.ranks[s].num_tokens, H, ValueKind::kWide), r.ranks[s].num_tokens, H, fmt));
    const HtDispatch a = ht_dispatch(r, 4, &x);
    ASSERT_EQ(diff(a, brute::ht_dispatch(r, 4, &x)), "");
    const int G = num_scale_groups(H), P = num_packed_scales(H);
    for (int d = 0; d < 4; ++d) {
      const HtRankRecv& rv = a.recv[d];
      for (int i = 0; i < rv.num_recv; ++i) {
        const Rows& src = x[rv.src_rank[i]];
        const int t = rv.src_token[i];
        ASSERT_EQ(0, std::memcmp(&rv.x.fp8[i * H], &src.fp8[t * H], H));
        if (fmt == ScaleFormat::kUe8m0)
          ASSERT_EQ(0, std::memcmp(&rv.x.packed_scales[i * P], &src.packed_scales[t * P], 4 * P));
        else
          ASSERT_EQ(0, std::memcmp(&rv.x.scales[i * G], &src.scales[t * G], 4 * G));
      }
    }
  }
}

TEST(ReferenceOps, HtTopkRebasedToLocalIds) {
  Routing r;
  r.num_ranks = 2;
  r.num_experts = 8;
  r.topk = 3;
  r.ranks.resize(2);
  r.ranks[0] = {2, {0, 5, -1, 6, 7, 4}, {0.5f, 0.25f, 0.125f, 1.0f, 2.0f, 4.0f}};
  r.ranks[1] = {1, {-1, -1, -1}, {1, 1, 1}};  // a token with no experts
  const HtDispatch d = ht_dispatch(r, 2);
  EXPECT_EQ(diff(d, brute::ht_dispatch(r, 2)), "");
  ASSERT_EQ(d.recv[0].num_recv, 1);  // token 0 (expert 0)
  ASSERT_EQ(d.recv[1].num_recv, 2);  // tokens 0 and 1
  EXPECT_EQ(d.recv[0].topk_idx, (std::vector<int64_t>{0, -1, -1}));
  EXPECT_EQ(d.recv[0].topk_weights, (std::vector<float>{0.5f, 0.0f, 0.0f}));
  EXPECT_EQ(d.recv[1].topk_idx, (std::vector<int64_t>{-1, 1, -1, 2, 3, 0}));
  EXPECT_EQ(d.recv[1].topk_weights, (std::vector<float>{0.0f, 0.25f, 0.0f, 1.0f, 2.0f, 4.0f}));
  EXPECT_EQ(d.recv[1].num_recv_per_expert_unaligned, (std::vector<int>{1, 1, 1, 1}));
  EXPECT_EQ(d.recv[1].num_recv_per_expert, (std::vector<int>{2, 2, 2, 2}));
  EXPECT_EQ(d.recv[0].num_recv_per_expert, (std::vector<int>{2, 0, 0, 0}));
  EXPECT_EQ(d.send_pos[0], (std::vector<int>{0, 0, -1, 1}));
  EXPECT_EQ(d.send_pos[1], (std::vector<int>{-1, -1}));
  EXPECT_EQ(d.recv[1].src_info, (std::vector<int32_t>{0, 1}));
  // The token with no experts combines to bf16(0 + biases).
  const std::vector<std::vector<uint16_t>> x = {{0x3f80}, {0x4000, 0x4040}};  // H = 1
  const std::vector<std::vector<uint16_t>> b0 = {{0, 0}, {0x3f80}};
  const HtCombineResult c = ht_combine(d, x, 1, nullptr, &b0);
  EXPECT_EQ(c.x[0], (std::vector<uint16_t>{0x4040, 0x4040}));  // 1 + 2, then 3 (one rank)
  EXPECT_EQ(c.x[1], (std::vector<uint16_t>{0x3f80}));
}

// The written order: ranks ascending from 0.0f, then bias0, then bias1; each a separate FP32 add.
TEST(ReferenceOps, HtCombineOrderContract) {
  Routing r;
  r.num_ranks = 3;
  r.num_experts = 3;
  r.topk = 3;
  r.ranks.resize(3);
  r.ranks[0] = {2, {0, 1, 2, 0, -1, -1}, {}};
  const HtDispatch d = ht_dispatch(r, 1);
  const uint16_t one = float_to_bf16(1.0f), m_one = float_to_bf16(-1.0f), tiny = float_to_bf16(std::ldexp(1.0f, -30));
  ASSERT_EQ(bf16_to_float(tiny), std::ldexp(1.0f, -30));
  // Token 0 reaches ranks 0,1,2 with rows 1, -1, 2^-30: ((0 + 1) + -1) + 2^-30 = 2^-30 (any other order loses it).
  // Token 1 reaches rank 0 only with row -0.0: 0.0f + -0.0f = +0.0f.
  std::vector<std::vector<uint16_t>> x = {{one, 0x8000}, {m_one}, {tiny}};
  HtCombineResult c = ht_combine(d, x, 1);
  EXPECT_EQ(c.x[0][0], tiny);
  EXPECT_EQ(c.x[0][1], 0x0000);
  EXPECT_EQ(brute::ht_combine(d, x, 1).x, c.x);
  // Biases after the sum, bias0 before bias1: ((0 + 1) + 2^-30) + -1 = 0, not 2^-30.
  x = {{one, one}, {0}, {0}};
  const std::vector<std::vector<uint16_t>> b0 = {{tiny, tiny}, {}, {}}, b1 = {{m_one, m_one}, {}, {}};
  c = ht_combine(d, x, 1, nullptr, &b0, &b1);
  EXPECT_EQ(c.x[0][0], 0x0000);
  // With only bias1 given it still comes last.
  c = ht_combine(d, x, 1, nullptr, nullptr, &b1);
  EXPECT_EQ(c.x[0][1], 0x0000);
}

void check_ll_provenance(const Routing& r, const LlDispatch& d, uint64_t seed) {
  const int El = r.num_local_experts(), H = d.hidden, slab = d.slab_rows();
  const std::vector<int64_t> m = ll_traffic_matrix(r);
  for (int dst = 0; dst < r.num_ranks; ++dst) {
    const LlRankRecv& rv = d.recv[dst];
    int64_t total = 0;
    for (int s = 0; s < r.num_ranks; ++s) total += m[s * r.num_ranks + dst];
    int64_t got = 0;
    for (int j = 0; j < El; ++j) {
      got += rv.recv_count[j];
      ASSERT_LE(rv.recv_count[j], slab);
      for (int i = 0; i < rv.recv_count[j]; ++i) {
        const size_t g = static_cast<size_t>(j) * slab + i;
        const int s = rv.src_rank[g], t = rv.src_token[g];
        ASSERT_EQ(rv.src_info[g], (s << 24) | t);
        if (i > 0) {
          const int ps = rv.src_rank[g - 1], pt = rv.src_token[g - 1];
          ASSERT_TRUE(ps < s || (ps == s && pt < t));
        }
        bool names = false;  // the token really names this expert
        for (int k = 0; k < r.topk; ++k) names |= r.ranks[s].topk_idx[t * r.topk + k] == dst * El + j;
        ASSERT_TRUE(names);
        if (!d.use_fp8) {
          for (int ch = 0; ch < H; ch += 5)
            ASSERT_EQ(rv.bf16[g * H + ch], pattern_bf16(seed, s, t, ch, ValueKind::kWide));
        }
      }
      for (int i = rv.recv_count[j]; i < slab; ++i) ASSERT_EQ(rv.src_info[static_cast<size_t>(j) * slab + i], -1);
    }
    ASSERT_EQ(got, total);
  }
}

TEST(ReferenceOps, LlDispatchAndCombineMatchBruteForce) {
  int n = 0;
  for (Case c : sweep()) {
    ++n;
    // LL needs H % 128 == 0 for fp8; bf16 takes any H.
    const ScaleFormat fmts[] = {ScaleFormat::kFloat, ScaleFormat::kFloatPow2, ScaleFormat::kUe8m0};
    const bool fp8 = (n % 2 == 0) && c.hidden % 128 == 0;
    const ScaleFormat fmt = fmts[n % 3];
    // Keep the [R][E_l, R*max, H] slabs small: fewer local experts, then fewer tokens.
    const auto slab_elems = [&c] {
      const int R = c.spec.num_ranks, El = c.spec.num_experts / R;
      int T = c.spec.num_tokens;
      for (int v : c.spec.tokens_per_rank) T = std::max(T, v);
      return static_cast<int64_t>(El) * R * R * (T + 3) * c.hidden;
    };
    while (slab_elems() > (int64_t{1} << 21) && c.spec.num_experts > c.spec.num_ranks) {
      c.spec.num_experts = c.spec.num_ranks * std::max(1, c.spec.num_experts / c.spec.num_ranks / 2);
      c.spec.topk = std::min(c.spec.topk, c.spec.num_experts);
    }
    while (slab_elems() > (int64_t{1} << 21) && c.spec.num_tokens > 1) {
      c.spec.num_tokens /= 2;
      for (int& v : c.spec.tokens_per_rank) v /= 2;
    }
    SCOPED_TRACE(c.name() + (fp8 ? " fp8 fmt=" + std::to_string(static_cast<int>(fmt)) : " bf16"));
    const Routing r = make_routing(c.spec);
    const int H = c.hidden, R = r.num_ranks;
    int max_tokens = 1;
    for (const RankRouting& rr : r.ranks) max_tokens = std::max(max_tokens, rr.num_tokens);
    max_tokens += n % 3;  // slack past the largest T
    const uint64_t seed = c.spec.seed ^ 0x77;
    const auto x = make_bf16_rows_all(r, seed, H, ValueKind::kWide);
    std::vector<std::vector<int>> stats(R, std::vector<int>(r.num_local_experts(), 1));
    const LlDispatch a = ll_dispatch(r, H, max_tokens, &x, fp8, fmt, &stats);
    const LlDispatch b = brute::ll_dispatch(r, H, max_tokens, &x, fp8, fmt);
    ASSERT_EQ(diff(a, b), "");
    check_ll_provenance(r, a, seed);
    for (int d = 0; d < R; ++d)
      for (int j = 0; j < r.num_local_experts(); ++j) ASSERT_EQ(stats[d][j], 1 + a.recv[d].recv_count[j]);
    if (fp8) {  // each row is the cast of its source row
      const int G = num_scale_groups(H), P = num_packed_scales(H), El = r.num_local_experts();
      std::vector<uint8_t> q(H);
      std::vector<float> sc(G);
      std::vector<int32_t> pk(P);
      for (int d = 0; d < R; ++d)
        for (int j = 0; j < El; ++j)
          for (int i = 0; i < a.recv[d].recv_count[j]; ++i) {
            const size_t g = static_cast<size_t>(j) * a.slab_rows() + i;
            const int s = a.recv[d].src_rank[g], t = a.recv[d].src_token[g];
            cast_row_to_fp8(&x[s][static_cast<size_t>(t) * H], H, fmt, q.data(), sc.data(), pk.data());
            ASSERT_EQ(0, std::memcmp(q.data(), &a.recv[d].fp8[g * H], H));
            if (fmt == ScaleFormat::kUe8m0)
              ASSERT_EQ(0, std::memcmp(pk.data(), &a.recv[d].packed_scales[g * P], 4 * P));
            else
              ASSERT_EQ(0, std::memcmp(sc.data(), &a.recv[d].scales[g * G], 4 * G));
          }
    }
    // Expert outputs: bf16 data in the dispatch layout (the received rows, or a fresh pattern with fp8).
    std::vector<std::vector<uint16_t>> y;
    for (int d = 0; d < R; ++d) {
      if (!fp8) {
        y.push_back(a.recv[d].bf16);
      } else {
        y.push_back(make_bf16_rows(seed + 9, d, r.num_local_experts() * a.slab_rows(), H, ValueKind::kWide));
      }
    }
    const auto oa = ll_combine(r, a, y);
    const auto ob = brute::ll_combine(r, a, y);
    ASSERT_EQ(hash(oa), hash(ob));
    ASSERT_EQ(oa, ob);
  }
}

// Two levels: per expert rank d, partial_d = bf16(fmaf chain over d's valid slots, k ascending, from 0.0f);
// out = bf16(sum of float(partial_d), d ascending, plain FP32 adds from 0.0f).
TEST(ReferenceOps, LlCombineOrderContract) {
  Routing r;
  r.num_ranks = 2;
  r.num_experts = 4;
  r.topk = 4;
  r.ranks.resize(2);
  r.ranks[0] = {1, {3, -1, 0, 2}, {1.0f, 100.0f, 1.0f, 1.0f}};
  r.ranks[1] = {0, {}, {}};
  const LlDispatch d = ll_dispatch(r, 1, 2, nullptr);
  EXPECT_EQ(d.send_row[0], (std::vector<int>{0, -1, 0, 0}));
  EXPECT_EQ(d.recv[0].recv_count, (std::vector<int>{1, 0}));
  EXPECT_EQ(d.recv[1].recv_count, (std::vector<int>{1, 1}));
  const uint16_t one = float_to_bf16(1.0f), m_one = float_to_bf16(-1.0f), tiny = float_to_bf16(std::ldexp(1.0f, -30));
  const auto both = [&](const std::vector<std::vector<uint16_t>>& y) {
    const auto a = ll_combine(r, d, y)[0];
    EXPECT_EQ(a, brute::ll_combine(r, d, y)[0]);
    return a;
  };
  // slab rows per rank: [E_l=2, R*max=4, H=1]; y(k=0) = expert 3 = rank 1 slab 1 row 0, y(k=2) = expert 0 =
  // rank 0 slab 0 row 0, y(k=3) = expert 2 = rank 1 slab 0 row 0. Slots 0 and 3 are rank 1's, slot 2 rank 0's.
  // The masked slot's weight (100) is ignored.
  std::vector<std::vector<uint16_t>> y(2, std::vector<uint16_t>(8, 0));
  // Grouped by rank: p0 = 2^-30, p1 = bf16(1 + -1) = 0, out = 2^-30 (one k-ascending sum would give
  // ((1 + 2^-30) + -1) = 0).
  y[1][4] = one;    // k = 0
  y[0][0] = tiny;   // k = 2
  y[1][0] = m_one;  // k = 3
  EXPECT_EQ(both(y), (std::vector<uint16_t>{tiny}));
  // Each rank's partial is rounded to bf16: p1 = bf16(1 + 2^-8) = 1 (tie to even), p0 = 2^-8, out = bf16(1 + 2^-8)
  // = 1. One FP32 sum (or FP32 partials) would give 1 + 2^-7.
  const uint16_t eps8 = float_to_bf16(std::ldexp(1.0f, -8));
  y[1][4] = one;
  y[0][0] = eps8;
  y[1][0] = eps8;
  EXPECT_EQ(both(y), (std::vector<uint16_t>{one}));
  // Fused multiply-add inside a rank's chain: c = 1 + 2^-7, slot 0: acc = fmaf(-1, c, 0) = -c; slot 3:
  // acc = fmaf(1 + 2^-23, c, -c) = 2^-23 + 2^-30 exactly (= 2^-23 * c, a bf16). Product-then-add would round
  // the product to 1 + 2^-7 + 2^-23 first and give 2^-23. Rank 0's partial is 0: out = bf16(0 + 0 + p1).
  r.ranks[0].topk_weights = {-1.0f, 0.0f, 1.0f, 1.0f + std::ldexp(1.0f, -23)};
  const uint16_t c = float_to_bf16(1.0f + std::ldexp(1.0f, -7));
  ASSERT_EQ(bf16_to_float(c), 1.0f + std::ldexp(1.0f, -7));
  y[1][4] = c;  // k = 0
  y[0][0] = 0;  // k = 2
  y[1][0] = c;  // k = 3
  const float fused = std::ldexp(1.0f, -23) + std::ldexp(1.0f, -30);
  ASSERT_EQ(bf16_to_float(float_to_bf16(fused)), fused);
  ASSERT_NE(float_to_bf16(std::ldexp(1.0f, -23)), float_to_bf16(fused));
  EXPECT_EQ(both(y), (std::vector<uint16_t>{float_to_bf16(fused)}));
  // A token whose slots are all masked gives +0.
  r.ranks[0].topk_idx = {-1, -1, -1, -1};
  const LlDispatch d0 = ll_dispatch(r, 1, 2, nullptr);
  EXPECT_EQ(ll_combine(r, d0, y)[0], (std::vector<uint16_t>{0}));
  EXPECT_EQ(brute::ll_combine(r, d0, y)[0], (std::vector<uint16_t>{0}));
}

// Rank masks: the routing with every slot of a masked source, and every slot naming an expert of a masked rank, set
// to -1. ll_dispatch / ll_combine with a mask must equal the brute-force model on that routing, bit for bit.
Routing without_masked(Routing r, const std::vector<uint8_t>& mask) {
  const int El = r.num_local_experts();
  for (int s = 0; s < r.num_ranks; ++s)
    for (int64_t& e : r.ranks[s].topk_idx)
      if (e >= 0 && (mask[s] != 0 || mask[e / El] != 0)) e = -1;
  return r;
}

TEST(ReferenceOps, LlRankMaskEqualsRoutingWithoutMaskedRanks) {
  int cases = 0;
  for (int R : {2, 4, 8}) {
    for (uint64_t seed = 1; seed <= 6; ++seed) {
      RoutingSpec spec;
      spec.num_ranks = R;
      spec.num_experts = 3 * R;
      spec.topk = 1 + static_cast<int>(seed % 5);
      spec.num_tokens = 5 + static_cast<int>(seed);
      spec.masked_fraction = seed % 2 ? 0.2 : 0.0;
      spec.seed = seed * 31 + R;
      const Routing r = make_routing(spec);
      std::vector<uint8_t> mask(R, 0);
      Rng rng(spec.seed);
      for (int d = 0; d < R; ++d) mask[d] = rng.below(3) == 0 ? 1 : 0;
      mask[seed % R] = 1;  // at least one masked rank
      if (seed == 6) std::fill(mask.begin(), mask.end(), 0);
      SCOPED_TRACE("R " + std::to_string(R) + " seed " + std::to_string(seed));
      const int H = 128, max_tokens = spec.num_tokens;
      const bool fp8 = seed % 3 == 0;
      const auto x = make_bf16_rows_all(r, seed, H, fp8 ? ValueKind::kWide : ValueKind::kExact);
      const LlDispatch a = ll_dispatch(r, H, max_tokens, &x, fp8, ScaleFormat::kFloat, nullptr, &mask);
      const Routing filtered = without_masked(r, mask);
      const LlDispatch b = brute::ll_dispatch(filtered, H, max_tokens, &x, fp8, ScaleFormat::kFloat);
      ASSERT_EQ(diff(a, b), "");
      for (int d = 0; d < R; ++d)
        for (int j = 0; j < r.num_local_experts(); ++j) {
          if (mask[d]) EXPECT_EQ(0, a.recv[d].recv_count[j]) << "masked destination " << d << " received rows";
          for (int i = 0; i < a.recv[d].recv_count[j]; ++i)
            EXPECT_EQ(0, mask[a.recv[d].src_rank[static_cast<size_t>(j) * a.slab_rows() + i]])
                << "rank " << d << " expert " << j << " row " << i << " came from a masked source";
        }
      std::vector<std::vector<uint16_t>> y;
      for (int d = 0; d < R; ++d)
        y.push_back(make_bf16_rows(seed + 5, d, r.num_local_experts() * a.slab_rows(), H, ValueKind::kWide));
      const auto oa = ll_combine(r, a, y, &mask);
      ASSERT_EQ(oa, brute::ll_combine(filtered, b, y));
      for (int s = 0; s < R; ++s)
        if (mask[s]) EXPECT_EQ(oa[s], std::vector<uint16_t>(oa[s].size(), 0)) << "masked rank " << s << " got output";
      if (seed == 6) {  // an all-zero mask is no mask
        ASSERT_EQ(diff(a, ll_dispatch(r, H, max_tokens, &x, fp8)), "");
        ASSERT_EQ(oa, ll_combine(r, a, y));
      }
      ++cases;
    }
  }
  EXPECT_EQ(cases, 18);
}

// One token of rank 0 with a slot on each rank: masking rank 1 leaves rank 0's partial only; rank 1's own token
// (on rank 0's expert) is not received by rank 0; a masked rank receives nothing and gets +0.
TEST(ReferenceOps, LlRankMaskSmallExample) {
  Routing r;
  r.num_ranks = 2;
  r.num_experts = 4;
  r.topk = 2;
  r.ranks.resize(2);
  r.ranks[0] = {1, {1, 2}, {1.0f, 1.0f}};  // expert 1 on rank 0, expert 2 on rank 1
  r.ranks[1] = {1, {0, -1}, {1.0f, 0.0f}};
  const std::vector<uint8_t> mask{0, 1};
  const LlDispatch full = ll_dispatch(r, 1, 1, nullptr);
  const LlDispatch d = ll_dispatch(r, 1, 1, nullptr, false, ScaleFormat::kFloat, nullptr, &mask);
  EXPECT_EQ(full.recv[0].recv_count, (std::vector<int>{1, 1}));
  EXPECT_EQ(d.recv[0].recv_count, (std::vector<int>{0, 1}));  // rank 1's token on expert 0 is gone
  EXPECT_EQ(d.recv[1].recv_count, (std::vector<int>{0, 0}));  // the masked rank receives nothing
  EXPECT_EQ(d.send_row[0], (std::vector<int>{0, -1}));
  EXPECT_EQ(d.send_row[1], (std::vector<int>{-1, -1}));
  // y: [E_l=2, R*max=2, H=1] per rank. Rank 0's partial (expert 1, row 0) = 2, rank 1's (expert 2, row 0) = 4.
  std::vector<std::vector<uint16_t>> y(2, std::vector<uint16_t>(4, 0));
  y[0][2] = float_to_bf16(2.0f);
  y[1][0] = float_to_bf16(4.0f);
  EXPECT_EQ(ll_combine(r, full, y)[0], (std::vector<uint16_t>{float_to_bf16(6.0f)}));
  const auto out = ll_combine(r, d, y, &mask);
  EXPECT_EQ(out[0], (std::vector<uint16_t>{float_to_bf16(2.0f)}));
  EXPECT_EQ(out[1], (std::vector<uint16_t>{0}));
  // Masking rank 0 instead: rank 1's token (expert 0) and rank 0's slot on rank 0 are gone, rank 1 keeps nothing.
  const std::vector<uint8_t> mask0{1, 0};
  const LlDispatch d0 = ll_dispatch(r, 1, 1, nullptr, false, ScaleFormat::kFloat, nullptr, &mask0);
  EXPECT_EQ(d0.recv[0].recv_count, (std::vector<int>{0, 0}));
  EXPECT_EQ(d0.recv[1].recv_count, (std::vector<int>{0, 0}));
  EXPECT_EQ(ll_combine(r, d0, y, &mask0)[1], (std::vector<uint16_t>{0}));
}

TEST(ReferenceOps, LlRankMaskInvalidThrows) {
  Routing r;
  r.num_ranks = 2;
  r.num_experts = 2;
  r.topk = 1;
  r.ranks = {{1, {0}, {1.0f}}, {1, {1}, {1.0f}}};
  const std::vector<uint8_t> short_mask{0}, bad_value{0, 2};
  EXPECT_THROW(ll_dispatch(r, 1, 1, nullptr, false, ScaleFormat::kFloat, nullptr, &short_mask), std::invalid_argument);
  EXPECT_THROW(ll_dispatch(r, 1, 1, nullptr, false, ScaleFormat::kFloat, nullptr, &bad_value), std::invalid_argument);
  const LlDispatch d = ll_dispatch(r, 1, 1, nullptr);
  const std::vector<std::vector<uint16_t>> y(2, std::vector<uint16_t>(2, 0));
  EXPECT_THROW(ll_combine(r, d, y, &short_mask), std::invalid_argument);
}

// ------------------------------------------------------------------------------------------------
// Generators, validation, determinism
// ------------------------------------------------------------------------------------------------

TEST(ReferenceGen, RoutingProperties) {
  RoutingSpec spec;
  spec.num_ranks = 8;
  spec.num_experts = 256;
  spec.topk = 8;
  spec.num_tokens = 2000;
  spec.masked_fraction = 0.25;
  spec.empty_token_fraction = 0.1;
  spec.num_zero_token_ranks = 2;
  spec.seed = 5;
  const Routing r = make_routing(spec);
  int64_t slots = 0, masked = 0, empty = 0, tokens = 0;
  for (int s = 0; s < 8; ++s) {
    const RankRouting& rr = r.ranks[s];
    EXPECT_EQ(rr.num_tokens, s >= 6 ? 0 : 2000);
    for (int t = 0; t < rr.num_tokens; ++t) {
      ++tokens;
      bool all = true;
      for (int k = 0; k < 8; ++k) {
        const int64_t e = rr.topk_idx[t * 8 + k];
        ++slots;
        masked += e < 0;
        all &= e < 0;
        for (int k2 = 0; k2 < k; ++k2)
          if (e >= 0) {
            ASSERT_NE(e, rr.topk_idx[t * 8 + k2]) << "distinct experts";
          }
        const float w = rr.topk_weights[t * 8 + k];
        ASSERT_TRUE(w > 0 && w <= 1 && w * 64 == std::floor(w * 64));
      }
      empty += all;
    }
  }
  EXPECT_NEAR(static_cast<double>(empty) / tokens, 0.1, 0.03);
  EXPECT_NEAR(static_cast<double>(masked) / slots, 0.1 + 0.9 * 0.25, 0.03);
  // Skew sends more to low ranks; uniform does not.
  spec.masked_fraction = 0;
  spec.empty_token_fraction = 0;
  spec.num_zero_token_ranks = 0;
  spec.skew = 4;
  const std::vector<int64_t> m = ll_traffic_matrix(make_routing(spec));
  int64_t to0 = 0, to7 = 0;
  for (int s = 0; s < 8; ++s) {
    to0 += m[s * 8 + 0];
    to7 += m[s * 8 + 7];
  }
  EXPECT_GT(to0, 10 * to7);
  // Per-rank regeneration agrees with the all-rank generator.
  EXPECT_EQ(make_rank_routing(spec, 3).topk_idx, make_routing(spec).ranks[3].topk_idx);
}

TEST(ReferenceGen, ExactValuesAreExact) {
  for (int i = 0; i < 1000; ++i) {
    const float v = bf16_to_float(pattern_bf16(1, 2, i, 3, ValueKind::kExact));
    const float n = v * 16;
    EXPECT_TRUE(n == std::floor(n) && std::fabs(n) >= 1 && std::fabs(n) <= 15);
  }
  EXPECT_NE(make_bf16_rows(1, 0, 4, 64, ValueKind::kWide), make_bf16_rows(1, 1, 4, 64, ValueKind::kWide));
}

TEST(ReferenceGen, InvalidArgumentsThrow) {
  RoutingSpec spec;
  spec.num_ranks = 2;
  spec.num_experts = 4;
  spec.topk = 2;
  spec.num_tokens = 3;
  Routing r = make_routing(spec);
  r.ranks[1].topk_idx[0] = 4;
  EXPECT_THROW(ht_dispatch(r, 1), std::invalid_argument);
  r.ranks[1].topk_idx[0] = -2;
  EXPECT_THROW(ht_dispatch(r, 1), std::invalid_argument);
  r.ranks[1].topk_idx[0] = -1;
  EXPECT_NO_THROW(ht_dispatch(r, 1));
  EXPECT_THROW(ht_dispatch(r, 0), std::invalid_argument);
  EXPECT_THROW(ll_dispatch(r, 128, 2, nullptr), std::invalid_argument);        // T = 3 > max_tokens
  EXPECT_THROW(ll_dispatch(r, 136, 3, nullptr, true), std::invalid_argument);  // fp8 needs H % 128 == 0
  r.num_experts = 5;
  EXPECT_THROW(r.validate(), std::invalid_argument);
  spec.topk = 5;
  EXPECT_THROW(make_routing(spec), std::invalid_argument);
}

TEST(ReferenceGen, DeterminismHashes) {
  RoutingSpec spec;
  spec.num_ranks = 4;
  spec.num_experts = 64;
  spec.topk = 6;
  spec.num_tokens = 50;
  spec.masked_fraction = 0.1;
  spec.skew = 2;
  spec.seed = 42;
  const Routing r = make_routing(spec);
  const auto x = make_bf16_rows_all(r, 42, 256, ValueKind::kWide);
  std::vector<Rows> rows;
  for (int s = 0; s < 4; ++s) rows.push_back(Rows::from_bf16(x[s], r.ranks[s].num_tokens, 256));
  uint64_t h_route = kFnvOffset;
  for (const RankRouting& rr : r.ranks) h_route = fnv1a64(rr.topk_idx, fnv1a64(rr.topk_weights, h_route));
  const uint64_t h_ht = hash(ht_dispatch(r, 8, &rows));
  const uint64_t h_ll = hash(ll_dispatch(r, 256, 64, &x, true, ScaleFormat::kUe8m0));
  // Same in-process.
  EXPECT_EQ(h_ht, hash(ht_dispatch(make_routing(spec), 8, &rows)));
  EXPECT_EQ(h_ll, hash(ll_dispatch(make_routing(spec), 256, 64, &x, true, ScaleFormat::kUe8m0)));
  // Same across runs, builds and platforms: golden values (change only with an intended generator change).
  EXPECT_EQ(fnv1a64("a", 1), 0xaf63dc4c8601ec8cull);  // the FNV-1a 64 test vector
  EXPECT_EQ(h_route, 0x34ea9d6233980525ull) << std::hex << h_route;
  EXPECT_EQ(h_ht, 0x0a61ea191352a937ull) << std::hex << h_ht;
  EXPECT_EQ(h_ll, 0x3fd2ff3d376c7a2eull) << std::hex << h_ll;
}

}  // namespace
}  // namespace nccl_moe::ref
