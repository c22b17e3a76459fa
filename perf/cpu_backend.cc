// CPU mode of moe-perf (see cpu_backend.h).
#include "cpu_backend.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>
#include <memory>

#include "cpu_baseline.h"
#include "progress.h"
#include "reference/testing/brute.h"
#include "verify.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

double nowUs() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Timing {
  double median_us = 0, min_us = 0, max_us = 0;
};

// `label` (a literal) names the loop in the progress lines.
template <typename Fn>
Timing timeCalls(Progress& prog, const char* label, int warmup, int iters, Fn fn) {
  for (int i = 0; i < warmup; ++i) {
    prog.setCall(label, i, warmup, iters);
    fn();
  }
  std::vector<double> us;
  for (int i = 0; i < iters; ++i) {
    prog.setCall(label, warmup + i, warmup, iters);
    const double t0 = nowUs();
    fn();
    us.push_back(nowUs() - t0);
  }
  Timing t;
  t.median_us = median(us);
  t.min_us = *std::min_element(us.begin(), us.end());
  t.max_us = *std::max_element(us.begin(), us.end());
  return t;
}

Timing timeBaseline(Progress& prog, int warmup, int iters, CpuBaseline& bl, bool combine) {
  const char* label =
      combine ? "baseline: timed combine (threads as ranks)" : "baseline: timed dispatch (threads as ranks)";
  for (int i = 0; i < warmup; ++i) {
    prog.setCall(label, i, warmup, iters);
    combine ? bl.combine() : bl.dispatch();
  }
  std::vector<double> us;
  for (int i = 0; i < iters; ++i) {
    prog.setCall(label, warmup + i, warmup, iters);
    us.push_back(combine ? bl.combine() : bl.dispatch());
  }
  Timing t;
  t.median_us = median(us);
  t.min_us = *std::min_element(us.begin(), us.end());
  t.max_us = *std::max_element(us.begin(), us.end());
  return t;
}

// Elements that differ (bitwise) between two vectors, plus the size difference.
template <typename T>
int64_t vecDiff(const std::vector<T>& a, const std::vector<T>& b) {
  const size_t n = std::min(a.size(), b.size());
  int64_t wrong = static_cast<int64_t>(std::max(a.size(), b.size()) - n);
  for (size_t i = 0; i < n; ++i) wrong += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return wrong;
}

int64_t rowsDiff(const ref::Rows& a, const ref::Rows& b) {
  return vecDiff(a.bf16, b.bf16) + vecDiff(a.fp8, b.fp8) + vecDiff(a.scales, b.scales) +
         vecDiff(a.packed_scales, b.packed_scales) + (a.num_rows != b.num_rows);
}

int64_t htDiff(const ref::HtDispatch& a, const ref::HtDispatch& b) {
  int64_t wrong = vecDiff(a.num_tokens, b.num_tokens);
  for (size_t d = 0; d < std::min(a.recv.size(), b.recv.size()); ++d) {
    const ref::HtRankRecv &x = a.recv[d], &y = b.recv[d];
    wrong += (x.num_recv != y.num_recv) + vecDiff(x.src_info, y.src_info) + vecDiff(x.rank_prefix, y.rank_prefix) +
             vecDiff(x.topk_idx, y.topk_idx) + vecDiff(x.topk_weights, y.topk_weights) +
             vecDiff(x.num_recv_per_expert, y.num_recv_per_expert) + rowsDiff(x.x, y.x);
  }
  return wrong + static_cast<int64_t>(a.recv.size() != b.recv.size());
}

int64_t llDiff(const ref::LlDispatch& a, const ref::LlDispatch& b) {
  int64_t wrong = 0;
  for (size_t d = 0; d < std::min(a.recv.size(), b.recv.size()); ++d) {
    const ref::LlRankRecv &x = a.recv[d], &y = b.recv[d];
    wrong += vecDiff(x.recv_count, y.recv_count) + vecDiff(x.src_info, y.src_info) + vecDiff(x.bf16, y.bf16) +
             vecDiff(x.fp8, y.fp8) + vecDiff(x.scales, y.scales) + vecDiff(x.packed_scales, y.packed_scales);
  }
  return wrong + static_cast<int64_t>(a.recv.size() != b.recv.size());
}

