// RDMA windows: registered memory regions with their keys, the translation of (key, offset) into an address, and
// THE access check every path applies to a memory reference of a work request. The software NIC
// (src/transport/emulated/) executes exactly this check before it touches memory, and the real path's asserts
// (proxy, IBGDA debug builds) call the same function, so the emulator cannot be stricter or laxer than what the
// code posting the requests believes.
//
// A window is one registration (ibv_reg_mr / ibv_reg_dmabuf_mr on hardware): [addr, addr + bytes) as the NIC
// addresses it (the registration's iova; this transport registers with iova = the virtual address), an lkey the
// owner's own work requests use, an rkey remote QPs use, and access rights with the values of enum ibv_access_flags
// (checked against verbs.h in tests/unit/window_test.cc). Signal windows (the words a fetch-add targets and a
// receiver polls) are registered strongly ordered: never IBV_ACCESS_RELAXED_ORDERING, so the NIC cannot let a
// signal overtake the data placed before it (design notes §2.1; NCCL forces the same on its signal MR).
//
// check_window_access() order of checks, first failure wins:
//   key      a window with this key (lkey for the requester's own buffers, rkey for a remote target) exists
//   range    [addr, addr + bytes) lies inside that window (no wrap-around)
//   rights   the window grants the operation: local write for an atomic's result buffer, remote write / remote
//            atomic for the target of a WRITE / fetch-add (reading a local gather source needs no right)
//   align    an atomic's target is 8-byte aligned (an atomic touches exactly kAtomicBytes)
// A zero-length access is always allowed and matches no window: a zero-byte WRITE carries no gather entry and
// its remote address is not validated (the IB specification lets a responder skip the check; we always skip it).
#pragma once

#include <nccl.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "transport/rdma/mlx5/byte_order.h"
#include "transport/rdma/mlx5/cqe.h"

namespace nccl_moe::rdma {

// Access rights, the values of enum ibv_access_flags.
enum WindowAccess : uint32_t {
  kAccessLocalWrite = 1u << 0,        // IBV_ACCESS_LOCAL_WRITE (an atomic's result, a READ's destination)
  kAccessRemoteWrite = 1u << 1,       // IBV_ACCESS_REMOTE_WRITE
  kAccessRemoteRead = 1u << 2,        // IBV_ACCESS_REMOTE_READ
  kAccessRemoteAtomic = 1u << 3,      // IBV_ACCESS_REMOTE_ATOMIC
  kAccessRelaxedOrdering = 1u << 20,  // IBV_ACCESS_RELAXED_ORDERING (never on a signal window)
};
constexpr uint32_t kAccessAllRemote = kAccessLocalWrite | kAccessRemoteWrite | kAccessRemoteRead | kAccessRemoteAtomic;

enum WindowFlags : uint32_t {
  kWindowSignal = 1u << 0,  // holds signal words: registered strongly ordered (relaxed ordering is stripped)
};

struct Window {
  uint64_t addr = 0;  // base as the NIC addresses it (iova)
  uint64_t bytes = 0;
  uint32_t lkey = 0;
  uint32_t rkey = 0;
  uint32_t access = 0;  // WindowAccess bits
  uint32_t flags = 0;   // WindowFlags bits
  MOE_HD bool strongly_ordered() const { return (access & kAccessRelaxedOrdering) == 0; }
};

// The kind of memory reference a work request makes.
enum class AccessKind : uint8_t {
  kLocalRead,     // gather source of a WRITE (requester's memory, lkey)
  kLocalWrite,    // an atomic's 8-byte result buffer (requester's memory, lkey)
  kRemoteWrite,   // WRITE target (responder's memory, rkey)
  kRemoteAtomic,  // fetch-add / compare-swap target (responder's memory, rkey)
};
MOE_HD constexpr bool is_remote(AccessKind k) {
  return k == AccessKind::kRemoteWrite || k == AccessKind::kRemoteAtomic;
}

enum class AccessFault : uint8_t {
  kNone = 0,
  kBadKey,            // no window with this key
  kOutOfWindow,       // the range leaves the window
  kNoRights,          // the window does not grant the operation
  kMisalignedAtomic,  // atomic target not 8-byte aligned
};

MOE_HD inline const char* access_fault_text(AccessFault f) {
  switch (f) {
    case AccessFault::kNone:
      return "no fault";
    case AccessFault::kBadKey:
      return "key not registered";
    case AccessFault::kOutOfWindow:
      return "range outside the window";
    case AccessFault::kNoRights:
      return "window does not grant the access";
    case AccessFault::kMisalignedAtomic:
      return "atomic target not 8-byte aligned";
  }
  return "unknown fault";
}

// The completion syndrome a NIC reports for a fault (mlx5 CQE syndromes, cqe.h): a local reference fails with a
// local protection error; a remote one with a remote access error, except a misaligned atomic, which the
// responder NAKs as an invalid request (IB specification: atomics must be naturally aligned).
MOE_HD constexpr uint8_t access_fault_syndrome(AccessFault f, AccessKind k) {
  return !is_remote(k)                         ? static_cast<uint8_t>(mlx5::CqeSyndrome::kLocalProtection)
         : f == AccessFault::kMisalignedAtomic ? static_cast<uint8_t>(mlx5::CqeSyndrome::kRemoteInvalidRequest)
                                               : static_cast<uint8_t>(mlx5::CqeSyndrome::kRemoteAccess);
}

constexpr uint64_t kAtomicTargetBytes = 8;

// Whether [addr, addr + bytes) lies inside `w` (without overflow for any inputs).
MOE_HD constexpr bool window_contains(const Window& w, uint64_t addr, uint64_t bytes) {
  return addr >= w.addr && bytes <= w.bytes && addr - w.addr <= w.bytes - bytes;
}

// Finds the window `key` names among `windows[0, num_windows)` (by rkey for remote kinds, lkey otherwise).
MOE_HD inline const Window* find_window(const Window* windows, uint32_t num_windows, uint32_t key, bool remote) {
  for (uint32_t i = 0; i < num_windows; ++i)
    if ((remote ? windows[i].rkey : windows[i].lkey) == key) return &windows[i];
  return nullptr;
}

// THE access check (see the header comment). `windows` are the registrations of the side the reference is
// checked on: the requester's own for local kinds, the responder's for remote kinds.
MOE_HD inline AccessFault check_window_access(const Window* windows, uint32_t num_windows, uint32_t key, uint64_t addr,
                                              uint64_t bytes, AccessKind kind) {
  if (bytes == 0) return AccessFault::kNone;
  const Window* w = find_window(windows, num_windows, key, is_remote(kind));
  if (w == nullptr) return AccessFault::kBadKey;
  if (!window_contains(*w, addr, bytes)) return AccessFault::kOutOfWindow;
  uint32_t needed = 0;
  if (kind == AccessKind::kLocalWrite) needed = kAccessLocalWrite;
  if (kind == AccessKind::kRemoteWrite) needed = kAccessRemoteWrite;
  if (kind == AccessKind::kRemoteAtomic) needed = kAccessRemoteAtomic;
  if ((w->access & needed) != needed) return AccessFault::kNoRights;
  if (kind == AccessKind::kRemoteAtomic && (addr % kAtomicTargetBytes != 0 || bytes != kAtomicTargetBytes))
    return AccessFault::kMisalignedAtomic;
  return AccessFault::kNone;
}

// A location in a window named by its key: what the proxy ring descriptors and the connection records carry.
// Translation adds the offset to the window's base; it fails (returns false) only when the key is unknown or the
// offset range leaves the window, so a caller that wants the NIC to see the bad reference (tests) can still
// compute the address as base + offset itself.
MOE_HD inline bool window_translate(const Window* windows, uint32_t num_windows, uint32_t key, bool remote,
                                    uint64_t offset, uint64_t bytes, uint64_t* addr) {
  const Window* w = find_window(windows, num_windows, key, remote);
  if (w == nullptr || offset > w->bytes || bytes > w->bytes - offset) return false;
  *addr = w->addr + offset;
  return true;
}

// ---- Host bookkeeping ----

// Registration bookkeeping of one memory domain (a rank's NIC, or the software NIC standing in for it): assigns
// keys and answers access checks. Thread-safe: the software NIC's executor checks while other threads register.
//
// Keys: key = (index << 8) | key_tag, with index counting registrations from 1 and never reused, so a key kept
// after deregistration (or another domain's key, with another tag) fails as kBadKey instead of reaching other
// memory. The lkey and rkey of one window differ (rkey index has bit 23 set), so a request that passes an lkey
// where an rkey belongs fails too; on mlx5 hardware both are usually equal, which would hide that bug.
class WindowRegistry {
 public:
  explicit WindowRegistry(uint8_t key_tag = 0x5a) : key_tag_(key_tag) {}

