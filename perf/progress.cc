// moe-perf's progress record, rate limiter, line format and printer thread (contract in progress.h).
#include "progress.h"

namespace nccl_moe::perf {

void Progress::setCall(const char* what, int call_idx, int num_warmup, int num_iters) {
  call.store(call_idx);
  warmup.store(num_warmup);
  iters.store(num_iters);
  phase.store(what);
  last_ns.store(nowNs());
}

void Progress::enterProblem(Mode m, DType d, int64_t num_tokens, int idx, int num) {
  mode.store(static_cast<int>(m));
  dtype.store(static_cast<int>(d));
  tokens.store(num_tokens);
  sms.store(-1);
  problem_idx.store(idx);
  num_problems.store(num);
  problem_start_ns.store(nowNs());
}

ProgressSnapshot Progress::snapshot(int64_t now_ns) const {
  ProgressSnapshot s;
  s.phase = phase.load();
  s.mode = mode.load();
  s.dtype = dtype.load();
  s.sms = sms.load();
  s.tokens = tokens.load();
  s.problem_idx = problem_idx.load();
  s.num_problems = num_problems.load();
  const int64_t start = problem_start_ns.load();
  s.problem_s = start > 0 && now_ns > start ? static_cast<double>(now_ns - start) * 1e-9 : 0.0;
  s.call = call.load();
  s.warmup = warmup.load();
  s.iters = iters.load();
  return s;
}

int countProblems(const Options& options) {
  int n = 0;
  for (Mode m : resolveModes(options)) {
    const ModeConfig c = resolveMode(options, m);
    n += static_cast<int>(c.dtypes.size() * c.tokens.size());
  }
  return n;
}

bool ProgressLimiter::due(double elapsed_s) {
  if (elapsed_s < first_after_s_) return false;
  if (last_s_ >= 0 && elapsed_s - last_s_ < interval_s_) return false;
  last_s_ = elapsed_s;
  return true;
}

std::string formatProgressLine(const ProgressSnapshot& s, double elapsed_s) {
  char buf[512];
  std::string line;
  std::snprintf(buf, sizeof(buf), "moe-perf: [%7.1f s]", elapsed_s);
  line = buf;
  if (s.mode >= 0) {
    const char* mode = modeName(static_cast<Mode>(s.mode));
    const char* dtype = s.dtype >= 0 ? dtypeName(static_cast<DType>(s.dtype)) : "?";
    std::snprintf(buf, sizeof(buf), " %s %s, %lld tokens", mode, dtype, static_cast<long long>(s.tokens));
    line += buf;
    if (s.sms == 0) {
      line += ", sms auto";
    } else if (s.sms > 0) {
      line += ", sms " + std::to_string(s.sms);
    }
    std::snprintf(buf, sizeof(buf), " (problem %d/%d, %.1f s):", s.problem_idx, s.num_problems, s.problem_s);
    line += buf;
  }
  line += " ";
  line += s.phase != nullptr ? s.phase : "";
  if (s.iters > 0) {
    if (s.call < s.warmup) {
      std::snprintf(buf, sizeof(buf), ", warm-up call %d/%d", s.call + 1, s.warmup);
    } else {
      std::snprintf(buf, sizeof(buf), ", timed call %d/%d", s.call - s.warmup + 1, s.iters);
    }
    line += buf;
  }
  return line;
}

ProgressPrinter::ProgressPrinter(const Progress& progress, ProgressLimiter limiter, std::FILE* sink)
    : progress_(progress), limiter_(limiter), sink_(sink), start_ns_(nowNs()), thread_([this] { loop(); }) {}

ProgressPrinter::~ProgressPrinter() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void ProgressPrinter::loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!wake_.wait_for(lock, std::chrono::milliseconds(200), [this] { return stop_; })) {
    const int64_t now = nowNs();
    const double elapsed_s = static_cast<double>(now - start_ns_) * 1e-9;
    if (!limiter_.due(elapsed_s)) continue;
    const std::string line = formatProgressLine(progress_.snapshot(now), elapsed_s) + "\n";
    std::fputs(line.c_str(), sink_);
    std::fflush(sink_);
  }
}

}  // namespace nccl_moe::perf
