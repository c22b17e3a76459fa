// NCCL all-to-all baseline of one rank (contract in gpu_baseline.h).
#include "gpu_baseline.h"

#include "baseline_kernels.h"
#include "verify.h"

namespace nccl_moe::perf {

namespace {
size_t sz(int64_t v) { return static_cast<size_t>(v); }
}  // namespace

GpuBaseline::GpuBaseline(const Problem& p, const RankDevice& rd)
    : p_(p), rd_(rd), ht_(p.spec.mode == Mode::kHt), row_bytes_(p.fmt.rowBytes()) {
  const int r = rd.rank, T = p.spec.tokens, H = p.spec.hidden;
  const cudaStream_t st = rd.stream;
  const std::vector<uint8_t> packed = p.packedInput(r);
  in_.assign(packed, st);
  std::vector<int> send_counts;
  if (ht_) {
    ht_plan_ = makeHtPlan(p.ht, r);
    const HtPlan& pl = ht_plan_;
    send_tokens_.assign(pl.send_tokens, st);
    send_.allocate(sz(pl.send_offsets.back()) * row_bytes_);
    recv_.allocate(sz(pl.recv_offsets.back()) * row_bytes_);
    y_.assign(p.ht_y[sz(r)], st);
    crecv_.allocate(sz(pl.send_offsets.back()) * sz(H));
    combine_rows_.assign(pl.combine_rows, st);
    send_counts = pl.send_counts;
  } else {
    ll_plan_ = makeLlPlan(p.routing, p.ll, r);
    const LlPlan& pl = ll_plan_;
    send_tokens_.assign(pl.send_tokens, st);
    send_.allocate(sz(pl.send_offsets.back()) * row_bytes_);
    recv_.allocate(sz(pl.recv_offsets.back()) * row_bytes_);
    slab_rows_.assign(pl.recv_slab_rows, st);
    slab_.allocate(sz(p.numLocalExperts()) * sz(p.slabRows()) * row_bytes_);
    slab_.zeroAsync(st);
    y_.assign(p.ll_y[sz(r)], st);
    csend_.allocate(sz(pl.recv_offsets.back()) * sz(H));
    crecv_.allocate(sz(pl.send_offsets.back()) * sz(H));
    combine_rows_.assign(pl.combine_rows, st);
    weights_.assign(p.routing.ranks[sz(r)].topk_weights, st);
    std::vector<int> slot_rank;
    for (const int64_t e : p.routing.ranks[sz(r)].topk_idx)
      slot_rank.push_back(e < 0 ? -1 : static_cast<int>(e / p.numLocalExperts()));
    slot_rank_.assign(slot_rank, st);
    send_counts = pl.send_counts;
  }
  out_.allocate(sz(T) * sz(H));
  counts_send_.assign(send_counts, st);
  counts_recv_.allocate(sz(rd.num_ranks));
  counts_host_.assign(sz(rd.num_ranks), 0);
  HARNESS_CUDA(cudaStreamSynchronize(st));
}

void GpuBaseline::allToAll(const void* send, const std::vector<int>& send_counts, const std::vector<int>& send_offsets,
                           void* recv, const std::vector<int>& recv_counts, const std::vector<int>& recv_offsets,
                           size_t row_bytes) {
  const auto* s = static_cast<const uint8_t*>(send);
  auto* d = static_cast<uint8_t*>(recv);
  PERF_NCCL(ncclGroupStart());
  for (int peer = 0; peer < rd_.num_ranks; ++peer) {
    if (send_counts[sz(peer)] > 0)
      PERF_NCCL(ncclSend(s + sz(send_offsets[sz(peer)]) * row_bytes, sz(send_counts[sz(peer)]) * row_bytes, ncclUint8,
                         peer, rd_.comm, rd_.stream));
    if (recv_counts[sz(peer)] > 0)
      PERF_NCCL(ncclRecv(d + sz(recv_offsets[sz(peer)]) * row_bytes, sz(recv_counts[sz(peer)]) * row_bytes, ncclUint8,
                         peer, rd_.comm, rd_.stream));
  }
  PERF_NCCL(ncclGroupEnd());
}

void GpuBaseline::dispatch() {
  const std::vector<int>& sc = ht_ ? ht_plan_.send_counts : ll_plan_.send_counts;
  const std::vector<int>& so = ht_ ? ht_plan_.send_offsets : ll_plan_.send_offsets;
  const std::vector<int>& rc = ht_ ? ht_plan_.recv_counts : ll_plan_.recv_counts;
  const std::vector<int>& ro = ht_ ? ht_plan_.recv_offsets : ll_plan_.recv_offsets;
  HARNESS_CUDA(copyRows(send_.get(), nullptr, in_.get(), send_tokens_.get(), so.back(), row_bytes_, rd_.stream));
  allToAll(send_.get(), sc, so, recv_.get(), rc, ro, row_bytes_);
  if (!ht_)
    HARNESS_CUDA(copyRows(slab_.get(), slab_rows_.get(), recv_.get(), nullptr, ro.back(), row_bytes_, rd_.stream));
}

void GpuBaseline::combine() {
  const int T = p_.spec.tokens, H = p_.spec.hidden;
  const size_t rb = sz(H) * 2;
  if (ht_) {
    const HtPlan& pl = ht_plan_;
    // The received rows are already grouped by source rank: send group s back to s as it is.
    allToAll(y_.get(), pl.recv_counts, pl.recv_offsets, crecv_.get(), pl.send_counts, pl.send_offsets, rb);
    HARNESS_CUDA(reduceRows(out_.get(), crecv_.get(), combine_rows_.get(), nullptr, T, rd_.num_ranks, H, rd_.stream));
  } else {
    const LlPlan& pl = ll_plan_;
    HARNESS_CUDA(copyRows(csend_.get(), nullptr, y_.get(), slab_rows_.get(), pl.recv_offsets.back(), rb, rd_.stream));
    allToAll(csend_.get(), pl.recv_counts, pl.recv_offsets, crecv_.get(), pl.send_counts, pl.send_offsets, rb);
    HARNESS_CUDA(reduceRows(out_.get(), crecv_.get(), combine_rows_.get(), weights_.get(), T, p_.spec.topk, H,
                            rd_.stream, slot_rank_.get(), rd_.num_ranks));
  }
}

void GpuBaseline::countExchange() {
  PERF_NCCL(ncclGroupStart());
  for (int peer = 0; peer < rd_.num_ranks; ++peer) {
    PERF_NCCL(ncclSend(counts_send_.get() + peer, 1, ncclInt32, peer, rd_.comm, rd_.stream));
    PERF_NCCL(ncclRecv(counts_recv_.get() + peer, 1, ncclInt32, peer, rd_.comm, rd_.stream));
  }
  PERF_NCCL(ncclGroupEnd());
  HARNESS_CUDA(cudaMemcpyAsync(counts_host_.data(), counts_recv_.get(), counts_host_.size() * sizeof(int),
                               cudaMemcpyDeviceToHost, rd_.stream));
  HARNESS_CUDA(cudaStreamSynchronize(rd_.stream));
  counts_exchanged_ = true;
}

int64_t GpuBaseline::dispatchWrong() const {
  const int r = rd_.rank;
  const std::vector<int>& rc = ht_ ? ht_plan_.recv_counts : ll_plan_.recv_counts;
  int64_t wrong = 0;
  // The count exchange (when it ran) must have delivered what this rank receives from each peer.
  if (counts_exchanged_)
    for (size_t s = 0; s < counts_host_.size(); ++s) wrong += counts_host_[s] != rc[s];
  if (ht_) {
    const int64_t n = ht_plan_.recv_offsets.back();
    const std::vector<uint8_t> got = recv_.download(sz(n) * row_bytes_, rd_.stream);
    wrong += htRecvWrong(p_, r, n, RowView::packed(got.data(), p_.fmt));
  } else {
    const std::vector<uint8_t> got = slab_.download(slab_.size(), rd_.stream);
    wrong += llRecvWrong(p_, r, p_.ll.recv[sz(r)].recv_count.data(), RowView::packed(got.data(), p_.fmt), nullptr);
  }
  return wrong;
}

int64_t GpuBaseline::combineWrong() const {
  const int r = rd_.rank;
  const std::vector<uint16_t> got = out_.download(out_.size(), rd_.stream);
  const auto& expected = ht_ ? p_.ht_expected_combine : p_.ll_expected_combine;
  return bf16Wrong(got.data(), expected[sz(r)]);
}

}  // namespace nccl_moe::perf
