// rdma-core is reached only at run time (src/transport/rdma/verbs/loader.h): libnccl_moe.so does not link
// libibverbs or libmlx5 (its dynamic section's NEEDED entries), nothing in src/ calls an ibv_* / mlx5dv_* function
// itself, a library that is absent or lacks a symbol is a clear error naming it, and where rdma-core is installed
// the tables bind and ibv_get_device_list runs through them (no NIC here: an empty list or an error, no crash).
#include <dlfcn.h>
#include <elf.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/error.h"
#include "transport/rdma/verbs/loader.h"

namespace nccl_moe::verbs {
namespace {

// DT_NEEDED entries of a 64-bit ELF shared object, read from its SHT_DYNAMIC section and the string table that
// section links to. Empty with *error set when the file cannot be read as such.
std::vector<std::string> neededLibraries(const std::string& path, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto read = [&](size_t offset, void* out, size_t n) {
    if (offset > bytes.size() || bytes.size() - offset < n) return false;
    std::memcpy(out, bytes.data() + offset, n);
    return true;
  };
  Elf64_Ehdr eh;
  if (!read(0, &eh, sizeof(eh)) || std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 ||
      eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_shentsize != sizeof(Elf64_Shdr)) {
    *error = path + " is not a readable 64-bit ELF file";
    return {};
  }
  std::vector<Elf64_Shdr> sections(eh.e_shnum);
  for (size_t i = 0; i < sections.size(); ++i) {
    if (!read(eh.e_shoff + i * sizeof(Elf64_Shdr), &sections[i], sizeof(Elf64_Shdr))) {
      *error = path + ": section header out of the file";
      return {};
    }
  }
  std::vector<std::string> needed;
  bool found_dynamic = false;
  for (const Elf64_Shdr& s : sections) {
    if (s.sh_type != SHT_DYNAMIC || s.sh_link >= sections.size()) continue;
    found_dynamic = true;
    const Elf64_Shdr& strtab = sections[s.sh_link];
    for (size_t off = 0; off + sizeof(Elf64_Dyn) <= s.sh_size; off += sizeof(Elf64_Dyn)) {
      Elf64_Dyn d;
      if (!read(s.sh_offset + off, &d, sizeof(d)) || d.d_tag == DT_NULL) break;
      if (d.d_tag != DT_NEEDED) continue;
      const size_t at = strtab.sh_offset + d.d_un.d_val;
      if (at >= bytes.size()) continue;
      needed.emplace_back(bytes.data() + at, strnlen(bytes.data() + at, bytes.size() - at));
    }
  }
  if (!found_dynamic) *error = path + " has no dynamic section";
  return needed;
}

TEST(VerbsLinking, LibraryDoesNotLinkLibibverbsOrLibmlx5) {
  std::string error;
  const std::vector<std::string> needed = neededLibraries(NCCL_MOE_SHARED_LIB_PATH, &error);
  ASSERT_TRUE(error.empty()) << error;
  std::string all;
  for (const std::string& n : needed) all += n + " ";
  // The reader works: the C library is always there.
  EXPECT_NE(std::string::npos, all.find("libc.so")) << "NEEDED of " << NCCL_MOE_SHARED_LIB_PATH << ": " << all;
  for (const std::string& n : needed) {
    EXPECT_EQ(std::string::npos, n.find("libibverbs")) << NCCL_MOE_SHARED_LIB_PATH << " links " << n;
    EXPECT_EQ(std::string::npos, n.find("libmlx5")) << NCCL_MOE_SHARED_LIB_PATH << " links " << n;
  }
}

// Source text without comments, string and character literals (so that documentation may name functions).
std::string codeOnly(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    const char next = i + 1 < text.size() ? text[i + 1] : '\0';
    if (c == '/' && next == '/') {
      while (i < text.size() && text[i] != '\n') ++i;
      out += '\n';
    } else if (c == '/' && next == '*') {
      i += 2;
      while (i + 1 < text.size() && !(text[i] == '*' && text[i + 1] == '/')) {
        if (text[i] == '\n') out += '\n';
        ++i;
      }
      ++i;
    } else if (c == '"' || c == '\'') {
      ++i;
      while (i < text.size() && text[i] != c) {
        if (text[i] == '\\') ++i;
        ++i;
      }
      out += "\"\"";
    } else {
      out += c;
    }
  }
  return out;
}

// rdma-core is reached through the loader's tables only: a direct call of an exported function would not even link
// (--no-undefined without libibverbs), and header-inline ones would bypass the one door.
TEST(VerbsLinking, NothingInSrcCallsAVerbsFunctionDirectly) {
  namespace fs = std::filesystem;
  const std::regex call(R"(\b(ibv|mlx5dv)_[A-Za-z0-9_]*\s*\()");
  const std::set<std::string> extensions = {".h", ".cc", ".cu", ".cuh"};
  int files = 0;
  for (const auto& entry : fs::recursive_directory_iterator(fs::path(NCCL_MOE_SOURCE_DIR) / "src")) {
    if (!entry.is_regular_file() || extensions.count(entry.path().extension().string()) == 0) continue;
    ++files;
    std::ifstream in(entry.path());
    const std::string code =
        codeOnly(std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()));
    for (auto it = std::sregex_iterator(code.begin(), code.end(), call); it != std::sregex_iterator(); ++it) {
      const size_t line = 1 + std::count(code.begin(), code.begin() + it->position(), '\n');
      ADD_FAILURE() << entry.path().string() << ":" << line << " calls " << it->str()
                    << "...: go through the tables of src/transport/rdma/verbs/loader.h";
    }
  }
  EXPECT_GT(files, 50) << "src/ not found under " << NCCL_MOE_SOURCE_DIR;
}

