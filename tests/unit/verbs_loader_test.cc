// rdma-core is reached only at run time (src/transport/rdma/verbs/loader.h): a library that is absent or lacks a
// symbol is a clear error naming it, and where rdma-core is installed the tables bind and ibv_get_device_list runs
// through them (no NIC here: an empty list or an error, no crash).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/error.h"
#include "transport/rdma/verbs/loader.h"

namespace nccl_moe::verbs {
namespace {

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
