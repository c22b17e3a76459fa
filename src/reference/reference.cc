// CPU reference of every NCCL-MoE operation (see reference.h for the contract, docs/reference.md for the
// ordering and accumulation rules): numerics, rows, routing checks, and the operations, written the way the GPU
// computes them (per-sender positions, prefix sums, scatter). The brute-force model that cross-checks them
// (written the simplest way: pull per receiver, linear searches), the generators and the hashes are test code in
// reference/testing/.
//
// FP32 contraction is disabled for this file so that "p = w * y; acc = acc + p" stays two roundings even
// when the compiler is allowed FMA instructions (-march=native etc.); where a contract fuses (LL combine),
// the code calls std::fmaf explicitly.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "reference/detail.h"

namespace nccl_moe::ref {

using detail::fail;
using detail::require;
using detail::sz;

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

int round_up(int v, int align) { return (v + align - 1) / align * align; }

int32_t pack_src(int rank, int token) { return static_cast<int32_t>((static_cast<uint32_t>(rank) << 24) | token); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Numerics
// ------------------------------------------------------------------------------------------------

float bf16_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN: CUDA's canonical bf16 NaN
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;  // round to nearest, ties to even; a carry into the exponent is the correct result
  return static_cast<uint16_t>(u >> 16);
}

float fp8_e4m3_to_float(uint8_t bits) {
  const bool neg = (bits & 0x80) != 0;
  const int exp = (bits >> 3) & 0xf;
  const int man = bits & 0x7;
  float v;
  if (exp == 0xf && man == 0x7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);  // subnormal: m * 2^-9
  } else {
    v = std::ldexp(static_cast<float>(8 + man), exp - 7 - 3);  // (1 + m/8) * 2^(exp-7)
  }
  return neg ? -v : v;
}

uint8_t float_to_fp8_e4m3(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint8_t>(0x7f | sign);  // NaN
  // |x| >= 448: everything up to 464 rounds to 448 (ties to the even code 0x7E), beyond saturates.
  if (a >= 0x43e00000u) return static_cast<uint8_t>(0x7e | sign);
  if (a >= 0x3c800000u) {                      // normal e4m3 range: |x| >= 2^-6
    const uint32_t exp = (a >> 23) - 127 + 7;  // 1..15
    const uint32_t man = (a >> 20) & 0x7;
    const uint32_t rest = a & 0xfffffu;  // the 20 mantissa bits below the kept 3
    uint32_t res = (exp << 3) | man;
    if (rest > 0x80000u || (rest == 0x80000u && (man & 1u))) ++res;  // may carry into the exponent
    return static_cast<uint8_t>(res | sign);
  }
  // Subnormal range: the grid is m * 2^-9, m = 0..8 (8 is the smallest normal, code 0x08).
  const float y = bits_float(a) * 512.0f;  // exact: scaling by a power of two, y < 8
  float n = std::floor(y);
  const float frac = y - n;  // exact
  if (frac > 0.5f || (frac == 0.5f && std::fmod(n, 2.0f) != 0.0f)) n += 1.0f;
  return static_cast<uint8_t>(static_cast<uint32_t>(n) | sign);
}

float fp8_group_scale(float amax, ScaleFormat format) {
  const float a = std::fmax(amax, kAmaxFloor);
  float scale = a / kFp8Max;
  if (format == ScaleFormat::kFloatPow2 || format == ScaleFormat::kUe8m0) {
    uint32_t b = float_bits(scale);
    if (b & 0x7fffffu) b = (b + 0x800000u) & ~0x7fffffu;
    scale = bits_float(b);
  }
  return scale;
}

uint8_t ue8m0_from_scale(float pow2_scale) { return static_cast<uint8_t>((float_bits(pow2_scale) >> 23) & 0xff); }

float ue8m0_to_scale(uint8_t b) { return bits_float(static_cast<uint32_t>(b) << 23); }

uint8_t ue8m0_byte(const int32_t* packed_row, int group) {
  return static_cast<uint8_t>((static_cast<uint32_t>(packed_row[group / 4]) >> (8 * (group % 4))) & 0xff);
}

void cast_row_to_fp8(const uint16_t* x, int hidden, ScaleFormat format, uint8_t* q, float* scales_f32,
                     int32_t* packed) {
  const int groups = num_scale_groups(hidden);
  if (format == ScaleFormat::kUe8m0) {
    for (int i = 0; i < num_packed_scales(hidden); ++i) packed[i] = 0;
  }
  for (int g = 0; g < groups; ++g) {
    const int begin = g * kScaleGroupElems;
    const int end = std::min(hidden, begin + kScaleGroupElems);
    float amax = 0.0f;
    for (int c = begin; c < end; ++c) amax = std::fmax(amax, std::fabs(bf16_to_float(x[c])));
    const float scale = fp8_group_scale(amax, format);
    const float inv = 1.0f / scale;
    for (int c = begin; c < end; ++c) q[c] = float_to_fp8_e4m3(bf16_to_float(x[c]) * inv);
    if (format == ScaleFormat::kUe8m0) {
      const uint32_t byte = ue8m0_from_scale(scale);
      packed[g / 4] = static_cast<int32_t>(static_cast<uint32_t>(packed[g / 4]) | (byte << (8 * (g % 4))));
    } else {
      scales_f32[g] = scale;
    }
  }
}

