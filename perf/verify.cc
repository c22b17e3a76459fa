// Output verification against the reference (contract in verify.h).
#include "verify.h"

#include <algorithm>
#include <cstring>
#include <map>

#include "reference/testing/compare.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

uint64_t rowHash(const RowFormat& f, const uint8_t* data, const uint8_t* scales) {
  uint64_t h = ref::fnv1a64(data, f.data_bytes);
  if (f.scale_bytes) h = ref::fnv1a64(scales, f.scale_bytes, h);
  return h;
}

}  // namespace

RowView RowView::packed(const void* rows, const RowFormat& fmt) {
  RowView v;
  v.data = static_cast<const uint8_t*>(rows);
  v.data_stride = fmt.rowBytes();
  if (fmt.scale_bytes) {
    v.scales = v.data + fmt.data_bytes;
    v.scale_stride = fmt.rowBytes();
  }
  return v;
}

RowView RowView::split(const void* data, const void* scales, const RowFormat& fmt) {
  RowView v;
  v.data = static_cast<const uint8_t*>(data);
  v.data_stride = fmt.data_bytes;
  if (fmt.scale_bytes) {
    v.scales = static_cast<const uint8_t*>(scales);
    v.scale_stride = fmt.scale_bytes;
  }
  return v;
}

int64_t rowWrong(const RowFormat& f, const uint8_t* got_data, const uint8_t* got_scales, const uint8_t* exp_data,
                 const float* exp_scales) {
  if (std::memcmp(got_data, exp_data, f.data_bytes) == 0 &&
      (f.scale_bytes == 0 || std::memcmp(got_scales, exp_scales, f.scale_bytes) == 0))
    return 0;
  int64_t wrong = 0;
  if (f.dtype == DType::kBf16) {
    for (int c = 0; c < f.hidden; ++c)
      wrong += got_data[2 * c] != exp_data[2 * c] || got_data[2 * c + 1] != exp_data[2 * c + 1];
  } else {
    for (int c = 0; c < f.hidden; ++c) wrong += got_data[c] != exp_data[c];
    for (int g = 0; g < f.groups; ++g) wrong += std::memcmp(got_scales + 4 * g, exp_scales + g, 4) != 0;
  }
  return wrong;
}

int64_t htRecvWrong(const Problem& p, int d, int64_t got_rows, const RowView& got) {
  const ref::HtRankRecv& rv = p.ht.recv[sz(d)];
  const int64_t n = std::min<int64_t>(got_rows, rv.num_recv);
  int64_t wrong = std::max<int64_t>(got_rows, rv.num_recv) - n;
  wrong *= p.fmt.elemsPerRow();
  for (int64_t i = 0; i < n; ++i) {
    const int s = rv.src_rank[sz(i)], t = rv.src_token[sz(i)];
    wrong += rowWrong(p.fmt, got.rowData(i), got.rowScales(i), p.expectedData(s, t), p.expectedScales(s, t));
  }
  return wrong;
}

int64_t htMetaWrong(const Problem& p, int d, int64_t got_num_recv, const std::vector<int>* per_expert,
                    const int64_t* topk_idx, const float* topk_weights) {
  const ref::HtRankRecv& rv = p.ht.recv[sz(d)];
  const int K = p.spec.topk;
  int64_t wrong = got_num_recv != rv.num_recv;
  if (per_expert != nullptr) {
    const std::vector<int>& exp = rv.num_recv_per_expert;
    if (per_expert->size() != exp.size()) {
      wrong += static_cast<int64_t>(exp.size());
    } else {
      for (size_t j = 0; j < exp.size(); ++j) wrong += (*per_expert)[j] != exp[j];
    }
  }
  const int64_t n = std::min<int64_t>(got_num_recv, rv.num_recv);
  wrong += (std::max<int64_t>(got_num_recv, rv.num_recv) - n) * K * ((topk_idx != nullptr) + (topk_weights != nullptr));
  for (int64_t i = 0; i < n * K; ++i) {
    if (topk_idx != nullptr) wrong += topk_idx[i] != rv.topk_idx[sz(i)];
    if (topk_weights != nullptr && !rv.topk_weights.empty())
      wrong += std::memcmp(&topk_weights[i], &rv.topk_weights[sz(i)], sizeof(float)) != 0;
  }
  return wrong;
}

int64_t bf16Wrong(const uint16_t* got, const std::vector<uint16_t>& expected) {
  int64_t wrong = 0;
  for (size_t i = 0; i < expected.size(); ++i) wrong += got[i] != expected[i];
  return wrong;
}

