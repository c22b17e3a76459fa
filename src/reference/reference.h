// CPU reference of every NCCL-MoE operation: the test oracle and the no-GPU backend of moe-perf.
//
// Contract (docs/reference.md has the full text; this header is the authoritative list of functions):
//   - Host data only, all R ranks simulated in one process, plain std::vector, row-major tensors.
//   - Depends on nothing but the C++17 standard library (no nccl_moe.h, no CUDA headers).
//   - Deterministic: same inputs give bitwise-identical outputs on every run and platform (no unordered
//     containers, no threads). FP32 accumulation orders are written on each function; the GPU kernels implement
//     the same orders so tests can demand bitwise equality.
//   - Invalid inputs (expert id < -1 or >= E, E % R != 0, sizes that disagree, T > max_tokens, ...) throw
//     std::invalid_argument with a message naming the argument.
//
// What exists only to test and benchmark lives beside it in reference/testing/: generators.h (seeded routings and
// rows), brute.h (the brute-force model that cross-checks these functions), traffic.h (per rank-pair row counts),
// compare.h (hashes, diff()).
//
// Notation: R ranks, s source rank, d destination (receiving) rank, T_s tokens on rank s, H hidden size,
// K top-k, E experts, E_l = E / R local experts, expert e lives on rank e / E_l with local id e % E_l,
// G = ceil(H / 128) scale groups per row, P = ceil(G / 4) packed UE8M0 words per row.
#pragma once

#include <cstdint>
#include <vector>

namespace nccl_moe::ref {

// ------------------------------------------------------------------------------------------------
// Formats and numeric helpers (bit-exact)
// ------------------------------------------------------------------------------------------------

constexpr int kScaleGroupElems = 128;  // one FP8 scale per 128 channels (last group may be partial)
constexpr float kFp8Max = 448.0f;      // largest finite e4m3 value (OCP e4m3fn)
constexpr float kAmaxFloor = 1e-4f;    // amax = max(amax, kAmaxFloor) before computing a scale

// Mirrors ncclMoeDataType_t (values must stay equal).
enum class DType : int { kBf16 = 0, kFp8E4M3 = 1 };
// Mirrors ncclMoeScaleFormat_t (values must stay equal).
enum class ScaleFormat : int { kFloat = 0, kFloatPow2 = 1, kUe8m0 = 2 };

inline int num_scale_groups(int hidden) { return (hidden + kScaleGroupElems - 1) / kScaleGroupElems; }
inline int num_packed_scales(int hidden) { return (num_scale_groups(hidden) + 3) / 4; }

// bf16 bits -> float: exact (bits << 16).
float bf16_to_float(uint16_t bits);
// float -> bf16 bits, round to nearest even. NaN -> 0x7FFF (CUDA's canonical bf16 NaN, sign dropped, as
// __float2bfloat16_rn does); +-Inf stay +-Inf; finite values that round past the largest bf16 become +-Inf.
uint16_t float_to_bf16(float f);

// e4m3 byte -> float: exact. OCP e4m3fn: bias 7, no infinities, 0x7F/0xFF are NaN, subnormals m * 2^-9.
float fp8_e4m3_to_float(uint8_t bits);
// float -> e4m3 byte, round to nearest even with saturation to +-448 ("satfinite"), bit-identical to CUDA's
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3): |x| <= 2^-10 -> +-0 (sign kept), subnormals rounded
// RNE on the 2^-9 grid, |x| > 448 (incl. Inf) -> +-448 (0x7E/0xFE), NaN -> 0x7F | sign.
uint8_t float_to_fp8_e4m3(float f);

// Scale of one 128-channel group from its amax (max |x| as float):
//   a = max(amax, 1e-4f); scale = a / 448.0f;
//   kFloatPow2 / kUe8m0: scale rounded UP to a power of two: if the float's mantissa bits are non-zero,
//   add one to the exponent field and clear the mantissa (bit operation, exact).
float fp8_group_scale(float amax, ScaleFormat format);
// UE8M0 byte of a power-of-two scale: its biased float exponent b (scale == 2^(b-127)).
uint8_t ue8m0_from_scale(float pow2_scale);
// 2^(b-127) as float (b in 1..254; 0 and 255 are not produced by the cast).
float ue8m0_to_scale(uint8_t b);
// Byte g of a packed UE8M0 row: word g/4, byte g%4 (little-endian: group 4i in bits 0..7 of word i).
uint8_t ue8m0_byte(const int32_t* packed_row, int group);

