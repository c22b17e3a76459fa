#include "transport/emulated/staging_pool.h"

#include <algorithm>
#include <iterator>

namespace nccl_moe::emulated {

StagingPool::StagingPool(uint64_t capacity_bytes, uint64_t alignment)
    : capacity_(0), alignment_(alignment == 0 ? 1 : alignment) {
  capacity_ = capacity_bytes / alignment_ * alignment_;
  if (capacity_ > 0) free_.emplace(0, capacity_);
}

uint64_t StagingPool::allocate(uint64_t bytes) {
  const uint64_t units = bytes == 0 ? 1 : bytes / alignment_ + (bytes % alignment_ != 0 ? 1 : 0);  // no overflow
  if (units > capacity_ / alignment_) return kNoSpace;
  const uint64_t size = units * alignment_;
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < size) continue;
    const uint64_t offset = it->first;
    const uint64_t rest = it->second - size;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + size, rest);
    used_.emplace(offset, size);
    in_use_ += size;
    high_water_ = std::max(high_water_, in_use_);
    return offset;
  }
  return kNoSpace;
}

bool StagingPool::release(uint64_t offset) {
  auto u = used_.find(offset);
  if (u == used_.end()) return false;
  uint64_t start = u->first;
  uint64_t size = u->second;
  in_use_ -= size;
  used_.erase(u);
  auto next = free_.lower_bound(start);
  if (next != free_.end() && start + size == next->first) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(start, size);
  return true;
}

uint64_t StagingPool::largestFree() const {
  uint64_t best = 0;
  for (const auto& f : free_) best = std::max(best, f.second);
  return best;
}

}  // namespace nccl_moe::emulated
