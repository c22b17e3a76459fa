// The library side of the bridge between libnccl_moe.so and the NCCL tuner plugin libnccl-tuner-moe.so
// (plugin/). The two libraries never link to each other: NCCL dlopens the plugin RTLD_LOCAL, and the plugin,
// in its init, finds ncclMoePluginAttach() in the already-loaded libnccl_moe (dlsym(RTLD_DEFAULT), else the
// loaded object named libnccl_moe.so*). If libnccl_moe is not loaded, the plugin works alone.
//
// Through the bridge:
//   plugin -> library  NCCL's logger (pluginLogger(): NCCL-MoE's log lines go through it while attached);
//                      every communicator NCCL announces to the tuner (commId hash, nRanks, nNodes, NVLink
//                      domains, CUDA device) into a registry that ncclMoeCommInit can consult;
//                      detach when NCCL destroyed the plugin's last communicator.
//   library -> plugin  the SMs NCCL-MoE kernels hold on a device (setPluginSmReserve), from which the tuner
//                      caps NCCL's channel count (see plugin/README.md for the rule).
//
// Threading: everything here is callable from any thread. pluginLogger() is one relaxed atomic load. The
// registry and the reservations are guarded by one mutex, taken only in comm init/destroy paths, never on
// NCCL's or NCCL-MoE's per-operation paths. Calls into the plugin (its hooks) only store atomics, so holding
// the mutex while calling them cannot deadlock.
//
// ABI: the C structs below are shared by two separately built libraries; they only grow at the end, `size`
// says how much the caller knows, `version` must be NCCL_MOE_PLUGIN_BRIDGE_VERSION.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NCCL_MOE_PLUGIN_BRIDGE_VERSION 1

// Same calling convention as NCCL's ncclDebugLogger_t (whose first parameter is an int-sized enum).
// `level`: 2 WARN, 3 INFO, 5 TRACE. `flags`: NCCL subsystem bits (1 INIT, 2 COLL, 0x40 TUNING, 0x80 ENV).
typedef void (*ncclMoeNcclLogger_t)(int level, unsigned long flags, const char* file, int line, const char* fmt, ...);

// One communicator as NCCL announced it to the tuner. Unknown fields are -1.
typedef struct {
  uint64_t comm_hash;  // NCCL's commHash (the tuner's commId); equal on all ranks of the comm
  int num_ranks;
  int num_nodes;
  int num_nvl_domains;  // NVLink domains (tuner v5+), -1 when NCCL did not say
  int min_ranks_per_nvl_domain;
  int max_ranks_per_nvl_domain;
  int cuda_device;    // CUDA device current during the tuner's init (the comm's device), or -1
  int tuner_version;  // tuner table NCCL loaded: 5 or 6
} ncclMoePluginCommInfo_t;

// Filled by the plugin; must stay valid as long as the plugin can be attached (it is linked -z nodelete).
typedef struct {
  size_t size;           // sizeof(ncclMoePluginHooks_t) as the plugin was built
  unsigned int version;  // NCCL_MOE_PLUGIN_BRIDGE_VERSION
  const char* plugin_name;
  ncclMoeNcclLogger_t logger;  // NCCL's logger (may be NULL)
  // cuda_device -1 = every device. reserve_sms -1 = no reservation. device_sms <= 0 = unknown.
  // Only stores atomics; callable with any lock held.
  void (*set_sm_reserve)(int cuda_device, int reserve_sms, int device_sms);
} ncclMoePluginHooks_t;

// Returned by the library; static, valid while libnccl_moe is loaded.
typedef struct {
  size_t size;
  unsigned int version;
  void (*comm_added)(const ncclMoePluginCommInfo_t* info);
  void (*comm_removed)(uint64_t comm_hash, int cuda_device);
  // The plugin has no communicator left: stop logging through NCCL and stop calling its hooks.
  void (*detach)(void);
} ncclMoePluginBridge_t;

// Exported from libnccl_moe.so (not part of the public header). Records `hooks` (replacing any earlier
// ones), takes its logger for pluginLogger(), replays the current SM reservations into the plugin and
// returns the library's table. NULL if `hooks` is NULL or of an unknown version.
__attribute__((visibility("default"))) const ncclMoePluginBridge_t* ncclMoePluginAttach(
    const ncclMoePluginHooks_t* hooks);

#define NCCL_MOE_PLUGIN_ATTACH_SYMBOL "ncclMoePluginAttach"

#ifdef __cplusplus
}  // extern "C"

namespace nccl_moe {

// NCCL's logger while the tuner plugin is attached, else nullptr. One relaxed atomic load.
ncclMoeNcclLogger_t pluginLogger();

// NCCL logger levels and subsystem bits, for callers of pluginLogger().
constexpr int kNcclLogWarn = 2;
constexpr int kNcclLogInfo = 3;
constexpr int kNcclLogTrace = 5;
constexpr unsigned long kNcclSubsysInit = 0x1;
constexpr unsigned long kNcclSubsysColl = 0x2;

// True while a plugin is attached (it has at least one NCCL communicator alive).
bool pluginAttached();

struct RegisteredComm {
  uint64_t comm_hash = 0;
  int num_ranks = 0;
  int num_nodes = 0;
  int num_nvl_domains = -1;
  int min_ranks_per_nvl_domain = -1;
  int max_ranks_per_nvl_domain = -1;
  int cuda_device = -1;  // device of the rank this entry describes (-1 unknown)
  int tuner_version = 0;
  int num_local_ranks = 0;  // how many of its ranks NCCL initialised in this process (ncclCommInitAll: several)
  uint64_t sequence = 0;    // registration order (larger = newer)
};

// The registered communicator with this hash, if any (of several local ranks: the most recently registered).
bool lookupRegisteredComm(uint64_t comm_hash, RegisteredComm* out);

// NCCL has no public API returning a communicator's hash, so ncclMoeCommInit can only match on what it can
// ask NCCL (ncclCommCount, ncclCommCuDevice). Returns how many distinct registered communicators have
// `num_ranks` ranks and a rank on `cuda_device` (cuda_device -1: any), and stores the most recently
// registered match in *out (when out != nullptr and the count is > 0). A count > 1 means the match is
// ambiguous (e.g. a TP and an EP group of equal size on the same GPU): do not trust it then.
int findRegisteredComms(int num_ranks, int cuda_device, RegisteredComm* out);

// Number of distinct communicators currently registered (tests, diagnostics).
int registeredCommCount();

// Declares that NCCL-MoE kernels hold `reserve_sms` SMs of `cuda_device` (-1: every device) while NCCL
// collectives may run; `device_sms` is that device's SM count (0 if unknown: the plugin then asks the
// driver). reserve_sms < 0 clears the reservation. Stored here and forwarded to the plugin now or when it
// attaches. NCCL_MOE_SM_RESERVE in the environment overrides this inside the plugin.
void setPluginSmReserve(int cuda_device, int reserve_sms, int device_sms);

}  // namespace nccl_moe
#endif
