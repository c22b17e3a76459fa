// Comparing CPU reference results, for tests and moe-perf: FNV-1a hashes for determinism checks (golden values pin
// the generators and the operations) and diff() for a human-readable first difference between two results (the
// reference against the brute-force model). Not part of the reference's contract (reference.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "reference/reference.h"

namespace nccl_moe::ref {

// ------------------------------------------------------------------------------------------------
// Hashes for determinism checks (FNV-1a 64-bit over bytes)
// ------------------------------------------------------------------------------------------------
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001b3ull;
uint64_t fnv1a64(const void* data, size_t bytes, uint64_t hash = kFnvOffset);
template <typename T>
uint64_t fnv1a64(const std::vector<T>& v, uint64_t hash = kFnvOffset) {
  return fnv1a64(v.data(), v.size() * sizeof(T), hash);
}
// Hash of every output field of a result (all ranks, in rank order, fields in declaration order).
uint64_t hash(const HtDispatch& d);
uint64_t hash(const HtCombineResult& c);
uint64_t hash(const LlDispatch& d);
uint64_t hash(const std::vector<std::vector<uint16_t>>& per_rank_bf16);

// Human-readable first difference between two results, or "" if they are equal (tests use it).
std::string diff(const HtDispatch& a, const HtDispatch& b);
std::string diff(const LlDispatch& a, const LlDispatch& b);
std::string diff(const DispatchLayout& a, const DispatchLayout& b);

}  // namespace nccl_moe::ref
