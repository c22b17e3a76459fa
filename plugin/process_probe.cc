// Process probes of the tuner (contract in process_probe.h). dl_iterate_phdr callbacks only collect names:
// dlopen/dlsym run after the iteration, outside the loader's lock.
#include "process_probe.h"

#include <cuda.h>  // CUdevice, CUresult, attribute ids only: libcuda is never linked
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <stdlib.h>

#include <algorithm>
#include <cstring>

namespace nccl_moe {
namespace tuner {
namespace {

const char* baseName(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

struct NameScan {
  const char* prefix;
  std::vector<std::string> paths;
};

int collectByPrefix(struct dl_phdr_info* info, size_t, void* data) {
  auto* scan = static_cast<NameScan*>(data);
  if (info->dlpi_name == nullptr || info->dlpi_name[0] == '\0') return 0;
  if (std::strncmp(baseName(info->dlpi_name), scan->prefix, std::strlen(scan->prefix)) == 0) {
    scan->paths.emplace_back(info->dlpi_name);
  }
  return 0;
}

std::vector<std::string> loadedObjectsNamed(const char* prefix) {
  NameScan scan{prefix, {}};
  dl_iterate_phdr(collectByPrefix, &scan);
  return std::move(scan.paths);
}

}  // namespace

DeviceInfo currentDevice() {
  DeviceInfo info;
  void* cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (cuda == nullptr) return info;
  using CtxGetDeviceFn = CUresult (*)(CUdevice*);
  using DeviceGetAttributeFn = CUresult (*)(int*, CUdevice_attribute, CUdevice);
  auto ctx_get_device = reinterpret_cast<CtxGetDeviceFn>(dlsym(cuda, "cuCtxGetDevice"));
  auto device_get_attribute = reinterpret_cast<DeviceGetAttributeFn>(dlsym(cuda, "cuDeviceGetAttribute"));
  CUdevice device = 0;
  if (ctx_get_device != nullptr && ctx_get_device(&device) == CUDA_SUCCESS) {
    info.cuda_device = static_cast<int>(device);
    int num_sms = 0;
    if (device_get_attribute != nullptr &&
        device_get_attribute(&num_sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device) == CUDA_SUCCESS) {
      info.num_sms = num_sms;
    }
  }
  dlclose(cuda);  // drops only the reference RTLD_NOLOAD took
  return info;
}

std::vector<std::string> loadedNcclCopies() {
  std::vector<std::string> real_paths;
  for (const std::string& path : loadedObjectsNamed("libnccl.so")) {
    char resolved[PATH_MAX];
    std::string real = realpath(path.c_str(), resolved) != nullptr ? std::string(resolved) : path;
    if (std::find(real_paths.begin(), real_paths.end(), real) == real_paths.end()) real_paths.push_back(real);
  }
  return real_paths;
}

AttachFn findLibraryAttach() {
  if (void* sym = dlsym(RTLD_DEFAULT, NCCL_MOE_PLUGIN_ATTACH_SYMBOL)) return reinterpret_cast<AttachFn>(sym);
  for (const std::string& path : loadedObjectsNamed("libnccl_moe.so")) {
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (lib == nullptr) continue;
    void* sym = dlsym(lib, NCCL_MOE_PLUGIN_ATTACH_SYMBOL);
    dlclose(lib);  // the library stays loaded by whoever loaded it
    if (sym != nullptr) return reinterpret_cast<AttachFn>(sym);
  }
  return nullptr;
}

}  // namespace tuner
}  // namespace nccl_moe
