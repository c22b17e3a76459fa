// Pressure runs (issue 16, item 5): 10,000 random iterations per mode on one communicator, every iteration checked
// bitwise against the CPU reference, with a reproducible hash. Opt-in: every test here skips (saying so) unless
// NCCL_MOE_PRESSURE=1, so the default ctest run lists them as skipped; select them with the name pattern
// "Pressure" (GPU_TEST_REGEX=Pressure for scripts/device_session.sh, ctest -R Pressure).
//   Pressure.Ht            random HT shapes as HtStress draws them (ht_case.h randomCase / RandomIteration):
//                          notify, dispatch, cached re-dispatch, combine enqueued back to back;
//   Pressure.Ll            random LL problems as LlWorld.PressureLoop draws them (ll_case.h randomProblem):
//                          both-phase and split send/receive calls, zero-copy combine or not, two results in turn;
//   Pressure.HtLlAlternating  HT and LL iterations drawn at random on one communicator sized for both, with
//                          ncclMoeLowLatencyReset (collective) before every LL iteration that follows an HT one;
//   Pressure.HtWorstCaseGraph  HT worst-case mode (recv_capacity > 0): notify + dispatch + combine captured once
//                          per shape class in a CUDA graph, replayed with new data and routing each iteration (the
//                          same T per rank across replays), outputs refilled with a marker before every replay;
//   Pressure.LlMasked      Ll's random problems on a communicator with rank masks (enable_rank_masks = 1), in
//                          unmasked and masked periods drawn from the seed: a masked period leaves one rank out
//                          (never the previous period's; it makes no call), masked by the others with
//                          ncclMoeSetRankMask and checked against the reference with that rank masked; every rank
//                          then clears the mask (ncclMoeClearRankMask) and an unmasked period follows; each calling
//                          rank's mask (ncclMoeQueryRankMask) is checked after every iteration. R = 4 and 8 only
//                          (R = 2 skips, saying why: one active rank exchanges with nobody).
// Each runs at R = 2, 4 and 8 ranks (LlMasked at 4 and 8; all on GPU 0 when the machine has fewer GPUs,
// tests/gpu/gpu_world.h). Environment: NCCL_MOE_PRESSURE_ITERS (default 10000), NCCL_MOE_PRESSURE_SEED (default per
// mode). Every iteration's outputs (LlMasked: and the rank's mask; a masked rank adds nothing) are folded into an FNV
// hash per rank, and the reference's expected outputs into another the same way; the final line prints both (they must
// be equal; the same seed and iteration count give the same hash on any machine). Progress goes to stdout every ~5 s;
// the first mismatch prints its iteration, the seed and how to rerun just that far, and every rank stops after that
// iteration.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "ht_case.h"
#include "ll_case.h"

