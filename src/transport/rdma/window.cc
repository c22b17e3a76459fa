#include "transport/rdma/window.h"

#include <cinttypes>
#include <cstdio>

#include "core/error.h"

namespace nccl_moe::rdma {

namespace {
constexpr uint32_t kKnownAccess = kAccessAllRemote | kAccessRelaxedOrdering;
constexpr uint32_t kKnownFlags = kWindowSignal;
constexpr uint32_t kMaxKeyIndex = (1u << 23) - 1;  // bit 23 of the index distinguishes rkeys from lkeys
constexpr uint32_t kRkeyIndexBit = 1u << 23;
}  // namespace

ncclResult_t WindowRegistry::registerWindow(uint64_t addr, uint64_t bytes, uint32_t access, uint32_t flags,
                                            Window* out) {
  MOE_ARG_CHECK(bytes != 0, "registerWindow: bytes is 0 (a window holds at least one byte)");
  MOE_ARG_CHECK(addr + bytes > addr, "registerWindow: [0x%" PRIx64 ", +%" PRIu64 ") wraps around the address space",
                addr, bytes);
  MOE_ARG_CHECK((access & ~kKnownAccess) == 0, "registerWindow: unknown access bits 0x%x", access & ~kKnownAccess);
  MOE_ARG_CHECK((flags & ~kKnownFlags) == 0, "registerWindow: unknown flag bits 0x%x", flags & ~kKnownFlags);
  std::lock_guard<std::mutex> lock(mu_);
  if (next_index_ > kMaxKeyIndex)
    return setLastError(ncclSystemError, "registerWindow: key space exhausted after %u registrations", kMaxKeyIndex);
  Window w;
  w.addr = addr;
  w.bytes = bytes;
  w.lkey = (next_index_ << 8) | key_tag_;
  w.rkey = ((next_index_ | kRkeyIndexBit) << 8) | key_tag_;
  // Signal words must not be overtaken by the data placed before them: never relaxed ordering there.
  w.access = (flags & kWindowSignal) ? (access & ~kAccessRelaxedOrdering) : access;
  w.flags = flags;
  ++next_index_;
  windows_.push_back(w);
  if (out != nullptr) *out = w;
  return ncclSuccess;
}

ncclResult_t WindowRegistry::deregisterWindow(uint32_t lkey) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < windows_.size(); ++i) {
    if (windows_[i].lkey == lkey) {
      windows_.erase(windows_.begin() + static_cast<std::ptrdiff_t>(i));
      return ncclSuccess;
    }
  }
  return setLastError(ncclInvalidArgument, "deregisterWindow: no window with lkey 0x%x", lkey);
}

ncclResult_t WindowRegistry::mirror(const std::vector<Window>& remote_windows, uint32_t access) {
  MOE_ARG_CHECK((access & ~kKnownAccess) == 0, "mirror: unknown access bits 0x%x", access & ~kKnownAccess);
  std::vector<Window> copy;
  for (const Window& r : remote_windows) {
    MOE_ARG_CHECK(r.bytes != 0 && r.addr + r.bytes > r.addr,
                  "mirror: window rkey 0x%x [0x%" PRIx64 ", +%" PRIu64 ") is empty or wraps", r.rkey, r.addr, r.bytes);
    for (const Window& c : copy) MOE_ARG_CHECK(c.rkey != r.rkey, "mirror: rkey 0x%x listed twice", r.rkey);
    Window w = r;
    w.lkey = 0;  // a mirror is only ever addressed by rkey
    w.access = access;
    copy.push_back(w);
  }
  std::lock_guard<std::mutex> lock(mu_);
  windows_.swap(copy);
  return ncclSuccess;
}

AccessFault WindowRegistry::check(uint32_t key, uint64_t addr, uint64_t bytes, AccessKind kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  return check_window_access(windows_.data(), static_cast<uint32_t>(windows_.size()), key, addr, bytes, kind);
}

bool WindowRegistry::find(uint32_t key, bool remote, Window* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Window* w = find_window(windows_.data(), static_cast<uint32_t>(windows_.size()), key, remote);
  if (w != nullptr && out != nullptr) *out = *w;
  return w != nullptr;
}

bool WindowRegistry::translate(uint32_t key, bool remote, uint64_t offset, uint64_t bytes, uint64_t* addr) const {
  std::lock_guard<std::mutex> lock(mu_);
  return window_translate(windows_.data(), static_cast<uint32_t>(windows_.size()), key, remote, offset, bytes, addr);
}

bool WindowRegistry::locate(uint64_t addr, uint64_t bytes, Window* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Window& w : windows_) {
    if (window_contains(w, addr, bytes == 0 ? 1 : bytes)) {
      if (out != nullptr) *out = w;
      return true;
    }
  }
  return false;
}

std::vector<Window> WindowRegistry::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return windows_;
}

size_t WindowRegistry::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return windows_.size();
}

std::string describeWindow(const Window& w) {
  char buf[192];
  std::snprintf(buf, sizeof(buf), "window {lkey 0x%x, rkey 0x%x, [0x%" PRIx64 ", 0x%" PRIx64 "), %s%s%s%s%s%s}", w.lkey,
                w.rkey, w.addr, w.addr + w.bytes, (w.access & kAccessLocalWrite) ? "LW " : "",
                (w.access & kAccessRemoteWrite) ? "RW " : "", (w.access & kAccessRemoteRead) ? "RR " : "",
                (w.access & kAccessRemoteAtomic) ? "RA " : "",
                (w.access & kAccessRelaxedOrdering) ? "relaxed" : "strong", (w.flags & kWindowSignal) ? " signal" : "");
  return buf;
}

}  // namespace nccl_moe::rdma
