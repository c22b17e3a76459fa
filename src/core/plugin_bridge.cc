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

constexpr int kMaxDevices = 64;     // reservation slots per CUDA device ordinal; slot kMaxDevices = all devices
constexpr int kGlobalSlot = kMaxDevices;

struct Reservation {
  int reserve_sms = -1;
  int device_sms = 0;
  bool set = false;  // ever written: replayed to a newly attached plugin
};

struct BridgeState {
  std::mutex mutex;
  ncclMoePluginHooks_t hooks{};   // copy of the attached plugin's hooks
  bool attached = false;
  std::vector<RegisteredComm> comms;
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

void bridgeCommAdded(const ncclMoePluginCommInfo_t* info) {
  if (info == nullptr) return;
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  for (RegisteredComm& c : st.comms) {
    if (c.comm_hash == info->comm_hash && c.cuda_device == info->cuda_device) {
      ++c.num_local_ranks;
      c.sequence = st.next_sequence++;
      return;
    }
  }
  RegisteredComm c;
  c.comm_hash = info->comm_hash;
  c.num_ranks = info->num_ranks;
  c.num_nodes = info->num_nodes;
  c.num_nvl_domains = info->num_nvl_domains;
  c.min_ranks_per_nvl_domain = info->min_ranks_per_nvl_domain;
  c.max_ranks_per_nvl_domain = info->max_ranks_per_nvl_domain;
  c.cuda_device = info->cuda_device;
  c.tuner_version = info->tuner_version;
  c.num_local_ranks = 1;
  c.sequence = st.next_sequence++;
  st.comms.push_back(c);
}

void bridgeCommRemoved(uint64_t comm_hash, int cuda_device) {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  for (size_t i = 0; i < st.comms.size(); ++i) {
    RegisteredComm& c = st.comms[i];
    if (c.comm_hash != comm_hash || c.cuda_device != cuda_device) continue;
    if (--c.num_local_ranks <= 0) st.comms.erase(st.comms.begin() + static_cast<std::ptrdiff_t>(i));
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

const ncclMoePluginBridge_t kBridge = {sizeof(ncclMoePluginBridge_t), NCCL_MOE_PLUGIN_BRIDGE_VERSION,
                                       bridgeCommAdded, bridgeCommRemoved, bridgeDetach};

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
  const RegisteredComm* best = nullptr;
  for (const RegisteredComm& c : st.comms) {
    if (c.comm_hash == comm_hash && (best == nullptr || c.sequence > best->sequence)) best = &c;
  }
  if (best != nullptr && out != nullptr) *out = *best;
  return best != nullptr;
}

int findRegisteredComms(int num_ranks, int cuda_device, RegisteredComm* out) {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  const RegisteredComm* best = nullptr;
  int count = 0;
  for (const RegisteredComm& c : st.comms) {
    if (c.num_ranks != num_ranks) continue;
    if (cuda_device >= 0 && c.cuda_device != cuda_device) continue;
    ++count;
    if (best == nullptr || c.sequence > best->sequence) best = &c;
  }
  if (best != nullptr && out != nullptr) *out = *best;
  return count;
}

int registeredCommCount() {
  BridgeState& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  return static_cast<int>(st.comms.size());
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