// Cast one bf16 row of `hidden` channels to e4m3. Per group g (channels [128g, min(128g+128, H))):
//   amax = max over the group of |float(x)| (starting from 0.0f), scale = fp8_group_scale(amax, format),
//   inv = 1.0f / scale, q[c] = float_to_fp8_e4m3(float(x[c]) * inv) (one FP32 multiply, no FMA).
// Writes q[H]; for kFloat/kFloatPow2 scales_f32[G]; for kUe8m0 packed[P] (unused high bytes of the last
// word are 0). The unused scale pointer may be null.
void cast_row_to_fp8(const uint16_t* x, int hidden, ScaleFormat format, uint8_t* q, float* scales_f32, int32_t* packed);
// Dequantised value of channel c of an fp8 row: fp8_e4m3_to_float(q[c]) * scale(group c/128), one FP32
// multiply. `scales_f32` is used for float formats, `packed` for kUe8m0.
float dequant_fp8(const uint8_t* q, int channel, ScaleFormat format, const float* scales_f32, const int32_t* packed);

// ------------------------------------------------------------------------------------------------
// Activation rows: one tensor of bf16 rows, or of fp8 rows plus scales
// ------------------------------------------------------------------------------------------------

struct Rows {
  DType dtype = DType::kBf16;
  ScaleFormat scale_format = ScaleFormat::kFloat;  // fp8 only
  int num_rows = 0;
  int hidden = 0;
  std::vector<uint16_t> bf16;          // [num_rows, H] when dtype == kBf16, else empty
  std::vector<uint8_t> fp8;            // [num_rows, H] when dtype == kFp8E4M3, else empty
  std::vector<float> scales;           // [num_rows, G] when fp8 and format kFloat/kFloatPow2, else empty
  std::vector<int32_t> packed_scales;  // [num_rows, P] when fp8 and format kUe8m0, else empty

  // Zero-filled rows of the given shape with exactly the vectors above that apply.
  static Rows zeros(DType dtype, ScaleFormat scale_format, int num_rows, int hidden);
  // bf16 rows wrapping `data` ([num_rows, H]).
  static Rows from_bf16(std::vector<uint16_t> data, int num_rows, int hidden);
  bool empty() const { return num_rows == 0 && hidden == 0; }
  // Copies row `src_row` of `src` (same dtype/format/hidden) into row `dst_row`, bitwise, scales included.
  void copy_row_from(int dst_row, const Rows& src, int src_row);
  // Value of (row, channel) as float: bf16 exactly, fp8 dequantised with dequant_fp8().
  float value(int row, int channel) const;
};

// Cast [num_rows, H] bf16 to fp8 rows with cast_row_to_fp8() on each row.
Rows cast_to_fp8(const std::vector<uint16_t>& bf16, int num_rows, int hidden, ScaleFormat format);

// ------------------------------------------------------------------------------------------------
// Routing of all ranks
// ------------------------------------------------------------------------------------------------

struct RankRouting {
  int num_tokens = 0;               // T_s >= 0
  std::vector<int64_t> topk_idx;    // [T_s, K] global expert ids, -1 = unused slot
  std::vector<float> topk_weights;  // [T_s, K] or empty (no weights)
};

struct Routing {
  int num_ranks = 1;               // R >= 1
  int num_experts = 1;             // E, E % R == 0, E >= R
  int topk = 1;                    // K >= 1
  std::vector<RankRouting> ranks;  // [R]

  int num_local_experts() const { return num_experts / num_ranks; }
  int expert_rank(int64_t expert) const { return static_cast<int>(expert / num_local_experts()); }
  // True if some rank has topk_weights. validate() requires then that every rank with tokens has them.
  bool has_weights() const;
  // Throws std::invalid_argument when shapes disagree or an id is < -1 or >= E. Every operation below
  // calls it. Ids within one token are expected to be distinct (not checked; see each operation).
  void validate() const;
};

// ------------------------------------------------------------------------------------------------
// Layout (ncclMoeGetDispatchLayout)
// ------------------------------------------------------------------------------------------------

struct DispatchLayout {
  std::vector<int> num_tokens_per_rank;    // [R]: tokens with >= 1 expert on rank d (once per rank)
  std::vector<int> num_tokens_per_expert;  // [E]: (token, slot) pairs naming expert e
  std::vector<uint8_t> is_token_in_rank;   // [T, R]: 1 if token t has an expert on rank d, else 0
};

