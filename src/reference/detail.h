// Internals of the CPU reference that reference.cc shares with the test-only code in reference/testing/: the
// argument-check helpers (same exception type and message prefix everywhere) and the LL dispatch output skeleton
// the brute-force model fills in its own order. Not part of the contract: consumers include reference.h and the
// reference/testing/ headers, never this file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "reference/reference.h"

namespace nccl_moe::ref::detail {

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument("nccl_moe::ref: " + what); }

inline void require(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

inline size_t sz(int64_t v) { return static_cast<size_t>(v); }

// ll_dispatch's argument checks (routing.validate() included); throws std::invalid_argument.
void check_ll(const Routing& routing, int hidden, int max_tokens, const std::vector<std::vector<uint16_t>>* x,
              bool use_fp8, ScaleFormat format);

// An LL dispatch result of the routing's shapes with nothing received: recv_count 0, src fields and send_row -1,
// data (when with_data) zero-filled in the vectors that apply to use_fp8 / format.
LlDispatch ll_empty(const Routing& routing, int hidden, int max_tokens, bool with_data, bool use_fp8,
                    ScaleFormat format);

// Writes token t of rank s (already cast when fp8) into slab row `slab_row` (global row index in [E_l*R*max]).
void ll_store_row(LlDispatch& out, LlRankRecv& rv, size_t slab_row, int s, int t, const uint16_t* x_bf16,
                  const uint8_t* q, const float* scales, const int32_t* packed);

}  // namespace nccl_moe::ref::detail