namespace {

namespace ref = nccl_moe::ref;
using gpu_test::Placement;
using gpu_test::World;
using harness::DeviceBytes;

// ---------------------------------------------------------------------------------------------------------
// Opt-in, iteration count, seed
// ---------------------------------------------------------------------------------------------------------

bool pressureRequested() {
  const char* v = std::getenv("NCCL_MOE_PRESSURE");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

int pressureIterations() {
  const char* v = std::getenv("NCCL_MOE_PRESSURE_ITERS");
  const int n = v != nullptr ? std::atoi(v) : 10000;
  return n > 0 ? n : 10000;
}

uint64_t pressureSeed(uint64_t fallback) {
  const char* v = std::getenv("NCCL_MOE_PRESSURE_SEED");
  return v != nullptr ? std::strtoull(v, nullptr, 0) : fallback;
}

#define PRESSURE_OR_SKIP(ranks, placement)                                                                     \
  do {                                                                                                         \
    if (!pressureRequested())                                                                                  \
      GTEST_SKIP() << "opt-in pressure run (10,000 iterations): set NCCL_MOE_PRESSURE=1 to run it"             \
                   << " (NCCL_MOE_PRESSURE_ITERS, NCCL_MOE_PRESSURE_SEED; docs/kernels-ht.md, Pressure runs)"; \
    GPU_WORLD_OR_SKIP(ranks, placement);                                                                       \
  } while (0)

// ---------------------------------------------------------------------------------------------------------
// The run's bookkeeping shared by the rank threads: progress, first mismatch, agreed stop, hashes
// ---------------------------------------------------------------------------------------------------------

class PressureRun {
 public:
  PressureRun(std::string mode, int ranks, int iterations, uint64_t seed)
      : mode_(std::move(mode)),
        ranks_(ranks),
        iterations_(iterations),
        seed_(seed),
        gpu_hash_(ranks, ref::kFnvOffset),
        ref_hash_(ranks, ref::kFnvOffset),
        start_(std::chrono::steady_clock::now()),
        last_print_(start_) {
    std::printf("[pressure %s R%d] seed %llu, %d iterations\n", mode_.c_str(), ranks_,
                static_cast<unsigned long long>(seed_), iterations_);
    std::fflush(stdout);
  }

  int iterations() const { return iterations_; }
  uint64_t seed() const { return seed_; }

  // Rank `rank` finished iteration `it` with these hashes of its outputs (device, reference). A difference is a
  // mismatch of this rank even when every element check passed (the hash covers what was compared).
  void record(int rank, int it, uint64_t gpu, uint64_t want, bool checks_ok, const std::string& what) {
    gpu_hash_[rank] = ref::mix_seed(gpu_hash_[rank], gpu);
    ref_hash_[rank] = ref::mix_seed(ref_hash_[rank], want);
    if (!checks_ok || gpu != want)
      fail(rank, it, what + (gpu != want ? " (output hash differs from the reference's)" : ""));
  }

  // The first failure is printed with its iteration and the seed; every rank stops after that iteration.
  void fail(int rank, int it, const std::string& what) {
    int cur = first_fail_.load();
    while (it < cur && !first_fail_.compare_exchange_weak(cur, it)) {
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (printed_fail_) return;
    printed_fail_ = true;
    std::printf(
        "[pressure %s R%d] FIRST MISMATCH at iteration %d (seed %llu), rank %d: %s\n"
        "[pressure %s R%d] rerun: NCCL_MOE_PRESSURE=1 NCCL_MOE_PRESSURE_SEED=%llu NCCL_MOE_PRESSURE_ITERS=%d\n",
        mode_.c_str(), ranks_, it, static_cast<unsigned long long>(seed_), rank, what.c_str(), mode_.c_str(), ranks_,
        static_cast<unsigned long long>(seed_), it + 1);
    std::fflush(stdout);
  }

  // After the barrier that ends iteration `it`: whether to stop. Every rank gets the same answer (a failure of a
  // later iteration cannot be recorded before every rank has passed that barrier).
  bool stopAfter(int it) const { return first_fail_.load() <= it; }
  bool failed() const { return first_fail_.load() != INT_MAX; }

  // Rank 0, after each iteration: one line every ~5 s.
  void progress(int done) {
    const auto now = std::chrono::steady_clock::now();
    if (std::chrono::duration<double>(now - last_print_).count() < 5.0) return;
    last_print_ = now;
    const double s = std::chrono::duration<double>(now - start_).count();
    std::printf("[pressure %s R%d] iteration %d/%d, %.1f s, %.1f iterations/s\n", mode_.c_str(), ranks_, done,
                iterations_, s, done / s);
    std::fflush(stdout);
  }

  // The final line: both hashes over every rank; they must be equal.
  void finish(int done) {
    uint64_t g = ref::kFnvOffset, w = ref::kFnvOffset;
    for (int r = 0; r < ranks_; ++r) {
      g = ref::mix_seed(g, gpu_hash_[r]);
      w = ref::mix_seed(w, ref_hash_[r]);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::printf("[pressure %s R%d] seed %llu, %d of %d iterations in %.1f s: hash %016llx (reference %016llx)%s\n",
                mode_.c_str(), ranks_, static_cast<unsigned long long>(seed_), done, iterations_, s,
                static_cast<unsigned long long>(g), static_cast<unsigned long long>(w),
                first_fail_.load() == INT_MAX ? "" : " STOPPED AT THE FIRST MISMATCH");
    std::fflush(stdout);
    EXPECT_EQ(iterations_, done) << "stopped early";
    EXPECT_EQ(w, g) << "output hash differs from the reference's";
  }

 private:
  std::string mode_;
  int ranks_, iterations_;
  uint64_t seed_;
  std::vector<uint64_t> gpu_hash_, ref_hash_;  // one per rank, written only by its thread
  std::chrono::steady_clock::time_point start_, last_print_;
  std::atomic<int> first_fail_{INT_MAX};
  std::mutex mu_;
  bool printed_fail_ = false;
};

// The expected results of the iterations, computed by the rank threads in chunks: at the first iteration of a
// chunk every rank computes its share (slot j of the chunk on rank j % R), then a barrier. The slots are reused by
// the next chunk, which starts only after the barrier that ends the last iteration of this one.
template <typename Exp>
class ChunkedExpectations {
 public:
  static constexpr int kChunk = 16;
  explicit ChunkedExpectations(World& world) : world_(world), slots_(kChunk) {}

  // make(it) -> Exp for iteration it; called by every rank at every iteration (before its allocations).
  template <typename Make>
  const Exp& at(int rank, int it, int iterations, Make make) {
    if (it % kChunk == 0) {
      for (int j = rank; j < kChunk && it + j < iterations; j += world_.size()) slots_[j] = make(it + j);
      world_.barrier().wait();
    }
    return slots_[it % kChunk];
  }

 private:
  World& world_;
  std::vector<Exp> slots_;
};

// ---------------------------------------------------------------------------------------------------------
// HT iterations (shared by Ht and HtLlAlternating)
// ---------------------------------------------------------------------------------------------------------

struct HtPlanned {
  ht_test::HtCase c;
  ht_test::Expected e;
};

// One HT iteration on `rank` (its barriers included): allocate, barrier, calls and checks, barrier, free, barrier.
void htIteration(PressureRun& run, World& world, int rank, int it, const HtPlanned& p, ncclMoeComm_t comm,
                 ncclMoeHandle_t handle, cudaStream_t stream) {
  std::unique_ptr<ht_test::RandomIteration> iter;
  bool ok = true;
  try {
    iter = std::make_unique<ht_test::RandomIteration>(p.c, p.e, rank, world.size(), it % 3);
  } catch (const std::exception& ex) {
    ADD_FAILURE() << "rank " << rank << " iteration " << it << ": " << ex.what();
    ok = false;
  }
  world.barrier().wait();
  const std::string tag =
      "iteration " + std::to_string(it) + " (HT " + p.c.name + ", data seed " + std::to_string(p.c.seed) + ")";
  uint64_t gpu = ref::kFnvOffset;
  if (ok) ok = iter->run(world, comm, handle, stream, false, tag, &gpu);
  run.record(rank, it, gpu, iter ? iter->expectedHash(ref::kFnvOffset) : 0, ok, tag);
  world.barrier().wait();  // every rank's calls are done before anyone frees (cudaFree waits for the device)
  iter.reset();
  // ... and every rank's frees are done before anyone launches a kernel that waits for a peer: a cudaFree still
  // waiting for the device behind a peer's spinning kernel (an LL reset's barrier right after this iteration in
  // HtLlAlternating) would hold the rank that kernel waits for until the device timeout.
  world.barrier().wait();
}

// The HT limits of the pressure runs: HtStress's, with the experts of the communicator.
ht_test::RandomLimits htLimits(int num_experts) {
  ht_test::RandomLimits lim;
  lim.num_experts = num_experts;
  return lim;
}

// ---------------------------------------------------------------------------------------------------------
// LL iterations (shared by Ll and HtLlAlternating)
// ---------------------------------------------------------------------------------------------------------

struct LlPlanned {
  bool split = false, zero_copy = false;
  ll_test::Expected ex;
};

// "none masked" or "rank r masked" (the ranks with mask[r] = 1).
std::string maskLabel(const std::vector<int>& mask) {
  std::string s;
  for (size_t r = 0; r < mask.size(); ++r)
    if (mask[r] != 0) s += (s.empty() ? "rank " : ", ") + std::to_string(r);
  return s.empty() ? "none masked" : s + " masked";
}

// One LL iteration on `rank` into `res` (no allocation): outputs marked, calls, checks, barrier. With
// `expect_mask` (a communicator with rank masks; LlMasked), the rank's mask is read after the calls
// (ncclMoeQueryRankMask into host memory) and must equal it; both go into the hashes after the outputs.
void llIteration(PressureRun& run, World& world, ll_test::Rank& rk, ll_test::RankResult& res, int it,
                 const LlPlanned& p, const std::vector<int>* expect_mask = nullptr) {
  const int rank = rk.rank;
  const std::string what = "iteration " + std::to_string(it) + " (LL " + std::string(p.split ? "split" : "both") +
                           (p.zero_copy ? ", zero-copy" : "") + ", " + ll_test::describe(p.ex.pb) +
                           (expect_mask != nullptr ? ", " + maskLabel(*expect_mask) : "") + ")";
  uint64_t gpu = ref::kFnvOffset, want = ref::kFnvOffset;
  bool ok = true;
  {
    // Every rank makes every call of the iteration whatever happened elsewhere (a failure stops the run after
    // this iteration, on every rank): a rank that skipped a call would leave its peers waiting for the timeout.
    // A write the kernels owe and skip shows as the marker, not as an older result.
    cudaMemsetAsync(res.recv_count.get(), 0xff, res.recv_count.bytes(), rk.stream);
    cudaMemsetAsync(res.recv_x.get(), 0xff, res.recv_x.bytes(), rk.stream);
    cudaMemsetAsync(res.out.get(), 0xff, res.out.bytes(), rk.stream);
    [&] {
      rk.uploadInputs(p.ex, res);
      rk.dispatch(p.ex, res, p.split ? ncclMoePhaseSend : ncclMoePhaseBoth);
      if (p.split) rk.dispatch(p.ex, res, ncclMoePhaseRecv);
      gpu = ref::mix_seed(gpu, rk.checkDispatch(p.ex, res, what));
      rk.uploadExpertOutputs(p.ex, res, p.zero_copy);
      rk.combine(p.ex, res, p.split ? ncclMoePhaseSend : ncclMoePhaseBoth, p.zero_copy);
      if (p.split) rk.combine(p.ex, res, ncclMoePhaseRecv, p.zero_copy);
      gpu = ref::mix_seed(gpu, rk.checkCombine(p.ex, res, what));
    }();
    if (expect_mask != nullptr) {
      std::vector<int> got(expect_mask->size(), -1);
      if (ncclMoeQueryRankMask(rk.comm, got.data(), 0, rk.stream) != ncclSuccess)
        ADD_FAILURE() << "rank " << rank << " " << what << ": ncclMoeQueryRankMask: " << ncclMoeGetLastError(rk.comm);
      EXPECT_EQ(*expect_mask, got) << "rank " << rank << " " << what << ": the rank's mask after the calls";
      gpu = ref::mix_seed(gpu, ref::fnv1a64(got));
    }
    ncclResult_t async = ncclSuccess;
    ncclMoeCommGetAsyncError(rk.comm, &async);
    if (async != ncclSuccess) ADD_FAILURE() << "rank " << rank << " " << what << ": " << ncclMoeGetLastError(rk.comm);
    ok = !::testing::Test::HasFailure();
  }
  want = ref::mix_seed(want, ll_test::refDispatchHash(p.ex, rank));
  want = ref::mix_seed(want, ref::fnv1a64(p.ex.out[rank]));
  if (expect_mask != nullptr) want = ref::mix_seed(want, ref::fnv1a64(*expect_mask));
  run.record(rank, it, gpu, want, ok, what);
  world.barrier().wait();
}

// The LL limits of the pressure runs: LlWorld's test config (E = 8 R, H <= 640, K <= 16, 24 tokens).
LlPlanned planLl(int n, uint64_t seed, int it, ref::Rng& rng) {
  LlPlanned p;
  const ll_test::Problem pb = ll_test::randomProblem(n, seed, it, rng, &p.split, &p.zero_copy);
  p.ex.pb = pb;  // the expected results are computed later, by the rank threads (ChunkedExpectations)
  return p;
}

// ---------------------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------------------

class Pressure : public ::testing::TestWithParam<int> {};

// HT: random shapes as HtStress draws them, 10,000 iterations.
TEST_P(Pressure, Ht) {
  const int n = GetParam();
  Placement placement;
  PRESSURE_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  const ht_test::RandomLimits lim = htLimits(32);
  PressureRun run("ht", n, pressureIterations(), pressureSeed(4242));
  std::vector<ht_test::HtCase> cases(run.iterations());
  ref::Rng rng(run.seed());
  for (int i = 0; i < run.iterations(); ++i)
    cases[i] = ht_test::randomCase(rng, i, ref::mix_seed(run.seed(), static_cast<uint64_t>(i)), lim, world);
  ChunkedExpectations<HtPlanned> plan(world);
  int done = 0;
  world.runWithComms(ht_test::randomConfig(lim), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle)) << ncclMoeGetLastError(comm);
    for (int it = 0; it < run.iterations(); ++it) {
      const HtPlanned& p = plan.at(rank, it, run.iterations(), [&](int i) {
        return HtPlanned{cases[i], ht_test::randomExpected(cases[i], n, lim)};
      });
      htIteration(run, world, rank, it, p, comm, handle, stream);
      if (rank == 0) {
        done = it + 1;
        run.progress(done);
      }
      if (run.stopAfter(it)) break;
    }
    world.barrier().wait();
    if (handle != nullptr) ncclMoeHandleDestroy(handle);
  });
  run.finish(done);
}

// LL: random problems as LlWorld.PressureLoop draws them, both-phase and split, zero-copy or not.
TEST_P(Pressure, Ll) {
  const int n = GetParam();
  Placement placement;
  PRESSURE_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  PressureRun run("ll", n, pressureIterations(), pressureSeed(20240601ull));
  std::vector<LlPlanned> plans(run.iterations());
  ref::Rng rng(run.seed());
  for (int i = 0; i < run.iterations(); ++i) plans[i] = planLl(n, run.seed(), i, rng);
  ChunkedExpectations<LlPlanned> plan(world);
  const ncclMoeConfig_t config = ll_test::testConfig(n);
  int done = 0;
  world.runWithComms(config, [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ll_test::Rank rk;
    rk.init(rank, comm, stream, config);
    ll_test::RankResult res[2];
    rk.allocResult(res[0]);
    rk.allocResult(res[1]);
    world.barrier().wait();
    for (int it = 0; it < run.iterations(); ++it) {
      const LlPlanned& p = plan.at(rank, it, run.iterations(), [&](int i) {
        LlPlanned q = plans[i];
        q.ex = ll_test::makeExpected(plans[i].ex.pb);
        return q;
      });
      llIteration(run, world, rk, res[it % 2], it, p);
      if (rank == 0) {
        done = it + 1;
        run.progress(done);
      }
      if (run.stopAfter(it)) break;
    }
    world.barrier().wait();
    rk.freeResult(res[0]);
    rk.freeResult(res[1]);
  });
  run.finish(done);
}

// LL with rank masks (config.enable_rank_masks = 1): unmasked and masked periods in turn, drawn from the seed. A
// masked period leaves one rank out (drawn, never the previous period's): the other ranks mask it with
// ncclMoeSetRankMask before its first iteration (the rank itself makes no call at all, as in ll_mask_test.cc
// SetMaskLeavesARankOutThenClearBringsItBack, and only meets the host barriers), and its LL iterations run among the
// active ranks against the reference with that rank masked (ll_case.h makeExpected with a rank mask). The first
// iteration after it (or the end of the run) clears the mask with ncclMoeClearRankMask on every rank (the masked one
// rejoins), and the unmasked period runs against the full reference. After every LL iteration each calling rank reads
// its mask (ncclMoeQueryRankMask) and compares it with the period's. R = 2 is skipped: one active rank exchanges with
// nobody.
constexpr int kMaxUnmaskedPeriod = 40;  // iterations, 1 to this many
constexpr int kMaxMaskedPeriod = 60;

TEST_P(Pressure, LlMasked) {
  const int n = GetParam();
  if (n < 4)
    GTEST_SKIP() << "masked ranks need R >= 4: at R = 2, masking one rank leaves one active rank whose LL calls "
                    "exchange with nobody but itself, so LlMasked runs at R = 4 and 8 only";
  Placement placement;
  PRESSURE_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  PressureRun run("ll-mask", n, pressureIterations(), pressureSeed(77007ull));
  struct Planned {
    int masked = -1;                  // the rank left out of this iteration, -1: none
    bool set = false, clear = false;  // before it: the active ranks set the mask / every rank clears it
    LlPlanned ll;
  };
  std::vector<Planned> plans(run.iterations());
  // The problems as Ll draws them (the same stream for the same seed); the periods from a stream of their own.
  ref::Rng rng(run.seed());
  for (int i = 0; i < run.iterations(); ++i) plans[i].ll = planLl(n, run.seed(), i, rng);
  ref::Rng period_rng(ref::mix_seed(run.seed(), 0x6d61736bull));
  for (int i = 0, prev = -1; i < run.iterations();) {
    const int unmasked = 1 + static_cast<int>(period_rng.below(kMaxUnmaskedPeriod));
    if (i > 0) plans[i].clear = true;  // i > 0: a masked period ends here
    for (int j = 0; j < unmasked && i < run.iterations(); ++j) plans[i++].masked = -1;
    if (i == run.iterations()) break;
    const int r =
        prev < 0 ? static_cast<int>(period_rng.below(n)) : (prev + 1 + static_cast<int>(period_rng.below(n - 1))) % n;
    const int masked = 1 + static_cast<int>(period_rng.below(kMaxMaskedPeriod));
    plans[i].set = true;
    for (int j = 0; j < masked && i < run.iterations(); ++j) plans[i++].masked = r;
    prev = r;
  }
  ChunkedExpectations<Planned> plan(world);
  ncclMoeConfig_t config = ll_test::testConfig(n);
  config.enable_rank_masks = 1;
  int done = 0;
  world.runWithComms(config, [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ll_test::Rank rk;
    rk.init(rank, comm, stream, config);
    ll_test::RankResult res[2];
    rk.allocResult(res[0]);
    rk.allocResult(res[1]);
    world.barrier().wait();
    int ll_calls = 0, last = -1;
    std::vector<int> mask(n, 0);
    for (int it = 0; it < run.iterations(); ++it) {
      const Planned& p = plan.at(rank, it, run.iterations(), [&](int i) {
        Planned q = plans[i];
        std::vector<uint8_t> m(n, 0);
        if (q.masked >= 0) m[q.masked] = 1;
        q.ll.ex = ll_test::makeExpected(plans[i].ll.ex.pb, q.masked >= 0 ? &m : nullptr);
        return q;
      });
      last = it;
      std::fill(mask.begin(), mask.end(), 0);
      if (p.masked >= 0) mask[p.masked] = 1;
      // Both after the barrier that ended the previous iteration on every rank.
      if (p.clear && ncclMoeClearRankMask(comm, stream) != ncclSuccess)  // collective over every rank
        run.fail(rank, it, std::string("ncclMoeClearRankMask: ") + ncclMoeGetLastError(comm));
      if (p.set && rank != p.masked && ncclMoeSetRankMask(comm, mask.data(), stream) != ncclSuccess)
        run.fail(rank, it, "ncclMoeSetRankMask (" + maskLabel(mask) + "): " + ncclMoeGetLastError(comm));
      if (rank == p.masked)
        world.barrier().wait();  // left out: no call of any kind (a CUDA call could wait for the others' kernels)
      else
        llIteration(run, world, rk, res[ll_calls++ % 2], it, p.ll, &mask);
      if (rank == 0) {
        done = it + 1;
        run.progress(done);
      }
      if (run.stopAfter(it)) break;
    }
    world.barrier().wait();
    // A run that ends in a masked period ends it too: every rank clears the mask, then every mask must be all 0.
    // Not after a failure (the same answer on every rank after the barrier): a rank's calls may be unfinished.
    if (last >= 0 && plans[last].masked >= 0 && !run.failed()) {
      EXPECT_EQ(ncclSuccess, ncclMoeClearRankMask(comm, stream))
          << "rank " << rank << " final clear: " << ncclMoeGetLastError(comm);
      std::vector<int> got(n, -1);
      EXPECT_EQ(ncclSuccess, ncclMoeQueryRankMask(comm, got.data(), 0, stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(std::vector<int>(n, 0), got) << "rank " << rank << ": the mask after the final clear";
      world.barrier().wait();
    }
    rk.freeResult(res[0]);
    rk.freeResult(res[1]);
  });
  int periods = 0, masked_its = 0;
  std::vector<int> per_rank(n, 0);
  for (int i = 0; i < done; ++i) {
    if (plans[i].set) {
      ++periods;
      ++per_rank[plans[i].masked];
    }
    if (plans[i].masked >= 0) ++masked_its;
  }
  std::string by_rank;
  for (int r = 0; r < n; ++r) by_rank += (r == 0 ? "" : " ") + std::to_string(per_rank[r]);
  std::printf(
      "[pressure ll-mask R%d] %d masked periods (per rank: %s), %d of %d iterations with a rank masked; each set by "
      "the active ranks (ncclMoeSetRankMask), cleared by all (ncclMoeClearRankMask)\n",
      n, periods, by_rank.c_str(), masked_its, done);
  run.finish(done);
}

// HT and LL drawn at random (one in two) on one communicator sized for both: HT's limits (E = 8 R, H <= 256,
// K <= 8, 96 tokens) inside LL's (H <= 640, K <= 16, 24 LL tokens). Every LL iteration that follows an HT one
// starts with ncclMoeLowLatencyReset on every rank (include/nccl_moe.h: needed when switching from HT back to LL).
TEST_P(Pressure, HtLlAlternating) {
  const int n = GetParam();
  Placement placement;
  PRESSURE_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  const ht_test::RandomLimits lim = htLimits(8 * n);
  ncclMoeConfig_t config = ll_test::testConfig(n);
  config.max_tokens_per_rank = lim.capacity;
  PressureRun run("ht-ll", n, pressureIterations(), pressureSeed(16005ull));
  struct Planned {
    bool ht = false;
    HtPlanned h;
    LlPlanned ll;
  };
  std::vector<Planned> plans(run.iterations());
  ref::Rng rng(run.seed());
  for (int i = 0; i < run.iterations(); ++i) {
    Planned& p = plans[i];
    p.ht = rng.below(2) == 0;
    if (p.ht)
      p.h.c = ht_test::randomCase(rng, i, ref::mix_seed(run.seed(), static_cast<uint64_t>(i)), lim, world);
    else
      p.ll = planLl(n, run.seed(), i, rng);
  }
  ChunkedExpectations<Planned> plan(world);
  int done = 0, resets = 0;
  world.runWithComms(config, [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle)) << ncclMoeGetLastError(comm);
    ll_test::Rank rk;
    rk.init(rank, comm, stream, config);
    ll_test::RankResult res[2];
    rk.allocResult(res[0]);
    rk.allocResult(res[1]);
    world.barrier().wait();
    bool after_ht = false;
    int ll_calls = 0;
    for (int it = 0; it < run.iterations(); ++it) {
      const Planned& p = plan.at(rank, it, run.iterations(), [&](int i) {
        Planned q = plans[i];
        if (q.ht)
          q.h.e = ht_test::randomExpected(q.h.c, n, lim);
        else
          q.ll.ex = ll_test::makeExpected(q.ll.ex.pb);
        return q;
      });
      if (p.ht) {
        htIteration(run, world, rank, it, p.h, comm, handle, stream);
        after_ht = true;
      } else {
        if (after_ht) {
          // Collective (device barriers over every rank): every rank calls it, after the HT iteration's barrier.
          if (ncclMoeLowLatencyReset(comm, stream) != ncclSuccess)
            run.fail(rank, it, std::string("ncclMoeLowLatencyReset: ") + ncclMoeGetLastError(comm));
          if (rank == 0) ++resets;
          after_ht = false;
        }
        llIteration(run, world, rk, res[ll_calls++ % 2], it, p.ll);
      }
      if (rank == 0) {
        done = it + 1;
        run.progress(done);
      }
      if (run.stopAfter(it)) break;
    }
    world.barrier().wait();
    rk.freeResult(res[0]);
    rk.freeResult(res[1]);
    if (handle != nullptr) ncclMoeHandleDestroy(handle);
  });
  std::printf("[pressure ht-ll R%d] %d switches from HT back to LL (each after ncclMoeLowLatencyReset)\n", n, resets);
  run.finish(done);
}

// ---------------------------------------------------------------------------------------------------------
// HT worst-case mode under CUDA graphs
// ---------------------------------------------------------------------------------------------------------

// The fixed part of a graph's shape class (the pointers and sizes its capture bakes in); routing (masked slots,
// skew, empty tokens) and data change every replay. Every rank has `tokens` tokens in every replay.
ht_test::HtCase graphClass(int k, const World& world) {
  ht_test::HtCase c;
  c.name = "class" + std::to_string(k);
  c.num_experts = 32;
  c.worst_case = true;
  c.alignment = 1;
  c.zero_ranks = 0;
  c.scale_layout = 0;
  switch (k) {
    case 0:  // bf16, weights both ways, two biases
      c.hidden = 256, c.topk = 8, c.tokens = 128, c.biases = 2, c.num_sms = 8;
      break;
    case 1:  // fp8 with float scales, int32 ids, no combine weights, one bias
      c.dtype = ref::DType::kFp8E4M3, c.hidden = 512, c.topk = 4, c.tokens = 64, c.idx64 = false;
      c.combine_weights = false, c.biases = 1, c.num_sms = 4;
      break;
    case 2:  // fp8 with ue8m0 scales, no dispatch weights
      c.dtype = ref::DType::kFp8E4M3, c.format = ref::ScaleFormat::kUe8m0, c.hidden = 384, c.topk = 6;
      c.tokens = 96, c.weights = false, c.num_sms = 16;
      break;
    case 3:  // one token of top-1 on one SM
      c.hidden = 128, c.topk = 1, c.tokens = 1, c.num_sms = 1;
      break;
    default:  // many SMs, few channels
      c.hidden = 64, c.topk = 8, c.tokens = 32, c.idx64 = false, c.biases = 1, c.num_sms = 32;
      break;
  }
  c.num_sms = world.clampSms(c.num_sms);
  return c;
}
constexpr int kGraphClasses = 5;

// One rank's graph of one class: buffers at fixed addresses, the captured notify + dispatch + combine.
class GraphClassRank {
 public:
  GraphClassRank(const ht_test::HtCase& c, int rank, int num_ranks) : c_(c), rank_(rank), rows_(num_ranks * c.tokens) {
    const size_t T = c.tokens, H = c.hidden, K = c.topk;
    const bool fp8 = c.dtype == ref::DType::kFp8E4M3;
    idx_.allocate(T * K * 8 + 16);
    in_.x.allocate(T * (fp8 ? H : 2 * H) + 16);
    in_.scales.allocate(T * ht_test::scaleWords(c) * 4 + 16);
    in_.weights.allocate(T * K * 4 + 16);
    out_.allocate(rows_, c.hidden, c.topk, fp8, c.idx64, ht_test::scaleWords(c));
    y_.allocate(static_cast<size_t>(rows_) * H * 2 + 16);
    yw_.allocate(static_cast<size_t>(rows_) * K * 4 + 16);
    b0_.allocate(T * H * 2 + 16);
    b1_.allocate(T * H * 2 + 16);
    comb_.allocate(T * H * 2 + 16);
    comb_w_.allocate(T * K * 4 + 16);
  }
  GraphClassRank(const GraphClassRank&) = delete;
  GraphClassRank& operator=(const GraphClassRank&) = delete;
  ~GraphClassRank() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
    if (handle_ != nullptr) ncclMoeHandleDestroy(handle_);
  }