// Layout of one rank's tokens. topk_idx: [num_tokens, topk], -1 = unused.
DispatchLayout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int topk, int num_experts, int num_ranks);

// ------------------------------------------------------------------------------------------------
// High-throughput dispatch / combine
// ------------------------------------------------------------------------------------------------

// What receiving rank d gets from a HT dispatch.
struct HtRankRecv {
  int num_recv = 0;                                // N_d
  std::vector<int> src_rank;                       // [N_d] source rank of each row
  std::vector<int> src_token;                      // [N_d] source token index of each row
  std::vector<int32_t> src_info;                   // [N_d] (src_rank << 24) | src_token
  std::vector<int> rank_prefix;                    // [R + 1]: rows from source s are [rank_prefix[s], rank_prefix[s+1])
  std::vector<int64_t> topk_idx;                   // [N_d, K] local id (e - d*E_l) where e is on d, else -1
  std::vector<float> topk_weights;                 // [N_d, K] weight where the id is local, else 0.0f; empty if
                                                   // the routing has no weights
  std::vector<int> num_recv_per_expert;            // [E_l] rows naming local expert j (each slot), rounded up to
                                                   // expert_alignment
  std::vector<int> num_recv_per_expert_unaligned;  // [E_l] the same before rounding
  Rows x;                                          // [N_d, H] rows copied bitwise (scales too); empty if no data
};

struct HtDispatch {
  int num_ranks = 0, num_experts = 0, topk = 0, expert_alignment = 1;
  std::vector<int> num_tokens;   // [R] T_s
  std::vector<HtRankRecv> recv;  // [R] indexed by receiving rank d
  // send_pos[s][t * R + d] = index of token t among rank s's tokens sent to d (0-based, ascending in t),
  // or -1 if t is not sent to d. Row of (s, t) at d = recv[d].rank_prefix[s] + send_pos[s][t * R + d].
  std::vector<std::vector<int>> send_pos;
};

// Dispatch of all ranks at once. Each token t of rank s goes to every rank d holding one of its experts,
// once per d. Receive order at d: source rank ascending, then source token ascending.
// `x`: null (routing only; recv[d].x stays empty) or [R] rows with x[s].num_rows == T_s, all of the same
// dtype/format/hidden. expert_alignment >= 1.
HtDispatch ht_dispatch(const Routing& routing, int expert_alignment, const std::vector<Rows>* x = nullptr);

struct HtCombineResult {
  std::vector<std::vector<uint16_t>> x;          // [R][T_s, H] bf16
  std::vector<std::vector<float>> topk_weights;  // [R][T_s, K] when weights were given, else empty vectors
};

// Reverse of `dispatch`. x[d]: [N_d, H] bf16 in d's receive order. For each source rank s and token t:
//   acc = 0.0f; for d = 0..R-1 ascending, if t was received by d: acc = acc + float(x[d][row(s,t,d)]);
//   if bias0: acc = acc + float(bias0[s][t]); if bias1: acc = acc + float(bias1[s][t]);
//   out[s][t] = float_to_bf16(acc).                                  (each "+" one FP32 add, per channel)
// A token sent nowhere gives bf16(0.0f (+ biases)). weights (optional) [R][N_d, K]: combined[s][t][k] =
// 0.0f + w[d0][row][k] + w[d1][row][k] + ... over the same d ascending, in FP32. bias0/bias1 (optional):
// [R][T_s, H] bf16; bias1 may be given without bias0.
HtCombineResult ht_combine(const HtDispatch& dispatch, const std::vector<std::vector<uint16_t>>& x, int hidden,
                           const std::vector<std::vector<float>>* weights = nullptr,
                           const std::vector<std::vector<uint16_t>>* bias0 = nullptr,
                           const std::vector<std::vector<uint16_t>>* bias1 = nullptr);

// ------------------------------------------------------------------------------------------------
// Nodes of a communicator (scale-out)
// ------------------------------------------------------------------------------------------------

// Which node every rank lives on. Node ids are dense: every id in [0, num_nodes()) holds at least one rank. Ranks
// of one node need not be consecutive (consecutive() builds the usual map). One node = a single-node communicator.
struct NodeMap {
  std::vector<int> node_of_rank;  // [R]

  int num_nodes() const;  // 1 + the largest id (0 when empty)
  // Every rank on node 0.
  static NodeMap single(int num_ranks);
  // Rank r on node r / ranks_per_node (DeepEP's layout). Requires ranks_per_node >= 1 and R % ranks_per_node == 0.
  static NodeMap consecutive(int num_ranks, int ranks_per_node);
  // Throws std::invalid_argument unless node_of_rank has num_ranks entries, ids are >= 0 and every id below
  // num_nodes() is used.
  void validate(int num_ranks) const;
};

