// Shared by the high-throughput GPU tests (ht_dispatch_test.cc, ht_educational_test.cc, ht_net_test.cc,
// pressure_test.cc): the case
// description, the expected results computed once on the host with the reference, the device copies of one rank's
// dispatch inputs and outputs, and the random iterations of HtStress and the pressure runs.
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "core/comm.h"
#include "ht_harness.h"
#include "kernels/intranode/tuning.h"
#include "reference/testing/compare.h"
#include "reference/testing/generators.h"

namespace ht_test {

struct HtCase {
  std::string name;
  int num_experts = 64, topk = 8, tokens = 256, hidden = 1024;
  ref::DType dtype = ref::DType::kBf16;
  ref::ScaleFormat format = ref::ScaleFormat::kFloat;
  int scale_layout = 0;  // 0 packed, 1 padded token stride, 2 column-major (token stride 1)
  bool idx64 = true;
  int alignment = 1;
  bool worst_case = false;
  double skew = 1.0, masked = 0.0, empty = 0.0;
  int zero_ranks = 0;
  std::vector<int> tokens_per_rank;  // [R] T of each rank (each <= tokens, the capacity), or empty: `tokens` everywhere
  int group_nodes = 0;               // > 0: group-limited routing over nodes of ranks_per_node ranks (generators.h)
  int ranks_per_node = 0;
  bool weights = true;
  int num_sms = 0;  // clamped to the world's SMs per rank before the case runs (World::clampSms)
  int biases = 0;   // combine: 0, 1 or 2 biases
  bool combine_weights = true;
  uint64_t seed = 1;
  nccl_moe::HtTuning tuning{};  // warp roles of the kernels (process-wide while the case runs)
};

inline std::ostream& operator<<(std::ostream& os, const HtCase& c) { return os << c.name; }

// Everything the ranks need, computed once on the host with the reference.
struct Expected {
  ref::Routing routing;
  std::vector<ref::Rows> x1, x2;  // dispatch data, cached re-dispatch data
  ref::HtDispatch d1, d2;
  std::vector<std::vector<uint16_t>> y;  // combine input per rank [N_d, H]
  std::vector<std::vector<float>> yw;    // combine weights per rank [N_d, K]
  std::vector<std::vector<uint16_t>> b0, b1;
  ref::HtCombineResult c;  // ref::ht_combine, or ref::ht_combine_nodes when makeExpected was given a node map
  int capacity = 0;        // max_tokens_per_rank of the communicator
};

inline std::vector<ref::Rows> makeRows(const ref::Routing& routing, uint64_t seed, int hidden, ref::DType dtype,
                                       ref::ScaleFormat format) {
  auto bf16 = ref::make_bf16_rows_all(routing, seed, hidden, ref::ValueKind::kWide);
  std::vector<ref::Rows> rows;
  for (int s = 0; s < routing.num_ranks; ++s) {
    const int T = routing.ranks[s].num_tokens;
    if (dtype == ref::DType::kBf16)
      rows.push_back(ref::Rows::from_bf16(bf16[s], T, hidden));
    else
      rows.push_back(ref::cast_to_fp8(bf16[s], T, hidden, format));
  }
  return rows;
}

// `nodes` (communicators of several nodes): the combine is the two-level ref::ht_combine_nodes over that map.
inline Expected makeExpected(const HtCase& c, int num_ranks, const ref::NodeMap* nodes = nullptr) {
  Expected e;
  ref::RoutingSpec spec;
  spec.num_ranks = num_ranks;
  spec.num_experts = c.num_experts;
  spec.topk = c.topk;
  spec.num_tokens = c.tokens;
  spec.skew = c.skew;
  spec.masked_fraction = c.masked;
  spec.empty_token_fraction = c.empty;
  spec.num_zero_token_ranks = c.zero_ranks;
  spec.tokens_per_rank = c.tokens_per_rank;
  spec.group_nodes = c.group_nodes;
  spec.ranks_per_node = c.ranks_per_node;
  spec.with_weights = c.weights;
  spec.seed = c.seed;
  e.routing = ref::make_routing(spec);
  e.capacity = c.tokens > 0 ? c.tokens : 1;
  e.x1 = makeRows(e.routing, c.seed * 7 + 1, c.hidden, c.dtype, c.format);
  e.x2 = makeRows(e.routing, c.seed * 7 + 2, c.hidden, c.dtype, c.format);
  e.d1 = ref::ht_dispatch(e.routing, c.alignment, &e.x1);
  e.d2 = ref::ht_dispatch(e.routing, c.alignment, &e.x2);
  ref::Rng rng(ref::mix_seed(c.seed, 99));
  for (int d = 0; d < num_ranks; ++d) {
    const int n = e.d1.recv[d].num_recv;
    e.y.push_back(ref::make_bf16_rows(c.seed * 7 + 3, d, n, c.hidden, ref::ValueKind::kWide));
    std::vector<float> w(static_cast<size_t>(n) * c.topk);
    for (auto& v : w) v = static_cast<float>(rng.uniform() * 2.0 - 1.0);
    e.yw.push_back(std::move(w));
  }
  for (int s = 0; s < num_ranks; ++s) {
    const int T = e.routing.ranks[s].num_tokens;
    e.b0.push_back(ref::make_bf16_rows(c.seed * 7 + 4, s, T, c.hidden, ref::ValueKind::kWide));
    e.b1.push_back(ref::make_bf16_rows(c.seed * 7 + 5, s, T, c.hidden, ref::ValueKind::kWide));
  }
  const auto* yw = c.combine_weights ? &e.yw : nullptr;
  const auto* b0 = c.biases >= 1 ? &e.b0 : nullptr;
  const auto* b1 = c.biases >= 2 ? &e.b1 : nullptr;
  e.c = nodes != nullptr ? ref::ht_combine_nodes(e.d1, *nodes, e.y, c.hidden, yw, b0, b1)
                         : ref::ht_combine(e.d1, e.y, c.hidden, yw, b0, b1);
  return e;
}

// Device copies of one rank's dispatch inputs.
struct DispatchInputs {
  DeviceBytes x, scales, weights;
  int64_t token_stride = 0, word_stride = 0;
};

inline void uploadInputs(const ref::Rows& rows, const ref::RankRouting& rr, int scale_layout, DispatchInputs* in) {
  const size_t row_bytes = rows.dtype == ref::DType::kBf16 ? 2 * static_cast<size_t>(rows.hidden) : rows.hidden;
  in->x.allocate(rows.num_rows * row_bytes + 16);
  if (rows.dtype == ref::DType::kBf16)
    in->x.uploadBytes(rows.bf16);
  else
    in->x.uploadBytes(rows.fp8);
  if (rows.dtype == ref::DType::kFp8E4M3) {
    const bool ue8m0 = rows.scale_format == ref::ScaleFormat::kUe8m0;
    const int words = ue8m0 ? ref::num_packed_scales(rows.hidden) : ref::num_scale_groups(rows.hidden);
    if (scale_layout == 1) {
      in->token_stride = words + 3;
      in->word_stride = 1;
    } else if (scale_layout == 2) {
      in->token_stride = 1;
      in->word_stride = rows.num_rows > 0 ? rows.num_rows : 1;
    }
    auto s = stridedScales(rows, in->token_stride, in->word_stride);
    in->scales.allocate(s.size() * 4 + 16);
    in->scales.uploadBytes(s);
  }
  in->weights.allocate(rr.topk_weights.size() * 4 + 16);
  in->weights.uploadBytes(rr.topk_weights);
}

// Outputs of one dispatch on one rank.
struct DispatchOutputs {
  DeviceBytes x, scales, idx, weights;
  int rows = 0;
  void allocate(int rows_, int hidden, int topk, bool fp8, bool idx64, int scale_words) {
    rows = rows_;
    const size_t r = rows > 0 ? rows : 1;
    x.allocate(r * (fp8 ? hidden : 2 * hidden));
    scales.allocate(r * scale_words * 4 + 4);
    idx.allocate(r * topk * (idx64 ? 8 : 4));
    weights.allocate(r * topk * 4);
    idx.fill(0x55);  // sentinel: every id the dispatch owes must be written
    weights.fill(0x55);
  }
};

// " (from rank s token t)": the source of received row `row` per the reference ("" for -1 or past N_recv).
inline std::string rowSource(const ref::HtRankRecv& want, long long row) {
  if (row < 0 || row >= want.num_recv) return "";
  return " (from rank " + std::to_string(want.src_rank[row]) + " token " + std::to_string(want.src_token[row]) + ")";
}

// Every dispatch output field against the reference, bitwise; in worst-case mode rows past N_recv must carry
// ids -1 and weights 0. With `hash`, the compared outputs of the N_recv rows (x, scales, ids as int64, weights) are
// folded into *hash in that order: htDispatchHash folds the reference's the same way.
inline void checkDispatch(const HtCase& c, const ref::HtRankRecv& want, const DispatchOutputs& out, int rank,
                          const char* what, uint64_t* hash = nullptr) {
  SCOPED_TRACE(std::string(what) + " rank " + std::to_string(rank));
  const int N = want.num_recv, K = c.topk, H = c.hidden;
  ASSERT_LE(N, out.rows);
  if (c.dtype == ref::DType::kFp8E4M3) {
    auto x = out.x.download<uint8_t>(static_cast<size_t>(N) * H);
    const long long i = firstDiff(x.data(), want.x.fp8.data(), x.size());
    EXPECT_EQ(-1, i) << "fp8 row " << (i < 0 ? -1 : i / H) << " channel " << (i < 0 ? -1 : i % H)
                     << rowSource(want, i < 0 ? -1 : i / H);
    if (hash != nullptr) *hash = ref::fnv1a64(x, *hash);
    if (c.format == ref::ScaleFormat::kUe8m0) {
      auto s = out.scales.download<int32_t>(static_cast<size_t>(N) * ref::num_packed_scales(H));
      const long long j = firstDiff(s.data(), want.x.packed_scales.data(), s.size());
      EXPECT_EQ(-1, j) << "ue8m0 scales" << rowSource(want, j < 0 ? -1 : j / ref::num_packed_scales(H));
      if (hash != nullptr) *hash = ref::fnv1a64(s, *hash);
    } else {
      auto s = out.scales.download<float>(static_cast<size_t>(N) * ref::num_scale_groups(H));
      const long long j = firstDiff(s.data(), want.x.scales.data(), s.size());
      EXPECT_EQ(-1, j) << "float scales" << rowSource(want, j < 0 ? -1 : j / ref::num_scale_groups(H));
      if (hash != nullptr) *hash = ref::fnv1a64(s, *hash);
    }
  } else {
    auto x = out.x.download<uint16_t>(static_cast<size_t>(N) * H);
    const long long i = firstDiff(x.data(), want.x.bf16.data(), x.size());
    EXPECT_EQ(-1, i) << "bf16 row " << (i < 0 ? -1 : i / H) << " channel " << (i < 0 ? -1 : i % H)
                     << rowSource(want, i < 0 ? -1 : i / H);
    if (hash != nullptr) *hash = ref::fnv1a64(x, *hash);
  }
  const int rows_ids = c.worst_case ? out.rows : N;
  std::vector<int64_t> ids(static_cast<size_t>(rows_ids) * K);
  if (c.idx64) {
    ids = out.idx.download<int64_t>(ids.size());
  } else {
    auto i32 = out.idx.download<int32_t>(ids.size());
    ids.assign(i32.begin(), i32.end());
  }
  for (size_t i = 0; i < static_cast<size_t>(N) * K; ++i) {
    if (ids[i] != want.topk_idx[i]) {
      ADD_FAILURE() << "topk id row " << i / K << " slot " << i % K << ": " << ids[i] << " != " << want.topk_idx[i]
                    << rowSource(want, static_cast<long long>(i / K));
      break;
    }
  }
  for (size_t i = static_cast<size_t>(N) * K; i < ids.size(); ++i) {
    if (ids[i] != -1) {
      ADD_FAILURE() << "row " << i / K << " past N_recv = " << N << " has id " << ids[i] << " (expected -1)";
      break;
    }
  }
  if (hash != nullptr) *hash = ref::fnv1a64(ids.data(), static_cast<size_t>(N) * K * 8, *hash);
  if (c.weights) {
    auto w = out.weights.download<float>(static_cast<size_t>(rows_ids) * K);
    const long long j = firstDiff(w.data(), want.topk_weights.data(), static_cast<size_t>(N) * K);
    EXPECT_EQ(-1, j) << "topk weights row " << (j < 0 ? -1 : j / K) << rowSource(want, j < 0 ? -1 : j / K);
    if (hash != nullptr) *hash = ref::fnv1a64(w.data(), static_cast<size_t>(N) * K * 4, *hash);
    for (size_t i = static_cast<size_t>(N) * K; i < w.size(); ++i) {
      if (w[i] != 0.0f) {
        ADD_FAILURE() << "row " << i / K << " past N_recv has weight " << w[i] << " (expected 0)";
        break;
      }
    }
  }
}

// The hash checkDispatch folds from the device outputs, folded from the reference's rows instead.
inline uint64_t htDispatchHash(const HtCase& c, const ref::HtRankRecv& want, uint64_t hash) {
  const size_t N = want.num_recv, K = c.topk, H = c.hidden;
  if (c.dtype == ref::DType::kFp8E4M3) {
    hash = ref::fnv1a64(want.x.fp8.data(), N * H, hash);
    if (c.format == ref::ScaleFormat::kUe8m0)
      hash = ref::fnv1a64(want.x.packed_scales.data(), N * ref::num_packed_scales(c.hidden) * 4, hash);
    else
      hash = ref::fnv1a64(want.x.scales.data(), N * ref::num_scale_groups(c.hidden) * 4, hash);
  } else {
    hash = ref::fnv1a64(want.x.bf16.data(), N * H * 2, hash);
  }
  hash = ref::fnv1a64(want.topk_idx.data(), N * K * 8, hash);
  if (c.weights) hash = ref::fnv1a64(want.topk_weights.data(), N * K * 4, hash);
  return hash;
}

// ---- One rank's run of a case: communicator, handle, stream, call arguments and the combine check. ----

// The communicator config of a case (capacity = max_tokens_per_rank).
inline ncclMoeConfig_t caseConfig(const HtCase& c, int capacity) {
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = c.num_experts;
  config.hidden = c.hidden;
  config.max_topk = c.topk;
  config.max_tokens_per_rank = capacity;
  config.num_sms = c.num_sms;
  return config;
}

// One rank's handle on its communicator and stream (World::runWithComms). Checks are non-fatal, so every rank
// reaches the end; after a failed step ok() is false and the caller skips what follows. Every collective call goes
// through call(): a host barrier first (no rank allocates or frees while a peer's kernel waits for it: with ranks
// sharing a GPU, cudaFree waits for the whole device), then the call, then its completion.
class RankSession {
 public:
  RankSession(World& world, int rank, ncclMoeComm_t comm, cudaStream_t stream)
      : world_(world), rank_(rank), comm_(comm), stream_(stream) {
    ok_ = ncclMoeHandleCreate(comm_, &handle_) == ncclSuccess;
    EXPECT_TRUE(ok_) << "rank " << rank << " handle: " << ncclMoeGetLastError(comm_);
  }
  ~RankSession() {
    if (handle_ != nullptr) ncclMoeHandleDestroy(handle_);
  }
  RankSession(const RankSession&) = delete;
  RankSession& operator=(const RankSession&) = delete;

