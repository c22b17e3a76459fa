// A fixed arena handed out in variable-size pieces: the software NIC's staging memory when it lives on a GPU
// (cuda_backend.h), where allocating while collective kernels spin is forbidden (cudaMalloc may wait for the
// whole device, design notes §4.3). The arena is allocated once up front; this class only does the bookkeeping
// (offsets), so it is plain C++ and unit-tested on the CPU.
//
// First fit over an address-ordered free list, `alignment`-byte pieces, neighbours coalesced on release.
// Not thread-safe: one NIC executor owns a pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>

namespace nccl_moe::emulated {

class StagingPool {
 public:
  static constexpr uint64_t kNoSpace = ~0ull;

  StagingPool(uint64_t capacity_bytes, uint64_t alignment);

  // Offset of a piece of at least `bytes` (0 bytes take one alignment unit), or kNoSpace.
  uint64_t allocate(uint64_t bytes);
  // Returns a piece; false when `offset` is not an allocated piece (nothing changes).
  bool release(uint64_t offset);

  uint64_t capacity() const { return capacity_; }
  uint64_t bytesInUse() const { return in_use_; }
  uint64_t highWater() const { return high_water_; }
  size_t numPieces() const { return used_.size(); }
  size_t numFreeRanges() const { return free_.size(); }
  uint64_t largestFree() const;

 private:
  uint64_t capacity_;
  uint64_t alignment_;
  uint64_t in_use_ = 0;
  uint64_t high_water_ = 0;
  std::map<uint64_t, uint64_t> free_;  // offset -> bytes, disjoint, never adjacent
  std::map<uint64_t, uint64_t> used_;  // offset -> bytes
};

}  // namespace nccl_moe::emulated
