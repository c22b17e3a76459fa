// The collectives of moe-perf's GPU backend on the rank's NCCL communicator (contract in collective.h): one rank
// per GPU; results come back to the host through small device buffers allocated once.
#include <algorithm>
#include <memory>

#include "collective.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

ncclRedOp_t ncclOp(ReduceOp op) { return op == ReduceOp::kMin ? ncclMin : op == ReduceOp::kMax ? ncclMax : ncclSum; }

class NcclCollective final : public Collective {
 public:
  static constexpr size_t kMaxDoubles = 256;
  static constexpr size_t kMaxGatherBytes = 4096;  // per rank

  explicit NcclCollective(const RankDevice& rd)
      : Collective(rd),
        token_(1),
        doubles_(kMaxDoubles),
        gather_send_(kMaxGatherBytes),
        gather_recv_(kMaxGatherBytes * sz(rd.num_ranks)) {
    token_.zeroAsync(rd.stream);
    HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  }

  // One rank per GPU: an allocation on one GPU never waits for another GPU's kernels.
  void quiesce() override {}

  // In pieces of kMaxDoubles (every rank passes the same length, so every rank makes the same NCCL calls).
  std::vector<double> allReduce(const std::vector<double>& v, ReduceOp op) override {
    std::vector<double> out;
    out.reserve(v.size());
    for (size_t at = 0; at < v.size(); at += kMaxDoubles) {
      const size_t n = std::min(kMaxDoubles, v.size() - at);
      doubles_.upload(v.data() + at, n, rd_.stream);
      PERF_NCCL(ncclAllReduce(doubles_.get(), doubles_.get(), n, ncclFloat64, ncclOp(op), rd_.comm, rd_.stream));
      const std::vector<double> part = doubles_.download(n, rd_.stream);
      out.insert(out.end(), part.begin(), part.end());
    }
    return out;
  }

  std::vector<char> allGather(const std::vector<char>& mine) override {
    if (mine.size() > kMaxGatherBytes) throw harness::Error("Collective::allGather: too many bytes");
    gather_send_.upload(mine.data(), mine.size(), rd_.stream);
    PERF_NCCL(ncclAllGather(gather_send_.get(), gather_recv_.get(), mine.size(), ncclChar, rd_.comm, rd_.stream));
    return gather_recv_.download(mine.size() * sz(rd_.num_ranks), rd_.stream);
  }

 protected:
  void rendezvous() override {
    PERF_NCCL(ncclAllReduce(token_.get(), token_.get(), 1, ncclInt32, ncclSum, rd_.comm, rd_.stream));
  }

 private:
  DeviceArray<int> token_;
  DeviceArray<double> doubles_;
  DeviceArray<char> gather_send_, gather_recv_;
};

}  // namespace

std::unique_ptr<Collective> makeNcclCollective(const RankDevice& rd) { return std::make_unique<NcclCollective>(rd); }

}  // namespace nccl_moe::perf
