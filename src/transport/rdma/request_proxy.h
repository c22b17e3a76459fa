// The request proxy's consumer (design notes §3.2): a CPU thread that turns the descriptors of one proxy ring
// (proxy_ring.h) into mlx5 WQEs with the shared builders and posts them on its QPs (HostSq), then reports
// consumption (credits) and completion back to the producer through the ring's shared words.
//
// One progress() call:
//   1. polls every QP's CQ; advances `completed` over the prefix of descriptors whose WQEs have completed (a
//      descriptor completes when its QP's completed index passed its last WQE; a quiet when all before it did)
//   2. copies out up to max_batch ready descriptors in ring order, translates (key, offset) to (address, key)
//      through the local registry (local_key: an lkey) and the QP's remote windows (remote / signal keys: rkeys
//      of the peer), and writes their WQEs: put = WRITE, put_signal = WRITE + fetch-add, signal = fetch-add, all
//      unsignaled; a quiet ends the batch. A descriptor whose WQEs do not fit its SQ stays in the ring for the
//      next call (the producer then runs out of credits: back-pressure, not loss).
//   3. publishes `consumed`, asks for a CQE on the last WQE of each QP it wrote to (and on every
//      max_unsignaled-th, so the SQ always drains) and rings those QPs' doorbells: one doorbell per QP per batch.
// Any failure (undecodable descriptor, producer overrun, unknown key or range outside a window, an error CQE)
// is sticky: the ring's error word gets a ProxyError, error() the message, and nothing more is consumed.
#pragma once

#include <nccl.h>

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "transport/rdma/host_sq.h"
#include "transport/rdma/proxy_ring.h"
#include "transport/rdma/window.h"

namespace nccl_moe::rdma {

struct ProxyQp {
  HostSq* sq = nullptr;
  std::vector<Window> remote_windows;  // the peer's windows (addr, bytes, rkey), e.g. from its connection record
};

struct RequestProxyConfig {
  uint32_t max_batch = 64;         // descriptors consumed per progress()
  uint32_t max_unsignaled = 32;    // at most this many WQEs in a row without a CQE request, per QP
  mlx5::LocalWord fetch_result{};  // registered 8 bytes that receive the fetch-adds' previous values (discarded)
};

class RequestProxy {
 public:
  // The ring's shared words and slots must be initialised for `start` (consumed = completed = start, slots
  // with proxy_init_slot); `local_windows` must outlive the proxy.
  RequestProxy(const ProxyRing& ring, uint32_t start, const WindowRegistry* local_windows, std::vector<ProxyQp> qps,
               const RequestProxyConfig& config);

  // One pass (see the header comment). Sets *progressed when anything was consumed or completed. Returns the
  // sticky failure's code: ncclSuccess, ncclInvalidUsage (bad descriptor, overrun, translation), ncclRemoteError.
  ncclResult_t progress(bool* progressed = nullptr);

  uint32_t consumed() const { return consumed_; }
  uint32_t completed() const { return completed_; }
  bool failed() const { return error_code_ != ProxyError::kNone; }
  const std::string& error() const { return error_; }
  uint64_t descriptorsPosted() const { return num_posted_; }

 private:
  struct InFlight {
    uint32_t seq;
    int qp;           // -1: a quiet
    uint32_t end_pi;  // the QP's producer index after the descriptor's last WQE
  };
  ncclResult_t fail(ProxyError code, ncclResult_t result, const std::string& message);
  // Writes the WQEs of `r`; returns false when they do not fit the QP's SQ (nothing written) or on failure.
  bool post(const ProxyRequest& r, uint32_t seq, bool* no_room);
  bool translate(const ProxyRequest& r, uint32_t seq, bool remote, uint32_t key, uint64_t offset, uint64_t bytes,
                 const char* what, uint64_t* addr);
  void completeInFlight();

  ProxyRing ring_;
  const WindowRegistry* local_windows_;
  std::vector<ProxyQp> qps_;
  RequestProxyConfig config_;
  uint32_t consumed_;
  uint32_t completed_;
  std::deque<InFlight> in_flight_;
  std::vector<uint32_t> unsignaled_run_;
  std::vector<bool> touched_;
  uint64_t num_posted_ = 0;
  ProxyError error_code_ = ProxyError::kNone;
  ncclResult_t error_result_ = ncclSuccess;
  std::string error_;
};

}  // namespace nccl_moe::rdma
