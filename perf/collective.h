// Host-visible collectives of moe-perf's GPU backend over the ranks of a run: one small interface, two
// implementations.
//
//   barrier()     stream-ordered: everything the rank enqueues after it starts once every rank has reached it; then
//                 a hold and (when set up) the device start gate, so that timed calls measure GPU execution and start
//                 together on every rank
//   allReduce()   of doubles (min, max, sum), result on the host of every rank
//   allGather()   of bytes, every rank's in rank order
//   agree()       true when a flag is true on every rank: after every step that may fail on one rank only, so the
//                 ranks' control flow never diverges (the lockstep rule of gpu_run.h)
//   quiesce()     every rank's stream is drained and every rank is here, for ranks that share a GPU; see below
//   hostBarrier() every rank's stream drained up to it and every rank's host past it: the GPU is idle when the
//                 host goes on (no hold, no gate); the entry of the common-boundary metric (gpu_run.h)
//
// NCCL (makeNcclCollective): one rank per GPU, the rank's ncclComm_t; barrier = ncclAllReduce of one int on the
// rank's stream. quiesce() does nothing: an allocation on one GPU never waits for another GPU's kernels.
// Host (makeHostCollective): the rank threads of one process exchange through shared memory (HostExchange,
// host_exchange.h) and meet at a bounded harness::HostBarrier; no NCCL call at all, which is what ranks sharing a
// GPU need (NCCL refuses two ranks of one communicator on one GPU). barrier = quiesce(): the rank drains its stream,
// then the threads meet. quiesce() is needed around every allocation and free when ranks share a GPU:
// cudaMalloc/cudaFree may wait for the whole device, and a rank that allocates while a peer's kernel spins waiting
// for it would deadlock until a device wait times out.
//
// Start gate (setupGate, both implementations): a device-side meeting of all ranks after the hold. Each rank stores an
// epoch into every rank's flag word and waits for every rank's (bounded, kGateTimeoutS); the flags are reached with
// plain pointers on the same GPU, peer access between GPUs of one process, CUDA IPC between processes.
// Every wait is bounded: host waits by the exchange's timeout (std::runtime_error), gate meetings by kGateTimeoutS.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "host_exchange.h"
#include "rank_device.h"

namespace nccl_moe::perf {

// The error text of a rank whose own call succeeded while another rank's failed.
inline const char* const kOtherRank = "failed on another rank";

class Collective {
 public:
  // 100 us: with the kernel timer CUPTI also traces every runtime/driver call, and the host's enqueue of a timed
  // call (event, correlation push, launch) then took longer than a 30 us hold on some calls; the rank whose GPU
  // went idle started late and its peer's kernel waited for it (erratic small-size medians).
  static constexpr int kHoldUs = 100;
  static constexpr double kGateTimeoutS = 30.0;

  virtual ~Collective();
  Collective(const Collective&) = delete;
  Collective& operator=(const Collective&) = delete;

  // Stream-ordered: everything enqueued after it starts once every rank has reached it. The hold that follows the
  // rendezvous keeps the stream busy while the host enqueues the timed call, so timing events measure GPU execution
  // (kernel time, as DeepEP's profiler-based figures do) and not the host's launch latency. With the start gate
  // (setupGate) the hold ends in a meeting of all ranks on the device, so the timed calls of all ranks start within
  // about one flag trip of each other: a rank's host that enqueued the hold late (after its rendezvous had finished
  // on the GPU) no longer starts its calls late, which a call that waits for its peers (a Both LL dispatch) would
  // otherwise count on the early rank.
  void barrier();
  // Every rank's stream drained and every rank here (host implementation); nothing (NCCL). Call it before and after
  // a rank allocates or frees device memory while ranks may share a GPU.
  virtual void quiesce() = 0;
  // The rendezvous of barrier() without its hold and gate, then this rank's stream drained: when it returns, every
  // rank's work enqueued before it is done (each rank's rendezvous is stream-ordered after that work and completes
  // only once every rank has reached it) and this rank's GPU is idle. The hosts leave it at slightly different
  // times (each returns from its own stream synchronisation); nothing aligns the ranks further.
  void hostBarrier();

  // Any length (the NCCL implementation reduces in pieces of its scratch buffer).
  virtual std::vector<double> allReduce(const std::vector<double>& v, ReduceOp op) = 0;
  // True when `ok` on every rank.
  bool agree(bool ok);
  // [R * mine.size()]: every rank's bytes, in rank order (every rank passes the same size).
  virtual std::vector<char> allGather(const std::vector<char>& mine) = 0;

  // Where a rank runs (gathered once by the caller).
  struct Place {
    std::string host;
    int pid;
    int device;
  };
  // Collective. Sets up the device start gate when every rank's GPU can reach every other's memory (same host: the
  // same GPU, peer access within the process, CUDA IPC across processes); otherwise barrier() keeps the plain hold.
  // `places` [rank]: every rank's host, process and device. Returns whether the gate is on (the same on every rank).
  bool setupGate(const std::vector<Place>& places);
  // Whether a gate meeting gave up waiting (a peer never arrived: the timing of the rows since is not aligned).
  bool gateTimedOut() const;

 protected:
  explicit Collective(const RankDevice& rd) : rd_(rd) {}
  // The stream-ordered part of barrier(): work enqueued after it starts once every rank's stream has reached it.
  virtual void rendezvous() = 0;

  const RankDevice rd_;

 private:
  bool gate_ = false;
  long long gate_epoch_ = 0;
  DeviceArray<long long> gate_flags_;   // [R]: word r = rank r's latest meeting
  DeviceArray<long long*> gate_peers_;  // [R]: every rank's gate_flags_, as this GPU reaches it
  DeviceArray<int> gate_timed_out_;
  std::vector<long long*> gate_opened_;  // IPC mappings to close
};

// The rank's NCCL communicator (rd.comm). Allocates its scratch buffers once: cudaFree synchronises the device,
// which must never happen while a collective of this rank is in flight.
std::unique_ptr<Collective> makeNcclCollective(const RankDevice& rd);

// Collectives over the rank threads of this process (every rank of the run is one of them): no NCCL call.
std::unique_ptr<Collective> makeHostCollective(const RankDevice& rd, HostExchange* exchange);

}  // namespace nccl_moe::perf
