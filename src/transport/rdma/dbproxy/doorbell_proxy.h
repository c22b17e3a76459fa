// The doorbell proxy (NCCL_MOE_NET_MODE=dbproxy, design notes §3.1): for machines where the NIC's doorbell page (UAR)
// cannot be mapped to the GPU. The GPU does everything IBGDA does -- reserves, writes the WQEs, marks them ready,
// writes the doorbell record, polls the CQ (ibgda.cuh) -- except the last store: its 8-byte doorbell word goes to a
// per-QP MAILBOX in pinned host memory instead of the UAR. A CPU thread per rank (proxy_thread.h) polls the mailboxes
// and stores each new word to the QP's real doorbell: the software NIC's doorbell word, or the UAR register with the
// MMIO store sequence of rdma-core's mlx5 provider (a full fence so the NIC sees the WQEs and the doorbell record the
// GPU wrote before it, one 8-byte store, then a store fence that flushes the write-combining buffer).
//
// Contract
//   - The wire is unchanged: the same WQEs, the same doorbell word; a peer cannot tell (so each rank's choice is
//     local; init still agrees on one mode for every rank and logs it, src/transport/rdma/verbs/comm_transport.h).
//   - Only the latest word matters: a doorbell announces every WQE up to its producer index, so a word overwritten
//     before the proxy saw it loses nothing (batching). Words cannot repeat between two polls: the GPU cannot run
//     more than one SQ's worth (<= 2^15 WQEBBs) ahead of the NIC, and the NIC executes nothing the proxy did not
//     forward, so the word's 16-bit index moves by less than 2^16.
//   - progress() never blocks and never fails: a malformed word is the NIC's to reject (foreign QPN, index past
//     what was written), as it would be from the GPU directly. A stalled or stopped proxy shows on the GPU as a
//     net-quiet / net-reserve timeout whose record names the QP; describe() says what the proxy forwarded.
//   - Routes are added before the proxy's thread starts (start(); add() then refuses: it is not thread-safe against
//     progress()). The destructor stops the thread.
//   - Pure host code: unit-tested with a CPU producer and the software NIC (tests/unit/doorbell_proxy_test.cc); the
//     MMIO store is the one line that has never run against a NIC.
#pragma once

#include <nccl.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/rdma/proxy/proxy_thread.h"

namespace nccl_moe::dbproxy {

enum class DoorbellTarget : int {
  kHostWord = 0,  // the software NIC's doorbell word: a release store
  kMmio = 1,      // a UAR register (BlueFlame doorbell): fence, 8-byte store, store fence
};

struct DoorbellRoute {
  const uint64_t* mailbox = nullptr;  // host address of the word the GPU stores its doorbell to (8-byte aligned)
  uint64_t* doorbell = nullptr;       // host address of the QP's real doorbell
  DoorbellTarget target = DoorbellTarget::kHostWord;
  int peer = -1;     // for describe()
  uint32_t qpn = 0;  // for describe()
};

// The MMIO doorbell store: what rdma-core's mlx5 provider does after its doorbell record (mmio_write64_be +
// mmio_flush_writes): everything the NIC must see (WQEs, doorbell record, written by the GPU and observed by this
// thread through the mailbox) is ordered before one 8-byte store, which is then flushed out of the write-combining
// buffer.
void ringMmio(uint64_t* uar, uint64_t word);

class DoorbellProxy {
 public:
  explicit DoorbellProxy(int rank) : rank_(rank) {}
  ~DoorbellProxy() { stop(); }
  DoorbellProxy(const DoorbellProxy&) = delete;
  DoorbellProxy& operator=(const DoorbellProxy&) = delete;

  // One more QP, before start(). The mailbox's current word counts as already forwarded.
  ncclResult_t add(const DoorbellRoute& route);
  // The proxy's CPU thread (proxy_thread.h: progress() in a loop with backoff, bounded stop).
  ncclResult_t start();
  ncclResult_t stop(double timeout_s = 5.0);  // ncclSuccess when not started, or already stopped
  bool running() const { return thread_ != nullptr && thread_->running(); }
  // One pass over every mailbox: forwards each word that changed. *progressed = anything forwarded. Always
  // ncclSuccess (the signature is the proxy thread's).
  ncclResult_t progress(bool* progressed = nullptr);

  size_t numRoutes() const { return routes_.size(); }
  // Routes whose mailbox holds a word not yet forwarded (read from any thread).
  size_t pending() const;
  uint64_t forwarded() const { return forwarded_.load(std::memory_order_relaxed); }
  // The last word forwarded on route i (0 before any).
  uint64_t lastForwarded(size_t i) const;
  // "doorbell proxy of rank r: N QPs (host words | UAR), F doorbells forwarded"; with `details`, each QP whose
  // mailbox holds a word not yet forwarded ("QP 0x.. to peer p: mailbox index a, forwarded b").
  std::string describe(bool details = false) const;

 private:
  struct Route {
    DoorbellRoute route;
    std::atomic<uint64_t> last{0};
  };
  int rank_;
  std::vector<std::unique_ptr<Route>> routes_;
  std::atomic<uint64_t> forwarded_{0};
  std::unique_ptr<proxy::ProxyThread> thread_;
};

}  // namespace nccl_moe::dbproxy
