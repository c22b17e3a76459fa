// Brute-force model of the reference operations (see brute.h): the same results as reference.cc, written the
// simplest way (pull per receiver, linear searches) rather than the way the GPU computes them. From reference.h it
// uses the numeric helpers and Routing; from reference/detail.h, ll_dispatch's argument checks, its empty output
// and its row store (the LL slab layout itself is computed here independently).
//
// FP32 contraction is disabled as in reference.cc, so the accumulations below round exactly as written (the LL
// combine's fused steps call std::fmaf explicitly).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "reference/testing/brute.h"

#include <cmath>
#include <utility>

#include "reference/detail.h"

namespace nccl_moe::ref {

using detail::sz;

namespace brute {

namespace {
bool token_goes_to(const Routing& routing, int s, int t, int d) {
  for (int k = 0; k < routing.topk; ++k) {
    const int64_t e = routing.ranks[s].topk_idx[sz(t) * routing.topk + k];
    if (e >= 0 && e / routing.num_local_experts() == d) return true;
  }
  return false;
}
}  // namespace

DispatchLayout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int topk, int num_experts, int num_ranks) {
  const int per_rank = num_experts / num_ranks;
  DispatchLayout l;
  l.num_tokens_per_rank.assign(sz(num_ranks), 0);
  l.num_tokens_per_expert.assign(sz(num_experts), 0);
  l.is_token_in_rank.assign(sz(num_tokens) * num_ranks, 0);
  for (int e = 0; e < num_experts; ++e)
    for (int i = 0; i < num_tokens * topk; ++i)
      if (topk_idx[i] == e) ++l.num_tokens_per_expert[e];
  for (int d = 0; d < num_ranks; ++d) {
    for (int t = 0; t < num_tokens; ++t) {
      bool any = false;
      for (int k = 0; k < topk; ++k) {
        const int64_t e = topk_idx[sz(t) * topk + k];
        if (e >= static_cast<int64_t>(d) * per_rank && e < static_cast<int64_t>(d + 1) * per_rank) any = true;
      }
      l.is_token_in_rank[sz(t) * num_ranks + d] = any ? 1 : 0;
      if (any) ++l.num_tokens_per_rank[d];
    }
  }
  return l;
}

HtDispatch ht_dispatch(const Routing& routing, int expert_alignment, const std::vector<Rows>* x) {
  routing.validate();
  const int R = routing.num_ranks, K = routing.topk, El = routing.num_local_experts();
  HtDispatch out;
  out.num_ranks = R;
  out.num_experts = routing.num_experts;
  out.topk = K;
  out.expert_alignment = expert_alignment;
  for (int s = 0; s < R; ++s) out.num_tokens.push_back(routing.ranks[s].num_tokens);
  const bool has_w = routing.has_weights();
  for (int d = 0; d < R; ++d) {
    HtRankRecv rv;
    rv.num_recv_per_expert_unaligned.assign(sz(El), 0);
    rv.rank_prefix.push_back(0);
    std::vector<std::pair<int, int>> order;  // (s, t) pulled in order
    for (int s = 0; s < R; ++s) {
      for (int t = 0; t < routing.ranks[s].num_tokens; ++t) {
        if (!token_goes_to(routing, s, t, d)) continue;
        order.emplace_back(s, t);
        rv.src_rank.push_back(s);
        rv.src_token.push_back(t);
        rv.src_info.push_back(s * (1 << 24) + t);
        for (int k = 0; k < K; ++k) {
          const int64_t e = routing.ranks[s].topk_idx[sz(t) * K + k];
          const bool local = e >= 0 && e / El == d;
          rv.topk_idx.push_back(local ? e % El : -1);
          if (has_w) rv.topk_weights.push_back(local ? routing.ranks[s].topk_weights[sz(t) * K + k] : 0.0f);
          if (local) rv.num_recv_per_expert_unaligned[sz(e % El)] += 1;
        }
      }
      rv.rank_prefix.push_back(static_cast<int>(rv.src_rank.size()));
    }
    rv.num_recv = static_cast<int>(rv.src_rank.size());
    for (int j = 0; j < El; ++j) {
      int v = rv.num_recv_per_expert_unaligned[j];
      while (v % expert_alignment != 0) ++v;
      rv.num_recv_per_expert.push_back(v);
    }
    if (x) {
      const Rows& x0 = (*x)[0];
      rv.x.dtype = x0.dtype;
      rv.x.scale_format = x0.scale_format;
      rv.x.num_rows = rv.num_recv;
      rv.x.hidden = x0.hidden;
      for (const auto& [s, t] : order) {
        const Rows& src = (*x)[s];
        const int H = src.hidden, G = num_scale_groups(H), P = num_packed_scales(H);
        if (src.dtype == DType::kBf16) {
          for (int c = 0; c < H; ++c) rv.x.bf16.push_back(src.bf16[sz(t) * H + c]);
        } else {
          for (int c = 0; c < H; ++c) rv.x.fp8.push_back(src.fp8[sz(t) * H + c]);
          if (src.scale_format == ScaleFormat::kUe8m0)
            for (int i = 0; i < P; ++i) rv.x.packed_scales.push_back(src.packed_scales[sz(t) * P + i]);
          else
            for (int g = 0; g < G; ++g) rv.x.scales.push_back(src.scales[sz(t) * G + g]);
        }
      }
    }
    out.recv.push_back(std::move(rv));
  }
  // send_pos: how many earlier tokens of s also go to d.
  for (int s = 0; s < R; ++s) {
    std::vector<int> pos;
    for (int t = 0; t < routing.ranks[s].num_tokens; ++t) {
      for (int d = 0; d < R; ++d) {
        if (!token_goes_to(routing, s, t, d)) {
          pos.push_back(-1);
          continue;
        }
        int earlier = 0;
        for (int u = 0; u < t; ++u) earlier += token_goes_to(routing, s, u, d) ? 1 : 0;
        pos.push_back(earlier);
      }
    }
    out.send_pos.push_back(pos);
  }
  return out;
}

HtCombineResult ht_combine(const HtDispatch& dispatch, const std::vector<std::vector<uint16_t>>& x, int hidden,
                           const std::vector<std::vector<float>>* weights,
                           const std::vector<std::vector<uint16_t>>* bias0,
                           const std::vector<std::vector<uint16_t>>* bias1) {
  const int R = dispatch.num_ranks, K = dispatch.topk;
  HtCombineResult out;
  out.x.resize(sz(R));
  out.topk_weights.resize(sz(R));
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < dispatch.num_tokens[s]; ++t) {
      // Rows holding (s, t), one per receiving rank, found by search.
      std::vector<std::pair<int, int>> holders;  // (d, row), d ascending
      for (int d = 0; d < R; ++d)
        for (int i = 0; i < dispatch.recv[d].num_recv; ++i)
          if (dispatch.recv[d].src_rank[i] == s && dispatch.recv[d].src_token[i] == t) holders.emplace_back(d, i);
      for (int c = 0; c < hidden; ++c) {
        float sum = 0.0f;
        for (const auto& [d, i] : holders) sum += bf16_to_float(x[d][sz(i) * hidden + c]);
        if (bias0) sum += bf16_to_float((*bias0)[s][sz(t) * hidden + c]);
        if (bias1) sum += bf16_to_float((*bias1)[s][sz(t) * hidden + c]);
        out.x[s].push_back(float_to_bf16(sum));
      }
      if (weights) {
        for (int k = 0; k < K; ++k) {
          float sum = 0.0f;
          for (const auto& [d, i] : holders) sum += (*weights)[d][sz(i) * K + k];
          out.topk_weights[s].push_back(sum);
        }
      }
    }
  }
  return out;
}

