#include "core/log.h"

#include <cuda_runtime.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "core/env.h"
#include "core/plugin_bridge.h"

namespace nccl_moe {
namespace {

struct LogState {
  LogLevel level = LogLevel::kWarn;
  FILE* out = stderr;
  char host[64] = {0};
  std::mutex mutex;
};

LogLevel parseLevel(const std::string& s) {
  if (strcasecmp(s.c_str(), "NONE") == 0) return LogLevel::kNone;
  if (strcasecmp(s.c_str(), "INFO") == 0) return LogLevel::kInfo;
  if (strcasecmp(s.c_str(), "TRACE") == 0) return LogLevel::kTrace;
  return LogLevel::kWarn;
}

// Expands %h (hostname) and %p (pid) like NCCL_DEBUG_FILE.
std::string expandPath(const std::string& pattern, const char* host) {
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '%' && i + 1 < pattern.size() && (pattern[i + 1] == 'h' || pattern[i + 1] == 'p')) {
      out += pattern[i + 1] == 'h' ? std::string(host) : std::to_string(getpid());
      ++i;
    } else {
      out += pattern[i];
    }
  }
  return out;
}

LogState& state() {
  static LogState* s = [] {
    auto* st = new LogState();  // never destroyed: logging may happen during static destruction
    gethostname(st->host, sizeof(st->host) - 1);
    st->level = parseLevel(envString("NCCL_MOE_DEBUG"));
    const std::string file = envString("NCCL_MOE_DEBUG_FILE");
    if (!file.empty()) {
      FILE* f = std::fopen(expandPath(file, st->host).c_str(), "w");
      if (f != nullptr) st->out = f;
    }
    return st;
  }();
  return *s;
}

const char* levelName(LogLevel level) {
  switch (level) {
    case LogLevel::kWarn:
      return "WARN";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kTrace:
      return "TRACE";
    default:
      return "";
  }
}

}  // namespace

bool logEnabled(LogLevel level) { return level != LogLevel::kNone && level <= state().level; }

void logLine(LogLevel level, const char* file, int line, const char* fmt, ...) {
  LogState& st = state();
  char message[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(message, sizeof(message), fmt, ap);
  va_end(ap);
  int dev = -1;
  cudaGetDevice(&dev);
  // Through NCCL's logger while the tuner plugin is attached and NCCL logging is on, so the line obeys
  // NCCL_DEBUG_SUBSYS and lands in NCCL_DEBUG_FILE. The message is an argument, never the format.
  if (ncclMoeNcclLogger_t nccl_logger = pluginLogger();
      nccl_logger != nullptr && std::getenv("NCCL_DEBUG") != nullptr) {
    const int nccl_level = level == LogLevel::kWarn   ? kNcclLogWarn
                           : level == LogLevel::kInfo ? kNcclLogInfo
                                                      : kNcclLogTrace;
    nccl_logger(nccl_level, kNcclSubsysInit | kNcclSubsysColl, file, line, "NCCL-MoE %s", message);
    return;
  }
  const char* base = std::strrchr(file, '/');
  base = base != nullptr ? base + 1 : file;
  std::lock_guard<std::mutex> lock(st.mutex);
  if (level == LogLevel::kTrace) {
    std::fprintf(st.out, "%s:%d:%ld [%d] NCCL-MoE %s %s:%d %s\n", st.host, getpid(), syscall(SYS_gettid), dev,
                 levelName(level), base, line, message);
  } else {
    std::fprintf(st.out, "%s:%d:%ld [%d] NCCL-MoE %s %s\n", st.host, getpid(), syscall(SYS_gettid), dev,
                 levelName(level), message);
  }
  std::fflush(st.out);
}

}  // namespace nccl_moe
