// CPU all-to-all baseline with threads as ranks (contract in cpu_baseline.h).
// Built with -ffp-contract=off: the reductions fuse multiply and add only where the reference does (LL combine,
// with an explicit std::fmaf).
#include "cpu_baseline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "verify.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

double nowUs() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// RankTeam
// ------------------------------------------------------------------------------------------------

RankTeam::RankTeam(int num_ranks, double barrier_timeout_s)
    : num_ranks_(num_ranks), barrier_timeout_s_(barrier_timeout_s), barrier_(num_ranks) {
  for (int r = 0; r < num_ranks; ++r) threads_.emplace_back([this, r] { worker(r); });
}

RankTeam::~RankTeam() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void RankTeam::worker(int rank) {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int)>* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || job_generation_ != seen; });
      if (stop_) return;
      seen = job_generation_;
      job = job_;
    }
    std::exception_ptr error;
    try {
      (*job)(rank);
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (error && !error_) error_ = error;
      --running_;
    }
    cv_.notify_all();
  }
}

void RankTeam::run(const std::function<void(int)>& fn) {
  std::unique_lock<std::mutex> lock(mutex_);
  // A failed run may have left the barrier with a rank that gave up (harness::HostBarrier is not reusable then).
  if (broken_) throw std::runtime_error("CPU baseline: the rank threads are unusable after an earlier failure");
  job_ = &fn;
  running_ = num_ranks_;
  error_ = nullptr;
  ++job_generation_;
  cv_.notify_all();
  cv_.wait(lock, [&] { return running_ == 0; });
  job_ = nullptr;
  if (error_) {
    broken_ = true;
    std::rethrow_exception(error_);
  }
}

