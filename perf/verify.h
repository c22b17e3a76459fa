// Verification of one rank's outputs against a Problem's expected results: counts of wrong elements (#wrong).
//
// Contract
//   - An "element" is one bf16 or fp8 value, one float scale, one top-k id or weight, one count. Bitwise equality
//     is required everywhere (the reference and the kernels share rounding and accumulation orders).
//   - HT rows are compared position by position (the receive order is part of the contract). A receive count that
//     differs counts every missing or extra row as wrong.
//   - LL slabs are compared as sets per local expert: each received row is identified by its content (its source
//     (rank, token) row is unique); positions that match the reference order are taken first. Unmatched rows count
//     their elements against the reference row at the same position (or all elements when there is none); expected
//     rows that never arrived count all their elements. The identity of every row (src_rank << 24 | src_token, -1
//     when unknown) is returned so the combine input can be built in the GPU's order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "problem.h"

namespace nccl_moe::perf {

// Outputs are filled with these bytes before every verified call, so that a write a kernel skips shows as wrong
// instead of leaving an earlier call's (correct) result in place: data, scales, weights and combined rows get
// 0xff (NaN in bf16, fp8 e4m3 and float: no correct output is NaN), receive counts and top-k ids 0x7f (a count and
// an id far outside every valid range; 0xff would read as the masked id -1).
constexpr int kMarkerDataByte = 0xff;
constexpr int kMarkerIndexByte = 0x7f;

// Rows in memory: data (row stride data_stride bytes) and, for fp8, float scales (row stride scale_stride bytes).
struct RowView {
  const uint8_t* data = nullptr;
  size_t data_stride = 0;
  const uint8_t* scales = nullptr;
  size_t scale_stride = 0;
  // Packed rows (data then scales in one row of fmt.rowBytes()).
  static RowView packed(const void* rows, const RowFormat& fmt);
  // Separate tensors: data [rows, data_bytes], scales [rows, groups] floats (may be null for bf16).
  static RowView split(const void* data, const void* scales, const RowFormat& fmt);
  const uint8_t* rowData(int64_t i) const { return data + static_cast<size_t>(i) * data_stride; }
  const uint8_t* rowScales(int64_t i) const {
    return scales ? scales + static_cast<size_t>(i) * scale_stride : nullptr;
  }
};

// Wrong elements of one row (data elements + scales) against expected data/scales (scales null for bf16).
int64_t rowWrong(const RowFormat& fmt, const uint8_t* got_data, const uint8_t* got_scales, const uint8_t* exp_data,
                 const float* exp_scales);

// HT dispatch: got_rows rows of rank d in receive order.
int64_t htRecvWrong(const Problem& p, int d, int64_t got_rows, const RowView& got);
// HT dispatch side outputs: receive count, aligned per-local-expert counts (may be null), re-based top-k ids
// [rows, K] and weights [rows, K] (either may be null).
int64_t htMetaWrong(const Problem& p, int d, int64_t got_num_recv, const std::vector<int>* per_expert,
                    const int64_t* topk_idx, const float* topk_weights);
// bf16 tensors (combine outputs).
int64_t bf16Wrong(const uint16_t* got, const std::vector<uint16_t>& expected);

// LL dispatch of rank d: got_counts [E_l], rows at j * slab_rows + i. identity (optional) gets [E_l * slab_rows].
int64_t llRecvWrong(const Problem& p, int d, const int* got_counts, const RowView& got, std::vector<int32_t>* identity);

// LL combine input in the order the GPU delivered: row (j, i) = llExpertRow of its identity, zeros where unknown.
std::vector<uint16_t> llExpertOutputsFor(const Problem& p, int d, const std::vector<int32_t>& identity);

}  // namespace nccl_moe::perf
