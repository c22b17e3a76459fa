// The one registry of NCCL_MOE_* environment variables: name, type, default and documentation, declared
// once in env.cc. docs/environment.md lists the same table (tests/unit/env_test.cc checks they agree).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe {

enum class EnvType { kInt, kString };

struct EnvVar {
  const char* name;
  EnvType type;
  const char* default_value;
  const char* doc;
};

// Every variable the library reads.
const std::vector<EnvVar>& envRegistry();

// Value of a registered variable (the environment, else its default). Reading an unregistered name is a
// programming error and returns the empty string / 0.
std::string envString(const char* name);
// Integer value; a malformed value falls back to the default and is reported through the logger once.
int64_t envInt(const char* name);

}  // namespace nccl_moe
