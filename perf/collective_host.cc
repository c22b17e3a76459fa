// The collectives of moe-perf's GPU backend over the rank threads of one process (contract in collective.h): every
// rank writes its bytes into its slot of a HostExchange, the threads meet at a bounded harness::HostBarrier, every
// rank reads all slots, and they meet again before a slot is reused. No NCCL call is made: this is what ranks that
// share a GPU use (NCCL refuses two ranks of one communicator on one GPU). Reductions run on every rank in rank
// order, so every rank gets the same bits.
#include <algorithm>
#include <cstring>
#include <memory>

#include "collective.h"

namespace nccl_moe::perf {

HostExchange::HostExchange(int num_ranks, double timeout_s)
    : barrier_(num_ranks), timeout_s_(timeout_s), slots_(static_cast<size_t>(num_ranks)) {}

void HostExchange::meet(const char* what) { perf::meet(barrier_, timeout_s_, what); }

std::vector<std::vector<char>> HostExchange::exchange(int rank, const std::vector<char>& mine) {
  slots_[static_cast<size_t>(rank)] = mine;
  meet("host collective: every rank's bytes written");
  std::vector<std::vector<char>> all = slots_;
  meet("host collective: every rank's bytes read");  // nobody overwrites a slot another rank is still reading
  return all;
}

namespace {

class HostCollective final : public Collective {
 public:
  HostCollective(const RankDevice& rd, HostExchange* exchange) : Collective(rd), exchange_(exchange) {
    if (exchange->size() != rd.num_ranks)
      throw harness::Error("host collective: the exchange has " + std::to_string(exchange->size()) + " slots for " +
                           std::to_string(rd.num_ranks) +
                           " ranks (every rank must be a thread of "
                           "this process)");
  }

  void quiesce() override {
    HARNESS_CUDA(cudaStreamSynchronize(rd_.stream));
    exchange_->meet("every rank's stream drained");
  }

  std::vector<double> allReduce(const std::vector<double>& v, ReduceOp op) override {
    std::vector<char> bytes(v.size() * sizeof(double));
    if (!v.empty()) std::memcpy(bytes.data(), v.data(), bytes.size());
    const std::vector<std::vector<char>> all = exchange_->exchange(rd_.rank, bytes);
    std::vector<double> out(v.size());
    for (size_t r = 0; r < all.size(); ++r) {
      if (all[r].size() != bytes.size()) throw harness::Error("host all-reduce: ranks passed different sizes");
      for (size_t i = 0; i < v.size(); ++i) {
        double x;
        std::memcpy(&x, all[r].data() + i * sizeof(double), sizeof(double));
        if (r == 0) {
          out[i] = x;
        } else if (op == ReduceOp::kMin) {
          out[i] = std::min(out[i], x);
        } else if (op == ReduceOp::kMax) {
          out[i] = std::max(out[i], x);
        } else {
          out[i] += x;
        }
      }
    }
    return out;
  }

  std::vector<char> allGather(const std::vector<char>& mine) override {
    const std::vector<std::vector<char>> all = exchange_->exchange(rd_.rank, mine);
    std::vector<char> out;
    out.reserve(mine.size() * all.size());
    for (const std::vector<char>& b : all) {
      if (b.size() != mine.size()) throw harness::Error("host all-gather: ranks passed different sizes");
      out.insert(out.end(), b.begin(), b.end());
    }
    return out;
  }

 protected:
  // Draining the stream before the threads meet makes the host barrier stream-ordered: no rank enqueues anything
  // after it before every rank's earlier work is done.
  void rendezvous() override { quiesce(); }

 private:
  HostExchange* exchange_;
};

}  // namespace

std::unique_ptr<Collective> makeHostCollective(const RankDevice& rd, HostExchange* exchange) {
  return std::make_unique<HostCollective>(rd, exchange);
}

}  // namespace nccl_moe::perf
