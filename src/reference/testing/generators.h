// Deterministic test data for the CPU reference's consumers (unit tests, GPU tests, moe-perf): seeded routings and
// activation rows that are pure functions of (seed, rank, ...), so every rank can regenerate any rank's data and a
// receiver can check provenance by recomputing a value. Not part of the reference's contract (reference.h);
// docs/reference.md, "Generators", gives the exact streams, pinned by golden hashes in the unit tests.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.h"

namespace nccl_moe::ref {

// splitmix64: the only random source, portable and stable across platforms and compilers.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  uint32_t below(uint32_t n);  // uniform-ish in [0, n), n >= 1 (multiply-shift, no rejection)
  double uniform();            // [0, 1) with 53 random bits
 private:
  uint64_t state_;
};
// Mixes values into a seed (used to derive per-rank / per-element streams).
uint64_t mix_seed(uint64_t a, uint64_t b);

struct RoutingSpec {
  int num_ranks = 1, num_experts = 1, topk = 1;  // K <= E
  int num_tokens = 0;                            // T_s for every rank ...
  std::vector<int> tokens_per_rank;              // ... unless this is non-empty ([R], overrides num_tokens)
  double skew = 1.0;                  // >= 1: an expert on rank r is picked with weight skew^-r (1 = uniform)
  double masked_fraction = 0.0;       // probability that a slot is -1 (random slots, not only at the end)
  double empty_token_fraction = 0.0;  // probability that a token has every slot -1
  int num_zero_token_ranks = 0;       // the last this-many ranks get T_s = 0
  bool with_weights = true;           // weights (1 + u % 64) / 64: exact in bf16/float products
  uint64_t seed = 1;
  // Group-limited routing (DeepSeek-V3's node-limited gating, as DeepEP's internode tests draw it): when
  // group_nodes > 0, each token's experts lie within at most group_nodes nodes, rank r on node r / ranks_per_node.
  // Per token: a score in [1, 2) per expert, a node's score = the max of its experts' scores, the group_nodes
  // best nodes are kept, and the topk best experts among theirs are chosen. Requires skew == 1, ranks_per_node
  // dividing num_ranks, group_nodes in [1, nodes] and group_nodes * (experts per node) >= topk.
  int group_nodes = 0;     // 0 = unconstrained
  int ranks_per_node = 0;  // used only with group_nodes > 0
};
// Routing of every rank; rank s uses the stream mix_seed(seed, s). Experts of one token are distinct.
Routing make_routing(const RoutingSpec& spec);
RankRouting make_rank_routing(const RoutingSpec& spec, int rank);

enum class ValueKind : int {
  kExact = 0,  // multiples of 1/16 in [-15/16, 15/16], never 0: sums of <= 16 such values (plus two
               // biases) are exact in FP32 and in bf16, so combine results are order-independent
  kWide = 1,   // +-(1 + m/128) * 2^e, m in [0,128), e in [-10, 9]: exercises the fp8 cast across groups
};
// bf16 value of (seed, rank, token, channel): a pure function, so receivers check provenance by recomputing.
uint16_t pattern_bf16(uint64_t seed, int rank, int token, int channel, ValueKind kind);
// [num_tokens, H] rows of pattern_bf16(seed, rank, t, c, kind).
std::vector<uint16_t> make_bf16_rows(uint64_t seed, int rank, int num_tokens, int hidden, ValueKind kind);
// make_bf16_rows for every rank of `routing` (T_s rows each).
std::vector<std::vector<uint16_t>> make_bf16_rows_all(const Routing& routing, uint64_t seed, int hidden,
                                                      ValueKind kind);

}  // namespace nccl_moe::ref