  // Registers [addr, addr + bytes) with `access` rights (WindowAccess) and `flags` (WindowFlags). A signal
  // window drops kAccessRelaxedOrdering. Fails on an empty range, a wrapping range, or unknown bits.
  ncclResult_t registerWindow(uint64_t addr, uint64_t bytes, uint32_t access, uint32_t flags, Window* out);
  // Removes the window whose lkey is `lkey`.
  ncclResult_t deregisterWindow(uint32_t lkey);
  // Makes this registry a mirror of another rank's windows, as its connection record lists them (ConnWindow:
  // addr, bytes, rkey; the record carries no rights, so `access` applies to all). The software NIC checks remote
  // references against a mirror when the responder lives in another process. Replaces the contents; fails on an
  // empty or wrapping window or a duplicate rkey.
  ncclResult_t mirror(const std::vector<Window>& remote_windows, uint32_t access);

  AccessFault check(uint32_t key, uint64_t addr, uint64_t bytes, AccessKind kind) const;
  // The window `key` names (by rkey when `remote`), if any.
  bool find(uint32_t key, bool remote, Window* out) const;
  // (key, offset) -> address, as window_translate.
  bool translate(uint32_t key, bool remote, uint64_t offset, uint64_t bytes, uint64_t* addr) const;
  // The window containing [addr, addr + bytes), if any: address -> (key, offset) for callers holding pointers.
  bool locate(uint64_t addr, uint64_t bytes, Window* out) const;

  std::vector<Window> snapshot() const;
  size_t size() const;

 private:
  mutable std::mutex mu_;
  std::vector<Window> windows_;
  uint32_t next_index_ = 1;
  uint8_t key_tag_;
};

// "window {lkey 0x.., rkey 0x.., [addr, addr+bytes), rights}" for messages.
std::string describeWindow(const Window& w);

}  // namespace nccl_moe::rdma