float dequant_fp8(const uint8_t* q, int channel, ScaleFormat format, const float* scales_f32, const int32_t* packed) {
  const int g = channel / kScaleGroupElems;
  const float scale = format == ScaleFormat::kUe8m0 ? ue8m0_to_scale(ue8m0_byte(packed, g)) : scales_f32[g];
  return fp8_e4m3_to_float(q[channel]) * scale;
}

// ------------------------------------------------------------------------------------------------
// Rows
// ------------------------------------------------------------------------------------------------

Rows Rows::zeros(DType dtype, ScaleFormat scale_format, int num_rows, int hidden) {
  require(num_rows >= 0 && hidden >= 0, "Rows: num_rows and hidden must be >= 0");
  Rows r;
  r.dtype = dtype;
  r.scale_format = scale_format;
  r.num_rows = num_rows;
  r.hidden = hidden;
  const size_t n = sz(num_rows) * sz(hidden);
  if (dtype == DType::kBf16) {
    r.bf16.assign(n, 0);
  } else {
    r.fp8.assign(n, 0);
    if (scale_format == ScaleFormat::kUe8m0)
      r.packed_scales.assign(sz(num_rows) * sz(num_packed_scales(hidden)), 0);
    else
      r.scales.assign(sz(num_rows) * sz(num_scale_groups(hidden)), 0.0f);
  }
  return r;
}

Rows Rows::from_bf16(std::vector<uint16_t> data, int num_rows, int hidden) {
  require(data.size() == sz(num_rows) * sz(hidden), "Rows::from_bf16: data.size() must be num_rows * hidden");
  Rows r;
  r.num_rows = num_rows;
  r.hidden = hidden;
  r.bf16 = std::move(data);
  return r;
}

void Rows::copy_row_from(int dst_row, const Rows& src, int src_row) {
  const size_t h = sz(hidden);
  if (dtype == DType::kBf16) {
    std::memcpy(&bf16[sz(dst_row) * h], &src.bf16[sz(src_row) * h], h * sizeof(uint16_t));
    return;
  }
  std::memcpy(&fp8[sz(dst_row) * h], &src.fp8[sz(src_row) * h], h);
  if (scale_format == ScaleFormat::kUe8m0) {
    const size_t p = sz(num_packed_scales(hidden));
    std::memcpy(&packed_scales[sz(dst_row) * p], &src.packed_scales[sz(src_row) * p], p * sizeof(int32_t));
  } else {
    const size_t g = sz(num_scale_groups(hidden));
    std::memcpy(&scales[sz(dst_row) * g], &src.scales[sz(src_row) * g], g * sizeof(float));
  }
}

float Rows::value(int row, int channel) const {
  const size_t h = sz(hidden);
  if (dtype == DType::kBf16) return bf16_to_float(bf16[sz(row) * h + channel]);
  const float* s = scales.empty() ? nullptr : &scales[sz(row) * num_scale_groups(hidden)];
  const int32_t* p = packed_scales.empty() ? nullptr : &packed_scales[sz(row) * num_packed_scales(hidden)];
  return dequant_fp8(&fp8[sz(row) * h], channel, scale_format, s, p);
}

Rows cast_to_fp8(const std::vector<uint16_t>& bf16, int num_rows, int hidden, ScaleFormat format) {
  require(bf16.size() == sz(num_rows) * sz(hidden), "cast_to_fp8: bf16.size() must be num_rows * hidden");
  Rows r = Rows::zeros(DType::kFp8E4M3, format, num_rows, hidden);
  const size_t g = sz(num_scale_groups(hidden)), p = sz(num_packed_scales(hidden));
  for (int t = 0; t < num_rows; ++t) {
    cast_row_to_fp8(&bf16[sz(t) * hidden], hidden, format, &r.fp8[sz(t) * hidden],
                    r.scales.empty() ? nullptr : &r.scales[sz(t) * g],
                    r.packed_scales.empty() ? nullptr : &r.packed_scales[sz(t) * p]);
  }
  return r;
}

// ------------------------------------------------------------------------------------------------
// Routing
// ------------------------------------------------------------------------------------------------

bool Routing::has_weights() const {
  for (const RankRouting& rr : ranks)
    if (!rr.topk_weights.empty()) return true;
  return false;
}

