// One benchmark problem (mode, dtype, shape, routing, seed) for every rank, built on the host with the CPU reference
// (nccl_moe::ref), plus the expected results the GPU outputs and the baselines are checked against.
//
// Contract
//   - Deterministic: every process builds the same routing and data from the same spec (ref::make_routing and
//     ref::make_bf16_rows are pure functions of the seed), so each rank can check what it receives without any
//     data exchange.
//   - Inputs: x of rank s = ref::make_bf16_rows(mix_seed(seed, kInputSalt), s, T, H, kExact). FP8 runs cast it on
//     the host with ref::cast_to_fp8 (float scales): HT feeds those FP8 rows to dispatch; LL feeds bf16 and the
//     kernel casts, so the cast rows are what LL dispatch must produce.
//   - HT combine input of rank d: ref::make_bf16_rows(mix_seed(seed, kHtCombineSalt), d, N_d, H, kExact), in
//     dispatch receive order. LL expert outputs are a function of the row's identity (source rank s, source token
//     t, global expert e): llExpertRow(), so the combine check does not depend on the slab order the GPU chose.
//   - Expected results come from ref: ht_dispatch / ll_dispatch (routing only: source of every row, counts, re-based
//     top-k) with rows looked up in the inputs, and ht_combine / ll_combine on the combine inputs above.
//   - A spec may ask for only some ranks' data (ranks_needed) when nothing is verified; expected results need every
//     rank's data and are built only with build_expected.
//   - "Packed rows" (the baselines' payload): one row = data bytes (H*2 bf16, H fp8) followed, for fp8, by the
//     G = ceil(H/128) float scales.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "options.h"
#include "reference/reference.h"

namespace nccl_moe::perf {

constexpr uint64_t kInputSalt = 0xDA7A;
constexpr uint64_t kHtCombineSalt = 0x47C0;
constexpr uint64_t kLlExpertSalt = 0x11C0;

struct RowFormat {
  DType dtype = DType::kBf16;
  int hidden = 0;
  int groups = 0;          // fp8: ceil(H / 128) float scales per row; bf16: 0
  size_t data_bytes = 0;   // H * 2 (bf16) or H (fp8)
  size_t scale_bytes = 0;  // groups * 4
  size_t rowBytes() const { return data_bytes + scale_bytes; }
  int64_t elemsPerRow() const { return hidden + groups; }  // data elements + scales, for #wrong
  static RowFormat make(DType dtype, int hidden);
};

struct ProblemSpec {
  Mode mode = Mode::kHt;
  DType dtype = DType::kBf16;
  int num_ranks = 1;
  int tokens = 0;  // T, equal on every rank
  int hidden = 0, topk = 0, experts = 0;
  int ll_max_tokens = 0;     // LL capacity (>= tokens): slab rows = num_ranks * ll_max_tokens
  int expert_alignment = 1;  // HT
  RoutingChoice routing;
  int ranks_per_node = 0;  // rank r on node r / ranks_per_node; 0 = every rank on one node (group routing needs it)
  // The communicator's nodes (R / comm_nodes consecutive ranks each) when it spans several: the expected HT combine
  // is then the two-level sum of the internode kernels (ref::ht_combine_nodes). 1: today's flat sum.
  int comm_nodes = 1;
  uint64_t seed = 1;
  std::vector<bool> ranks_needed;  // [R] ranks whose inputs (and combine inputs) to build; empty = all
  bool build_expected = true;      // build the expected outputs (implies every rank's data)
};

struct Problem {
  ProblemSpec spec;
  RowFormat fmt;
  ref::Routing routing;
  std::vector<int64_t> traffic;  // [R * R]: HT tokens (deduplicated per rank) / LL selections from s to d

  std::vector<std::vector<uint16_t>> x_bf16;  // [R][T * H]; HT fp8: empty (the fp8 rows are the input)
  std::vector<ref::Rows> x_fp8;               // [R] fp8 runs: cast of x (fp8 [T, H] + float scales [T, G])

  // HT
  ref::HtDispatch ht;                                      // routing only (no data)
  std::vector<std::vector<uint16_t>> ht_y;                 // [R][N_d * H] combine input
  std::vector<std::vector<uint16_t>> ht_expected_combine;  // [R][T * H]

  // LL
  ref::LlDispatch ll;                                      // routing only (no data)
  std::vector<std::vector<uint16_t>> ll_y;                 // [R][E_l * slab * H] expert outputs in ref order
  std::vector<std::vector<uint16_t>> ll_expected_combine;  // [R][T * H]

  bool haveRank(int rank) const;
  int numLocalExperts() const { return spec.experts / spec.num_ranks; }
  int numNodes() const { return perf::numNodes(spec.num_ranks, spec.ranks_per_node); }
  int slabRows() const { return spec.num_ranks * spec.ll_max_tokens; }
  int64_t numRecv(int d) const;        // HT rows rank d receives
  int64_t numSelections(int s) const;  // valid (token, slot) pairs of rank s
  int64_t numLlRecv(int d) const;      // LL rows rank d receives (all slabs)
  // Data / scales of the row rank s's token t is expected to arrive as (HT: the input row; LL: bf16 input or its
  // fp8 cast). scales is null for bf16.
  const uint8_t* expectedData(int s, int t) const;
  const float* expectedScales(int s, int t) const;
  // The dispatch payload of rank s as packed rows [T, rowBytes()] (for fp8: data then scales per row).
  std::vector<uint8_t> packedInput(int s) const;
};

// Builds the problem; throws std::invalid_argument (from ref) on inconsistent shapes.
Problem buildProblem(const ProblemSpec& spec);

// LL expert output row (bf16 [H]) for source rank s, token t, global expert e.
void llExpertRow(uint64_t seed, int s, int t, int e, int hidden, int num_experts, uint16_t* out);

}  // namespace nccl_moe::perf
