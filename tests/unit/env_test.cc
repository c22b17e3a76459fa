// The environment registry is the one list of NCCL_MOE_* knobs: docs/environment.md must list the same names
// with the same defaults, and values parse as documented.
#include "core/env.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>
#include <sstream>
#include <string>

namespace {

std::string readDoc() {
  std::ifstream in(std::string(NCCL_MOE_SOURCE_DIR) + "/docs/environment.md");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(Env, DocsListEveryRegisteredVariableWithItsDefault) {
  const std::string doc = readDoc();
  ASSERT_FALSE(doc.empty());
  for (const auto& var : nccl_moe::envRegistry()) {
    const std::string row = std::string("| `") + var.name + "` | " +
                            (var.type == nccl_moe::EnvType::kInt ? "int" : "string") + " | `" + var.default_value +
                            "` |";
    EXPECT_NE(std::string::npos, doc.find(row)) << "docs/environment.md lacks the row: " << row;
  }
  // And the doc names no variable the registry does not know.
  size_t pos = 0;
  int rows = 0;
  while ((pos = doc.find("| `NCCL_MOE_", pos)) != std::string::npos) {
    ++rows;
    ++pos;
  }
  EXPECT_EQ(static_cast<int>(nccl_moe::envRegistry().size()), rows);
}

TEST(Env, IntegersParseAndFallBackToTheDefault) {
  setenv("NCCL_MOE_TIMEOUT_S", "7", 1);
  EXPECT_EQ(7, nccl_moe::envInt("NCCL_MOE_TIMEOUT_S"));
  setenv("NCCL_MOE_TIMEOUT_S", "7x", 1);
  EXPECT_EQ(100, nccl_moe::envInt("NCCL_MOE_TIMEOUT_S"));
  unsetenv("NCCL_MOE_TIMEOUT_S");
  EXPECT_EQ(100, nccl_moe::envInt("NCCL_MOE_TIMEOUT_S"));
  EXPECT_EQ(0, nccl_moe::envInt("NCCL_MOE_NOT_A_VARIABLE"));
  EXPECT_EQ("WARN", nccl_moe::envString("NCCL_MOE_DEBUG"));
}

}  // namespace
