// Library side of the tuner-plugin bridge (contract in plugin_bridge.h): the attached plugin's hooks, NCCL's
// logger, the registry of communicators NCCL announced to the tuner, and the SM reservations forwarded to
// the plugin. One mutex guards everything but the logger pointer, which log.cc reads lock-free.
#include "core/plugin_bridge.h"

#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

namespace nccl_moe {
namespace {

constexpr int kMaxDevices = 64;  // reservation slots per CUDA device ordinal; slot kMaxDevices = all devices
constexpr int kGlobalSlot = kMaxDevices;

struct Reservation {
  int reserve_sms = -1;
  int device_sms = 0;
  bool set = false;  // ever written: replayed to a newly attached plugin
};

// One entry per (communicator, CUDA device): ranks of one communicator on different devices of this process
// (ncclCommInitAll) are separate entries; `refs` counts registrations of the same pair (device unknown).
struct Entry {
  RegisteredComm info;
  int refs = 0;
};

struct BridgeState {
  std::mutex mutex;
  ncclMoePluginHooks_t hooks{};  // copy of the attached plugin's hooks
  bool attached = false;
  std::vector<Entry> entries;
  uint64_t next_sequence = 1;
  Reservation reservations[kMaxDevices + 1];
};

std::atomic<ncclMoeNcclLogger_t> g_logger{nullptr};

BridgeState& state() {
  static BridgeState* s = new BridgeState();  // never destroyed: the plugin may call in during process exit
  return *s;
}

int slotOf(int cuda_device) {
  if (cuda_device < 0) return kGlobalSlot;
  return cuda_device < kMaxDevices ? cuda_device : -1;
}

// Caller holds the mutex.
void forward(BridgeState& st, int slot) {
  if (!st.attached || st.hooks.set_sm_reserve == nullptr) return;
  const Reservation& r = st.reservations[slot];
  st.hooks.set_sm_reserve(slot == kGlobalSlot ? -1 : slot, r.reserve_sms, r.device_sms);
}

// Caller holds the mutex. `entry` with num_local_ranks = every registration of its communicator here.
RegisteredComm withLocalRanks(const BridgeState& st, const Entry& entry) {
  RegisteredComm out = entry.info;
  out.num_local_ranks = 0;
  for (const Entry& e : st.entries) {
    if (e.info.comm_hash == entry.info.comm_hash) out.num_local_ranks += e.refs;
  }
  return out;
}

void bridgeCommAdded(const ncclMoePluginCommInfo_t* info) {
  if (info == nullptr) return;
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  for (Entry& e : st.entries) {
    if (e.info.comm_hash == info->comm_hash && e.info.cuda_device == info->cuda_device) {
      ++e.refs;
      e.info.sequence = st.next_sequence++;
      return;
    }
  }
  Entry e;
  e.info.comm_hash = info->comm_hash;
  e.info.num_ranks = info->num_ranks;
  e.info.num_nodes = info->num_nodes;
  e.info.num_nvl_domains = info->num_nvl_domains;
  e.info.min_ranks_per_nvl_domain = info->min_ranks_per_nvl_domain;
  e.info.max_ranks_per_nvl_domain = info->max_ranks_per_nvl_domain;
  e.info.cuda_device = info->cuda_device;
  e.info.tuner_version = info->tuner_version;
  e.info.sequence = st.next_sequence++;
  e.refs = 1;
  try {
    st.entries.push_back(e);
  } catch (...) {
    // Out of memory: the communicator stays unregistered (lookups miss); never throw into the plugin.
  }
}

void bridgeCommRemoved(uint64_t comm_hash, int cuda_device) {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  for (size_t i = 0; i < st.entries.size(); ++i) {
    Entry& e = st.entries[i];
    if (e.info.comm_hash != comm_hash || e.info.cuda_device != cuda_device) continue;
    if (--e.refs <= 0) st.entries.erase(st.entries.begin() + static_cast<std::ptrdiff_t>(i));
    return;
  }
}

void bridgeDetach() {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  st.attached = false;
  st.hooks = ncclMoePluginHooks_t{};
  g_logger.store(nullptr, std::memory_order_relaxed);
}

const ncclMoePluginBridge_t kBridge = {sizeof(ncclMoePluginBridge_t), NCCL_MOE_PLUGIN_BRIDGE_VERSION, bridgeCommAdded,
                                       bridgeCommRemoved, bridgeDetach};

}  // namespace

ncclMoeNcclLogger_t pluginLogger() { return g_logger.load(std::memory_order_relaxed); }

bool pluginAttached() {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.attached;
}

bool lookupRegisteredComm(uint64_t comm_hash, RegisteredComm* out) {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  const Entry* best = nullptr;
  for (const Entry& e : st.entries) {
    if (e.info.comm_hash == comm_hash && (best == nullptr || e.info.sequence > best->info.sequence)) best = &e;
  }
  if (best != nullptr && out != nullptr) *out = withLocalRanks(st, *best);
  return best != nullptr;
}

int findRegisteredComms(int num_ranks, int cuda_device, RegisteredComm* out) {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  const Entry* best = nullptr;
  std::vector<uint64_t> hashes;  // distinct communicators among the matches
  for (const Entry& e : st.entries) {
    if (e.info.num_ranks != num_ranks) continue;
    if (cuda_device >= 0 && e.info.cuda_device != cuda_device) continue;
    bool seen = false;
    for (uint64_t h : hashes) seen = seen || h == e.info.comm_hash;
    if (!seen) hashes.push_back(e.info.comm_hash);
    if (best == nullptr || e.info.sequence > best->info.sequence) best = &e;
  }
  if (best != nullptr && out != nullptr) *out = withLocalRanks(st, *best);
  return static_cast<int>(hashes.size());
}

int registeredCommCount() {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  std::vector<uint64_t> hashes;
  for (const Entry& e : st.entries) {
    bool seen = false;
    for (uint64_t h : hashes) seen = seen || h == e.info.comm_hash;
    if (!seen) hashes.push_back(e.info.comm_hash);
  }
  return static_cast<int>(hashes.size());
}

void setPluginSmReserve(int cuda_device, int reserve_sms, int device_sms) {
  const int slot = slotOf(cuda_device);
  if (slot < 0) return;
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  Reservation& r = st.reservations[slot];
  r.reserve_sms = reserve_sms < 0 ? -1 : reserve_sms;
  r.device_sms = device_sms > 0 ? device_sms : 0;
  r.set = true;
  forward(st, slot);
}

}  // namespace nccl_moe

extern "C" const ncclMoePluginBridge_t* ncclMoePluginAttach(const ncclMoePluginHooks_t* hooks) {
  using namespace nccl_moe;
  // The fields below exist since version 1; a plugin built against a larger struct only adds fields.
  constexpr size_t kV1Size = offsetof(ncclMoePluginHooks_t, set_sm_reserve) + sizeof(hooks->set_sm_reserve);
  if (hooks == nullptr || hooks->version < 1 || hooks->size < kV1Size) return nullptr;
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  st.hooks = ncclMoePluginHooks_t{};
  std::memcpy(&st.hooks, hooks, kV1Size);
  st.hooks.size = sizeof(ncclMoePluginHooks_t);
  st.attached = true;
  g_logger.store(hooks->logger, std::memory_order_relaxed);
  for (int slot = 0; slot <= kMaxDevices; ++slot) {
    if (st.reservations[slot].set) forward(st, slot);
  }
  return &kBridge;
}
