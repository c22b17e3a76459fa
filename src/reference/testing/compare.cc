// Comparing CPU reference results (tests and moe-perf): FNV-1a hashes of whole results for determinism checks,
// diff() for a readable first difference between two results. Compares only; computes nothing of the contract.
#include "reference/testing/compare.h"

#include <cstring>
#include <sstream>

namespace nccl_moe::ref {

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t hash) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) {
    hash ^= p[i];
    hash *= kFnvPrime;
  }
  return hash;
}

namespace {
template <typename T>
uint64_t hash_value(const T& v, uint64_t h) {
  return fnv1a64(&v, sizeof(v), h);
}

uint64_t hash_rows(const Rows& r, uint64_t h) {
  h = hash_value(static_cast<int>(r.dtype), h);
  h = hash_value(static_cast<int>(r.scale_format), h);
  h = hash_value(r.num_rows, h);
  h = hash_value(r.hidden, h);
  h = fnv1a64(r.bf16, h);
  h = fnv1a64(r.fp8, h);
  h = fnv1a64(r.scales, h);
  return fnv1a64(r.packed_scales, h);
}
}  // namespace

uint64_t hash(const HtDispatch& d) {
  uint64_t h = kFnvOffset;
  h = hash_value(d.num_ranks, h);
  h = hash_value(d.num_experts, h);
  h = hash_value(d.topk, h);
  h = hash_value(d.expert_alignment, h);
  h = fnv1a64(d.num_tokens, h);
  for (const HtRankRecv& r : d.recv) {
    h = hash_value(r.num_recv, h);
    h = fnv1a64(r.src_rank, h);
    h = fnv1a64(r.src_token, h);
    h = fnv1a64(r.src_info, h);
    h = fnv1a64(r.rank_prefix, h);
    h = fnv1a64(r.topk_idx, h);
    h = fnv1a64(r.topk_weights, h);
    h = fnv1a64(r.num_recv_per_expert, h);
    h = fnv1a64(r.num_recv_per_expert_unaligned, h);
    h = hash_rows(r.x, h);
  }
  for (const auto& p : d.send_pos) h = fnv1a64(p, h);
  return h;
}

uint64_t hash(const HtCombineResult& c) {
  uint64_t h = kFnvOffset;
  for (const auto& x : c.x) h = fnv1a64(x, h);
  for (const auto& w : c.topk_weights) h = fnv1a64(w, h);
  return h;
}

uint64_t hash(const LlDispatch& d) {
  uint64_t h = kFnvOffset;
  h = hash_value(d.num_ranks, h);
  h = hash_value(d.num_experts, h);
  h = hash_value(d.topk, h);
  h = hash_value(d.max_tokens, h);
  h = hash_value(d.hidden, h);
  h = hash_value(static_cast<int>(d.use_fp8), h);
  h = hash_value(static_cast<int>(d.scale_format), h);
  h = fnv1a64(d.num_tokens, h);
  for (const LlRankRecv& r : d.recv) {
    h = fnv1a64(r.bf16, h);
    h = fnv1a64(r.fp8, h);
    h = fnv1a64(r.scales, h);
    h = fnv1a64(r.packed_scales, h);
    h = fnv1a64(r.recv_count, h);
    h = fnv1a64(r.src_rank, h);
    h = fnv1a64(r.src_token, h);
    h = fnv1a64(r.src_info, h);
  }
  for (const auto& p : d.send_row) h = fnv1a64(p, h);
  return h;
}

uint64_t hash(const std::vector<std::vector<uint16_t>>& per_rank_bf16) {
  uint64_t h = kFnvOffset;
  for (const auto& v : per_rank_bf16) h = fnv1a64(v, h);
  return h;
}

namespace {

// Compares bitwise (floats by their bits, so NaN == NaN and 0.0 != -0.0).
template <typename T>
bool first_diff(const std::vector<T>& a, const std::vector<T>& b, const std::string& name, std::string* msg) {
  if (a.size() != b.size()) {
    *msg = name + ": size " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
    return true;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      std::ostringstream os;
      os << name << "[" << i << "]: " << +a[i] << " vs " << +b[i];
      *msg = os.str();
      return true;
    }
  }
  return false;
}

bool scalar_diff(int64_t a, int64_t b, const std::string& name, std::string* msg) {
  if (a == b) return false;
  *msg = name + ": " + std::to_string(a) + " vs " + std::to_string(b);
  return true;
}

}  // namespace

std::string diff(const DispatchLayout& a, const DispatchLayout& b) {
  std::string m;
  if (first_diff(a.num_tokens_per_rank, b.num_tokens_per_rank, "num_tokens_per_rank", &m) ||
      first_diff(a.num_tokens_per_expert, b.num_tokens_per_expert, "num_tokens_per_expert", &m) ||
      first_diff(a.is_token_in_rank, b.is_token_in_rank, "is_token_in_rank", &m))
    return m;
  return "";
}