int64_t layoutDiff(const ref::DispatchLayout& a, const ref::DispatchLayout& b) {
  return vecDiff(a.num_tokens_per_rank, b.num_tokens_per_rank) +
         vecDiff(a.num_tokens_per_expert, b.num_tokens_per_expert) + vecDiff(a.is_token_in_rank, b.is_token_in_rank);
}

int64_t perRankBf16Diff(const std::vector<std::vector<uint16_t>>& a, const std::vector<std::vector<uint16_t>>& b) {
  int64_t wrong = static_cast<int64_t>(a.size() != b.size());
  for (size_t r = 0; r < std::min(a.size(), b.size()); ++r) wrong += vecDiff(a[r], b[r]);
  return wrong;
}

void fillTiming(ResultRow* row, const Timing& t) {
  row->available = true;
  row->median_us = t.median_us;
  row->min_us = t.min_us;
  row->max_us = t.max_us;
}

void emit(const RunInfo& run, const ResultRow& row) {
  out("%s", tableRow(row, run.options.metrics).c_str());
  if (run.json) run.json->write(row);
}

// Runs one (mode, dtype, tokens) problem; returns false when a check failed.
bool runProblem(const RunInfo& run, const Problem& p, RankTeam& team, Progress& prog) {
  const bool check = run.options.check != 0;
  const int R = p.spec.num_ranks, T = p.spec.tokens, H = p.spec.hidden;
  const int w = run.warmup, n = run.iters;
  bool ok = true;

  out("# [cpu] baseline: %d threads as ranks\n", R);
  prog.set("baseline: setup (threads as ranks)");
  CpuBaseline bl(p, &team);
  const Timing bl_dispatch = timeBaseline(prog, w, n, bl, false);
  prog.set("baseline: dispatch check");
  const int64_t bl_dispatch_wrong = check ? bl.dispatchWrong() : 0;
  const Timing bl_combine = timeBaseline(prog, w, n, bl, true);
  prog.set("baseline: combine check");
  const int64_t bl_combine_wrong = check ? bl.combineWrong() : 0;

  std::vector<ResultRow> rows;
  // One row of op `op`; with its NCCL-baseline twin's timing when `baseline` is given.
  auto addRow = [&](const char* op, const Timing& t, int64_t wrong, const Timing* baseline, int64_t baseline_wrong) {
    ResultRow r = makeRow(run, p, op, 0, true);
    fillTiming(&r, t);
    r.wrong = wrong;
    if (baseline != nullptr) {
      r.has_baseline = true;
      r.baseline_median_us = baseline->median_us;
      r.baseline_wrong = baseline_wrong;
    }
    rows.push_back(r);
  };
  if (p.spec.mode == Mode::kHt) {
    std::vector<ref::Rows> x(sz(R));
    for (int s = 0; s < R; ++s)
      x[sz(s)] = p.spec.dtype == DType::kFp8 ? p.x_fp8[sz(s)] : ref::Rows::from_bf16(p.x_bf16[sz(s)], T, H);
    const int align = p.spec.expert_alignment;

    out("# [cpu] timing ref::ht_dispatch / ht_combine (%d + %d calls each)\n", w, n);
    ref::HtDispatch disp;
    const Timing t_dispatch =
        timeCalls(prog, "timed ref::ht_dispatch", w, n, [&] { disp = ref::ht_dispatch(p.routing, align, &x); });
    ref::HtCombineResult comb;
    const Timing t_combine =
        timeCalls(prog, "timed ref::ht_combine", w, n, [&] { comb = ref::ht_combine(p.ht, p.ht_y, H); });
    std::vector<ref::DispatchLayout> layouts(sz(R));
    const Timing t_first = timeCalls(prog, "timed layouts + ref::ht_dispatch", w, n, [&] {
      for (int s = 0; s < R; ++s) {
        const auto& rr = p.routing.ranks[sz(s)];
        layouts[sz(s)] = ref::get_dispatch_layout(rr.topk_idx.data(), rr.num_tokens, p.spec.topk, p.spec.experts, R);
      }
      disp = ref::ht_dispatch(p.routing, align, &x);
    });

    int64_t wrong_dispatch = 0, wrong_combine = 0, wrong_layout = 0;
    if (check) {
      out("# [cpu] checking the reference against its brute-force model\n");
      prog.set("verification: reference vs brute-force model");
      wrong_dispatch = htDiff(disp, ref::brute::ht_dispatch(p.routing, align, &x));
      for (int d = 0; d < R; ++d) {
        const ref::Rows& got = disp.recv[sz(d)].x;
        const void* data = p.spec.dtype == DType::kFp8 ? static_cast<const void*>(got.fp8.data())
                                                       : static_cast<const void*>(got.bf16.data());
        wrong_dispatch += htRecvWrong(p, d, got.num_rows, RowView::split(data, got.scales.data(), p.fmt));
        wrong_dispatch += htMetaWrong(
            p, d, disp.recv[sz(d)].num_recv, &disp.recv[sz(d)].num_recv_per_expert, disp.recv[sz(d)].topk_idx.data(),
            disp.recv[sz(d)].topk_weights.empty() ? nullptr : disp.recv[sz(d)].topk_weights.data());
      }
      wrong_combine = perRankBf16Diff(comb.x, ref::brute::ht_combine(p.ht, p.ht_y, H).x);
      wrong_combine += perRankBf16Diff(comb.x, p.ht_expected_combine);
      for (int s = 0; s < R; ++s) {
        const auto& rr = p.routing.ranks[sz(s)];
        wrong_layout += layoutDiff(layouts[sz(s)], ref::brute::get_dispatch_layout(rr.topk_idx.data(), rr.num_tokens,
                                                                                   p.spec.topk, p.spec.experts, R));
      }
    }
    addRow("dispatch", t_dispatch, wrong_dispatch, &bl_dispatch, bl_dispatch_wrong);
    addRow("combine", t_combine, wrong_combine, &bl_combine, bl_combine_wrong);
    addRow("notify_dispatch", t_first, wrong_layout + wrong_dispatch, nullptr, 0);
  } else {
    const bool fp8 = p.spec.dtype == DType::kFp8;
    const int cap = p.spec.ll_max_tokens;
    out("# [cpu] timing ref::ll_dispatch / ll_combine (%d + %d calls each)\n", w, n);
    ref::LlDispatch disp;
    const Timing t_dispatch = timeCalls(prog, "timed ref::ll_dispatch", w, n, [&] {
      disp = ref::ll_dispatch(p.routing, H, cap, &p.x_bf16, fp8, ref::ScaleFormat::kFloat);
    });
    std::vector<std::vector<uint16_t>> comb;
    const Timing t_combine =
        timeCalls(prog, "timed ref::ll_combine", w, n, [&] { comb = ref::ll_combine(p.routing, p.ll, p.ll_y); });
    int64_t wrong_dispatch = 0, wrong_combine = 0;
    if (check) {
      out("# [cpu] checking the reference against its brute-force model\n");
      prog.set("verification: reference vs brute-force model");
      wrong_dispatch =
          llDiff(disp, ref::brute::ll_dispatch(p.routing, H, cap, &p.x_bf16, fp8, ref::ScaleFormat::kFloat));
      for (int d = 0; d < R; ++d) {
        const ref::LlRankRecv& rv = disp.recv[sz(d)];
        const void* data = fp8 ? static_cast<const void*>(rv.fp8.data()) : static_cast<const void*>(rv.bf16.data());
        wrong_dispatch +=
            llRecvWrong(p, d, rv.recv_count.data(), RowView::split(data, rv.scales.data(), p.fmt), nullptr);
      }
      wrong_combine = perRankBf16Diff(comb, ref::brute::ll_combine(p.routing, p.ll, p.ll_y));
      wrong_combine += perRankBf16Diff(comb, p.ll_expected_combine);
    }
    addRow("dispatch", t_dispatch, wrong_dispatch, &bl_dispatch, bl_dispatch_wrong);
    addRow("combine", t_combine, wrong_combine, &bl_combine, bl_combine_wrong);
  }
  for (ResultRow& r : rows) {
    r.gpu_name = "cpu";
    emit(run, r);
    if (r.wrong != 0 || r.baseline_wrong != 0) ok = false;
  }
  return ok;
}

}  // namespace