  // Barrier, then `enqueue()` (an ncclMoe* call on stream()), then finish(). Ranks whose session failed still take
  // part in the barrier (so the others do not wait for them) but enqueue nothing.
  template <typename Enqueue>
  void call(const char* what, Enqueue enqueue) {
    world_.barrier().wait();
    if (ok_) finish(enqueue(), what);
  }
  // Waits for an enqueued call; checks its return value and the communicator's async error.
  void finish(ncclResult_t res, const char* what) {
    if (!ok_) return;
    if (res == ncclSuccess && cudaStreamSynchronize(stream_) != cudaSuccess) res = ncclUnhandledCudaError;
    ncclResult_t async = ncclSuccess;
    if (res == ncclSuccess) ncclMoeCommGetAsyncError(comm_, &async);
    if (res != ncclSuccess || async != ncclSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << what << ": " << ncclMoeGetLastError(comm_);
      ok_ = false;
    }
  }
  bool ok() const { return ok_; }
  ncclMoeComm_t comm() const { return comm_; }
  ncclMoeHandle_t handle() const { return handle_; }
  cudaStream_t stream() const { return stream_; }

 private:
  World& world_;
  int rank_;
  bool ok_ = false;
  ncclMoeComm_t comm_ = nullptr;
  ncclMoeHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// The rank's top-k ids on the device, as int64 or int32 per the case.
inline DeviceBytes uploadIds(const HtCase& c, const ref::RankRouting& rr) {
  DeviceBytes idx(rr.topk_idx.size() * 8 + 16);
  if (c.idx64)
    idx.uploadBytes(rr.topk_idx);
  else
    idx.uploadBytes(toInt32(rr.topk_idx));
  return idx;
}

// Scale words per received row: 0 for bf16.
inline int scaleWords(const HtCase& c) {
  if (c.dtype != ref::DType::kFp8E4M3) return 0;
  return c.format == ref::ScaleFormat::kUe8m0 ? ref::num_packed_scales(c.hidden) : ref::num_scale_groups(c.hidden);
}

// Notify arguments of the case; the host counts go to *num_recv and *per_expert (sized to the local experts).
inline ncclMoeNotifyArgs_t notifyArgs(const HtCase& c, int capacity, int num_ranks, const DeviceBytes& idx, int T,
                                      int* num_recv, std::vector<int>* per_expert) {
  ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  na.topk_idx = idx.get();
  na.topk_idx_type = c.idx64 ? ncclMoeIndexInt64 : ncclMoeIndexInt32;
  na.num_tokens = T;
  na.topk = c.topk;
  na.expert_alignment = c.alignment;
  na.recv_capacity = c.worst_case ? num_ranks * capacity : 0;
  per_expert->assign(c.num_experts / num_ranks, -1);
  na.num_recv_tokens = num_recv;
  na.num_recv_tokens_per_expert = per_expert->data();
  return na;
}

// The notify's counts against the reference: the host counts in host-count mode (num_recv, per_expert as
// notifyArgs filled them), and in both modes the handle's device count, aligned per-expert counts and the source of
// every received row (ncclMoeHandleRecvCountDevice). Call after the notify completed.
inline void checkNotifyCounts(const HtCase& c, const ref::HtRankRecv& want, ncclMoeHandle_t handle, int num_recv,
                              const std::vector<int>& per_expert, int rank) {
  const int* d_count = nullptr;
  const int* d_per_expert = nullptr;
  const int* d_src_info = nullptr;
  ncclMoeHandleRecvCountDevice(handle, &d_count, &d_per_expert, &d_src_info);
  if (!c.worst_case) {
    EXPECT_EQ(want.num_recv, num_recv) << "rank " << rank;
    EXPECT_EQ(want.num_recv_per_expert, per_expert) << "rank " << rank;
  }
  int dev_count = -1;
  cudaMemcpy(&dev_count, d_count, 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(want.num_recv, dev_count) << "rank " << rank;
  std::vector<int> dev_pe(per_expert.size());
  cudaMemcpy(dev_pe.data(), d_per_expert, 4 * dev_pe.size(), cudaMemcpyDeviceToHost);
  EXPECT_EQ(want.num_recv_per_expert, dev_pe) << "rank " << rank;
  std::vector<int32_t> src(want.num_recv);
  if (want.num_recv > 0) cudaMemcpy(src.data(), d_src_info, 4 * src.size(), cudaMemcpyDeviceToHost);
  const long long i = firstDiff(src.data(), want.src_info.data(), src.size());
  EXPECT_EQ(-1, i) << "rank " << rank << " recv_src_info row " << i << ": 0x" << std::hex << (i < 0 ? 0 : src[i])
                   << " != 0x" << (i < 0 ? 0 : want.src_info[i]) << std::dec << rowSource(want, i);
}

// Dispatch arguments of the case from one rank's device inputs and outputs.
inline ncclMoeDispatchArgs_t dispatchArgs(const HtCase& c, const DispatchInputs& in, const DispatchOutputs& out) {
  const bool fp8 = c.dtype == ref::DType::kFp8E4M3;
  ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  da.x = in.x.get();
  da.dtype = fp8 ? ncclMoeFp8E4M3 : ncclMoeBfloat16;
  da.hidden = c.hidden;
  if (fp8) {
    da.x_scales = in.scales.get();
    da.scale_format = c.format == ref::ScaleFormat::kUe8m0 ? ncclMoeScaleUe8m0 : ncclMoeScaleFloat;
    da.x_scales_token_stride = in.token_stride;
    da.x_scales_channel_stride = in.word_stride;
    da.recv_x_scales = out.scales.get();
  }
  da.topk_weights = c.weights ? in.weights.as<float>() : nullptr;
  da.recv_x = out.x.get();
  da.recv_topk_idx = out.idx.get();
  da.recv_topk_weights = c.weights ? out.weights.as<float>() : nullptr;
  da.num_sms = c.num_sms;
  return da;
}

// " (held by ranks d0 d1 ...)": the ranks that received token t of rank s in `d` ("" for t < 0).
inline std::string tokenHolders(const ref::HtDispatch& d, int s, int t) {
  if (t < 0) return "";
  std::string out = " (held by ranks";
  for (int r = 0; r < d.num_ranks; ++r)
    if (d.send_pos[s][static_cast<size_t>(t) * d.num_ranks + r] >= 0) out += " " + std::to_string(r);
  return out + ")";
}

// One rank's combine: its inputs (expert outputs y of `rows` received rows, weights, biases) on the device, the
// outputs, and the arguments that name them.
struct CombineCall {
  DeviceBytes y, yw, b0, b1, out, out_w;
  ncclMoeCombineArgs_t args = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  int tokens = 0;

  CombineCall(const HtCase& c, const Expected& e, int rank, int rows) : tokens(e.routing.ranks[rank].num_tokens) {
    const size_t yrows = rows > 0 ? rows : 1, T = tokens, H = c.hidden, K = c.topk;
    y.allocate(yrows * H * 2);
    yw.allocate(yrows * K * 4);
    b0.allocate(T * H * 2 + 16);
    b1.allocate(T * H * 2 + 16);
    out.allocate(T * H * 2 + 16);
    out_w.allocate(T * K * 4 + 16);
    y.uploadBytes(e.y[rank]);
    yw.uploadBytes(e.yw[rank]);
    b0.uploadBytes(e.b0[rank]);
    b1.uploadBytes(e.b1[rank]);
    args.x = y.get();
    args.hidden = c.hidden;
    args.topk_weights = c.combine_weights ? yw.as<float>() : nullptr;
    args.combined_topk_weights = c.combine_weights ? out_w.as<float>() : nullptr;
    args.bias_0 = c.biases >= 1 ? b0.get() : nullptr;
    args.bias_1 = c.biases >= 2 ? b1.get() : nullptr;
    args.combined_x = out.get();
    args.num_sms = c.num_sms;
  }

  // The combined rows (and weights) against the reference, bitwise; with `hash`, both are folded into *hash
  // (htCombineHash folds the reference's the same way).
  void check(const HtCase& c, const Expected& e, int rank, uint64_t* hash = nullptr) const {
    const size_t H = c.hidden;
    auto got = out.download<uint16_t>(tokens * H);
    if (hash != nullptr) *hash = ref::fnv1a64(got, *hash);
    const long long i = firstDiff(got.data(), e.c.x[rank].data(), got.size());
    EXPECT_EQ(-1, i) << "rank " << rank << " combine token " << (i < 0 ? -1 : i / static_cast<long long>(H))
                     << " channel " << (i < 0 ? -1 : i % static_cast<long long>(H)) << ": " << (i < 0 ? 0 : got[i])
                     << " != " << (i < 0 ? 0 : e.c.x[rank][i])
                     << tokenHolders(e.d1, rank, i < 0 ? -1 : static_cast<int>(i / static_cast<long long>(H)));
    if (c.combine_weights) {
      auto gw = out_w.download<float>(static_cast<size_t>(tokens) * c.topk);
      EXPECT_EQ(-1, firstDiff(gw.data(), e.c.topk_weights[rank].data(), gw.size()))
          << "rank " << rank << " combined weights";
      if (hash != nullptr) *hash = ref::fnv1a64(gw, *hash);
    }
  }
};

// The hash CombineCall::check folds from the device outputs, folded from the reference's.
inline uint64_t htCombineHash(const HtCase& c, const Expected& e, int rank, uint64_t hash) {
  const size_t T = e.routing.ranks[rank].num_tokens;
  hash = ref::fnv1a64(e.c.x[rank].data(), T * c.hidden * 2, hash);
  if (c.combine_weights) hash = ref::fnv1a64(e.c.topk_weights[rank].data(), T * c.topk * 4, hash);
  return hash;
}

// Worst-case mode with a capacity 5 rows short on rank 0: the overflow is reported on rank 0 only and no row past
// the capacity is written. Runs whichever kernels NCCL_MOE_HT_KERNEL selects.
inline void checkCapacityOverflow(int n, Placement placement) {
  HtCase c;
  c.tokens = 64;
  c.num_experts = 32;
  c.topk = 4;
  c.hidden = 256;
  c.worst_case = true;
  const Expected e = makeExpected(c, n);
  const int short_capacity = e.d1.recv[0].num_recv - 5;
  ASSERT_GT(short_capacity, 0);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  world.runWithComms(caseConfig(c, c.tokens), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    RankSession session(world, rank, comm, stream);
    const ref::RankRouting& rr = e.routing.ranks[rank];
    const int capacity = rank == 0 ? short_capacity : n * c.tokens;
    const int H = c.hidden, K = c.topk, extra = 8;
    DeviceBytes idx(rr.topk_idx.size() * 8 + 16), x(static_cast<size_t>(rr.num_tokens) * H * 2 + 16);
    idx.uploadBytes(rr.topk_idx);
    x.uploadBytes(e.x1[rank].bf16);
    DeviceBytes rx(static_cast<size_t>(capacity + extra) * H * 2), ridx(static_cast<size_t>(capacity + extra) * K * 8);
    rx.fill(0x7b);
    ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
    na.topk_idx = idx.get();
    na.num_tokens = rr.num_tokens;
    na.topk = K;
    na.recv_capacity = capacity;
    session.call("notify", [&] { return ncclMoeDispatchNotify(comm, session.handle(), &na, stream); });
    ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
    da.x = x.get();
    da.hidden = H;
    da.recv_x = rx.get();
    da.recv_topk_idx = ridx.get();
    world.barrier().wait();
    EXPECT_EQ(ncclSuccess, ncclMoeDispatch(comm, session.handle(), &da, stream)) << ncclMoeGetLastError(comm);
    EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
    ncclResult_t async = ncclSuccess;
    ncclMoeCommGetAsyncError(comm, &async);
    if (rank == 0) {
      EXPECT_NE(ncclSuccess, async);
      const std::string msg = ncclMoeGetLastError(comm);
      EXPECT_NE(std::string::npos, msg.find("capacity")) << msg;
      auto got = rx.download<uint16_t>(static_cast<size_t>(capacity + extra) * H);
      const auto& want = e.d1.recv[0].x.bf16;
      EXPECT_EQ(-1, firstDiff(got.data(), want.data(), static_cast<size_t>(capacity) * H)) << "rows below capacity";
      for (size_t i = static_cast<size_t>(capacity) * H; i < got.size(); ++i) {
        if (got[i] != 0x7b7b) {
          ADD_FAILURE() << "row " << i / H << " past the capacity was written";
          break;
        }
      }
    } else {
      EXPECT_EQ(ncclSuccess, async) << ncclMoeGetLastError(comm);
    }
    world.barrier().wait();  // nobody frees its buffers while a peer may still read them
  });
}

// ---- Random back-to-back iterations (HtStress, tests/gpu/pressure_test.cc) ----

// The shape limits of a random iteration; the communicator is configured with them (randomConfig).
struct RandomLimits {
  int num_experts = 32, max_hidden = 256, max_topk = 8, capacity = 96;
};

inline ncclMoeConfig_t randomConfig(const RandomLimits& lim) {
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = lim.num_experts;
  config.hidden = lim.max_hidden;
  config.max_topk = lim.max_topk;
  config.max_tokens_per_rank = lim.capacity;
  return config;
}

// Random iteration `i` drawn from `rng` (the same stream for every rank): dtype and scale format, K, H, index type,
// alignment, worst-case mode, masked slots, skew, weights, biases, SMs, tokens, a zero-token rank. Its data come
// from `seed` (HtStress: 10000 + i).
inline HtCase randomCase(ref::Rng& rng, int i, uint64_t seed, const RandomLimits& lim, const World& world) {
  HtCase c;
  c.name = "iter" + std::to_string(i);
  c.num_experts = lim.num_experts;
  c.topk = 1 + static_cast<int>(rng.below(lim.max_topk));
  c.hidden = 16 * (1 + static_cast<int>(rng.below(lim.max_hidden / 16)));
  const int kind = static_cast<int>(rng.below(3));
  c.dtype = kind == 0 ? ref::DType::kBf16 : ref::DType::kFp8E4M3;
  c.format = kind == 2 ? ref::ScaleFormat::kUe8m0 : ref::ScaleFormat::kFloat;
  c.idx64 = rng.below(2) == 0;
  c.alignment = rng.below(2) == 0 ? 1 : 4;
  c.worst_case = rng.below(2) == 0;
  c.masked = rng.below(3) == 0 ? 0.3 : 0.0;
  c.skew = rng.below(4) == 0 ? 3.0 : 1.0;
  c.weights = rng.below(4) != 0;
  c.combine_weights = rng.below(2) == 0;
  c.biases = static_cast<int>(rng.below(3));
  c.num_sms = world.clampSms(1 + static_cast<int>(rng.below(32)));
  c.tokens = static_cast<int>(rng.below(lim.capacity + 1));
  c.zero_ranks = rng.below(8) == 0 ? 1 : 0;
  c.seed = seed;
  return c;
}

// The expected results of a random case (capacity: the communicator's max_tokens_per_rank; nodes: as makeExpected).
inline Expected randomExpected(const HtCase& c, int num_ranks, const RandomLimits& lim,
                               const ref::NodeMap* nodes = nullptr) {
  Expected e = makeExpected(c, num_ranks, nodes);
  e.capacity = lim.capacity;
  return e;
}

// One rank's share of one random iteration. Construct it (every device buffer the iteration needs, outputs at the
// largest row count) before the world's barrier; run() after it: notify, dispatch, cached re-dispatch of new data
// and combine enqueued back to back (with `step`, a stream synchronisation and a barrier between the calls),
// one synchronisation, then every output checked bitwise against the reference. Destroy it only after the barrier
// that follows the iteration: cudaFree synchronises the device, and a rank freeing while a peer has not yet
// enqueued its calls (the peer's kernels wait for them) deadlocks until the device timeout in a world of ranks
// sharing a GPU.
class RandomIteration {
 public:
  RandomIteration(const HtCase& c, const Expected& e, int rank, int num_ranks, int scale_layout)
      : c_(c),
        e_(e),
        rank_(rank),
        max_rows_(num_ranks * e.capacity),
        idx_(uploadIds(c, e.routing.ranks[rank])),
        cc_(c, e, rank, max_rows_) {
    const ref::RankRouting& rr = e.routing.ranks[rank];
    for (int pass = 0; pass < 2; ++pass) {
      uploadInputs(pass == 0 ? e.x1[rank] : e.x2[rank], rr, scale_layout, &in_[pass]);
      out_[pass].allocate(max_rows_, c.hidden, c.topk, c.dtype == ref::DType::kFp8E4M3, c.idx64, scaleWords(c));
    }
    na_ = notifyArgs(c, e.capacity, num_ranks, idx_, rr.num_tokens, &num_recv_, &per_expert_);
  }
  RandomIteration(const RandomIteration&) = delete;
  RandomIteration& operator=(const RandomIteration&) = delete;

