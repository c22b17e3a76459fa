// libnccl-tuner-moe.so: NCCL's tuner tables ncclTunerPlugin_v5 (NCCL 2.28, 2.29) and ncclTunerPlugin_v6
// (NCCL >= 2.30), the only symbols the library exports (plugin/exports.map).
//
// What it does:
//   init        per NCCL communicator: reads NCCL_MOE_SM_RESERVE, asks the driver for the current device and
//               its SM count, warns once if two different libnccl copies are loaded, attaches to a loaded
//               libnccl_moe (logger + communicator registry, src/core/plugin_bridge.h) and logs one INFO line
//               tagged "NCCL-MoE tuner".
//   getCollInfo caps nChannels so NCCL's CTAs fit beside the SMs NCCL-MoE kernels hold (channel_cap.h);
//               the cost table is left untouched. O(1): a few relaxed atomic loads, a 21-entry scan, one
//               relaxed counter increment on the context. No locks, allocation, CUDA calls or logging.
//   getChunkSize (v6) keeps NCCL's chunk size.
//   finalize    logs how often the communicator consulted the tuner, unregisters it, detaches from
//               libnccl_moe with the last communicator.
// Failure policy: NCCL treats an error from init/getCollInfo as fatal for the user, so every entry point
// returns ncclSuccess; on trouble the tuner logs (INFO) and leaves NCCL's decisions alone (context NULL).
// Lifetime: NCCL dlcloses the plugin with its last communicator and may reopen it; the library is linked
// -z nodelete, so the process-wide state below and the hooks libnccl_moe holds stay valid.
#include <stdlib.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "channel_cap.h"
#include "core/plugin_bridge.h"
#include "nccl_tuner_abi.h"
#include "process_probe.h"

