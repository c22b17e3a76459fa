#include "transport/emulated/cuda_backend.h"

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <thread>

#include "core/error.h"
#include "core/log.h"

namespace nccl_moe::emulated {

namespace {
constexpr uint64_t kStagingAlignment = 256;
}  // namespace

CudaMemoryBackend::CudaMemoryBackend(const CudaBackendOptions& options)
    : options_(options), pool_(options.staging_bytes, kStagingAlignment) {}

ncclResult_t CudaMemoryBackend::create(const CudaBackendOptions& options, std::unique_ptr<CudaMemoryBackend>* out) {
  MOE_ARG_CHECK(out != nullptr, "CudaMemoryBackend::create: out is null");
  MOE_ARG_CHECK(options.staging_bytes >= options.max_chunk_bytes && options.max_chunk_bytes > 0,
                "CudaMemoryBackend::create: staging_bytes %" PRIu64 " must be >= max_chunk_bytes %" PRIu64 " > 0",
                options.staging_bytes, options.max_chunk_bytes);
  MOE_ARG_CHECK(options.complete_timeout_s > 0, "CudaMemoryBackend::create: complete_timeout_s must be > 0");
  std::unique_ptr<CudaMemoryBackend> b(new CudaMemoryBackend(options));
  MOE_CUDA_CHECK(cudaSetDevice(options.device));
  MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&b->arena_), options.staging_bytes));
  MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&b->sink_), options.max_chunk_bytes));
  // Load (and run once) both kernels now: a first launch while a kernel on this GPU spins on the NIC can hang
  // under lazy module loading (design notes §4.3).
  cudaStream_t s = nullptr;
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const cudaError_t err = loadCudaBackendKernels(s);
  cudaStreamDestroy(s);
  if (err != cudaSuccess)
    return setLastError(ncclUnhandledCudaError, "CudaMemoryBackend: loading its kernels failed: %s (%s)",
                        cudaGetErrorName(err), cudaGetErrorString(err));
  *out = std::move(b);
  return ncclSuccess;
}

CudaMemoryBackend::~CudaMemoryBackend() {
  cudaSetDevice(options_.device);
  for (cudaStream_t s : streams_) {
    if (s == nullptr || s == shared_stream_) continue;
    cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
  }
  if (shared_stream_ != nullptr) {
    cudaStreamSynchronize(shared_stream_);
    cudaStreamDestroy(shared_stream_);
  }
  cudaFree(arena_);
  cudaFree(sink_);
}

ncclResult_t CudaMemoryBackend::prepareQp(uint32_t qp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (qp < streams_.size() && streams_[qp] != nullptr) return ncclSuccess;
  MOE_CUDA_CHECK(cudaSetDevice(options_.device));
  cudaStream_t s = options_.one_stream ? shared_stream_ : nullptr;
  if (s == nullptr) MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  if (options_.one_stream) shared_stream_ = s;
  if (streams_.size() <= qp) streams_.resize(qp + 1, nullptr);
  streams_[qp] = s;
  return ncclSuccess;
}

bool CudaMemoryBackend::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_;
}
std::string CudaMemoryBackend::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}
uint64_t CudaMemoryBackend::stagingHighWater() const { return pool_.highWater(); }

void CudaMemoryBackend::fail(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return;
  failed_ = true;
  error_ = message;
  MOE_WARN("CUDA memory backend of the software NIC: %s", message.c_str());
}

void CudaMemoryBackend::check(cudaError_t err, const char* what, uint32_t qp) {
  if (err == cudaSuccess) return;
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s for QP %u failed: %s (%s)", what, qp, cudaGetErrorName(err),
                cudaGetErrorString(err));
  fail(buf);
}

void CudaMemoryBackend::enterThread() {
  // Per thread, once: the executor thread (or a test thread stepping the NIC) addresses this device and is not
  // disturbed by another thread's stream capture.
  thread_local int tls_device = -1;
  if (tls_device == options_.device) return;
  cudaSetDevice(options_.device);
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  tls_device = options_.device;
}

cudaStream_t CudaMemoryBackend::streamOf(uint32_t qp) {
  enterThread();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (qp < streams_.size() && streams_[qp] != nullptr) return streams_[qp];
  }
  // A QP nobody prepared: creating a stream now could wait for the device while kernels spin. Report it and
  // create it anyway (better a diagnosed stall than a crash).
  fail("QP " + std::to_string(qp) +
       " was not prepared (prepareQp after SoftNic::createQp); its stream is created late");
  prepareQp(qp);
  std::lock_guard<std::mutex> lock(mu_);
  return qp < streams_.size() ? streams_[qp] : nullptr;
}

