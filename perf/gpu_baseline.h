// The NCCL all-to-all baseline of one rank on its GPU, for the same routing as the MoE operation (plan.h):
//   dispatch: copyRows gather into per-destination order, grouped ncclSend/ncclRecv of the packed rows,
//             then (LL) copyRows scatter into the [E_l, R * max, row] slab layout;
//   combine:  (LL) copyRows gather of the expert outputs back into per-source order, grouped ncclSend/ncclRecv,
//             reduceRows into [T, H] bf16 in the reference's order (HT unweighted over ranks, LL weighted over k);
//   countExchange: the per-peer row counts sent through NCCL and read on the host (what a real NCCL-based MoE layer
//             must do before sizing its receive buffers); added to dispatch for the notify_dispatch row.
// Everything is enqueued on the rank's stream; the caller times it. Construction uploads inputs (untimed).
#pragma once

#include <vector>

#include "plan.h"
#include "problem.h"
#include "rank_device.h"

namespace nccl_moe::perf {

class GpuBaseline {
 public:
  GpuBaseline(const Problem& p, const RankDevice& rd);
  void dispatch();
  void combine();
  void countExchange();
  // Wait for the stream, download the outputs and count elements that differ from the reference (dispatchWrong
  // also checks the counts of the last countExchange(), if one ran).
  int64_t dispatchWrong() const;
  int64_t combineWrong() const;

 private:
  void allToAll(const void* send, const std::vector<int>& send_counts, const std::vector<int>& send_offsets, void* recv,
                const std::vector<int>& recv_counts, const std::vector<int>& recv_offsets, size_t row_bytes);

  const Problem& p_;
  RankDevice rd_;
  bool ht_;
  size_t row_bytes_;
  HtPlan ht_plan_;
  LlPlan ll_plan_;
  // dispatch
  DeviceArray<uint8_t> in_;  // [T, row] packed input
  DeviceArray<int> send_tokens_;
  DeviceArray<uint8_t> send_;   // [sent rows, row]
  DeviceArray<uint8_t> recv_;   // [received rows, row]
  DeviceArray<int> slab_rows_;  // LL
  DeviceArray<uint8_t> slab_;   // LL [E_l * slab, row]
  // combine
  DeviceArray<uint16_t> y_;        // HT [N_recv, H]; LL [E_l * slab, H]
  DeviceArray<uint16_t> csend_;    // LL [received rows, H]
  DeviceArray<uint16_t> crecv_;    // [sent rows, H]
  DeviceArray<int> combine_rows_;  // HT [T * R]; LL [T * K]
  DeviceArray<float> weights_;     // LL [T * K]
  DeviceArray<int> slot_rank_;     // LL [T * K]: expert rank of each slot (-1 masked), ref::ll_combine's groups
  DeviceArray<uint16_t> out_;      // [T, H]
  // count exchange
  DeviceArray<int> counts_send_, counts_recv_;
  std::vector<int> counts_host_;
  bool counts_exchanged_ = false;
};

}  // namespace nccl_moe::perf
