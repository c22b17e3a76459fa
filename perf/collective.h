// Host-visible collectives of moe-perf's GPU backend over the ranks of a run: a stream-ordered barrier with the
// device start gate, an all-reduce of doubles, an all-gather of bytes and the agreement on a flag that keeps every
// rank's control flow identical (the lockstep rule of gpu_rank.cc), all on the rank's NCCL communicator; and the
// bounded host barrier of the rank threads of one process.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "harness/barrier.h"
#include "rank_device.h"

namespace nccl_moe::perf {

// The error text of a rank whose own call succeeded while another rank's failed.
inline const char* const kOtherRank = "failed on another rank";

// The rank threads of this process meet at `barrier`; one that does not arrive within timeout_s fails the run
// (harness::Error naming `what`).
void meet(harness::HostBarrier& barrier, double timeout_s, const char* what);

// Scratch buffers are allocated once: cudaFree synchronises the device, which must never happen while a collective
// of this rank is in flight.
class Collective {
 public:
  static constexpr size_t kMaxDoubles = 256;
  static constexpr size_t kMaxGatherBytes = 4096;  // per rank
  // 100 us: with the kernel timer CUPTI also traces every runtime/driver call, and the host's enqueue of a timed
  // call (event, correlation push, launch) then took longer than a 30 us hold on some calls; the rank whose GPU
  // went idle started late and its peer's kernel waited for it (erratic small-size medians).
  static constexpr int kHoldUs = 100;
  static constexpr double kGateTimeoutS = 30.0;

  explicit Collective(const RankDevice& rd);
  ~Collective();
  Collective(const Collective&) = delete;
  Collective& operator=(const Collective&) = delete;

  // Stream-ordered: everything enqueued after it starts once every rank has reached it. The hold that follows
  // the all-reduce keeps the stream busy while the host enqueues the timed call, so timing events measure GPU
  // execution (kernel time, as DeepEP's profiler-based figures do) and not the host's launch latency. With the
  // start gate (setupGate) the hold ends in a meeting of all ranks on the device, so the timed calls of all
  // ranks start within about one flag trip of each other: a rank's host that enqueued the hold late (after its
  // NCCL all-reduce had finished on the GPU) no longer starts its calls late, which a call that waits for its
  // peers (a Both LL dispatch) would otherwise count on the early rank.
  void barrier();

  // Where a rank runs (gathered once by the caller).
  struct Place {
    std::string host;
    int pid;
    int device;
  };
  // Collective. Sets up the device start gate when every rank's GPU can reach every other's memory (same host:
  // peer access within the process, CUDA IPC across processes); otherwise barrier() keeps the plain hold.
  // `places` [rank]: every rank's host, process and device. Returns whether the gate is on (the same on every
  // rank).
  bool setupGate(const std::vector<Place>& places);
  // Whether a gate meeting gave up waiting (a peer never arrived: the timing of the rows since is not aligned).
  bool gateTimedOut() const;

  std::vector<double> allReduce(const std::vector<double>& v, ncclRedOp_t op);
  // True when `ok` on every rank.
  bool agree(bool ok);
  // [R * mine.size()]: every rank's bytes, in rank order.
  std::vector<char> allGather(const std::vector<char>& mine);

 private:
  RankDevice rd_;
  DeviceArray<int> token_;
  DeviceArray<double> doubles_;
  DeviceArray<char> gather_send_, gather_recv_;
  bool gate_ = false;
  long long gate_epoch_ = 0;
  DeviceArray<long long> gate_flags_;   // [R]: word r = rank r's latest meeting
  DeviceArray<long long*> gate_peers_;  // [R]: every rank's gate_flags_, as this GPU reaches it
  DeviceArray<int> gate_timed_out_;
  std::vector<long long*> gate_opened_;  // IPC mappings to close
};

}  // namespace nccl_moe::perf
