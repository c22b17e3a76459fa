// Building benchmark problems and their expected results from the CPU reference (contract in problem.h).
#include "problem.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "reference/testing/generators.h"
#include "reference/testing/traffic.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

// Runs fn(i) for i in [0, n) on up to hardware_concurrency threads (the ref generators are pure functions).
template <typename Fn>
void parallelFor(int n, Fn fn) {
  const int workers = std::max(1, std::min<int>(n, static_cast<int>(std::thread::hardware_concurrency())));
  if (workers <= 1) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int> next{0};
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w)
    threads.emplace_back([&] {
      for (int i = next++; i < n; i = next++) fn(i);
    });
  for (auto& t : threads) t.join();
}

}  // namespace

RowFormat RowFormat::make(DType dtype, int hidden) {
  RowFormat f;
  f.dtype = dtype;
  f.hidden = hidden;
  if (dtype == DType::kBf16) {
    f.data_bytes = sz(hidden) * 2;
  } else {
    f.groups = ref::num_scale_groups(hidden);
    f.data_bytes = sz(hidden);
    f.scale_bytes = sz(f.groups) * 4;
  }
  return f;
}

bool Problem::haveRank(int rank) const {
  return spec.build_expected || spec.ranks_needed.empty() || spec.ranks_needed[sz(rank)];
}

int64_t Problem::numRecv(int d) const { return ht.recv.empty() ? 0 : ht.recv[sz(d)].num_recv; }

int64_t Problem::numSelections(int s) const {
  int64_t n = 0;
  for (int64_t e : routing.ranks[sz(s)].topk_idx) n += e >= 0;
  return n;
}

int64_t Problem::numLlRecv(int d) const {
  int64_t n = 0;
  if (!ll.recv.empty())
    for (int c : ll.recv[sz(d)].recv_count) n += c;
  return n;
}

const uint8_t* Problem::expectedData(int s, int t) const {
  if (fmt.dtype == DType::kFp8) return x_fp8[sz(s)].fp8.data() + sz(t) * sz(spec.hidden);
  return reinterpret_cast<const uint8_t*>(x_bf16[sz(s)].data() + sz(t) * sz(spec.hidden));
}

const float* Problem::expectedScales(int s, int t) const {
  if (fmt.dtype != DType::kFp8) return nullptr;
  return x_fp8[sz(s)].scales.data() + sz(t) * sz(fmt.groups);
}

std::vector<uint8_t> Problem::packedInput(int s) const {
  const size_t rb = fmt.rowBytes();
  std::vector<uint8_t> out(sz(spec.tokens) * rb);
  for (int t = 0; t < spec.tokens; ++t) {
    std::memcpy(out.data() + sz(t) * rb, expectedData(s, t), fmt.data_bytes);
    if (fmt.scale_bytes) std::memcpy(out.data() + sz(t) * rb + fmt.data_bytes, expectedScales(s, t), fmt.scale_bytes);
  }
  return out;
}

void llExpertRow(uint64_t seed, int s, int t, int e, int hidden, int num_experts, uint16_t* out) {
  const uint64_t salt = ref::mix_seed(seed, kLlExpertSalt);
  const int id = t * num_experts + e;
  for (int c = 0; c < hidden; ++c) out[c] = ref::pattern_bf16(salt, s, id, c, ref::ValueKind::kExact);
}

Problem buildProblem(const ProblemSpec& spec) {
  Problem p;
  p.spec = spec;
  p.fmt = RowFormat::make(spec.dtype, spec.hidden);
  const int R = spec.num_ranks, T = spec.tokens, H = spec.hidden;
  if (spec.mode == Mode::kLl && spec.ll_max_tokens < T)
    throw std::invalid_argument("buildProblem: ll_max_tokens must be >= tokens");

  ref::RoutingSpec rs;
  rs.num_ranks = R;
  rs.num_experts = spec.experts;
  rs.topk = spec.topk;
  rs.num_tokens = T;
  rs.skew = spec.routing.skew;
  rs.masked_fraction = spec.routing.masked_fraction;
  rs.group_nodes = spec.routing.group_nodes;
  rs.ranks_per_node = spec.ranks_per_node;
  rs.with_weights = true;
  rs.seed = spec.seed;
  p.routing = ref::make_routing(rs);
  p.traffic = spec.mode == Mode::kHt ? ref::traffic_matrix(p.routing) : ref::ll_traffic_matrix(p.routing);

  // Inputs.
  p.x_bf16.assign(sz(R), {});
  p.x_fp8.assign(sz(R), ref::Rows{});
  const uint64_t x_seed = ref::mix_seed(spec.seed, kInputSalt);
  parallelFor(R, [&](int s) {
    if (!p.haveRank(s)) return;
    p.x_bf16[sz(s)] = ref::make_bf16_rows(x_seed, s, T, H, ref::ValueKind::kExact);
    if (spec.dtype == DType::kFp8) {
      p.x_fp8[sz(s)] = ref::cast_to_fp8(p.x_bf16[sz(s)], T, H, ref::ScaleFormat::kFloat);
      if (spec.mode == Mode::kHt) p.x_bf16[sz(s)] = {};  // the fp8 rows are the HT input
    }
  });

  if (spec.mode == Mode::kHt) {
    p.ht = ref::ht_dispatch(p.routing, spec.expert_alignment, nullptr);
    p.ht_y.assign(sz(R), {});
    const uint64_t y_seed = ref::mix_seed(spec.seed, kHtCombineSalt);
    parallelFor(R, [&](int d) {
      if (!p.haveRank(d)) return;
      p.ht_y[sz(d)] = ref::make_bf16_rows(y_seed, d, static_cast<int>(p.numRecv(d)), H, ref::ValueKind::kExact);
    });
    if (spec.build_expected) {
      p.ht_expected_combine =
          spec.comm_nodes > 1
              ? ref::ht_combine_nodes(p.ht, ref::NodeMap::consecutive(R, R / spec.comm_nodes), p.ht_y, H).x
              : ref::ht_combine(p.ht, p.ht_y, H).x;
    }
  } else {
    p.ll = ref::ll_dispatch(p.routing, H, spec.ll_max_tokens, nullptr, spec.dtype == DType::kFp8,
                            ref::ScaleFormat::kFloat);
    const int El = p.numLocalExperts(), slab = p.slabRows();
    p.ll_y.assign(sz(R), {});
    parallelFor(R, [&](int d) {
      if (!p.haveRank(d)) return;
      std::vector<uint16_t>& y = p.ll_y[sz(d)];
      y.assign(sz(El) * sz(slab) * sz(H), 0);
      const ref::LlRankRecv& rv = p.ll.recv[sz(d)];
      for (int j = 0; j < El; ++j)
        for (int i = 0; i < rv.recv_count[sz(j)]; ++i) {
          const size_t row = sz(j) * sz(slab) + sz(i);
          llExpertRow(spec.seed, rv.src_rank[row], rv.src_token[row], d * El + j, H, spec.experts,
                      y.data() + row * sz(H));
        }
    });
    if (spec.build_expected) p.ll_expected_combine = ref::ll_combine(p.routing, p.ll, p.ll_y);
  }
  return p;
}

}  // namespace nccl_moe::perf
