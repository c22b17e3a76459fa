// The in-process bootstrap of an ncclMoeCommInitAll world: R ranks of one process, each initialised by its own
// thread, several possibly on one GPU. All-gathers meet in host memory under a mutex; every wait is bounded
// (NCCL_MOE_TIMEOUT_S) and a rank that gives up breaks the world, so the others fail at once instead of
// waiting out their own timeouts. Teardown is not collective: a retired communicator waits in the world until
// the last one is retired, then all are released (a peer may read or write a buffer until its own device work
// is done, and nobody else knows when that is).
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <vector>

#include "core/bootstrap.h"
#include "core/comm.h"
#include "core/device_guard.h"
#include "core/error.h"

namespace nccl_moe {
namespace {

struct World {
  explicit World(int n, unsigned long long timeout) : size(n), timeout_ns(timeout), slots(n) {}
  const int size;
  const unsigned long long timeout_ns;
  std::mutex mutex;
  std::condition_variable cv;
  int arrived = 0;
  unsigned long long generation = 0;
  bool broken = false;
  std::vector<std::vector<uint8_t>> slots;  // [rank]: this round's bytes
  std::vector<ncclMoeComm*> retired;

  // Returns once all ranks arrived (true), or false when the wait expired or the world broke.
  bool meet(std::unique_lock<std::mutex>& lock) {
    if (broken) return false;
    const unsigned long long gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return true;
    }
    const bool met =
        cv.wait_for(lock, std::chrono::nanoseconds(timeout_ns), [&] { return generation != gen || broken; });
    if (met && generation != gen) return true;
    broken = true;
    cv.notify_all();
    return false;
  }
};

class WorldBootstrap : public Bootstrap {
 public:
  WorldBootstrap(std::shared_ptr<World> world, int rank) : world_(std::move(world)), rank_(rank) {}
  const char* name() const override { return "in-process world"; }
  int rank() const override { return rank_; }
  int size() const override { return world_->size; }

  ncclResult_t allGather(const void* mine, void* all, size_t bytes) override {
    World& w = *world_;
    std::unique_lock<std::mutex> lock(w.mutex);
    w.slots[rank_].assign(static_cast<const uint8_t*>(mine), static_cast<const uint8_t*>(mine) + bytes);
    if (!w.meet(lock)) return failure("an all-gather");
    for (int r = 0; r < w.size; ++r) {
      if (w.slots[r].size() != bytes) {
        w.broken = true;
        w.cv.notify_all();
        return setLastError(ncclInternalError, "in-process bootstrap: rank %d gathered %zu bytes, rank %d %zu", rank_,
                            bytes, r, w.slots[r].size());
      }
      std::memcpy(static_cast<uint8_t*>(all) + bytes * r, w.slots[r].data(), bytes);
    }
    // Nobody refills a slot before every rank has read this round.
    if (!w.meet(lock)) return failure("an all-gather");
    return ncclSuccess;
  }

  ncclResult_t retire(ncclMoeComm* comm) override {
    std::vector<ncclMoeComm*> all;
    {
      std::lock_guard<std::mutex> lock(world_->mutex);
      world_->retired.push_back(comm);
      if (static_cast<int>(world_->retired.size()) < world_->size) return ncclSuccess;
      all.swap(world_->retired);
    }
    // The last one: every rank's device work is done (each synchronised its device before retiring).
    for (ncclMoeComm* c : all) {
      releaseCommResources(c);
      delete c;  // also deletes this bootstrap (owned by one of them): nothing of `this` is used below
    }
    return ncclSuccess;
  }

 private:
  ncclResult_t failure(const char* what) {
    return setLastError(ncclSystemError,
                        "in-process bootstrap (ncclMoeCommInitAll): rank %d gave up in %s after waiting up to "
                        "NCCL_MOE_TIMEOUT_S=%llus for the other ranks of the world, or another rank gave up first",
                        rank_, what, world_->timeout_ns / 1000000000ull);
  }

  std::shared_ptr<World> world_;
  int rank_;
};

}  // namespace

ncclResult_t makeWorldBootstraps(int size, unsigned long long timeout_ns, std::unique_ptr<Bootstrap>* out) {
  auto world = std::make_shared<World>(size, timeout_ns);
  for (int r = 0; r < size; ++r) out[r] = std::make_unique<WorldBootstrap>(world, r);
  return ncclSuccess;
}

}  // namespace nccl_moe
