// The bootstrap seam: every collective step of communicator setup and teardown (identity and buffer-handle
// all-gathers, agreement on a failure, barriers) goes through this interface, never through NCCL or threads
// directly. Two implementations:
//   NCCL    over the user's ncclComm_t (ncclMoeCommInit): all-gathers through ncclAllGather on a stream of the
//           bootstrap's own (bootstrap_nccl.cc);
//   world   in-process, for the R ranks of one ncclMoeCommInitAll call driven from threads, several of which
//           may share one GPU (bootstrap_world.cc).
// Later transports exchange their connection records through the same allGather.
#pragma once

#include <nccl.h>

#include <cstddef>
#include <memory>

struct ncclMoeComm;

namespace nccl_moe {

class Bootstrap {
 public:
  virtual ~Bootstrap() = default;
  virtual const char* name() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Collective: every rank's `bytes` bytes (the same `bytes` on every rank), in rank order, into
  // all[size() * bytes]. On failure the message is in the thread's last error.
  virtual ncclResult_t allGather(const void* mine, void* all, size_t bytes) = 0;
  // Teardown of a communicator on this bootstrap. NCCL: collective (a barrier, then the communicator's
  // resources go). World: not collective; the resources of all ranks go with the world's last communicator
  // (peers may still be reading a buffer until then). Takes ownership of `comm` (deletes it, now or later).
  virtual ncclResult_t retire(ncclMoeComm* comm) = 0;

  // Collective: *any_failed = true when some rank passed local_failed.
  ncclResult_t agree(bool local_failed, bool* any_failed);
  // Collective: returns once every rank has entered it.
  ncclResult_t barrier();
};

// Over the user's NCCL communicator, on `device` (its stream and scratch memory are allocated here; a failure
// returns before any collective).
ncclResult_t makeNcclBootstrap(ncclComm_t nccl, int device, std::unique_ptr<Bootstrap>* out);

// One in-process world of `size` ranks: makeWorldBootstraps returns the bootstrap of every rank (each used by
// the thread that initialises that rank). Waits are bounded by `timeout_ns`.
ncclResult_t makeWorldBootstraps(int size, unsigned long long timeout_ns, std::unique_ptr<Bootstrap>* out);

}  // namespace nccl_moe
