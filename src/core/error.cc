#include "core/error.h"

#include <cstdio>

namespace nccl_moe {
namespace {
thread_local std::string t_last_error;
}

ncclResult_t setLastError(ncclResult_t result, const char* fmt, ...) {
  char message[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(message, sizeof(message), fmt, ap);
  va_end(ap);
  t_last_error = message;
  return result;
}

const char* threadLastError() { return t_last_error.c_str(); }
void clearThreadLastError() { t_last_error.clear(); }

}  // namespace nccl_moe