TEST(VerbsLoader, AMissingLibraryIsAClearErrorAndBindsNothing) {
  IbvApi ibv;
  EXPECT_EQ(ncclSystemError, loadIbverbs("/nonexistent/libibverbs.so.1", &ibv));
  std::string msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("/nonexistent/libibverbs.so.1 could not be loaded")) << msg;
  EXPECT_NE(std::string::npos, msg.find("No such file")) << msg;  // dlerror's reason
  EXPECT_NE(std::string::npos, msg.find("rdma-core " + std::to_string(kMinRdmaCoreRelease) + " or newer")) << msg;
  EXPECT_NE(std::string::npos, msg.find("scale-out")) << msg;
  EXPECT_EQ(nullptr, ibv.handle);
  EXPECT_EQ(nullptr, ibv.get_device_list);
  EXPECT_EQ(nullptr, ibv.wc_status_str);

  Mlx5Api dv;
  EXPECT_EQ(ncclSystemError, loadMlx5("libmlx5-does-not-exist.so.1", &dv));
  msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("libmlx5-does-not-exist.so.1 could not be loaded")) << msg;
  EXPECT_EQ(nullptr, dv.handle);
  EXPECT_EQ(nullptr, dv.create_qp);
}

bool rdmaCoreInstalled(std::string* why) {
  void* h = dlopen(kIbverbsSoname, RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* err = dlerror();
    *why = std::string(kIbverbsSoname) + " is not installed here (" + (err != nullptr ? err : "?") + ")";
    return false;
  }
  dlclose(h);
  return true;
}

// A library that is not rdma-core's: the first missing symbol is named, with its version and the release.
TEST(VerbsLoader, ALibraryWithoutTheSymbolsNamesTheFirstMissingOne) {
  IbvApi ibv;
  EXPECT_EQ(ncclSystemError, loadIbverbs("libm.so.6", &ibv));
  std::string msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("has no ibv_get_device_list@IBVERBS_1.1")) << msg;
  EXPECT_NE(std::string::npos, msg.find("libm.so.6")) << msg;
  EXPECT_EQ(nullptr, ibv.handle);
  EXPECT_EQ(nullptr, ibv.get_device_list);

  std::string why;
  if (!rdmaCoreInstalled(&why)) GTEST_SKIP() << why;
  // libibverbs has no mlx5dv_* symbols: the mlx5 table's first entry is the one reported.
  Mlx5Api dv;
  EXPECT_EQ(ncclSystemError, loadMlx5(kIbverbsSoname, &dv));
  msg = threadLastError();
  EXPECT_NE(std::string::npos, msg.find("has no mlx5dv_is_supported@MLX5_1.8")) << msg;
  EXPECT_NE(std::string::npos, msg.find("came with rdma-core 22")) << msg;
  EXPECT_EQ(nullptr, dv.is_supported);
}

template <typename Fn>
const void* address(Fn* fn) {
  return reinterpret_cast<const void*>(fn);
}