std::string diff(const HtDispatch& a, const HtDispatch& b) {
  std::string m;
  if (scalar_diff(a.num_ranks, b.num_ranks, "num_ranks", &m) ||
      scalar_diff(a.num_experts, b.num_experts, "num_experts", &m) || scalar_diff(a.topk, b.topk, "topk", &m) ||
      scalar_diff(a.expert_alignment, b.expert_alignment, "expert_alignment", &m) ||
      first_diff(a.num_tokens, b.num_tokens, "num_tokens", &m) ||
      scalar_diff(static_cast<int64_t>(a.recv.size()), static_cast<int64_t>(b.recv.size()), "recv.size()", &m) ||
      scalar_diff(static_cast<int64_t>(a.send_pos.size()), static_cast<int64_t>(b.send_pos.size()), "send_pos.size()",
                  &m))
    return m;
  for (size_t d = 0; d < a.recv.size(); ++d) {
    const HtRankRecv &x = a.recv[d], &y = b.recv[d];
    const std::string p = "recv[" + std::to_string(d) + "].";
    if (scalar_diff(x.num_recv, y.num_recv, p + "num_recv", &m) ||
        first_diff(x.src_rank, y.src_rank, p + "src_rank", &m) ||
        first_diff(x.src_token, y.src_token, p + "src_token", &m) ||
        first_diff(x.src_info, y.src_info, p + "src_info", &m) ||
        first_diff(x.rank_prefix, y.rank_prefix, p + "rank_prefix", &m) ||
        first_diff(x.topk_idx, y.topk_idx, p + "topk_idx", &m) ||
        first_diff(x.topk_weights, y.topk_weights, p + "topk_weights", &m) ||
        first_diff(x.num_recv_per_expert, y.num_recv_per_expert, p + "num_recv_per_expert", &m) ||
        first_diff(x.num_recv_per_expert_unaligned, y.num_recv_per_expert_unaligned,
                   p + "num_recv_per_expert_unaligned", &m) ||
        scalar_diff(static_cast<int>(x.x.dtype), static_cast<int>(y.x.dtype), p + "x.dtype", &m) ||
        scalar_diff(static_cast<int>(x.x.scale_format), static_cast<int>(y.x.scale_format), p + "x.scale_format", &m) ||
        scalar_diff(x.x.num_rows, y.x.num_rows, p + "x.num_rows", &m) ||
        scalar_diff(x.x.hidden, y.x.hidden, p + "x.hidden", &m) || first_diff(x.x.bf16, y.x.bf16, p + "x.bf16", &m) ||
        first_diff(x.x.fp8, y.x.fp8, p + "x.fp8", &m) || first_diff(x.x.scales, y.x.scales, p + "x.scales", &m) ||
        first_diff(x.x.packed_scales, y.x.packed_scales, p + "x.packed_scales", &m))
      return m;
  }
  for (size_t s = 0; s < a.send_pos.size(); ++s)
    if (first_diff(a.send_pos[s], b.send_pos[s], "send_pos[" + std::to_string(s) + "]", &m)) return m;
  return "";
}

std::string diff(const LlDispatch& a, const LlDispatch& b) {
  std::string m;
  if (scalar_diff(a.num_ranks, b.num_ranks, "num_ranks", &m) ||
      scalar_diff(a.num_experts, b.num_experts, "num_experts", &m) || scalar_diff(a.topk, b.topk, "topk", &m) ||
      scalar_diff(a.max_tokens, b.max_tokens, "max_tokens", &m) || scalar_diff(a.hidden, b.hidden, "hidden", &m) ||
      scalar_diff(a.use_fp8, b.use_fp8, "use_fp8", &m) ||
      scalar_diff(static_cast<int>(a.scale_format), static_cast<int>(b.scale_format), "scale_format", &m) ||
      first_diff(a.num_tokens, b.num_tokens, "num_tokens", &m) ||
      scalar_diff(static_cast<int64_t>(a.recv.size()), static_cast<int64_t>(b.recv.size()), "recv.size()", &m) ||
      scalar_diff(static_cast<int64_t>(a.send_row.size()), static_cast<int64_t>(b.send_row.size()), "send_row.size()",
                  &m))
    return m;
  for (size_t d = 0; d < a.recv.size(); ++d) {
    const LlRankRecv &x = a.recv[d], &y = b.recv[d];
    const std::string p = "recv[" + std::to_string(d) + "].";
    if (first_diff(x.recv_count, y.recv_count, p + "recv_count", &m) ||
        first_diff(x.src_rank, y.src_rank, p + "src_rank", &m) ||
        first_diff(x.src_token, y.src_token, p + "src_token", &m) ||
        first_diff(x.src_info, y.src_info, p + "src_info", &m) || first_diff(x.bf16, y.bf16, p + "bf16", &m) ||
        first_diff(x.fp8, y.fp8, p + "fp8", &m) || first_diff(x.scales, y.scales, p + "scales", &m) ||
        first_diff(x.packed_scales, y.packed_scales, p + "packed_scales", &m))
      return m;
  }
  for (size_t s = 0; s < a.send_row.size(); ++s)
    if (first_diff(a.send_row[s], b.send_row[s], "send_row[" + std::to_string(s) + "]", &m)) return m;
  return "";
}

}  // namespace nccl_moe::ref