int runCpu(RunInfo& run, int num_ranks, const std::string& reason) {
  const Options& o = run.options;
  run.iters = o.iters > 0 ? o.iters : 3;
  run.warmup = o.warmup >= 0 ? o.warmup : 1;
  out("# %s: running the CPU reference with %d threads as ranks\n", reason.c_str(), num_ranks);
  out("# iters %d, warmup %d, check %d, routing %s, seed %llu\n", run.iters, run.warmup, o.check,
      o.routing.text.c_str(), static_cast<unsigned long long>(o.seed));
  if (o.inject_skipped_write) out("# --inject-skipped-write: a self-test of the GPU backend; ignored by the CPU run\n");
  RankTeam team(num_ranks, hostWaitSeconds(o));
  Progress prog;
  std::unique_ptr<ProgressPrinter> printer;  // progress lines on stderr
  if (!o.quiet) printer = std::make_unique<ProgressPrinter>(prog);
  const int num_problems = countProblems(o);
  int problem_idx = 0;
  int exit_code = 0;
  for (Mode mode : resolveModes(o)) {
    const ModeConfig cfg = resolveMode(o, mode);
    const int64_t cap = *std::max_element(cfg.tokens.begin(), cfg.tokens.end());
    out("#\n# %s mode (CPU reference), %d ranks\n", mode == Mode::kHt ? "HT (high-throughput)" : "LL (low-latency)",
        num_ranks);
    bool header = false;
    for (DType dtype : cfg.dtypes) {
      std::string bad = checkShape(cfg, dtype, num_ranks);
      if (bad.empty()) bad = checkNodes(o.routing, o.ranks_per_node, cfg, num_ranks);
      if (!bad.empty()) {
        out("# %s %s: invalid shape: %s\n", modeName(mode), dtypeName(dtype), bad.c_str());
        exit_code = 2;
        problem_idx += static_cast<int>(cfg.tokens.size());
        continue;
      }
      for (int64_t tokens : cfg.tokens) {
        prog.enterProblem(mode, dtype, tokens, ++problem_idx, num_problems);
        ProblemSpec spec;
        spec.mode = mode;
        spec.dtype = dtype;
        spec.num_ranks = num_ranks;
        spec.tokens = static_cast<int>(tokens);
        spec.hidden = cfg.hidden;
        spec.topk = cfg.topk;
        spec.experts = cfg.experts;
        spec.ll_max_tokens = static_cast<int>(cap);
        spec.expert_alignment = o.expert_alignment;
        spec.routing = o.routing;
        spec.ranks_per_node = o.ranks_per_node;
        spec.seed = o.seed;
        spec.build_expected = o.check != 0;
        try {
          out("# [cpu] building %s %s problem: %lld tokens x %d ranks\n", modeName(mode), dtypeName(dtype),
              static_cast<long long>(tokens), num_ranks);
          prog.set("building the problem (CPU reference)");
          const Problem p = buildProblem(spec);
          printRoutingSummary(p, true);
          if (!header) {
            out("%s", tableHeader(o.metrics).c_str());
            header = true;
          }
          if (!runProblem(run, p, team, prog)) exit_code = exit_code ? exit_code : 1;
        } catch (const std::exception& e) {
          out("# %s %s %lld tokens: error: %s\n", modeName(mode), dtypeName(dtype), static_cast<long long>(tokens),
              e.what());
          exit_code = exit_code ? exit_code : 1;
        }
      }
    }
    if (header) {
      printTableNotes(mode, true);
      printNodeNotes(mode, numNodes(num_ranks, o.ranks_per_node));
      if (o.metrics.any()) printMetricsNotes(o.metrics, true);
    }
  }
  printer.reset();
  if (exit_code != 0) {
    out("# errors: see above\n");
  } else {
    out("# %s\n", o.check ? "all checks passed" : "no errors (checks skipped: -c 0)");
  }
  return exit_code;
}

}  // namespace nccl_moe::perf