// HT combine on a communicator of several nodes: the two-level sum the internode kernels compute (a node's ranks
// are reduced by that node's forwarder, which sends one bf16 partial per token over RDMA). For each source rank
// s, token t and channel c, with node(d) = nodes.node_of_rank[d] and row(d) the row of (s, t) at d:
//   for every node n ascending that holds a rank d with t received by d:
//     acc_n = 0.0f; for d ascending with node(d) == n and t received by d: acc_n = acc_n + float(x[d][row(d), c]);
//     P_n = float_to_bf16(acc_n)             (only when num_nodes() > 1; one node keeps acc_n unrounded)
//   sum = 0.0f; for those n ascending: sum = sum + float(P_n);
//   if bias0: sum = sum + float(bias0[s][t, c]); if bias1: sum = sum + float(bias1[s][t, c]);
//   out[s][t, c] = float_to_bf16(sum).
// Weights: wn = 0.0f + w[d][row] + ... over the node's d ascending (FP32, never rounded), then
// 0.0f + wn0 + wn1 + ... over the nodes ascending. A single-node map gives ht_combine()'s result bit for bit.
// Arguments as ht_combine(); `nodes` must map dispatch.num_ranks ranks.
HtCombineResult ht_combine_nodes(const HtDispatch& dispatch, const NodeMap& nodes,
                                 const std::vector<std::vector<uint16_t>>& x, int hidden,
                                 const std::vector<std::vector<float>>* weights = nullptr,
                                 const std::vector<std::vector<uint16_t>>* bias0 = nullptr,
                                 const std::vector<std::vector<uint16_t>>* bias1 = nullptr);

// The internode HT plan (docs/kernels-ht-internode.md): which records cross RDMA between rail peers and where the
// forwarder of each node places them over NVLink. A function of the dispatch's send positions and the node map
// only; the kernels compute the same numbers (the source in notify and in its record headers, the forwarder from
// the headers), and their tests compare against this. Requires every node to hold the same number G of ranks (the
// rails); the local index of a rank is its position among its node's ranks, ascending.
struct HtNodePlan {
  int num_ranks = 0, num_nodes = 0, ranks_per_node = 0;
  std::vector<int> node_of;               // [R] node of each rank
  std::vector<int> local_index;           // [R] index among its node's ranks
  std::vector<std::vector<int>> rank_of;  // [N][G] rank at (node, local index)
  // node_list[s][m]: the tokens of rank s with a holder (a rank holding one of its experts) on node m, ascending.
  // Record q of the pair (s, node m) is token node_list[s][m][q]; m == node_of[s] included (no RDMA there).
  std::vector<std::vector<std::vector<int>>> node_list;
  std::vector<std::vector<int>> node_pos;  // [s][t * N + m]: q of token t in node_list[s][m], or -1
  // hold_pos[s][m][q * G + j]: row position of record q at rank rank_of[m][j] (send_pos of the dispatch), -1 when
  // that rank holds none of the token's experts. What the record header carries and the forwarder reads.
  std::vector<std::vector<std::vector<int>>> hold_pos;
  // rank_count[s][d]: tokens of s sent to d (the notify record's rank_count, forwarded to d).
  std::vector<std::vector<int>> rank_count;

  // The rank that receives (s, node m)'s records and forwards them: the rank of node m with s's local index
  // (s itself on its own node).
  int forwarder(int s, int m) const { return rank_of.at(m).at(local_index.at(s)); }
  // Slot of the forwarder's HT region where holder (m, j) returns its combine rows of source node a's rail rank:
  // a * G + j (under NodeMap::consecutive: the holder's rank when a == m).
  int combine_slot(int src_node, int holder_local) const { return src_node * ranks_per_node + holder_local; }
  // Records crossing RDMA from s (pairs (t, m) with a holder on node m != node_of[s]).
  int64_t rdma_records(int s) const;
};

// Throws std::invalid_argument when the map is invalid for the dispatch or its nodes differ in size.
HtNodePlan ht_node_plan(const HtDispatch& dispatch, const NodeMap& nodes);

// ------------------------------------------------------------------------------------------------
// Low-latency dispatch / combine
// ------------------------------------------------------------------------------------------------