HtCombineResult ht_combine_nodes(const HtDispatch& dispatch, const NodeMap& nodes,
                                 const std::vector<std::vector<uint16_t>>& x, int hidden,
                                 const std::vector<std::vector<float>>* weights,
                                 const std::vector<std::vector<uint16_t>>* bias0,
                                 const std::vector<std::vector<uint16_t>>* bias1) {
  const int R = dispatch.num_ranks, K = dispatch.topk;
  int num_nodes = 0;
  for (int v : nodes.node_of_rank) num_nodes = v + 1 > num_nodes ? v + 1 : num_nodes;
  HtCombineResult out;
  out.x.resize(sz(R));
  out.topk_weights.resize(sz(R));
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < dispatch.num_tokens[s]; ++t) {
      // Per node, its rows holding (s, t), found by search, ranks ascending.
      std::vector<std::vector<std::pair<int, int>>> by_node(sz(num_nodes));
      for (int d = 0; d < R; ++d)
        for (int i = 0; i < dispatch.recv[d].num_recv; ++i)
          if (dispatch.recv[d].src_rank[i] == s && dispatch.recv[d].src_token[i] == t)
            by_node[sz(nodes.node_of_rank[d])].emplace_back(d, i);
      for (int c = 0; c < hidden; ++c) {
        float sum = 0.0f;
        for (const auto& holders : by_node) {
          if (holders.empty()) continue;
          float part = 0.0f;
          for (const auto& [d, i] : holders) part += bf16_to_float(x[d][sz(i) * hidden + c]);
          sum += num_nodes > 1 ? bf16_to_float(float_to_bf16(part)) : part;
        }
        if (bias0) sum += bf16_to_float((*bias0)[s][sz(t) * hidden + c]);
        if (bias1) sum += bf16_to_float((*bias1)[s][sz(t) * hidden + c]);
        out.x[s].push_back(float_to_bf16(sum));
      }
      if (weights) {
        for (int k = 0; k < K; ++k) {
          float sum = 0.0f;
          for (const auto& holders : by_node) {
            if (holders.empty()) continue;
            float part = 0.0f;
            for (const auto& [d, i] : holders) part += (*weights)[d][sz(i) * K + k];
            sum += part;
          }
          out.topk_weights[s].push_back(sum);
        }
      }
    }
  }
  return out;
}

