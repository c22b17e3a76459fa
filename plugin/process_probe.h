// What the tuner learns about its process without linking anything but libc/libdl: the current CUDA device
// and its SM count (through a libcuda that NCCL already loaded), the loaded copies of libnccl, and the
// loaded libnccl_moe's bridge entry point. Called from the tuner's init/finalize only, never per collective.
#pragma once

#include <string>
#include <vector>

#include "core/plugin_bridge.h"

namespace nccl_moe {
namespace tuner {

struct DeviceInfo {
  int cuda_device = -1;  // current device of the calling thread, -1 if unknown
  int num_sms = 0;       // its multiprocessor count, 0 if unknown
};

// Asks the CUDA driver (only if libcuda.so.1 is already loaded; never loads it, never creates a context).
DeviceInfo currentDevice();

// Distinct real paths of the loaded objects whose file name starts with "libnccl.so".
std::vector<std::string> loadedNcclCopies();

// ncclMoePluginAttach of the loaded libnccl_moe: dlsym(RTLD_DEFAULT) first (library linked into the program
// or loaded RTLD_GLOBAL), else a loaded object named libnccl_moe.so* opened RTLD_NOLOAD (loaded RTLD_LOCAL,
// e.g. by Python). nullptr when libnccl_moe is not loaded.
using AttachFn = const ncclMoePluginBridge_t* (*)(const ncclMoePluginHooks_t*);
AttachFn findLibraryAttach();

}  // namespace tuner
}  // namespace nccl_moe