TEST(VerbsLoader, InstalledRdmaCoreBindsEveryEntryPointAndListsDevicesSafely) {
  std::string why;
  if (!rdmaCoreInstalled(&why)) GTEST_SKIP() << why;
  const IbvApi* ibv = nullptr;
  ASSERT_EQ(ncclSuccess, ibverbs(&ibv)) << threadLastError();
  ASSERT_NE(nullptr, ibv);
  const std::pair<const char*, const void*> required[] = {
      {"get_device_list", address(ibv->get_device_list)},
      {"free_device_list", address(ibv->free_device_list)},
      {"get_device_name", address(ibv->get_device_name)},
      {"open_device", address(ibv->open_device)},
      {"close_device", address(ibv->close_device)},
      {"query_device", address(ibv->query_device)},
      {"query_port_compat", address(ibv->query_port_compat)},
      {"query_gid", address(ibv->query_gid)},
      {"alloc_pd", address(ibv->alloc_pd)},
      {"dealloc_pd", address(ibv->dealloc_pd)},
      {"reg_mr", address(ibv->reg_mr)},
      {"reg_mr_iova2", address(ibv->reg_mr_iova2)},
      {"dereg_mr", address(ibv->dereg_mr)},
      {"create_cq", address(ibv->create_cq)},
      {"destroy_cq", address(ibv->destroy_cq)},
      {"create_qp", address(ibv->create_qp)},
      {"modify_qp", address(ibv->modify_qp)},
      {"destroy_qp", address(ibv->destroy_qp)},
      {"qp_to_qp_ex", address(ibv->qp_to_qp_ex)},
      {"wc_status_str", address(ibv->wc_status_str)},
  };
  for (const auto& r : required) EXPECT_NE(nullptr, r.second) << r.first;
  // The optional entry is bound exactly when the library has it.
  void* h = dlopen(kIbverbsSoname, RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(nullptr, h);
  EXPECT_EQ(dlvsym(h, "ibv_reg_dmabuf_mr", "IBVERBS_1.12") != nullptr, ibv->reg_dmabuf_mr != nullptr);
  // Bound at the version the header declares: the same address dlvsym gives for that version.
  EXPECT_EQ(dlvsym(h, "ibv_get_device_list", "IBVERBS_1.1"), address(ibv->get_device_list));
  dlclose(h);
  EXPECT_STREQ("success", ibv->wc_status_str(IBV_WC_SUCCESS));

  // No NIC on a CI machine: an empty list, or NULL with errno (no RDMA subsystem in sysfs). Either way no crash.
  int num = -1;
  errno = 0;
  ibv_device** list = ibv->get_device_list(&num);
  if (list == nullptr) {
    std::printf("ibv_get_device_list: NULL, errno %d (%s)\n", errno, std::strerror(errno));
  } else {
    std::printf("ibv_get_device_list: %d device(s)%s", num, num > 0 ? ":" : "\n");
    EXPECT_GE(num, 0);
    for (int i = 0; i < num; ++i) std::printf(" %s%s", ibv->get_device_name(list[i]), i + 1 == num ? "\n" : "");
    EXPECT_EQ(nullptr, list[num > 0 ? num : 0]) << "the list is NULL-terminated";
    ibv->free_device_list(list);
  }

  const Mlx5Api* dv = nullptr;
  ASSERT_EQ(ncclSuccess, mlx5(&dv)) << threadLastError();
  EXPECT_NE(nullptr, dv->is_supported);
  EXPECT_NE(nullptr, dv->create_qp);
  EXPECT_NE(nullptr, dv->init_obj);
}

// The process-wide load happens once: every thread, racing on the first call, gets the same table (or the same
// failure with the same message).
TEST(VerbsLoader, LoadsOnceWhateverTheThreads) {
  const int n = 8;
  std::vector<const IbvApi*> tables(n, nullptr);
  std::vector<ncclResult_t> results(n, ncclInternalError);
  std::vector<std::string> messages(n);
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      clearThreadLastError();
      results[t] = ibverbs(&tables[t]);
      messages[t] = threadLastError();
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 1; t < n; ++t) {
    EXPECT_EQ(results[0], results[t]);
    EXPECT_EQ(tables[0], tables[t]);
    EXPECT_EQ(messages[0], messages[t]);
  }
  EXPECT_EQ(results[0] == ncclSuccess, tables[0] != nullptr);
}

}  // namespace
}  // namespace nccl_moe::verbs
