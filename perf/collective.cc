// What both implementations of the collectives share: the barrier's hold and start gate, and agree() (contract in
// collective.h; the implementations are collective_nccl.cc and collective_host.cc).
#include "collective.h"

#include <cstring>

#include "baseline_kernels.h"

namespace nccl_moe::perf {

namespace {
size_t sz(int64_t v) { return static_cast<size_t>(v); }
}  // namespace

Collective::~Collective() {
  for (long long* p : gate_opened_) cudaIpcCloseMemHandle(p);
}

void Collective::barrier() {
  rendezvous();
  if (gate_) {
    HARNESS_CUDA(holdAndMeet(kHoldUs, gate_peers_.get(), gate_flags_.get(), rd_.rank, rd_.num_ranks, ++gate_epoch_,
                             kGateTimeoutS, gate_timed_out_.get(), rd_.stream));
  } else {
    HARNESS_CUDA(holdStream(kHoldUs, rd_.stream));
  }
}

void Collective::hostBarrier() {
  rendezvous();
  HARNESS_CUDA(cudaStreamSynchronize(rd_.stream));
}

bool Collective::setupGate(const std::vector<Place>& places) {
  struct Entry {
    long long* ptr;
    int ipc_ok;  // `ipc` is valid (needed only by peers in other processes)
    cudaIpcMemHandle_t ipc;
  };
  gate_flags_.allocate(sz(rd_.num_ranks));
  gate_flags_.zeroAsync(rd_.stream);
  gate_timed_out_.allocate(1);
  gate_timed_out_.zeroAsync(rd_.stream);
  Entry mine{};
  mine.ptr = gate_flags_.get();
  mine.ipc_ok = cudaIpcGetMemHandle(&mine.ipc, mine.ptr) == cudaSuccess;
  if (!mine.ipc_ok) (void)cudaGetLastError();
  bool ok = true;
  std::vector<char> bytes(sizeof(Entry));
  std::memcpy(bytes.data(), &mine, sizeof(Entry));
  const std::vector<char> all = allGather(bytes);
  const Place& me = places[sz(rd_.rank)];
  std::vector<long long*> peers(sz(rd_.num_ranks), nullptr);
  for (int r = 0; r < rd_.num_ranks && ok; ++r) {
    Entry e;
    std::memcpy(&e, all.data() + sz(r) * sizeof(Entry), sizeof(Entry));
    const Place& pl = places[sz(r)];
    if (pl.host != me.host) {
      ok = false;
    } else if (pl.pid == me.pid) {
      int can = 0;
      if (pl.device != rd_.device) {
        ok = cudaDeviceCanAccessPeer(&can, rd_.device, pl.device) == cudaSuccess && can != 0;
        if (ok) {
          const cudaError_t err = cudaDeviceEnablePeerAccess(pl.device, 0);
          if (err == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();
          ok = err == cudaSuccess || err == cudaErrorPeerAccessAlreadyEnabled;
        }
      }
      peers[sz(r)] = e.ptr;
    } else {
      void* p = nullptr;
      ok = e.ipc_ok && cudaIpcOpenMemHandle(&p, e.ipc, cudaIpcMemLazyEnablePeerAccess) == cudaSuccess;
      if (ok) gate_opened_.push_back(static_cast<long long*>(p));
      peers[sz(r)] = static_cast<long long*>(p);
    }
  }
  if (!ok) (void)cudaGetLastError();
  if (ok) gate_peers_.assign(peers, rd_.stream);
  gate_ = agree(ok);
  return gate_;
}

bool Collective::gateTimedOut() const { return gate_ && gate_timed_out_.download(1, rd_.stream)[0] != 0; }

bool Collective::agree(bool ok) { return allReduce({ok ? 1.0 : 0.0}, ReduceOp::kMin)[0] > 0.5; }

}  // namespace nccl_moe::perf
