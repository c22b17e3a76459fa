// The shared library exports the public C ABI only (ncclMoe*), and none of those names collides with a
// symbol exported by the libnccl it links against.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <link.h>
#include <unistd.h>

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
  for (const char* required :
       {"ncclMoeCommInit", "ncclMoeCommDestroy", "ncclMoeDispatch", "ncclMoeCombine", "ncclMoeDispatchNotify",
        "ncclMoeGetDispatchLayout", "ncclMoeLowLatencyDispatch", "ncclMoeLowLatencyCombine", "ncclMoeGetLastError",
        "ncclMoeGetBufferSize", "ncclMoeCommNodeCount"}) {
    EXPECT_EQ(1u, symbols.count(required)) << "missing export: " << required;
  }
}

// The libnccl the build linked, or, where that path does not exist (a build folder carried to another machine),
// the libnccl.so.2 the dynamic loader finds here.
std::string ncclLibraryPath() {
  if (access(NCCL_MOE_NCCL_LIB_PATH, R_OK) == 0) return NCCL_MOE_NCCL_LIB_PATH;
  void* handle = dlopen("libnccl.so.2", RTLD_LAZY | RTLD_LOCAL);
  if (handle == nullptr) return NCCL_MOE_NCCL_LIB_PATH;
  const link_map* map = nullptr;
  std::string path = NCCL_MOE_NCCL_LIB_PATH;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr) path = map->l_name;
  dlclose(handle);
  return path;
}

TEST(Exports, NoCollisionWithLibnccl) {
  const auto ours = definedDynamicSymbols(NCCL_MOE_SHARED_LIB_PATH);
  const std::string nccl_path = ncclLibraryPath();
  const auto nccl = definedDynamicSymbols(nccl_path);
  ASSERT_FALSE(nccl.empty()) << "could not read dynamic symbols of " << nccl_path;
  EXPECT_EQ(1u, nccl.count("ncclAllReduce")) << "libnccl symbol table looks wrong";
  for (const auto& s : ours) EXPECT_EQ(0u, nccl.count(s)) << s << " is exported by libnccl too";
}

}  // namespace
