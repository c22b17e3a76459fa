#include "transport/emulated/chaos.h"

#include <cerrno>
#include <cstdlib>
#include <string>

#include "core/env.h"
#include "core/log.h"

namespace nccl_moe::emulated {

uint64_t chaosSeedFromEnvironment() {
  const std::string value = envString("NCCL_MOE_EMU_CHAOS");
  if (value.empty()) return 0;
  char* end = nullptr;
  errno = 0;
  const unsigned long long seed = std::strtoull(value.c_str(), &end, 0);
  if (end == value.c_str() || *end != '\0' || errno == ERANGE || value[0] == '-') {
    MOE_WARN("NCCL_MOE_EMU_CHAOS=\"%s\" is not an unsigned 64-bit integer; chaos mode stays off", value.c_str());
    return 0;
  }
  return seed;
}

}  // namespace nccl_moe::emulated