  // Captures notify (worst-case: recv_capacity = R * T, no host counts) + dispatch + combine; false (reported)
  // on failure. Nothing runs: no barrier needed.
  bool capture(ncclMoeComm_t comm, cudaStream_t stream) {
    if (ncclMoeHandleCreate(comm, &handle_) != ncclSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << c_.name << " handle: " << ncclMoeGetLastError(comm);
      return false;
    }
    ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
    na.topk_idx = idx_.get();
    na.topk_idx_type = c_.idx64 ? ncclMoeIndexInt64 : ncclMoeIndexInt32;
    na.num_tokens = c_.tokens;
    na.topk = c_.topk;
    na.expert_alignment = c_.alignment;
    na.recv_capacity = rows_;
    const ncclMoeDispatchArgs_t da = ht_test::dispatchArgs(c_, in_, out_);
    ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
    ca.x = y_.get();
    ca.hidden = c_.hidden;
    ca.topk_weights = c_.combine_weights ? yw_.as<float>() : nullptr;
    ca.combined_topk_weights = c_.combine_weights ? comb_w_.as<float>() : nullptr;
    ca.bias_0 = c_.biases >= 1 ? b0_.get() : nullptr;
    ca.bias_1 = c_.biases >= 2 ? b1_.get() : nullptr;
    ca.combined_x = comb_.get();
    ca.num_sms = c_.num_sms;
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << c_.name << ": capture did not begin";
      return false;
    }
    ncclResult_t r1 = ncclMoeDispatchNotify(comm, handle_, &na, stream);
    ncclResult_t r2 = r1 == ncclSuccess ? ncclMoeDispatch(comm, handle_, &da, stream) : r1;
    ncclResult_t r3 = r2 == ncclSuccess ? ncclMoeCombine(comm, handle_, &ca, stream) : r2;
    const cudaError_t end = cudaStreamEndCapture(stream, &graph_);
    if (r3 != ncclSuccess || end != cudaSuccess || cudaGraphInstantiate(&exec_, graph_, 0) != cudaSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << c_.name << " capture: " << ncclMoeGetLastError(comm) << " / "
                    << cudaGetErrorString(end);
      return false;
    }
    return true;
  }

  // New routing and data of one replay into the fixed buffers, outputs refilled with markers (before the barrier).
  void upload(const ht_test::Expected& e) {
    const ref::RankRouting& rr = e.routing.ranks[rank_];
    if (c_.idx64)
      idx_.uploadBytes(rr.topk_idx);
    else
      idx_.uploadBytes(ht_test::toInt32(rr.topk_idx));
    const ref::Rows& x = e.x1[rank_];
    if (c_.dtype == ref::DType::kBf16) {
      in_.x.uploadBytes(x.bf16);
    } else {
      in_.x.uploadBytes(x.fp8);
      in_.scales.uploadBytes(ht_test::stridedScales(x, 0, 0));
    }
    if (c_.weights) in_.weights.uploadBytes(rr.topk_weights);
    y_.uploadBytes(e.y[rank_]);
    yw_.uploadBytes(e.yw[rank_]);
    b0_.uploadBytes(e.b0[rank_]);
    b1_.uploadBytes(e.b1[rank_]);
    for (DeviceBytes* b : {&out_.x, &out_.scales, &comb_, &comb_w_}) b->fill(0xff);
    out_.idx.fill(0x55);
    out_.weights.fill(0x55);
  }

  // One replay, then its checks (device counts, every dispatch field, combine); false after a failure.
  bool replay(ncclMoeComm_t comm, cudaStream_t stream, const ht_test::Expected& e, const std::string& tag,
              uint64_t* hash) {
    if (cudaGraphLaunch(exec_, stream) != cudaSuccess || cudaStreamSynchronize(stream) != cudaSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << tag << ": graph launch failed";
      return false;
    }
    ncclResult_t async = ncclSuccess;
    ncclMoeCommGetAsyncError(comm, &async);
    if (async != ncclSuccess) {
      ADD_FAILURE() << "rank " << rank_ << " " << tag << ": " << ncclMoeGetLastError(comm);
      return false;
    }
    SCOPED_TRACE(tag);
    const ref::HtRankRecv& want = e.d1.recv[rank_];
    const int* d_count = nullptr;
    const int* d_per_expert = nullptr;
    ncclMoeHandleRecvCountDevice(handle_, &d_count, &d_per_expert, nullptr);
    int count = -1;
    std::vector<int> per_expert(want.num_recv_per_expert.size(), -1);
    cudaMemcpy(&count, d_count, 4, cudaMemcpyDeviceToHost);
    if (!per_expert.empty()) cudaMemcpy(per_expert.data(), d_per_expert, 4 * per_expert.size(), cudaMemcpyDeviceToHost);
    EXPECT_EQ(want.num_recv, count) << "rank " << rank_ << " device recv count";
    EXPECT_EQ(want.num_recv_per_expert, per_expert) << "rank " << rank_ << " device per-expert counts";
    *hash = ref::fnv1a64(&count, 4, *hash);
    *hash = ref::fnv1a64(per_expert, *hash);
    if (count != want.num_recv) return false;
    ht_test::checkDispatch(c_, want, out_, rank_, (tag + " dispatch").c_str(), hash);
    checkCombine(e, hash);
    return !::testing::Test::HasFailure();
  }

  // The hash replay() folds, from the reference.
  uint64_t expectedHash(const ht_test::Expected& e) const {
    const ref::HtRankRecv& want = e.d1.recv[rank_];
    uint64_t h = ref::fnv1a64(&want.num_recv, 4);
    h = ref::fnv1a64(want.num_recv_per_expert, h);
    h = ht_test::htDispatchHash(c_, want, h);
    return ht_test::htCombineHash(c_, e, rank_, h);
  }

 private:
  void checkCombine(const ht_test::Expected& e, uint64_t* hash) const {
    const size_t T = c_.tokens, H = c_.hidden;
    auto got = comb_.download<uint16_t>(T * H);
    const long long i = ht_test::firstDiff(got.data(), e.c.x[rank_].data(), got.size());
    EXPECT_EQ(-1, i) << "rank " << rank_ << " combine token " << (i < 0 ? -1 : i / static_cast<long long>(H));
    *hash = ref::fnv1a64(got, *hash);
    if (c_.combine_weights) {
      auto gw = comb_w_.download<float>(T * c_.topk);
      EXPECT_EQ(-1, ht_test::firstDiff(gw.data(), e.c.topk_weights[rank_].data(), gw.size()))
          << "rank " << rank_ << " combined weights";
      *hash = ref::fnv1a64(gw, *hash);
    }
  }

  ht_test::HtCase c_;
  int rank_, rows_;
  DeviceBytes idx_;
  ht_test::DispatchInputs in_;
  ht_test::DispatchOutputs out_;
  DeviceBytes y_, yw_, b0_, b1_, comb_, comb_w_;
  ncclMoeHandle_t handle_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

