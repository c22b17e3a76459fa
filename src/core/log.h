// Logging in NCCL's line format ("host:pid:tid [dev] NCCL-MoE INFO ..."), filtered by NCCL_MOE_DEBUG.
// When the tuner plugin (plugin/) has attached NCCL's logger, lines go through it instead, so they obey
// NCCL_DEBUG / NCCL_DEBUG_SUBSYS and land in NCCL_DEBUG_FILE beside NCCL's own.
#pragma once

namespace nccl_moe {

enum class LogLevel : int { kNone = 0, kWarn = 1, kInfo = 2, kTrace = 3 };

bool logEnabled(LogLevel level);
void logLine(LogLevel level, const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 4, 5)));

}  // namespace nccl_moe

#define MOE_LOG_AT(level, ...)                                                                      \
  do {                                                                                              \
    if (::nccl_moe::logEnabled(level)) ::nccl_moe::logLine(level, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
#define MOE_WARN(...) MOE_LOG_AT(::nccl_moe::LogLevel::kWarn, __VA_ARGS__)
#define MOE_INFO(...) MOE_LOG_AT(::nccl_moe::LogLevel::kInfo, __VA_ARGS__)
#define MOE_TRACE(...) MOE_LOG_AT(::nccl_moe::LogLevel::kTrace, __VA_ARGS__)