LlDispatch ll_dispatch(const Routing& routing, int hidden, int max_tokens, const std::vector<std::vector<uint16_t>>* x,
                       bool use_fp8, ScaleFormat format) {
  detail::check_ll(routing, hidden, max_tokens, x, use_fp8, format);
  const int R = routing.num_ranks, K = routing.topk, El = routing.num_local_experts();
  LlDispatch out = detail::ll_empty(routing, hidden, max_tokens, x != nullptr, use_fp8, format);
  const size_t slab = sz(out.slab_rows());
  std::vector<uint8_t> q(sz(hidden));
  std::vector<float> scales(sz(num_scale_groups(hidden)));
  std::vector<int32_t> packed(sz(num_packed_scales(hidden)));
  for (int d = 0; d < R; ++d) {
    for (int j = 0; j < El; ++j) {
      const int64_t e = static_cast<int64_t>(d) * El + j;
      int row = 0;
      for (int s = 0; s < R; ++s) {
        for (int t = 0; t < routing.ranks[s].num_tokens; ++t) {
          for (int k = 0; k < K; ++k) {
            if (routing.ranks[s].topk_idx[sz(t) * K + k] != e) continue;
            const uint16_t* xr = x ? &(*x)[s][sz(t) * hidden] : nullptr;
            if (xr && use_fp8) cast_row_to_fp8(xr, hidden, format, q.data(), scales.data(), packed.data());
            detail::ll_store_row(out, out.recv[d], sz(j) * slab + row, s, t, xr, q.data(), scales.data(),
                                 packed.data());
            out.send_row[s][sz(t) * K + k] = row;
            ++row;
          }
        }
      }
      out.recv[d].recv_count[j] = row;
    }
  }
  return out;
}

std::vector<std::vector<uint16_t>> ll_combine(const Routing& routing, const LlDispatch& dispatch,
                                              const std::vector<std::vector<uint16_t>>& y) {
  const int R = routing.num_ranks, K = routing.topk, El = routing.num_local_experts(), H = dispatch.hidden;
  const int slab = dispatch.slab_rows();
  std::vector<std::vector<uint16_t>> out(sz(R));
  for (int s = 0; s < R; ++s) {
    const RankRouting& rr = routing.ranks[s];
    for (int t = 0; t < rr.num_tokens; ++t) {
      // For every valid slot, find its row by searching the expert's slab for the (occurrence)-th (s, t) row.
      std::vector<const uint16_t*> rows(sz(K), nullptr);
      for (int k = 0; k < K; ++k) {
        const int64_t e = rr.topk_idx[sz(t) * K + k];
        if (e < 0) continue;
        int occurrence = 0;
        for (int k2 = 0; k2 < k; ++k2) occurrence += rr.topk_idx[sz(t) * K + k2] == e ? 1 : 0;
        const int d = static_cast<int>(e / El), j = static_cast<int>(e % El);
        const LlRankRecv& rv = dispatch.recv[d];
        for (int i = 0; i < rv.recv_count[j]; ++i) {
          const size_t g = sz(j) * slab + i;
          if (rv.src_rank[g] == s && rv.src_token[g] == t && occurrence-- == 0) {
            rows[k] = &y[d][g * H];
            break;
          }
        }
      }
      for (int c = 0; c < H; ++c) {
        float sum = 0.0f;
        for (int d = 0; d < R; ++d) {
          float part = 0.0f;
          bool any = false;
          for (int k = 0; k < K; ++k) {
            if (!rows[k] || rr.topk_idx[sz(t) * K + k] / El != d) continue;
            part = std::fmaf(rr.topk_weights[sz(t) * K + k], bf16_to_float(rows[k][c]), part);
            any = true;
          }
          if (any) sum += bf16_to_float(float_to_bf16(part));
        }
        out[s].push_back(float_to_bf16(sum));
      }
    }
  }
  return out;
}

}  // namespace brute

}  // namespace nccl_moe::ref
