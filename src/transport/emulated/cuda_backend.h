// The software NIC's memory backend for requester and responder memory that is device memory of THIS process on
// one GPU (virtual nodes: ranks of one process sharing a GPU, design notes §4.4). Memory moves on one
// non-blocking CUDA stream per QP, so a QP's operations are ordered among themselves and independent of other
// QPs (stream order is the per-QP order the executor relies on; chaos provides the rest):
//
//   readSource   cudaMemcpyAsync(staging <- src) on the QP's stream
//   stageInline  a one-thread kernel carrying the bytes as its argument (no host buffer must outlive the call)
//   writeRemote  cudaMemcpyAsync(dst <- staging) on the QP's stream
//   atomic       a one-thread kernel on the QP's stream: atomicAdd_system / atomicCAS_system on the 64-bit word,
//                previous value (big-endian if asked) to the result address
//   complete     the QP's stream drained (cudaStreamQuery loop, bounded: complete_timeout_s, then the backend
//                is marked failed with a message naming the QP and the stream)
//
// The one-GPU rule (design notes §4.3): while test or collective kernels spin on this GPU, nothing here may wait
// for the whole device or use the legacy default stream. So all allocation happens in create() (staging is a
// fixed arena, StagingPool; allocStaging never calls cudaMalloc), both kernels are loaded and launched once in
// create() (the lazy-loading hang), streams are created by prepareQp() at QP creation (setup time), and the
// first call from any thread sets that thread's device and its stream-capture mode to relaxed (another thread's
// graph capture must not make this thread's calls fail).
//
// Failures (a CUDA error, staging exhausted, a stream that does not drain) never throw or abort: the first one is
// kept (error()), logged, and failed() turns true; staging requests that cannot be served get a scratch "sink"
// buffer so the executor keeps running (the data it carries is then garbage, and tests check failed()).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/emulated/memory_backend.h"
#include "transport/emulated/staging_pool.h"

namespace nccl_moe::emulated {

struct CudaBackendOptions {
  int device = 0;
  uint64_t staging_bytes = 64ull << 20;   // the staging arena (device memory)
  uint64_t max_chunk_bytes = 1ull << 20;  // NicConfig::max_chunk_bytes: the largest single staging request
  double complete_timeout_s = 60.0;       // bound of complete(qp)
  // Every QP on one stream (a communicator's NIC): a process holds few streams then. Ranks of a one-GPU world
  // each have a NIC; with a stream per QP their streams outnumber CUDA_DEVICE_MAX_CONNECTIONS (2x4: 40 QP streams
  // besides the ranks' own), streams share hardware queues, and a NIC copy or atomic queued behind a rank's
  // spinning receive kernel waits for it: a hang until the timeout, seen on 2x4 after tens of LL iterations.
  // One stream still orders each QP's operations (more strictly: across QPs too; chaos reorders before issue).
  bool one_stream = false;
};

class CudaMemoryBackend final : public MemoryBackend {
 public:
  static ncclResult_t create(const CudaBackendOptions& options, std::unique_ptr<CudaMemoryBackend>* out);
  ~CudaMemoryBackend() override;
  CudaMemoryBackend(const CudaMemoryBackend&) = delete;
  CudaMemoryBackend& operator=(const CudaMemoryBackend&) = delete;

  // Creates the stream of the NIC's QP index `qp` (call right after SoftNic::createQp, before kernels run).
  ncclResult_t prepareQp(uint32_t qp);
  // A responder in another process on this GPU: its buffer [remote_base, + bytes), as the NIC addresses it (its
  // registration's iova: the owner's virtual address), is mapped in this process at `local` (CUDA IPC). WRITEs and
  // atomics for `peer` are placed through that mapping; addresses outside it fail the backend. Call before the
  // executor starts.
  ncclResult_t mapPeer(int peer, uint64_t remote_base, uint64_t bytes, void* local);

  bool failed() const;
  std::string error() const;
  uint64_t stagingHighWater() const;

  const char* name() const override { return "cuda"; }
  void* allocStaging(uint64_t bytes) override;
  void freeStaging(void* staging) override;
  void readSource(uint32_t qp, void* staging, uint64_t src, uint64_t bytes) override;
  void stageInline(uint32_t qp, void* staging, const void* bytes_in_wqe, uint64_t bytes) override;
  void writeRemote(uint32_t qp, int peer, uint64_t dst, const void* staging, uint64_t bytes) override;
  void atomic(uint32_t qp, int peer, const AtomicRequest& request) override;
  void complete(uint32_t qp) override;

 private:
  explicit CudaMemoryBackend(const CudaBackendOptions& options);
  void enterThread();
  cudaStream_t streamOf(uint32_t qp);
  // The address to use here for the responder `peer`'s `addr` (`bytes` from it): itself in this process, else through
  // the peer's mapping (0 and a backend failure when outside it).
  uint64_t placeAt(uint32_t qp, int peer, uint64_t addr, uint64_t bytes);
  void fail(const std::string& message);
  void check(cudaError_t err, const char* what, uint32_t qp);

  CudaBackendOptions options_;
  uint8_t* arena_ = nullptr;
  uint8_t* sink_ = nullptr;
  StagingPool pool_;
  mutable std::mutex mu_;  // streams_, error_ (prepareQp may run while the executor does)
  std::vector<cudaStream_t> streams_;
  struct PeerMapping {
    uint64_t remote_base = 0, bytes = 0;
    uint8_t* local = nullptr;  // null: the peer is in this process
  };
  std::vector<PeerMapping> peers_;        // [peer rank]
  cudaStream_t shared_stream_ = nullptr;  // one_stream: the stream of every QP
  std::string error_;
  bool failed_ = false;
};

// cuda_backend_kernels.cu: the backend's kernels.
struct InlineBytes {
  uint8_t bytes[32];
};
cudaError_t loadCudaBackendKernels(cudaStream_t stream);  // attributes + one launch each (touch no memory)
cudaError_t launchEmuAtomic(const AtomicRequest& request, cudaStream_t stream);
cudaError_t launchEmuStageInline(void* dst, const InlineBytes& bytes, uint32_t num_bytes, cudaStream_t stream);

}  // namespace nccl_moe::emulated
