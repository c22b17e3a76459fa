// The shared library exports the public C ABI only (ncclMoe*), and none of those names collides with a
// symbol exported by the libnccl it links against.
#include <gtest/gtest.h>

#include <cstdio>
#include <set>
#include <string>

namespace {

std::set<std::string> definedDynamicSymbols(const std::string& path) {
  std::set<std::string> symbols;
  const std::string cmd = "nm -D --defined-only '" + path + "' 2>/dev/null";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return symbols;
  char line[1024];
  while (std::fgets(line, sizeof(line), pipe) != nullptr) {
    // "<address> <type> <name>[@version]"
    char addr[64], type[8], name[512];
    if (std::sscanf(line, "%63s %7s %511s", addr, type, name) != 3) continue;
    std::string n(name);
    const size_t at = n.find('@');
    if (at != std::string::npos) n = n.substr(0, at);
    symbols.insert(n);
  }
  pclose(pipe);
  return symbols;
}

TEST(Exports, OnlyNcclMoeSymbolsLeaveTheLibrary) {
  const auto symbols = definedDynamicSymbols(NCCL_MOE_SHARED_LIB_PATH);
  ASSERT_FALSE(symbols.empty()) << "could not read dynamic symbols of " << NCCL_MOE_SHARED_LIB_PATH;
  for (const auto& s : symbols) {
    EXPECT_EQ(0u, s.rfind("ncclMoe", 0)) << "unexpected export: " << s;
  }
  for (const char* required : {"ncclMoeCommInit", "ncclMoeCommDestroy", "ncclMoeDispatch", "ncclMoeCombine",
                               "ncclMoeDispatchNotify", "ncclMoeGetDispatchLayout", "ncclMoeLowLatencyDispatch",
                               "ncclMoeLowLatencyCombine", "ncclMoeGetLastError", "ncclMoeGetBufferSize"}) {
    EXPECT_EQ(1u, symbols.count(required)) << "missing export: " << required;
  }
}

TEST(Exports, NoCollisionWithLibnccl) {
  const auto ours = definedDynamicSymbols(NCCL_MOE_SHARED_LIB_PATH);
  const auto nccl = definedDynamicSymbols(NCCL_MOE_NCCL_LIB_PATH);
  ASSERT_FALSE(nccl.empty()) << "could not read dynamic symbols of " << NCCL_MOE_NCCL_LIB_PATH;
  EXPECT_EQ(1u, nccl.count("ncclAllReduce")) << "libnccl symbol table looks wrong";
  for (const auto& s : ours) EXPECT_EQ(0u, nccl.count(s)) << s << " is exported by libnccl too";
}

}  // namespace
