// The process's bounded host barrier and the shared memory of the host collectives (contract in host_exchange.h).
#include "host_exchange.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace nccl_moe::perf {

void meet(harness::HostBarrier& barrier, double timeout_s, const char* what) {
  if (!barrier.wait(timeout_s))
    throw std::runtime_error(std::string("host barrier (") + what + "): another rank thread of this process did not " +
                             "arrive within " + std::to_string(static_cast<long long>(timeout_s)) + " s");
}

HostExchange::HostExchange(int num_ranks, double timeout_s)
    : barrier_(num_ranks), timeout_s_(timeout_s), slots_(static_cast<size_t>(num_ranks)) {}

void HostExchange::meet(const char* what) { perf::meet(barrier_, timeout_s_, what); }

std::vector<std::vector<char>> HostExchange::exchange(int rank, const std::vector<char>& mine) {
  slots_[static_cast<size_t>(rank)] = mine;  // each rank writes only its own slot
  meet("host collective: every rank's bytes written");
  std::vector<std::vector<char>> all = slots_;
  meet("host collective: every rank's bytes read");  // nobody overwrites a slot another rank is still reading
  for (const std::vector<char>& b : all)
    if (b.size() != mine.size()) throw std::runtime_error("host collective: the ranks passed different sizes");
  return all;
}

std::vector<double> HostExchange::allReduce(int rank, const std::vector<double>& values, ReduceOp op) {
  std::vector<char> bytes(values.size() * sizeof(double));
  if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  const std::vector<std::vector<char>> all = exchange(rank, bytes);
  std::vector<double> out(values.size());
  for (size_t r = 0; r < all.size(); ++r) {
    for (size_t i = 0; i < values.size(); ++i) {
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

std::vector<char> HostExchange::allGather(int rank, const std::vector<char>& mine) {
  const std::vector<std::vector<char>> all = exchange(rank, mine);
  std::vector<char> out;
  out.reserve(mine.size() * all.size());
  for (const std::vector<char>& b : all) out.insert(out.end(), b.begin(), b.end());
  return out;
}

}  // namespace nccl_moe::perf