void RankTeam::barrier() {
  if (!barrier_.wait(barrier_timeout_s_))
    throw std::runtime_error("CPU baseline: a rank thread did not reach the barrier within " +
                             std::to_string(static_cast<long long>(barrier_timeout_s_)) + " s");
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// ------------------------------------------------------------------------------------------------
// CpuBaseline
// ------------------------------------------------------------------------------------------------

CpuBaseline::CpuBaseline(const Problem& p, RankTeam* team) : p_(p), team_(team) {
  const int R = p.spec.num_ranks, H = p.spec.hidden;
  const size_t rb = p.fmt.rowBytes();
  input_.resize(sz(R));
  send_.resize(sz(R));
  dispatch_out.resize(sz(R));
  combine_out.resize(sz(R));
  crecv_.resize(sz(R));
  csend_.resize(sz(R));
  for (int r = 0; r < R; ++r) {
    input_[sz(r)] = p.packedInput(r);
    combine_out[sz(r)].assign(sz(p.spec.tokens) * sz(H), 0);
    if (p.spec.mode == Mode::kHt) {
      ht_.push_back(makeHtPlan(p.ht, r));
      const HtPlan& pl = ht_.back();
      send_[sz(r)].assign(sz(pl.send_offsets.back()) * rb, 0);
      dispatch_out[sz(r)].assign(sz(pl.recv_offsets.back()) * rb, 0);
      crecv_[sz(r)].assign(sz(pl.send_offsets.back()) * sz(H), 0);
    } else {
      ll_.push_back(makeLlPlan(p.routing, p.ll, r));
      const LlPlan& pl = ll_.back();
      send_[sz(r)].assign(sz(pl.send_offsets.back()) * rb, 0);
      dispatch_out[sz(r)].assign(sz(p.numLocalExperts()) * sz(p.slabRows()) * rb, 0);
      csend_[sz(r)].assign(sz(pl.recv_offsets.back()) * sz(H), 0);
      crecv_[sz(r)].assign(sz(pl.send_offsets.back()) * sz(H), 0);
    }
  }
}

double CpuBaseline::dispatch() {
  const int R = p_.spec.num_ranks;
  const size_t rb = p_.fmt.rowBytes();
  double t0 = 0, t1 = 0;
  const bool ht = p_.spec.mode == Mode::kHt;
  std::function<void(int)> fn = [&](int r) {
    const std::vector<int>& send_tokens = ht ? ht_[sz(r)].send_tokens : ll_[sz(r)].send_tokens;
    team_->barrier();
    if (r == 0) t0 = nowUs();
    // Permutation: gather rows into per-destination order.
    uint8_t* send = send_[sz(r)].data();
    const uint8_t* in = input_[sz(r)].data();
    for (size_t i = 0; i < send_tokens.size(); ++i) std::memcpy(send + i * rb, in + sz(send_tokens[i]) * rb, rb);
    team_->barrier();
    // All-to-all: pull every peer's group for this rank.
    uint8_t* out = dispatch_out[sz(r)].data();
    for (int s = 0; s < R; ++s) {
      if (ht) {
        const HtPlan& me = ht_[sz(r)];
        const uint8_t* src = send_[sz(s)].data() + sz(ht_[sz(s)].send_offsets[sz(r)]) * rb;
        std::memcpy(out + sz(me.recv_offsets[sz(s)]) * rb, src, sz(me.recv_counts[sz(s)]) * rb);
      } else {
        // LL: the pull lands each row directly at its slab position (all-to-all and un-permutation fused).
        const LlPlan& me = ll_[sz(r)];
        const uint8_t* src = send_[sz(s)].data() + sz(ll_[sz(s)].send_offsets[sz(r)]) * rb;
        for (int i = 0; i < me.recv_counts[sz(s)]; ++i)
          std::memcpy(out + sz(me.recv_slab_rows[sz(me.recv_offsets[sz(s)] + i)]) * rb, src + sz(i) * rb, rb);
      }
    }
    team_->barrier();
    if (r == 0) t1 = nowUs();
  };
  team_->run(fn);
  return t1 - t0;
}

double CpuBaseline::combine() {
  const int R = p_.spec.num_ranks, H = p_.spec.hidden, K = p_.spec.topk;
  const bool ht = p_.spec.mode == Mode::kHt;
  double t0 = 0, t1 = 0;
  std::function<void(int)> fn = [&](int r) {
    team_->barrier();
    if (r == 0) t0 = nowUs();
    if (!ht) {
      // Permutation at the expert side: gather the slab rows back into per-source order.
      const LlPlan& me = ll_[sz(r)];
      const uint16_t* y = p_.ll_y[sz(r)].data();
      uint16_t* cs = csend_[sz(r)].data();
      for (size_t i = 0; i < me.recv_slab_rows.size(); ++i)
        std::memcpy(cs + i * sz(H), y + sz(me.recv_slab_rows[i]) * sz(H), sz(H) * 2);
    }
    team_->barrier();
    // All-to-all back: pull this rank's rows from every expert rank.
    uint16_t* cr = crecv_[sz(r)].data();
    for (int d = 0; d < R; ++d) {
      if (ht) {
        const HtPlan& me = ht_[sz(r)];
        const uint16_t* src = p_.ht_y[sz(d)].data() + sz(ht_[sz(d)].recv_offsets[sz(r)]) * sz(H);
        std::memcpy(cr + sz(me.send_offsets[sz(d)]) * sz(H), src, sz(me.send_counts[sz(d)]) * sz(H) * 2);
      } else {
        const LlPlan& me = ll_[sz(r)];
        const uint16_t* src = csend_[sz(d)].data() + sz(ll_[sz(d)].recv_offsets[sz(r)]) * sz(H);
        std::memcpy(cr + sz(me.send_offsets[sz(d)]) * sz(H), src, sz(me.send_counts[sz(d)]) * sz(H) * 2);
      }
    }
    // Un-permutation: reduce into [T, H] in the reference's order (d ascending for HT; LL: ref::ll_combine's
    // two levels).
    const int T = p_.spec.tokens;
    const int M = ht ? R : K;
    const std::vector<int>& rows = ht ? ht_[sz(r)].combine_rows : ll_[sz(r)].combine_rows;
    const std::vector<float>& w = p_.routing.ranks[sz(r)].topk_weights;
    std::vector<float> acc(sz(H)), part(sz(H));
    const std::vector<int64_t>& idx = p_.routing.ranks[sz(r)].topk_idx;
    const int El = p_.numLocalExperts();
    uint16_t* out = combine_out[sz(r)].data();
    for (int t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (ht) {
        for (int m = 0; m < M; ++m) {
          const int row = rows[sz(t) * sz(M) + sz(m)];
          if (row < 0) continue;
          const uint16_t* src = cr + sz(row) * sz(H);
          for (int c = 0; c < H; ++c) acc[sz(c)] = acc[sz(c)] + ref::bf16_to_float(src[c]);
        }
      } else {
        // ref::ll_combine's two levels: per expert rank d ascending an fmaf chain over d's slots (k ascending)
        // rounded to bf16, then those partials added in FP32.
        for (int d = 0; d < R; ++d) {
          bool any = false;
          std::fill(part.begin(), part.end(), 0.0f);
          for (int m = 0; m < M; ++m) {
            const int row = rows[sz(t) * sz(M) + sz(m)];
            if (row < 0 || idx[sz(t) * sz(K) + sz(m)] / El != d) continue;
            any = true;
            const uint16_t* src = cr + sz(row) * sz(H);
            const float wk = w[sz(t) * sz(K) + sz(m)];
            for (int c = 0; c < H; ++c) part[sz(c)] = std::fmaf(wk, ref::bf16_to_float(src[c]), part[sz(c)]);
          }
          if (!any) continue;
          for (int c = 0; c < H; ++c) acc[sz(c)] = acc[sz(c)] + ref::bf16_to_float(ref::float_to_bf16(part[sz(c)]));
        }
      }
      for (int c = 0; c < H; ++c) out[sz(t) * sz(H) + sz(c)] = ref::float_to_bf16(acc[sz(c)]);
    }
    team_->barrier();
    if (r == 0) t1 = nowUs();
  };
  team_->run(fn);
  return t1 - t0;
}

int64_t CpuBaseline::dispatchWrong() const {
  int64_t wrong = 0;
  for (int d = 0; d < p_.spec.num_ranks; ++d) {
    const RowView view = RowView::packed(dispatch_out[sz(d)].data(), p_.fmt);
    if (p_.spec.mode == Mode::kHt) {
      wrong += htRecvWrong(p_, d, p_.numRecv(d), view);
    } else {
      wrong += llRecvWrong(p_, d, p_.ll.recv[sz(d)].recv_count.data(), view, nullptr);
    }
  }
  return wrong;
}

int64_t CpuBaseline::combineWrong() const {
  int64_t wrong = 0;
  const auto& expected = p_.spec.mode == Mode::kHt ? p_.ht_expected_combine : p_.ll_expected_combine;
  for (int r = 0; r < p_.spec.num_ranks; ++r) wrong += bf16Wrong(combine_out[sz(r)].data(), expected[sz(r)]);
  return wrong;
}

}  // namespace nccl_moe::perf