#define TUNER_LOG(logger, level, flags, ...)                                              \
  do {                                                                                    \
    if ((logger) != nullptr) (logger)((level), (flags), __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

namespace nccl_moe {
namespace tuner {
namespace {

constexpr const char* kPluginName = "NCCL-MoE";
constexpr int kMaxDevices = 64;  // per-device reservation slots; the last slot applies to all devices
constexpr int kGlobalSlot = kMaxDevices;
constexpr unsigned long kLogFlags = NCCL_INIT | NCCL_TUNING;

// SMs reserved by NCCL-MoE kernels, pushed by libnccl_moe through the bridge. -1 = none; sms 0 = unknown.
struct SmSlot {
  std::atomic<int> reserve_sms{-1};
  std::atomic<int> device_sms{0};
};
SmSlot g_slots[kMaxDevices + 1];

int slotOf(int cuda_device) {
  if (cuda_device < 0) return kGlobalSlot;
  return cuda_device < kMaxDevices ? cuda_device : -1;
}

void hookSetSmReserve(int cuda_device, int reserve_sms, int device_sms) {
  const int slot = slotOf(cuda_device);
  if (slot < 0) return;
  g_slots[slot].device_sms.store(device_sms > 0 ? device_sms : 0, std::memory_order_relaxed);
  g_slots[slot].reserve_sms.store(reserve_sms >= 0 ? reserve_sms : -1, std::memory_order_relaxed);
}

void resetSlots() {
  for (SmSlot& slot : g_slots) {
    slot.reserve_sms.store(-1, std::memory_order_relaxed);
    slot.device_sms.store(0, std::memory_order_relaxed);
  }
}

struct Context {
  uint64_t comm_hash = 0;
  size_t num_ranks = 0;
  size_t num_nodes = 0;
  int cuda_device = -1;
  int device_slot = -1;         // slot of cuda_device, or -1
  int queried_sms = 0;          // from the driver at init, 0 if unknown
  int env_reserve = -1;         // NCCL_MOE_SM_RESERVE, -1 if unset/invalid
  bool size_rule_valid = true;  // NCCL's thread counts and thresholds are the defaults
  int tuner_version = 0;
  ncclDebugLogger_t logger = nullptr;
  AttachFn attach = nullptr;                      // libnccl_moe's entry point found at init
  const ncclMoePluginBridge_t* bridge = nullptr;  // its table, valid while that library stays loaded
  std::atomic<uint64_t> num_calls{0};
  std::atomic<uint64_t> num_capped{0};
};

// Process-wide state touched only by init/finalize.
struct PluginState {
  std::mutex mutex;
  int live_contexts = 0;
  bool warned_duplicate_nccl = false;
  AttachFn attached_fn = nullptr;  // the libnccl_moe we last attached to
  const ncclMoePluginBridge_t* attached_bridge = nullptr;
};

PluginState& pluginState() {
  static PluginState* s = new PluginState();  // never destroyed (the library is never unmapped)
  return *s;
}

// SMs the NCCL-MoE kernels hold beside this communicator's collectives, and the device's SM count.
// Precedence: the environment (operator override), then the device's slot, then the all-devices slot.
void effectiveReserve(const Context& ctx, int* reserve_sms, int* device_sms) {
  int reserve = -1;
  int sms = 0;
  if (ctx.device_slot >= 0) {
    reserve = g_slots[ctx.device_slot].reserve_sms.load(std::memory_order_relaxed);
    sms = g_slots[ctx.device_slot].device_sms.load(std::memory_order_relaxed);
  }
  if (reserve < 0) reserve = g_slots[kGlobalSlot].reserve_sms.load(std::memory_order_relaxed);
  if (ctx.env_reserve >= 0) reserve = ctx.env_reserve;
  if (sms <= 0) sms = ctx.queried_sms;
  if (sms <= 0) sms = g_slots[kGlobalSlot].device_sms.load(std::memory_order_relaxed);
  *reserve_sms = reserve;
  *device_sms = sms;
}

int parseReserve(const char* text) {
  if (text == nullptr || *text == '\0') return -1;
  errno = 0;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < 0 || value > 1 << 20) return -2;
  return static_cast<int>(value);
}

void warnIfSeveralNcclCopies(PluginState& st, ncclDebugLogger_t logger) {
  if (st.warned_duplicate_nccl) return;
  const std::vector<std::string> copies = loadedNcclCopies();
  if (copies.size() < 2) return;
  st.warned_duplicate_nccl = true;
  TUNER_LOG(logger, NCCL_LOG_WARN, NCCL_INIT,
            "NCCL-MoE tuner: %zu different libnccl copies are loaded in this process (%s and %s). A communicator "
            "created by one copy must never be used through the other; link NCCL-MoE against the NCCL the "
            "framework uses.",
            copies.size(), copies[0].c_str(), copies[1].c_str());
  // The WARN above is invisible without NCCL_DEBUG; this condition is worth one line on stderr regardless.
  if (getenv("NCCL_DEBUG") == nullptr) {
    std::fprintf(stderr,
                 "NCCL-MoE tuner WARNING: %zu different libnccl copies are loaded in this process (%s and %s)\n",
                 copies.size(), copies[0].c_str(), copies[1].c_str());
  }
}

ncclResult_t initContext(int tuner_version, void** context, uint64_t comm_hash, size_t num_ranks, size_t num_nodes,
                         ncclDebugLogger_t logger, const ncclNvlDomainInfo_v5_t* nvl_domains) noexcept {
  if (context == nullptr) return ncclSuccess;
  *context = nullptr;
  try {
    std::unique_ptr<Context> ctx(new (std::nothrow) Context());
    if (ctx == nullptr) {
      TUNER_LOG(logger, NCCL_LOG_INFO, kLogFlags, "NCCL-MoE tuner: out of memory; comm %#lx runs untuned",
                static_cast<unsigned long>(comm_hash));
      return ncclSuccess;
    }
    ctx->comm_hash = comm_hash;
    ctx->num_ranks = num_ranks;
    ctx->num_nodes = num_nodes;
    ctx->tuner_version = tuner_version;
    ctx->logger = logger;
    const char* reserve_text = getenv("NCCL_MOE_SM_RESERVE");
    ctx->env_reserve = parseReserve(reserve_text);
    if (ctx->env_reserve == -2) {
      TUNER_LOG(logger, NCCL_LOG_INFO, NCCL_INIT | NCCL_ENV,
                "NCCL-MoE tuner: ignoring NCCL_MOE_SM_RESERVE=\"%s\" (not a non-negative integer)", reserve_text);
      ctx->env_reserve = -1;
    }
    ctx->size_rule_valid = getenv("NCCL_NTHREADS") == nullptr && getenv("NCCL_LL128_NTHREADS") == nullptr &&
                           getenv("NCCL_THREAD_THRESHOLDS") == nullptr;
    const DeviceInfo device = currentDevice();
    ctx->cuda_device = device.cuda_device;
    ctx->device_slot = device.cuda_device >= 0 && device.cuda_device < kMaxDevices ? device.cuda_device : -1;
    ctx->queried_sms = device.num_sms;

    ncclMoePluginCommInfo_t info{};
    info.comm_hash = comm_hash;
    info.num_ranks = static_cast<int>(num_ranks);
    info.num_nodes = static_cast<int>(num_nodes);
    info.num_nvl_domains = nvl_domains != nullptr ? nvl_domains->nNvlDomains : -1;
    info.min_ranks_per_nvl_domain = nvl_domains != nullptr ? nvl_domains->minRanksPerNvlDomain : -1;
    info.max_ranks_per_nvl_domain = nvl_domains != nullptr ? nvl_domains->maxRanksPerNvlDomain : -1;
    info.cuda_device = device.cuda_device;
    info.tuner_version = tuner_version;

    PluginState& st = pluginState();
    {
      std::lock_guard<std::mutex> lock(st.mutex);
      warnIfSeveralNcclCopies(st, logger);
      ctx->attach = findLibraryAttach();
      if (ctx->attach != nullptr) {
        ncclMoePluginHooks_t hooks{};
        hooks.size = sizeof(hooks);
        hooks.version = NCCL_MOE_PLUGIN_BRIDGE_VERSION;
        hooks.plugin_name = kPluginName;
        // ncclDebugLogger_t and ncclMoeNcclLogger_t differ only in the first parameter: an int-sized enum
        // versus int, passed identically.
        hooks.logger = reinterpret_cast<ncclMoeNcclLogger_t>(logger);
        hooks.set_sm_reserve = hookSetSmReserve;
        ctx->bridge = ctx->attach(&hooks);
        if (ctx->bridge != nullptr) {
          st.attached_fn = ctx->attach;
          st.attached_bridge = ctx->bridge;
          if (ctx->bridge->comm_added != nullptr) ctx->bridge->comm_added(&info);
        }
      }
      ++st.live_contexts;
    }

    int reserve_sms = -1;
    int device_sms = 0;
    effectiveReserve(*ctx, &reserve_sms, &device_sms);
    const int cap = channelCap(reserve_sms, device_sms);
    TUNER_LOG(logger, NCCL_LOG_INFO, kLogFlags,
              "NCCL-MoE tuner: init comm %#lx nRanks %zu nNodes %zu nvlDomains %d cudaDev %d SMs %d SM reserve %d "
              "(%s) -> channel cap %d (tuner v%d, libnccl_moe %s)",
              static_cast<unsigned long>(comm_hash), num_ranks, num_nodes, info.num_nvl_domains, ctx->cuda_device,
              device_sms, reserve_sms,
              ctx->env_reserve >= 0 ? "NCCL_MOE_SM_RESERVE" : (reserve_sms >= 0 ? "registered" : "none"), cap,
              tuner_version, ctx->bridge != nullptr ? "attached" : (ctx->attach != nullptr ? "refused" : "not loaded"));
    if (reserve_sms > 0 && device_sms <= 0) {
      TUNER_LOG(logger, NCCL_LOG_INFO, kLogFlags,
                "NCCL-MoE tuner: SM count of the device unknown, so the SM reserve %d cannot cap NCCL channels",
                reserve_sms);
    } else if (reserve_sms >= device_sms && device_sms > 0) {
      TUNER_LOG(logger, NCCL_LOG_INFO, kLogFlags,
                "NCCL-MoE tuner: SM reserve %d >= %d SMs: NCCL limited to 1 channel, co-residency with NCCL-MoE "
                "kernels is not guaranteed",
                reserve_sms, device_sms);
    }
    *context = ctx.release();
  } catch (...) {
    // Only std::vector/std::string allocation can throw here; run untuned rather than fail the comm.
    TUNER_LOG(logger, NCCL_LOG_INFO, kLogFlags, "NCCL-MoE tuner: init failed; comm %#lx runs untuned",
              static_cast<unsigned long>(comm_hash));
  }
  return ncclSuccess;
}

ncclResult_t initV5(void** context, uint64_t comm_id, size_t num_ranks, size_t num_nodes, ncclDebugLogger_t logger,
                    ncclNvlDomainInfo_v5_t* nvl_domains, ncclTunerConstants_v5_t* /*constants*/) {
  return initContext(5, context, comm_id, num_ranks, num_nodes, logger, nvl_domains);
}

ncclResult_t initV6(void** context, uint64_t comm_id, size_t num_ranks, size_t num_nodes, ncclDebugLogger_t logger,
                    ncclNvlDomainInfo_v6_t* nvl_domains, ncclTunerConstants_v6_t* /*constants*/) {
  return initContext(6, context, comm_id, num_ranks, num_nodes, logger, nvl_domains);
}

ncclResult_t getCollInfo(void* context, ncclFunc_t /*coll_type*/, size_t num_bytes, int /*num_pipe_ops*/,
                         float** coll_cost_table, int num_algo, int num_proto, int /*reg_buff*/, int* num_channels) {
  Context* ctx = static_cast<Context*>(context);
  if (ctx == nullptr || num_channels == nullptr) return ncclSuccess;
  ctx->num_calls.fetch_add(1, std::memory_order_relaxed);
  int reserve_sms = -1;
  int device_sms = 0;
  effectiveReserve(*ctx, &reserve_sms, &device_sms);
  const int cap = channelCap(reserve_sms, device_sms);
  if (cap <= 0) return ncclSuccess;
  // NCCL passes a float[numAlgo][numProto] array cast to float**.
  const int algo = cheapestAlgorithm(reinterpret_cast<const float*>(coll_cost_table), num_algo, num_proto);
  const int value = channelsToWrite(cap, algo, num_bytes, ctx->size_rule_valid, *num_channels);
  if (value != *num_channels) {
    *num_channels = value;
    ctx->num_capped.fetch_add(1, std::memory_order_relaxed);
  }
  return ncclSuccess;
}

ncclResult_t getChunkSize(void* /*context*/, ncclFunc_t /*coll_type*/, size_t /*num_bytes*/, int /*algo*/,
                          int /*proto*/, int /*num_channels*/, size_t* /*chunk_size*/) {
  return ncclSuccess;  // NCCL's chunk size stands
}

ncclResult_t finalize(void* context) {
  Context* ctx = static_cast<Context*>(context);
  if (ctx == nullptr) return ncclSuccess;
  TUNER_LOG(ctx->logger, NCCL_LOG_INFO, kLogFlags,
            "NCCL-MoE tuner: finalize comm %#lx: consulted %lu times, channels capped %lu times",
            static_cast<unsigned long>(ctx->comm_hash),
            static_cast<unsigned long>(ctx->num_calls.load(std::memory_order_relaxed)),
            static_cast<unsigned long>(ctx->num_capped.load(std::memory_order_relaxed)));
  PluginState& st = pluginState();
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    // Call into libnccl_moe only if the library we attached to is still the one loaded.
    const AttachFn loaded = (ctx->bridge != nullptr || st.attached_bridge != nullptr) ? findLibraryAttach() : nullptr;
    if (ctx->bridge != nullptr && loaded == ctx->attach && ctx->bridge->comm_removed != nullptr) {
      ctx->bridge->comm_removed(ctx->comm_hash, ctx->cuda_device);
    }
    if (--st.live_contexts == 0) {
      if (st.attached_bridge != nullptr && loaded == st.attached_fn && st.attached_bridge->detach != nullptr) {
        st.attached_bridge->detach();
      }
      st.attached_fn = nullptr;
      st.attached_bridge = nullptr;
      resetSlots();
    }
  }
  delete ctx;
  return ncclSuccess;
}

}  // namespace
}  // namespace tuner
}  // namespace nccl_moe

extern "C" {

__attribute__((visibility("default"))) extern const ncclTuner_v5_t ncclTunerPlugin_v5;
__attribute__((visibility("default"))) extern const ncclTuner_v6_t ncclTunerPlugin_v6;

// clang-format off
const ncclTuner_v5_t ncclTunerPlugin_v5 = {
    nccl_moe::tuner::kPluginName,
    nccl_moe::tuner::initV5,
    nccl_moe::tuner::getCollInfo,
    nccl_moe::tuner::finalize,
};

const ncclTuner_v6_t ncclTunerPlugin_v6 = {
    nccl_moe::tuner::kPluginName,
    nccl_moe::tuner::initV6,
    nccl_moe::tuner::getCollInfo,
    nccl_moe::tuner::finalize,
    nccl_moe::tuner::getChunkSize,
};
// clang-format on

}  // extern "C"