  // The calls and checks (non-fatal, naming the rank and `tag`); false after a failure of the call or of the test so
  // far (gtest's flag is shared by the rank threads: compare the per-iteration hash for this rank's own). With `hash`,
  // every compared output is folded into *hash (checkDispatch, CombineCall::check); expectedHash folds the reference's.
  bool run(World& world, ncclMoeComm_t comm, ncclMoeHandle_t handle, cudaStream_t stream, bool step,
           const std::string& tag, uint64_t* hash = nullptr) {
    const int n = world.size();
    if (ncclMoeDispatchNotify(comm, handle, &na_, stream) != ncclSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << tag << " notify: " << ncclMoeGetLastError(comm);
      return false;
    }
    auto stepped = [&] {
      if (!step) return;
      cudaStreamSynchronize(stream);
      world.barrier().wait();
    };
    stepped();
    bool ok = true;
    for (int pass = 0; pass < 2 && ok; ++pass) {
      if (pass == 1) stepped();
      out_[pass].rows = c_.worst_case ? max_rows_ : num_recv_;
      const ncclMoeDispatchArgs_t da = dispatchArgs(c_, in_[pass], out_[pass]);
      if (ncclMoeDispatch(comm, handle, &da, stream) != ncclSuccess) {
        ADD_FAILURE() << "rank " << rank_ << " " << tag << " dispatch: " << ncclMoeGetLastError(comm);
        ok = false;
      }
    }
    stepped();
    if (ok && ncclMoeCombine(comm, handle, &cc_.args, stream) != ncclSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << tag << " combine: " << ncclMoeGetLastError(comm);
      ok = false;
    }
    if (!ok) return false;
    EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
    ncclResult_t async = ncclSuccess;
    ncclMoeCommGetAsyncError(comm, &async);
    if (async != ncclSuccess) {
      // The HT sync words of this rank (epoch of its last call, arrivals of every rank) for the diagnosis.
      nccl_moe::HtSync sync{};
      cudaMemcpy(&sync, comm->buffer + comm->layout.ht_region() + comm->layout.ht.sync(), sizeof(sync),
                 cudaMemcpyDeviceToHost);
      std::string arrive;
      for (int s = 0; s < n; ++s) arrive += " " + std::to_string(sync.arrive[s]);
      ADD_FAILURE() << "rank " << rank_ << " " << tag << ": " << ncclMoeGetLastError(comm) << " [epoch " << sync.epoch
                    << ", blocks_done " << sync.blocks_done << ", arrive" << arrive << ", num_sms " << c_.num_sms
                    << "]";
      return false;
    }
    SCOPED_TRACE(tag);
    checkDispatch(c_, e_.d1.recv[rank_], out_[0], rank_, (tag + " dispatch").c_str(), hash);
    checkDispatch(c_, e_.d2.recv[rank_], out_[1], rank_, (tag + " cached").c_str(), hash);
    cc_.check(c_, e_, rank_, hash);
    return !::testing::Test::HasFailure();  // the test's (any rank's) failures so far, as HtStress always had
  }

  // The hash run() folds from the device outputs, folded from the reference's.
  uint64_t expectedHash(uint64_t hash) const {
    hash = htDispatchHash(c_, e_.d1.recv[rank_], hash);
    hash = htDispatchHash(c_, e_.d2.recv[rank_], hash);
    return htCombineHash(c_, e_, rank_, hash);
  }

 private:
  const HtCase& c_;
  const Expected& e_;
  int rank_, max_rows_;
  DeviceBytes idx_;
  DispatchInputs in_[2];
  DispatchOutputs out_[2];
  CombineCall cc_;
  int num_recv_ = -1;
  std::vector<int> per_expert_;
  ncclMoeNotifyArgs_t na_{};
};

}  // namespace ht_test
