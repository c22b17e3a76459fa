// The collectives of moe-perf's GPU backend over the rank threads of one process (contract in collective.h): the
// data goes through a HostExchange (host_exchange.h: slots in shared memory, a bounded harness::HostBarrier,
// reductions in rank order); the barrier drains the rank's stream before the threads meet. No NCCL call is made:
// this is what ranks that share a GPU use (NCCL refuses two ranks of one communicator on one GPU).
#include <memory>

#include "collective.h"

namespace nccl_moe::perf {

namespace {

class HostCollective final : public Collective {
 public:
  HostCollective(const RankDevice& rd, HostExchange* exchange) : Collective(rd), exchange_(exchange) {
    if (exchange->size() != rd.num_ranks)
      throw harness::Error("host collective: the exchange has " + std::to_string(exchange->size()) + " slots for " +
                           std::to_string(rd.num_ranks) + " ranks (every rank must be a thread of this process)");
  }

  void quiesce() override {
    HARNESS_CUDA(cudaStreamSynchronize(rd_.stream));
    exchange_->meet("every rank's stream drained");
  }

  std::vector<double> allReduce(const std::vector<double>& v, ReduceOp op) override {
    return exchange_->allReduce(rd_.rank, v, op);
  }

  std::vector<char> allGather(const std::vector<char>& mine) override { return exchange_->allGather(rd_.rank, mine); }

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