// What receiving rank d gets from a LL dispatch. Slab j (local expert j) has R * max_tokens rows; row i of
// slab j is element [j * R * max_tokens + i]. Rows past recv_count[j] are zero (data) / -1 (src info);
// the GPU leaves them undefined, so compare only the first recv_count[j] rows.
struct LlRankRecv {
  std::vector<uint16_t> bf16;          // [E_l, R*max, H] when !use_fp8
  std::vector<uint8_t> fp8;            // [E_l, R*max, H] when use_fp8
  std::vector<float> scales;           // [E_l, R*max, G] when use_fp8 and format kFloat/kFloatPow2
  std::vector<int32_t> packed_scales;  // [E_l, R*max, P] when use_fp8 and format kUe8m0
  std::vector<int> recv_count;         // [E_l]
  std::vector<int> src_rank;           // [E_l, R*max]
  std::vector<int> src_token;          // [E_l, R*max]
  std::vector<int32_t> src_info;       // [E_l, R*max] (src_rank << 24) | src_token, -1 past the count
};

struct LlDispatch {
  int num_ranks = 0, num_experts = 0, topk = 0, max_tokens = 0, hidden = 0;
  bool use_fp8 = false;
  ScaleFormat scale_format = ScaleFormat::kFloat;
  std::vector<int> num_tokens;   // [R] T_s
  std::vector<LlRankRecv> recv;  // [R] indexed by receiving rank d
  // send_row[s][t * K + k] = row index inside slab (e % E_l) of rank e / E_l where (s, t, k) landed, for
  // e = topk_idx[s][t, k]; -1 for unused slots.
  std::vector<std::vector<int>> send_row;

  int slab_rows() const { return num_ranks * max_tokens; }
};

// Dispatch of all ranks at once. Each valid (token, slot) of rank s with expert e is one row in slab
// e % E_l of rank e / E_l (no deduplication). Slab j rows are packed at the front in order source rank
// ascending, then source token ascending (then slot ascending if a token names an expert twice).
// x: null (routing only) or [R][T_s, H] bf16. Requires T_s <= max_tokens, and H % 128 == 0 with use_fp8.
// use_fp8: each row is cast with cast_row_to_fp8(format) (format kFloat, kFloatPow2 or kUe8m0).
// cumulative_stats (optional): [R][E_l], recv_count[d][j] added to it.
// rank_mask (optional, rank masks): [R], 1 = rank masked, else 0. A masked source sends nothing (its slots are
// treated as -1: send_row -1); a masked destination receives nothing (every slot naming one of its experts is
// treated as -1, its recv_count is 0). The rows of the active ranks keep the order above among themselves. An
// all-zero mask gives the unmasked result bit for bit.
LlDispatch ll_dispatch(const Routing& routing, int hidden, int max_tokens, const std::vector<std::vector<uint16_t>>* x,
                       bool use_fp8 = false, ScaleFormat format = ScaleFormat::kFloat,
                       std::vector<std::vector<int>>* cumulative_stats = nullptr,
                       const std::vector<uint8_t>* rank_mask = nullptr);

// Reverse of `dispatch`, weighted, in two levels (the kernels' order, bit for bit). y: [R][E_l, R*max, H] bf16
// expert outputs in d's dispatch layout. Weights come from routing.ranks[s].topk_weights (required). For each
// source rank s, token t and channel c:
//   for every expert rank d holding at least one valid slot of t:
//     acc = 0.0f; for k = 0..K-1 ascending with topk_idx[t,k] >= 0 and topk_idx[t,k] / E_l == d:
//       acc = std::fmaf(w[t,k], float(y(t,k)), acc);           (fused multiply-add, one rounding)
//     partial_d = float_to_bf16(acc);                            (round to nearest even)
//   sum = 0.0f; for those d ascending: sum = sum + bf16_to_float(partial_d);   (plain FP32 adds)
//   out[s][t] = float_to_bf16(sum).   A token with no valid slot gives +0.
// rank_mask (optional): as for ll_dispatch (pass the dispatch's): masked expert ranks d are left out of every sum
// (their contribution is absent; a token whose valid slots all live on masked ranks gives +0), and a masked source's
// out[s] is all +0 (it receives nothing).
std::vector<std::vector<uint16_t>> ll_combine(const Routing& routing, const LlDispatch& dispatch,
                                              const std::vector<std::vector<uint16_t>>& y,
                                              const std::vector<uint8_t>* rank_mask = nullptr);

}  // namespace nccl_moe::ref