TEST_P(Pressure, HtWorstCaseGraph) {
  const int n = GetParam();
  Placement placement;
  PRESSURE_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  std::vector<ht_test::HtCase> classes;
  int max_tokens = 1, max_hidden = 16, max_topk = 1;
  for (int k = 0; k < kGraphClasses; ++k) {
    classes.push_back(graphClass(k, world));
    max_tokens = std::max(max_tokens, classes.back().tokens);
    max_hidden = std::max(max_hidden, classes.back().hidden);
    max_topk = std::max(max_topk, classes.back().topk);
  }
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = classes[0].num_experts;
  config.hidden = max_hidden;
  config.max_topk = max_topk;
  config.max_tokens_per_rank = max_tokens;
  PressureRun run("ht-graph", n, pressureIterations(), pressureSeed(90001ull));
  // Per iteration: the class, and the routing of this replay (masked slots, skew, empty tokens) with new data.
  std::vector<ht_test::HtCase> cases(run.iterations());
  std::vector<int> class_of(run.iterations());
  ref::Rng rng(run.seed());
  for (int i = 0; i < run.iterations(); ++i) {
    class_of[i] = static_cast<int>(rng.below(kGraphClasses));
    ht_test::HtCase c = classes[class_of[i]];
    c.masked = rng.below(3) == 0 ? 0.3 : 0.0;
    c.skew = rng.below(4) == 0 ? 3.0 : 1.0;
    c.empty = rng.below(5) == 0 ? 0.2 : 0.0;
    c.seed = ref::mix_seed(run.seed(), static_cast<uint64_t>(i));
    c.name += " replay " + std::to_string(i);
    cases[i] = c;
  }
  ChunkedExpectations<ht_test::Expected> plan(world);
  int done = 0;
  world.runWithComms(config, [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    std::vector<std::unique_ptr<GraphClassRank>> graphs;
    bool ok = true;
    for (int k = 0; k < kGraphClasses && ok; ++k) {
      graphs.push_back(std::make_unique<GraphClassRank>(classes[k], rank, n));
      ok = graphs.back()->capture(comm, stream);
    }
    if (!ok) run.fail(rank, 0, "capture failed");
    world.barrier().wait();
    const int iterations = run.failed() ? 0 : run.iterations();  // the same on every rank (after the barrier)
    for (int it = 0; it < iterations; ++it) {
      const ht_test::Expected& e =
          plan.at(rank, it, run.iterations(), [&](int i) { return ht_test::makeExpected(cases[i], n); });
      GraphClassRank& g = *graphs[class_of[it]];
      g.upload(e);
      world.barrier().wait();  // every rank's inputs are in place before any replay starts
      const std::string tag = "iteration " + std::to_string(it) + " (" + cases[it].name + ", data seed " +
                              std::to_string(cases[it].seed) + ")";
      uint64_t gpu = ref::kFnvOffset;
      const bool good = g.replay(comm, stream, e, tag, &gpu);  // every rank replays (see llIteration)
      run.record(rank, it, gpu, g.expectedHash(e), good, tag);
      world.barrier().wait();  // every replay is checked before any rank uploads the next one
      if (rank == 0) {
        done = it + 1;
        run.progress(done);
      }
      if (run.stopAfter(it)) break;
    }
    world.barrier().wait();
    graphs.clear();  // graphs and handles go before the communicator (after every rank's last replay)
  });
  run.finish(done);
}

INSTANTIATE_TEST_SUITE_P(Ranks, Pressure, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);

}  // namespace