int64_t llRecvWrong(const Problem& p, int d, const int* got_counts, const RowView& got,
                    std::vector<int32_t>* identity) {
  const ref::LlRankRecv& rv = p.ll.recv[sz(d)];
  const int El = p.numLocalExperts(), slab = p.slabRows();
  const int64_t elems = p.fmt.elemsPerRow();
  if (identity) identity->assign(sz(El) * sz(slab), -1);
  int64_t wrong = 0;
  for (int j = 0; j < El; ++j) {
    const int exp_n = rv.recv_count[sz(j)];
    int got_n = got_counts[j];
    wrong += got_n != exp_n;  // the count itself
    if (got_n < 0) got_n = 0;
    if (got_n > slab) {
      wrong += static_cast<int64_t>(got_n - slab) * elems;
      got_n = slab;
    }
    const size_t base = sz(j) * sz(slab);
    // Expected row e of this slab is the input row of (src_rank, src_token) (or its fp8 cast).
    auto expData = [&](int e) { return p.expectedData(rv.src_rank[base + sz(e)], rv.src_token[base + sz(e)]); };
    auto expScales = [&](int e) { return p.expectedScales(rv.src_rank[base + sz(e)], rv.src_token[base + sz(e)]); };
    auto gotData = [&](int i) { return got.rowData(static_cast<int64_t>(base + sz(i))); };
    auto gotScales = [&](int i) { return got.rowScales(static_cast<int64_t>(base + sz(i))); };
    auto diff = [&](int i, int e) { return rowWrong(p.fmt, gotData(i), gotScales(i), expData(e), expScales(e)); };

    std::vector<int> match(sz(got_n), -1);  // expected row of each received row
    std::vector<char> used(sz(exp_n), 0);
    // 1. Positional matches (the reference order).
    for (int i = 0; i < std::min(got_n, exp_n); ++i)
      if (diff(i, i) == 0) {
        match[sz(i)] = i;
        used[sz(i)] = 1;
      }
    // 2. Content lookup for the rest (rows are unique: one (rank, token) per slab).
    std::vector<int> unmatched;
    std::multimap<uint64_t, int> by_hash;
    for (int e = 0; e < exp_n; ++e)
      if (!used[sz(e)]) by_hash.emplace(rowHash(p.fmt, expData(e), reinterpret_cast<const uint8_t*>(expScales(e))), e);
    for (int i = 0; i < got_n && !by_hash.empty(); ++i) {
      if (match[sz(i)] >= 0) continue;
      const auto range = by_hash.equal_range(rowHash(p.fmt, gotData(i), gotScales(i)));
      for (auto it = range.first; it != range.second; ++it)
        if (!used[sz(it->second)] && diff(i, it->second) == 0) {
          match[sz(i)] = it->second;
          used[sz(it->second)] = 1;
          break;
        }
    }
    for (int i = 0; i < got_n; ++i)
      if (match[sz(i)] < 0) unmatched.push_back(i);
    std::vector<int> unused;
    for (int e = 0; e < exp_n; ++e)
      if (!used[sz(e)]) unused.push_back(e);
    // 3. Rows that match nothing exactly.
    if (!unmatched.empty() && unmatched.size() * unused.size() <= 4096) {
      // Few: charge each the differences to its closest unclaimed expected row (and take that row's identity).
      for (int i : unmatched) {
        int64_t best = elems;
        size_t best_k = unused.size();
        for (size_t k = 0; k < unused.size(); ++k) {
          if (unused[k] < 0) continue;
          const int64_t w = diff(i, unused[k]);
          if (w < best) {
            best = w;
            best_k = k;
          }
        }
        if (best_k < unused.size()) {
          match[sz(i)] = unused[best_k];
          unused[best_k] = -1;
        }
        wrong += best;
      }
    } else {
      // Many: compare with the expected row at the same position (or count every element).
      for (int i : unmatched) wrong += i < exp_n ? diff(i, i) : elems;
    }
    // Expected rows that never arrived.
    int64_t missing = 0;
    for (int e : unused) missing += e >= 0;
    wrong += std::max<int64_t>(0, std::min<int64_t>(missing, exp_n - got_n)) * elems;
    if (identity)
      for (int i = 0; i < got_n; ++i)
        if (match[sz(i)] >= 0) (*identity)[base + sz(i)] = rv.src_info[base + sz(match[sz(i)])];
  }
  return wrong;
}

std::vector<uint16_t> llExpertOutputsFor(const Problem& p, int d, const std::vector<int32_t>& identity) {
  const int El = p.numLocalExperts(), slab = p.slabRows(), H = p.spec.hidden;
  std::vector<uint16_t> y(sz(El) * sz(slab) * sz(H), 0);
  for (int j = 0; j < El; ++j)
    for (int i = 0; i < slab; ++i) {
      const int32_t id = identity[sz(j) * sz(slab) + sz(i)];
      if (id < 0) continue;
      llExpertRow(p.spec.seed, id >> 24, id & 0xFFFFFF, d * El + j, H, p.spec.experts,
                  y.data() + (sz(j) * sz(slab) + sz(i)) * sz(H));
    }
  return y;
}

}  // namespace nccl_moe::perf