void Routing::validate() const {
  require(num_ranks >= 1, "routing.num_ranks must be >= 1");
  require(num_experts >= num_ranks && num_experts % num_ranks == 0,
          "routing.num_experts must be a positive multiple of num_ranks (" + std::to_string(num_ranks) + ")");
  require(topk >= 1, "routing.topk must be >= 1");
  require(ranks.size() == sz(num_ranks), "routing.ranks.size() must be num_ranks");
  for (int s = 0; s < num_ranks; ++s) {
    const RankRouting& rr = ranks[s];
    const std::string who = "routing.ranks[" + std::to_string(s) + "]";
    require(rr.num_tokens >= 0 && rr.num_tokens < (1 << 24), who + ".num_tokens must be in [0, 2^24)");
    require(rr.topk_idx.size() == sz(rr.num_tokens) * sz(topk), who + ".topk_idx.size() must be num_tokens * topk");
    require(rr.topk_weights.empty() || rr.topk_weights.size() == rr.topk_idx.size(),
            who + ".topk_weights must be empty or num_tokens * topk");
    require(rr.num_tokens == 0 || rr.topk_weights.empty() == !has_weights(),
            who + ".topk_weights: either every rank with tokens has weights or none has");
    for (size_t i = 0; i < rr.topk_idx.size(); ++i) {
      const int64_t e = rr.topk_idx[i];
      if (e < -1 || e >= num_experts)
        fail(who + ".topk_idx[" + std::to_string(i) + "] = " + std::to_string(e) + " must be -1 or in [0, " +
             std::to_string(num_experts) + ")");
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Layout
// ------------------------------------------------------------------------------------------------

DispatchLayout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int topk, int num_experts, int num_ranks) {
  require(num_ranks >= 1 && num_experts >= num_ranks && num_experts % num_ranks == 0,
          "get_dispatch_layout: num_experts must be a positive multiple of num_ranks");
  require(num_tokens >= 0 && topk >= 1, "get_dispatch_layout: num_tokens >= 0 and topk >= 1 required");
  require(num_tokens == 0 || topk_idx != nullptr, "get_dispatch_layout: topk_idx is null");
  const int experts_per_rank = num_experts / num_ranks;
  DispatchLayout l;
  l.num_tokens_per_rank.assign(sz(num_ranks), 0);
  l.num_tokens_per_expert.assign(sz(num_experts), 0);
  l.is_token_in_rank.assign(sz(num_tokens) * sz(num_ranks), 0);
  for (int t = 0; t < num_tokens; ++t) {
    uint8_t* in_rank = &l.is_token_in_rank[sz(t) * num_ranks];
    for (int k = 0; k < topk; ++k) {
      const int64_t e = topk_idx[sz(t) * topk + k];
      if (e == -1) continue;
      if (e < -1 || e >= num_experts)
        fail("get_dispatch_layout: topk_idx[" + std::to_string(t) + "," + std::to_string(k) +
             "] = " + std::to_string(e) + " out of range");
      ++l.num_tokens_per_expert[sz(e)];
      in_rank[e / experts_per_rank] = 1;
    }
    for (int d = 0; d < num_ranks; ++d) l.num_tokens_per_rank[sz(d)] += in_rank[d];
  }
  return l;
}

// ------------------------------------------------------------------------------------------------
// High-throughput dispatch / combine
// ------------------------------------------------------------------------------------------------

namespace {

void check_ht_rows(const Routing& routing, const std::vector<Rows>& x) {
  require(x.size() == sz(routing.num_ranks), "ht_dispatch: x.size() must be num_ranks");
  for (int s = 0; s < routing.num_ranks; ++s) {
    const Rows& r = x[s];
    const std::string who = "ht_dispatch: x[" + std::to_string(s) + "]";
    require(r.num_rows == routing.ranks[s].num_tokens, who + ".num_rows must be the rank's num_tokens");
    require(r.dtype == x[0].dtype && r.scale_format == x[0].scale_format && r.hidden == x[0].hidden,
            who + " must have the dtype, scale format and hidden of x[0]");
    require(r.hidden >= 1, who + ".hidden must be >= 1");
    const size_t n = sz(r.num_rows) * r.hidden;
    if (r.dtype == DType::kBf16) {
      require(r.bf16.size() == n, who + ".bf16.size() must be num_rows * hidden");
    } else {
      require(r.fp8.size() == n, who + ".fp8.size() must be num_rows * hidden");
      if (r.scale_format == ScaleFormat::kUe8m0)
        require(r.packed_scales.size() == sz(r.num_rows) * num_packed_scales(r.hidden),
                who + ".packed_scales.size() must be num_rows * ceil(ceil(hidden/128)/4)");
      else
        require(r.scales.size() == sz(r.num_rows) * num_scale_groups(r.hidden),
                who + ".scales.size() must be num_rows * ceil(hidden/128)");
    }
  }
}

}  // namespace

HtDispatch ht_dispatch(const Routing& routing, int expert_alignment, const std::vector<Rows>* x) {
  routing.validate();
  require(expert_alignment >= 1, "ht_dispatch: expert_alignment must be >= 1");
  if (x) check_ht_rows(routing, *x);
  const int R = routing.num_ranks, K = routing.topk, El = routing.num_local_experts();

  HtDispatch out;
  out.num_ranks = R;
  out.num_experts = routing.num_experts;
  out.topk = K;
  out.expert_alignment = expert_alignment;
  out.num_tokens.resize(sz(R));
  out.send_pos.resize(sz(R));

  // Sender side: position of each token among the tokens s sends to d (token order), and the counts.
  std::vector<int> count(sz(R) * R, 0);  // count[s * R + d]
  for (int s = 0; s < R; ++s) {
    const RankRouting& rr = routing.ranks[s];
    out.num_tokens[s] = rr.num_tokens;
    std::vector<int>& pos = out.send_pos[s];
    pos.assign(sz(rr.num_tokens) * R, -1);
    for (int t = 0; t < rr.num_tokens; ++t) {
      for (int k = 0; k < K; ++k) {
        const int64_t e = rr.topk_idx[sz(t) * K + k];
        if (e < 0) continue;
        const int d = routing.expert_rank(e);
        if (pos[sz(t) * R + d] < 0) pos[sz(t) * R + d] = count[sz(s) * R + d]++;
      }
    }
  }

  // Receiver side: prefix over source ranks, then scatter every (s, t) to its row.
  out.recv.resize(sz(R));
  for (int d = 0; d < R; ++d) {
    HtRankRecv& rv = out.recv[d];
    rv.rank_prefix.assign(sz(R) + 1, 0);
    for (int s = 0; s < R; ++s) rv.rank_prefix[s + 1] = rv.rank_prefix[s] + count[sz(s) * R + d];
    const int n = rv.rank_prefix[R];
    rv.num_recv = n;
    rv.src_rank.assign(sz(n), -1);
    rv.src_token.assign(sz(n), -1);
    rv.src_info.assign(sz(n), -1);
    rv.topk_idx.assign(sz(n) * K, -1);
    if (routing.has_weights()) rv.topk_weights.assign(sz(n) * K, 0.0f);
    rv.num_recv_per_expert.assign(sz(El), 0);
    rv.num_recv_per_expert_unaligned.assign(sz(El), 0);
    if (x) rv.x = Rows::zeros((*x)[0].dtype, (*x)[0].scale_format, n, (*x)[0].hidden);
  }
  for (int s = 0; s < R; ++s) {
    const RankRouting& rr = routing.ranks[s];
    const bool has_w = routing.has_weights();
    for (int t = 0; t < rr.num_tokens; ++t) {
      for (int d = 0; d < R; ++d) {
        const int p = out.send_pos[s][sz(t) * R + d];
        if (p < 0) continue;
        HtRankRecv& rv = out.recv[d];
        const int row = rv.rank_prefix[s] + p;
        rv.src_rank[row] = s;
        rv.src_token[row] = t;
        rv.src_info[row] = pack_src(s, t);
        for (int k = 0; k < K; ++k) {
          const int64_t e = rr.topk_idx[sz(t) * K + k];
          if (e < 0 || routing.expert_rank(e) != d) continue;
          const int64_t local = e - static_cast<int64_t>(d) * El;
          rv.topk_idx[sz(row) * K + k] = local;
          if (has_w) rv.topk_weights[sz(row) * K + k] = rr.topk_weights[sz(t) * K + k];
          ++rv.num_recv_per_expert_unaligned[sz(local)];
        }
        if (x) rv.x.copy_row_from(row, (*x)[s], t);
      }
    }
  }
  for (int d = 0; d < R; ++d) {
    HtRankRecv& rv = out.recv[d];
    for (int j = 0; j < El; ++j)
      rv.num_recv_per_expert[j] = round_up(rv.num_recv_per_expert_unaligned[j], expert_alignment);
  }
  return out;
}

namespace {

void check_ht_combine(const HtDispatch& dispatch, const std::vector<std::vector<uint16_t>>& x, int hidden,
                      const std::vector<std::vector<float>>* weights, const std::vector<std::vector<uint16_t>>* bias0,
                      const std::vector<std::vector<uint16_t>>* bias1) {
  const int R = dispatch.num_ranks;
  require(hidden >= 1, "ht_combine: hidden must be >= 1");
  require(x.size() == sz(R), "ht_combine: x.size() must be num_ranks");
  for (int d = 0; d < R; ++d)
    require(x[d].size() == sz(dispatch.recv[d].num_recv) * hidden,
            "ht_combine: x[" + std::to_string(d) + "].size() must be num_recv * hidden");
  if (weights) {
    require(weights->size() == sz(R), "ht_combine: weights->size() must be num_ranks");
    for (int d = 0; d < R; ++d)
      require((*weights)[d].size() == sz(dispatch.recv[d].num_recv) * dispatch.topk,
              "ht_combine: weights[" + std::to_string(d) + "].size() must be num_recv * topk");
  }
  for (const auto* bias : {bias0, bias1}) {
    if (!bias) continue;
    require(bias->size() == sz(R), "ht_combine: bias->size() must be num_ranks");
    for (int s = 0; s < R; ++s)
      require((*bias)[s].size() == sz(dispatch.num_tokens[s]) * hidden,
              "ht_combine: bias[" + std::to_string(s) + "].size() must be num_tokens * hidden");
  }
}

}  // namespace

HtCombineResult ht_combine(const HtDispatch& dispatch, const std::vector<std::vector<uint16_t>>& x, int hidden,
                           const std::vector<std::vector<float>>* weights,
                           const std::vector<std::vector<uint16_t>>* bias0,
                           const std::vector<std::vector<uint16_t>>* bias1) {
  check_ht_combine(dispatch, x, hidden, weights, bias0, bias1);
  const int R = dispatch.num_ranks, K = dispatch.topk;
  HtCombineResult out;
  out.x.resize(sz(R));
  out.topk_weights.resize(sz(R));
  std::vector<float> acc(sz(hidden));
  std::vector<float> wacc(sz(K));
  for (int s = 0; s < R; ++s) {
    const int T = dispatch.num_tokens[s];
    out.x[s].assign(sz(T) * hidden, 0);
    if (weights) out.topk_weights[s].assign(sz(T) * K, 0.0f);
    for (int t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(wacc.begin(), wacc.end(), 0.0f);
      for (int d = 0; d < R; ++d) {
        const int p = dispatch.send_pos[s][sz(t) * R + d];
        if (p < 0) continue;
        const size_t row = sz(dispatch.recv[d].rank_prefix[s] + p);
        const uint16_t* xr = &x[d][row * hidden];
        for (int c = 0; c < hidden; ++c) acc[c] = acc[c] + bf16_to_float(xr[c]);
        if (weights) {
          const float* wr = &(*weights)[d][row * K];
          for (int k = 0; k < K; ++k) wacc[k] = wacc[k] + wr[k];
        }
      }
      if (bias0)
        for (int c = 0; c < hidden; ++c) acc[c] = acc[c] + bf16_to_float((*bias0)[s][sz(t) * hidden + c]);
      if (bias1)
        for (int c = 0; c < hidden; ++c) acc[c] = acc[c] + bf16_to_float((*bias1)[s][sz(t) * hidden + c]);
      for (int c = 0; c < hidden; ++c) out.x[s][sz(t) * hidden + c] = float_to_bf16(acc[c]);
      if (weights)
        for (int k = 0; k < K; ++k) out.topk_weights[s][sz(t) * K + k] = wacc[k];
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Nodes and the two-level HT combine
// ------------------------------------------------------------------------------------------------

int NodeMap::num_nodes() const {
  int n = 0;
  for (int v : node_of_rank) n = std::max(n, v + 1);
  return n;
}

NodeMap NodeMap::single(int num_ranks) {
  require(num_ranks >= 1, "NodeMap::single: num_ranks must be >= 1");
  NodeMap m;
  m.node_of_rank.assign(sz(num_ranks), 0);
  return m;
}

NodeMap NodeMap::consecutive(int num_ranks, int ranks_per_node) {
  require(num_ranks >= 1, "NodeMap::consecutive: num_ranks must be >= 1");
  require(ranks_per_node >= 1 && num_ranks % ranks_per_node == 0,
          "NodeMap::consecutive: ranks_per_node must be >= 1 and divide num_ranks (" + std::to_string(num_ranks) +
              "), got " + std::to_string(ranks_per_node));
  NodeMap m;
  for (int r = 0; r < num_ranks; ++r) m.node_of_rank.push_back(r / ranks_per_node);
  return m;
}

void NodeMap::validate(int num_ranks) const {
  require(node_of_rank.size() == sz(num_ranks),
          "nodes.node_of_rank.size() must be num_ranks (" + std::to_string(num_ranks) + ")");
  for (int r = 0; r < num_ranks; ++r)
    require(node_of_rank[r] >= 0, "nodes.node_of_rank[" + std::to_string(r) + "] must be >= 0");
  std::vector<bool> used(sz(num_nodes()), false);
  for (int r = 0; r < num_ranks; ++r) used[sz(node_of_rank[r])] = true;
  for (size_t n = 0; n < used.size(); ++n)
    require(used[n], "nodes: node " + std::to_string(n) + " holds no rank (node ids must be dense)");
}

HtCombineResult ht_combine_nodes(const HtDispatch& dispatch, const NodeMap& nodes,
                                 const std::vector<std::vector<uint16_t>>& x, int hidden,
                                 const std::vector<std::vector<float>>* weights,
                                 const std::vector<std::vector<uint16_t>>* bias0,
                                 const std::vector<std::vector<uint16_t>>* bias1) {
  check_ht_combine(dispatch, x, hidden, weights, bias0, bias1);
  const int R = dispatch.num_ranks, K = dispatch.topk;
  nodes.validate(R);
  const int N = nodes.num_nodes();
  const bool round_partials = N > 1;  // one node: no RDMA hop, today's flat sum
  // ranks_of[n]: the ranks of node n, ascending.
  std::vector<std::vector<int>> ranks_of(sz(N));
  for (int d = 0; d < R; ++d) ranks_of[sz(nodes.node_of_rank[d])].push_back(d);

  HtCombineResult out;
  out.x.resize(sz(R));
  out.topk_weights.resize(sz(R));
  std::vector<float> acc(sz(hidden)), part(sz(hidden));
  std::vector<float> wacc(sz(K)), wpart(sz(K));
  for (int s = 0; s < R; ++s) {
    const int T = dispatch.num_tokens[s];
    out.x[s].assign(sz(T) * hidden, 0);
    if (weights) out.topk_weights[s].assign(sz(T) * K, 0.0f);
    for (int t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(wacc.begin(), wacc.end(), 0.0f);
      for (int n = 0; n < N; ++n) {
        // Level 1: the node's partial (what its forwarder sends over RDMA).
        bool any = false;
        std::fill(part.begin(), part.end(), 0.0f);
        std::fill(wpart.begin(), wpart.end(), 0.0f);
        for (int d : ranks_of[sz(n)]) {
          const int p = dispatch.send_pos[s][sz(t) * R + d];
          if (p < 0) continue;
          any = true;
          const size_t row = sz(dispatch.recv[d].rank_prefix[s] + p);
          const uint16_t* xr = &x[d][row * hidden];
          for (int c = 0; c < hidden; ++c) part[c] = part[c] + bf16_to_float(xr[c]);
          if (weights) {
            const float* wr = &(*weights)[d][row * K];
            for (int k = 0; k < K; ++k) wpart[k] = wpart[k] + wr[k];
          }
        }
        if (!any) continue;
        // Level 2: the token owner's sum over nodes.
        for (int c = 0; c < hidden; ++c)
          acc[c] = acc[c] + (round_partials ? bf16_to_float(float_to_bf16(part[c])) : part[c]);
        for (int k = 0; k < K; ++k) wacc[k] = wacc[k] + wpart[k];
      }
      if (bias0)
        for (int c = 0; c < hidden; ++c) acc[c] = acc[c] + bf16_to_float((*bias0)[s][sz(t) * hidden + c]);
      if (bias1)
        for (int c = 0; c < hidden; ++c) acc[c] = acc[c] + bf16_to_float((*bias1)[s][sz(t) * hidden + c]);
      for (int c = 0; c < hidden; ++c) out.x[s][sz(t) * hidden + c] = float_to_bf16(acc[c]);
      if (weights)
        for (int k = 0; k < K; ++k) out.topk_weights[s][sz(t) * K + k] = wacc[k];
    }
  }
  return out;
}

int64_t HtNodePlan::rdma_records(int s) const {
  int64_t n = 0;
  for (int m = 0; m < num_nodes; ++m)
    if (m != node_of[sz(s)]) n += static_cast<int64_t>(node_list[sz(s)][sz(m)].size());
  return n;
}

HtNodePlan ht_node_plan(const HtDispatch& dispatch, const NodeMap& nodes) {
  const int R = dispatch.num_ranks;
  nodes.validate(R);
  require(dispatch.send_pos.size() == sz(R) && dispatch.recv.size() == sz(R) && dispatch.num_tokens.size() == sz(R),
          "ht_node_plan: dispatch does not hold R ranks");
  HtNodePlan plan;
  const int N = nodes.num_nodes();
  plan.num_ranks = R;
  plan.num_nodes = N;
  plan.node_of = nodes.node_of_rank;
  plan.rank_of.resize(sz(N));
  plan.local_index.assign(sz(R), 0);
  for (int d = 0; d < R; ++d) {
    std::vector<int>& of = plan.rank_of[sz(nodes.node_of_rank[d])];
    plan.local_index[sz(d)] = static_cast<int>(of.size());
    of.push_back(d);
  }
  const int G = static_cast<int>(plan.rank_of[0].size());
  for (int m = 0; m < N; ++m)
    require(static_cast<int>(plan.rank_of[sz(m)].size()) == G,
            "ht_node_plan: node " + std::to_string(m) + " holds " + std::to_string(plan.rank_of[sz(m)].size()) +
                " ranks, node 0 holds " + std::to_string(G) + " (the rails need nodes of equal size)");
  plan.ranks_per_node = G;
  plan.node_list.assign(sz(R), std::vector<std::vector<int>>(sz(N)));
  plan.node_pos.resize(sz(R));
  plan.hold_pos.assign(sz(R), std::vector<std::vector<int>>(sz(N)));
  plan.rank_count.assign(sz(R), std::vector<int>(sz(R), 0));
  for (int s = 0; s < R; ++s) {
    const int T = dispatch.num_tokens[sz(s)];
    require(dispatch.send_pos[sz(s)].size() == sz(T) * sz(R), "ht_node_plan: send_pos of a rank has the wrong size");
    plan.node_pos[sz(s)].assign(sz(T) * sz(N), -1);
    for (int t = 0; t < T; ++t) {
      for (int m = 0; m < N; ++m) {
        bool any = false;
        for (int j = 0; j < G; ++j) any = any || dispatch.send_pos[sz(s)][sz(t) * R + plan.rank_of[sz(m)][sz(j)]] >= 0;
        if (!any) continue;
        std::vector<int>& list = plan.node_list[sz(s)][sz(m)];
        plan.node_pos[sz(s)][sz(t) * N + m] = static_cast<int>(list.size());
        list.push_back(t);
        for (int j = 0; j < G; ++j) {
          const int d = plan.rank_of[sz(m)][sz(j)];
          const int p = dispatch.send_pos[sz(s)][sz(t) * R + d];
          plan.hold_pos[sz(s)][sz(m)].push_back(p);
          if (p >= 0) ++plan.rank_count[sz(s)][sz(d)];
        }
      }
    }
  }
  return plan;
}

// ------------------------------------------------------------------------------------------------
// Low-latency dispatch / combine
// ------------------------------------------------------------------------------------------------

// Shared with the brute-force model (reference/testing/brute.cc) through reference/detail.h.
namespace detail {

void check_ll(const Routing& routing, int hidden, int max_tokens, const std::vector<std::vector<uint16_t>>* x,
              bool use_fp8, ScaleFormat format) {
  routing.validate();
  require(hidden >= 1, "ll_dispatch: hidden must be >= 1");
  require(max_tokens >= 0, "ll_dispatch: max_tokens must be >= 0");
  if (use_fp8) require(hidden % kScaleGroupElems == 0, "ll_dispatch: hidden must be a multiple of 128 with use_fp8");
  require(format == ScaleFormat::kFloat || format == ScaleFormat::kFloatPow2 || format == ScaleFormat::kUe8m0,
          "ll_dispatch: unknown scale format");
  for (int s = 0; s < routing.num_ranks; ++s)
    require(routing.ranks[s].num_tokens <= max_tokens, "ll_dispatch: ranks[" + std::to_string(s) +
                                                           "].num_tokens must be <= max_tokens (" +
                                                           std::to_string(max_tokens) + ")");
  if (x) {
    require(x->size() == sz(routing.num_ranks), "ll_dispatch: x->size() must be num_ranks");
    for (int s = 0; s < routing.num_ranks; ++s)
      require((*x)[s].size() == sz(routing.ranks[s].num_tokens) * hidden,
              "ll_dispatch: x[" + std::to_string(s) + "].size() must be num_tokens * hidden");
  }
}

LlDispatch ll_empty(const Routing& routing, int hidden, int max_tokens, bool with_data, bool use_fp8,
                    ScaleFormat format) {
  const int R = routing.num_ranks, El = routing.num_local_experts();
  LlDispatch out;
  out.num_ranks = R;
  out.num_experts = routing.num_experts;
  out.topk = routing.topk;
  out.max_tokens = max_tokens;
  out.hidden = hidden;
  out.use_fp8 = use_fp8;
  out.scale_format = format;
  out.num_tokens.resize(sz(R));
  out.send_row.resize(sz(R));
  for (int s = 0; s < R; ++s) {
    out.num_tokens[s] = routing.ranks[s].num_tokens;
    out.send_row[s].assign(sz(routing.ranks[s].num_tokens) * routing.topk, -1);
  }
  const size_t rows = sz(El) * out.slab_rows();
  out.recv.resize(sz(R));
  for (LlRankRecv& rv : out.recv) {
    rv.recv_count.assign(sz(El), 0);
    rv.src_rank.assign(rows, -1);
    rv.src_token.assign(rows, -1);
    rv.src_info.assign(rows, -1);
    if (!with_data) continue;
    if (!use_fp8) {
      rv.bf16.assign(rows * hidden, 0);
    } else {
      rv.fp8.assign(rows * hidden, 0);
      if (format == ScaleFormat::kUe8m0)
        rv.packed_scales.assign(rows * num_packed_scales(hidden), 0);
      else
        rv.scales.assign(rows * num_scale_groups(hidden), 0.0f);
    }
  }
  return out;
}

void ll_store_row(LlDispatch& out, LlRankRecv& rv, size_t slab_row, int s, int t, const uint16_t* x_bf16,
                  const uint8_t* q, const float* scales, const int32_t* packed) {
  rv.src_rank[slab_row] = s;
  rv.src_token[slab_row] = t;
  rv.src_info[slab_row] = pack_src(s, t);
  const size_t h = sz(out.hidden);
  if (!x_bf16) return;
  if (!out.use_fp8) {
    std::memcpy(&rv.bf16[slab_row * h], x_bf16, h * sizeof(uint16_t));
    return;
  }
  std::memcpy(&rv.fp8[slab_row * h], q, h);
  if (out.scale_format == ScaleFormat::kUe8m0) {
    const size_t p = sz(num_packed_scales(out.hidden));
    std::memcpy(&rv.packed_scales[slab_row * p], packed, p * sizeof(int32_t));
  } else {
    const size_t g = sz(num_scale_groups(out.hidden));
    std::memcpy(&rv.scales[slab_row * g], scales, g * sizeof(float));
  }
}

}  // namespace detail

namespace {

// Rank masks: checks `rank_mask` (null = none) against R ranks.
void check_rank_mask(const std::vector<uint8_t>* rank_mask, int num_ranks, const char* api) {
  if (rank_mask == nullptr) return;
  require(rank_mask->size() == sz(num_ranks), std::string(api) + ": rank_mask->size() must be num_ranks");
  for (size_t r = 0; r < rank_mask->size(); ++r)
    require((*rank_mask)[r] <= 1,
            std::string(api) + ": rank_mask[" + std::to_string(r) + "] must be 0 (active) or 1 (masked)");
}

bool rank_masked(const std::vector<uint8_t>* rank_mask, int rank) {
  return rank_mask != nullptr && (*rank_mask)[sz(rank)] != 0;
}

}  // namespace

LlDispatch ll_dispatch(const Routing& routing, int hidden, int max_tokens, const std::vector<std::vector<uint16_t>>* x,
                       bool use_fp8, ScaleFormat format, std::vector<std::vector<int>>* cumulative_stats,
                       const std::vector<uint8_t>* rank_mask) {
  detail::check_ll(routing, hidden, max_tokens, x, use_fp8, format);
  const int R = routing.num_ranks, K = routing.topk, E = routing.num_experts, El = routing.num_local_experts();
  check_rank_mask(rank_mask, R, "ll_dispatch");
  // A slot travels when its source and its expert's rank are both active.
  auto travels = [&](int s, int64_t e) {
    return e >= 0 && !rank_masked(rank_mask, s) && !rank_masked(rank_mask, static_cast<int>(e / El));
  };
  if (cumulative_stats) {
    require(cumulative_stats->size() == sz(R), "ll_dispatch: cumulative_stats->size() must be num_ranks");
    for (const auto& v : *cumulative_stats)
      require(v.size() == sz(El), "ll_dispatch: cumulative_stats[d].size() must be num_local_experts");
  }
  LlDispatch out = detail::ll_empty(routing, hidden, max_tokens, x != nullptr, use_fp8, format);
  const size_t slab = sz(out.slab_rows());

  // Per (source rank, global expert) counts, then for every expert a prefix over source ranks: the base row
  // of s's block in the expert's slab. Inside the block, rows follow (token, slot) order.
  std::vector<int> count(sz(R) * E, 0);  // count[s * E + e]
  for (int s = 0; s < R; ++s)
    for (int64_t e : routing.ranks[s].topk_idx)
      if (travels(s, e)) ++count[sz(s) * E + e];
  std::vector<int> base(sz(R) * E, 0);  // base[s * E + e]
  for (int e = 0; e < E; ++e) {
    int run = 0;
    for (int s = 0; s < R; ++s) {
      base[sz(s) * E + e] = run;
      run += count[sz(s) * E + e];
    }
    out.recv[e / El].recv_count[e % El] = run;
  }

  std::vector<uint8_t> q(sz(hidden));
  std::vector<float> scales(sz(num_scale_groups(hidden)));
  std::vector<int32_t> packed(sz(num_packed_scales(hidden)));
  std::vector<int> next(sz(E));
  for (int s = 0; s < R; ++s) {
    const RankRouting& rr = routing.ranks[s];
    std::fill(next.begin(), next.end(), 0);
    for (int t = 0; t < rr.num_tokens; ++t) {
      const uint16_t* xr = x ? &(*x)[s][sz(t) * hidden] : nullptr;
      if (xr && use_fp8) cast_row_to_fp8(xr, hidden, format, q.data(), scales.data(), packed.data());
      for (int k = 0; k < K; ++k) {
        const int64_t e = rr.topk_idx[sz(t) * K + k];
        if (!travels(s, e)) continue;
        const int row = base[sz(s) * E + e] + next[sz(e)]++;
        out.send_row[s][sz(t) * K + k] = row;
        const int d = static_cast<int>(e / El), j = static_cast<int>(e % El);
        detail::ll_store_row(out, out.recv[d], sz(j) * slab + row, s, t, xr, q.data(), scales.data(), packed.data());
      }
    }
  }
  if (cumulative_stats)
    for (int d = 0; d < R; ++d)
      for (int j = 0; j < El; ++j) (*cumulative_stats)[d][j] += out.recv[d].recv_count[j];
  return out;
}

namespace {

void check_ll_combine(const Routing& routing, const LlDispatch& dispatch, const std::vector<std::vector<uint16_t>>& y) {
  routing.validate();
  require(dispatch.num_ranks == routing.num_ranks && dispatch.num_experts == routing.num_experts &&
              dispatch.topk == routing.topk,
          "ll_combine: dispatch and routing disagree on ranks/experts/topk");
  const int R = routing.num_ranks;
  const size_t rows = sz(routing.num_local_experts()) * dispatch.slab_rows();
  require(y.size() == sz(R), "ll_combine: y.size() must be num_ranks");
  for (int d = 0; d < R; ++d) {
    require(y[d].size() == rows * dispatch.hidden,
            "ll_combine: y[" + std::to_string(d) + "].size() must be E_l * R * max_tokens * hidden");
    require(routing.ranks[d].num_tokens == dispatch.num_tokens[d],
            "ll_combine: routing.ranks[" + std::to_string(d) + "].num_tokens differs from the dispatch's");
    require(routing.ranks[d].num_tokens == 0 || !routing.ranks[d].topk_weights.empty(),
            "ll_combine: routing.ranks[" + std::to_string(d) + "].topk_weights is required");
  }
}

}  // namespace

std::vector<std::vector<uint16_t>> ll_combine(const Routing& routing, const LlDispatch& dispatch,
                                              const std::vector<std::vector<uint16_t>>& y,
                                              const std::vector<uint8_t>* rank_mask) {
  check_ll_combine(routing, dispatch, y);
  check_rank_mask(rank_mask, routing.num_ranks, "ll_combine");
  const int R = routing.num_ranks, K = routing.topk, El = routing.num_local_experts(), H = dispatch.hidden;
  const size_t slab = sz(dispatch.slab_rows());
  std::vector<std::vector<uint16_t>> out(sz(R));
  std::vector<float> acc(sz(H)), sum(sz(H));
  for (int s = 0; s < R; ++s) {
    const RankRouting& rr = routing.ranks[s];
    out[s].assign(sz(rr.num_tokens) * H, 0);
    if (rank_masked(rank_mask, s)) continue;  // a masked rank receives nothing
    for (int t = 0; t < rr.num_tokens; ++t) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      // Level 1 per expert rank d (ascending): FMA chain over d's slots, k ascending, rounded to bf16;
      // level 2: the bf16 partials added in FP32, d ascending.
      for (int d = 0; d < R; ++d) {
        if (rank_masked(rank_mask, d)) continue;  // its contribution is absent
        bool any = false;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int k = 0; k < K; ++k) {
          const int64_t e = rr.topk_idx[sz(t) * K + k];
          if (e < 0 || e / El != d) continue;
          any = true;
          const float w = rr.topk_weights[sz(t) * K + k];
          const int j = static_cast<int>(e % El);
          const uint16_t* yr = &y[d][(sz(j) * slab + dispatch.send_row[s][sz(t) * K + k]) * H];
          for (int c = 0; c < H; ++c) acc[c] = std::fmaf(w, bf16_to_float(yr[c]), acc[c]);
        }
        if (!any) continue;
        for (int c = 0; c < H; ++c) sum[c] = sum[c] + bf16_to_float(float_to_bf16(acc[c]));
      }
      for (int c = 0; c < H; ++c) out[s][sz(t) * H + c] = float_to_bf16(sum[c]);
    }
  }
  return out;
}

}  // namespace nccl_moe::ref