void* CudaMemoryBackend::allocStaging(uint64_t bytes) {
  const uint64_t offset = pool_.allocate(bytes);
  if (offset != StagingPool::kNoSpace) return arena_ + offset;
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "staging arena exhausted: %" PRIu64 " bytes requested, %" PRIu64 " of %" PRIu64
                " in use (largest free %" PRIu64 "); raise CudaBackendOptions::staging_bytes",
                bytes, pool_.bytesInUse(), pool_.capacity(), pool_.largestFree());
  fail(buf);
  return sink_;
}

void CudaMemoryBackend::freeStaging(void* staging) {
  if (staging == sink_ || staging == nullptr) return;
  const uint64_t offset = static_cast<uint64_t>(static_cast<uint8_t*>(staging) - arena_);
  if (!pool_.release(offset)) fail("freeStaging of a pointer the arena never handed out");
}

void CudaMemoryBackend::readSource(uint32_t qp, void* staging, uint64_t src, uint64_t bytes) {
  check(cudaMemcpyAsync(staging, reinterpret_cast<const void*>(src), bytes, cudaMemcpyDefault, streamOf(qp)),
        "cudaMemcpyAsync (read source)", qp);
}

void CudaMemoryBackend::stageInline(uint32_t qp, void* staging, const void* bytes_in_wqe, uint64_t bytes) {
  InlineBytes b{};
  if (bytes > sizeof(b.bytes)) {
    fail("inline data of " + std::to_string(bytes) + " bytes exceeds the 32 a WQE can carry");
    return;
  }
  std::memcpy(b.bytes, bytes_in_wqe, bytes);
  check(launchEmuStageInline(staging, b, static_cast<uint32_t>(bytes), streamOf(qp)), "inline staging kernel", qp);
}

ncclResult_t CudaMemoryBackend::mapPeer(int peer, uint64_t remote_base, uint64_t bytes, void* local) {
  MOE_ARG_CHECK(peer >= 0 && local != nullptr && bytes > 0,
                "CudaMemoryBackend::mapPeer: peer %d, %" PRIu64 " bytes at %p", peer, bytes, local);
  std::lock_guard<std::mutex> lock(mu_);
  if (peers_.size() <= static_cast<size_t>(peer)) peers_.resize(static_cast<size_t>(peer) + 1);
  peers_[peer] = PeerMapping{remote_base, bytes, static_cast<uint8_t*>(local)};
  return ncclSuccess;
}

uint64_t CudaMemoryBackend::placeAt(uint32_t qp, int peer, uint64_t addr, uint64_t bytes) {
  // Same process: the responder's address is usable as is. Another process: through its IPC mapping.
  if (peer < 0 || static_cast<size_t>(peer) >= peers_.size() || peers_[peer].local == nullptr) return addr;
  const PeerMapping& m = peers_[peer];
  if (addr < m.remote_base || bytes > m.bytes || addr - m.remote_base > m.bytes - bytes) {
    char what[160];
    std::snprintf(what, sizeof(what),
                  "QP %u: responder %d address 0x%" PRIx64 " (+%" PRIu64 " bytes) is outside its mapped buffer", qp,
                  peer, addr, bytes);
    fail(what);
    return 0;
  }
  return reinterpret_cast<uint64_t>(m.local + (addr - m.remote_base));
}

void CudaMemoryBackend::writeRemote(uint32_t qp, int peer, uint64_t dst, const void* staging, uint64_t bytes) {
  const uint64_t at = placeAt(qp, peer, dst, bytes);
  if (at == 0) return;
  check(cudaMemcpyAsync(reinterpret_cast<void*>(at), staging, bytes, cudaMemcpyDefault, streamOf(qp)),
        "cudaMemcpyAsync (place data)", qp);
}

void CudaMemoryBackend::atomic(uint32_t qp, int peer, const AtomicRequest& request) {
  AtomicRequest here = request;
  here.remote_addr = placeAt(qp, peer, request.remote_addr, 8);
  if (here.remote_addr == 0) return;
  check(launchEmuAtomic(here, streamOf(qp)), "atomic kernel launch", qp);
}

void CudaMemoryBackend::complete(uint32_t qp) {
  cudaStream_t s = streamOf(qp);
  const auto start = std::chrono::steady_clock::now();
  uint32_t spins = 0;
  for (;;) {
    const cudaError_t err = cudaStreamQuery(s);
    if (err == cudaSuccess) return;
    if (err != cudaErrorNotReady) {
      check(err, "cudaStreamQuery (complete)", qp);
      return;
    }
    if (++spins > 64) std::this_thread::yield();
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > options_.complete_timeout_s) {
      char buf[200];
      std::snprintf(buf, sizeof(buf),
                    "complete(QP %u): its stream did not drain within %.1f s (copies or the atomic kernel of this QP "
                    "are stuck on the GPU)",
                    qp, options_.complete_timeout_s);
      fail(buf);
      return;
    }
  }
}

}  // namespace nccl_moe::emulated
