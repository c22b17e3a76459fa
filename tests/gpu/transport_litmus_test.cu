// The GPU producer of the scale-out transport (src/transport/rdma/ibgda/ibgda.cuh) against the software NIC
// executing on this GPU (src/transport/emulated/: SoftNic + CudaMemoryBackend), on ONE GPU: two virtual nodes
// (rank 0 and rank 1) in this process, each with its own NIC, executor thread, window registry and error record;
// windows are cudaMalloc'd device buffers; QPs connect the ranks both ways. Kernels are one block each, on two
// non-blocking streams (the consumer launched first), so the NIC's copies and atomic kernels always find SMs.
// The put_signal litmus itself (data then signal, every byte checked, acked back) runs over whole worlds (2x1, 2x2,
// 4x1, every cross-node pair at once) in both GPU modes: transport_world_litmus_test.cu.
//
//   CrossQpReordering    two QPs to one peer: B's data is seen before A's at least once (no cross-QP order)
//   LastBytePolling      a consumer polling the last data byte sees incomplete data at least once (chaos is
//                        adversarial: only the signal orders data)
//   SourceOverwrite      a source rewritten right after its doorbell reaches the receiver at least once
//   ConcurrentProducers  8 blocks post put_signal on one QP: reservation, in-order ready and lock under contention,
//                        the 64-WQEBB SQ wraps; every signal counted, every slot intact, the QP stays healthy
//   DoorbellProxyStalled the GPU rang its mailbox but no doorbell proxy runs: quiet times out naming the QP; the
//                        proxy names the unforwarded index; started, it forwards and the WQE completes
//   MissingDoorbell      written, never rung: quiet times out naming phase, rank, peer and QP; ringing from the
//                        host afterwards completes the WQE (it was well-formed, only unannounced)
//   AccessErrors         bad rkey, range outside the window, misaligned atomic: error CQE, QP in error on the NIC,
//                        kErrNetCqe with the syndrome in the GPU's record
//   SqOverrun            a producer that skips the SQ-full wait writes wqe_cnt + 1 WQEs and rings once: error CQE
//                        (0x02, EmuFault SQ overrun) for WQE 0, the rest flushed, QP in error, nothing executed,
//                        kErrNetCqe on the producer's rank; its peer, waiting for the flushed signal, records a
//                        bounded timeout naming the sender and the QP (0.3 s)
//
// Knobs: NCCL_MOE_EMU_CHAOS (chaos seed; a fixed non-zero seed when unset: these tests need chaos). Every device wait
// is bounded (kTimeoutNs) and reports where it stopped; every host wait is bounded too.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "gpu_world.h"
#include "peer_wait.cuh"
#include "transport/emulated/chaos.h"
#include "transport/emulated/cuda_backend.h"
#include "transport/emulated/gpu_queues.h"
#include "transport/emulated/nic.h"
#include "transport/rdma/ibgda/ibgda.cuh"
#include "transport/rdma/window.h"
#include "transport_world.h"

namespace {

using namespace nccl_moe::transport_test;  // NOLINT(build/namespaces): the tests' shared helpers

// ---- Kernels ----

// Ordering tests: one sender kernel and one observer kernel, `tries` rounds in lock step through the ack.
enum class OrderTest : int { kCrossQp, kLastByte, kSourceOverwrite };

struct OrderSend {
  OrderTest kind;
  ib::GpuQp qp_a;  // the data QP (kCrossQp: QP A)
  ib::GpuQp qp_b;  // kCrossQp: QP B
  uint8_t* src_a;
  uint8_t* src_b;  // 8 bytes (kCrossQp)
  uint32_t bytes;
  uint64_t dst_a;
  uint32_t dst_rkey;
  uint64_t dst_b;
  uint64_t sig_addr;
  uint32_t sig_rkey;
  const uint64_t* ack;
  uint64_t tries;
  TestStatus* st;
};
struct OrderObserve {
  OrderTest kind;
  ib::GpuQp qp;  // acks
  const uint8_t* dst_a;
  const uint64_t* dst_b;
  const uint64_t* sig;
  uint32_t bytes;
  uint64_t ack_addr;
  uint32_t ack_rkey;
  uint64_t tries;
  TestStatus* st;
};

__global__ void orderSendKernel(OrderSend a) {
  __shared__ int abort_flag;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  for (uint64_t t = 0; t < a.tries; ++t) {
    const uint8_t x = tryByte(t);
    fillBytes(a.src_a, a.bytes, x);
    if (a.kind == OrderTest::kCrossQp) fillBytes(a.src_b, 8, x);
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      bool ok = true;
      if (a.kind == OrderTest::kCrossQp) {
        ok = ib::put(a.qp_a, reinterpret_cast<uint64_t>(a.src_a), a.dst_a, a.dst_rkey, a.bytes) &&
             ib::put(a.qp_b, reinterpret_cast<uint64_t>(a.src_b), a.dst_b, a.dst_rkey, 8) && ib::quiet(a.qp_a) &&
             ib::quiet(a.qp_b);
      } else if (a.kind == OrderTest::kLastByte) {
        ok = ib::put_signal(a.qp_a, reinterpret_cast<uint64_t>(a.src_a), a.dst_a, a.dst_rkey, a.bytes, a.sig_addr,
                            a.sig_rkey, 1);
      } else {
        ok = ib::put(a.qp_a, reinterpret_cast<uint64_t>(a.src_a), a.dst_a, a.dst_rkey, a.bytes);
      }
      if (!ok) {
        failStatus(a.st, 2, kWherePut, t, 0, 0);
        abort_flag = 1;
      }
    }
    __syncthreads();
    if (abort_flag != 0) return;
    if (a.kind == OrderTest::kSourceOverwrite) {
      // The WRITE is rung but not complete: a new value now is a bug the receiver can see (the NIC reads late).
      fillBytes(a.src_a, a.bytes, static_cast<uint8_t>(~x));
      __threadfence_system();
      __syncthreads();
      if (threadIdx.x == 0 && !ib::signal(a.qp_a, a.sig_addr, a.sig_rkey, 1)) {
        failStatus(a.st, 2, kWherePut, t, 0, 0);
        abort_flag = 1;
      }
    }
    if (threadIdx.x == 0 && abort_flag == 0 && !waitGeq(a.ack, t + 1, a.st, kWhereAck, t)) abort_flag = 1;
    __syncthreads();
    if (abort_flag != 0) return;
  }
  if (threadIdx.x == 0 && !ib::quiet(a.qp_a)) failStatus(a.st, 2, kWhereQuiet, a.tries, 0, 0);
}

__global__ void orderObserveKernel(OrderObserve a) {
  __shared__ int abort_flag;
  __shared__ unsigned long long off_bytes;   // bytes that are not the new value
  __shared__ unsigned long long odd_bytes;   // bytes that are neither the old nor the new value
  __shared__ unsigned long long seen_bytes;  // kSourceOverwrite: bytes with the overwritten value
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  for (uint64_t t = 0; t < a.tries; ++t) {
    const uint8_t x = tryByte(t);
    const uint8_t old = t == 0 ? 0 : tryByte(t - 1);
    if (threadIdx.x == 0) {
      off_bytes = odd_bytes = seen_bytes = 0;
      bool ok = true;
      if (a.kind == OrderTest::kCrossQp) {
        // Wait for B's word (relaxed polling, then an acquire: what a consumer trusting B would do).
        const uint64_t start = dev::globaltimer_ns();
        uint64_t seen = 0;
        for (uint32_t spins = 0;; ++spins) {
          seen = dev::ld_acquire_sys(a.dst_b);
          if (seen == tryWord(t)) break;
          if ((spins & 255u) == 255u && dev::globaltimer_ns() - start > kTimeoutNs) {
            failStatus(a.st, 1, kWhereBWord, t, seen, tryWord(t));
            ok = false;
            break;
          }
        }
      } else if (a.kind == OrderTest::kLastByte) {
        const uint64_t start = dev::globaltimer_ns();
        uint8_t seen = 0;
        for (uint32_t spins = 0;; ++spins) {
          seen = dev::ld_relaxed_sys(a.dst_a + a.bytes - 1);
          if (seen == x) break;
          if ((spins & 255u) == 255u && dev::globaltimer_ns() - start > kTimeoutNs) {
            failStatus(a.st, 1, kWhereLastByte, t, seen, x);
            ok = false;
            break;
          }
        }
        __threadfence();
      } else {
        ok = waitGeq(a.sig, t + 1, a.st, kWhereSignal, t);
      }
      if (!ok) abort_flag = 1;
    }
    __syncthreads();
    if (abort_flag != 0) return;
    unsigned long long my_off = 0, my_odd = 0, my_seen = 0;
    const uint8_t overwritten = static_cast<uint8_t>(~x);
    for (uint32_t j = threadIdx.x; j < a.bytes; j += blockDim.x) {
      const uint8_t v = __ldcg(a.dst_a + j);
      if (v != x) ++my_off;
      if (a.kind == OrderTest::kSourceOverwrite) {
        if (v == overwritten) ++my_seen;
        if (v != x && v != overwritten) ++my_odd;
      } else if (v != x && v != old) {
        ++my_odd;
      }
    }
    if (my_off != 0) atomicAdd(&off_bytes, my_off);
    if (my_odd != 0) atomicAdd(&odd_bytes, my_odd);
    if (my_seen != 0) atomicAdd(&seen_bytes, my_seen);
    __syncthreads();
    if (threadIdx.x == 0) {
      if (a.kind == OrderTest::kSourceOverwrite) {
        if (seen_bytes != 0) atomicAdd(&a.st->count, 1ull);
      } else if (off_bytes != 0) {
        atomicAdd(&a.st->count, 1ull);  // B before A / last byte before the rest
      }
      if (odd_bytes != 0) atomicAdd(&a.st->corrupt, odd_bytes);
      if (a.kind == OrderTest::kLastByte && !waitGeq(a.sig, t + 1, a.st, kWhereSignal, t)) abort_flag = 1;
    }
    __syncthreads();
    if (abort_flag != 0) return;
    if (a.kind == OrderTest::kLastByte) {
      // After the signal the data must be complete: the correct consumer never sees a wrong byte.
      unsigned long long wrong = 0;
      for (uint32_t j = threadIdx.x; j < a.bytes; j += blockDim.x) wrong += __ldcg(a.dst_a + j) != x ? 1 : 0;
      if (wrong != 0) atomicAdd(&a.st->mismatches, wrong);
      __syncthreads();
    }
    if (threadIdx.x == 0 && !ib::signal(a.qp, a.ack_addr, a.ack_rkey, 1)) {
      failStatus(a.st, 2, kWhereAckSend, t, 0, 0);
      abort_flag = 1;
    }
    __syncthreads();
    if (abort_flag != 0) return;
  }
  if (threadIdx.x == 0 && !ib::quiet(a.qp)) failStatus(a.st, 2, kWhereQuiet, a.tries, 0, 0);
}

// One transport call then quiet (MissingDoorbell, AccessErrors): what quiet returned lands in st->call_result.
enum class SingleOp : int { kPutNoDoorbell, kPut, kSignal };
struct SingleArgs {
  SingleOp op;
  ib::GpuQp qp;
  uint64_t src;
  uint64_t remote;
  uint32_t rkey;
  uint32_t bytes;
  TestStatus* st;
};
__global__ void singleOpKernel(SingleArgs a) {
  bool posted = false;
  if (a.op == SingleOp::kPutNoDoorbell) posted = ib::put(a.qp, a.src, a.remote, a.rkey, a.bytes, false);
  if (a.op == SingleOp::kPut) posted = ib::put(a.qp, a.src, a.remote, a.rkey, a.bytes);
  if (a.op == SingleOp::kSignal) posted = ib::signal(a.qp, a.remote, a.rkey, 1);
  const bool quiet_ok = ib::quiet(a.qp);
  a.st->call_result = (posted ? 1 : 0) | (quiet_ok ? 2 : 0);
  __threadfence_system();
}

// Many producers on one QP: thread 0 of every block posts put_signal in a loop (slot = block), then quiet. The
// SQ (64 WQEBBs) wraps many times under contention on the reservation, the in-order ready index and the lock.
struct ConcurrentArgs {
  ib::GpuQp qp;
  uint64_t src;  // slot b at src + b * slot_bytes (constant data)
  uint64_t dst;
  uint32_t dst_rkey;
  uint32_t slot_bytes;
  uint64_t sig_addr;
  uint32_t sig_rkey;
  uint32_t per_block;
  TestStatus* st;
};
__global__ void concurrentSendKernel(ConcurrentArgs a) {
  if (threadIdx.x != 0) return;
  const uint64_t off = static_cast<uint64_t>(blockIdx.x) * a.slot_bytes;
  for (uint32_t i = 0; i < a.per_block; ++i) {
    if (!ib::put_signal(a.qp, a.src + off, a.dst + off, a.dst_rkey, a.slot_bytes, a.sig_addr, a.sig_rkey, 1)) {
      failStatus(a.st, 2, kWherePut, i, blockIdx.x, 0);
      return;
    }
  }
  if (!ib::quiet(a.qp)) failStatus(a.st, 2, kWhereQuiet, a.per_block, blockIdx.x, 0);
}

// A producer that skips the SQ-full wait (what reserve() prevents): n WQEs written at once from the next free index
// and announced with one doorbell, n > wqe_cnt, so the last ones overwrite slots of the first, still incomplete
// (the NIC never saw them). n - 1 WRITEs of `bytes`, then a fetch-add to the peer's signal word.
struct OverrunArgs {
  ib::GpuQp qp;
  uint32_t n;
  uint64_t src;
  uint64_t dst;
  uint32_t dst_rkey;
  uint32_t bytes;
  uint64_t sig;
  uint32_t sig_rkey;
  TestStatus* st;
};
__global__ void sqOverrunKernel(OverrunArgs a) {
  const uint32_t base = dev::atom_add_relaxed_gpu(&a.qp.state->reserved, a.n);  // no room wait
  const nccl_moe::mlx5::SqRing sq{a.qp.sq, a.qp.wqe_cnt};
  for (uint32_t k = 0; k < a.n; ++k) {
    const nccl_moe::mlx5::WqeCtrl ctrl{base + k, a.qp.qpn, true, nccl_moe::mlx5::FenceMode::kNone};
    if (k + 1 < a.n) {
      nccl_moe::mlx5::build_write(sq.wqebb(base + k),
                                  nccl_moe::mlx5::WriteWqe{ctrl, nccl_moe::mlx5::LocalSge{a.src, a.qp.lkey, a.bytes},
                                                           nccl_moe::mlx5::RemoteSge{a.dst, a.dst_rkey}});
    } else {
      nccl_moe::mlx5::build_fetch_add(
          sq.wqebb(base + k),
          nccl_moe::mlx5::FetchAddWqe{
              ctrl, nccl_moe::mlx5::RemoteSge{a.sig, a.sig_rkey}, 1,
              nccl_moe::mlx5::LocalWord{reinterpret_cast<uint64_t>(&a.qp.state->atomic_result), a.qp.result_lkey}});
    }
  }
  const bool posted = ib::detail::mark_ready(a.qp, base, a.n) && ib::ring(a.qp);
  const bool quiet_ok = posted && ib::quiet(a.qp);
  a.st->call_result = (posted ? 1 : 0) | (quiet_ok ? 2 : 0);
  __threadfence_system();
}

// ---- Tests ----

// Runs one ordering test (sender rank 0, observer rank 1) and returns its status.
void runOrderTest(OrderTest kind, uint32_t bytes, uint64_t tries, TestStatus* out) {
  const uint64_t seed = testChaosSeed();
  World w;
  WORLD_OR_SKIP(w, seed);
  std::printf("chaos seed %" PRIu64 ", %" PRIu64 " tries of %u bytes\n", seed, tries, bytes);
  DevWindow src, dst, sig, ack;
  ASSERT_EQ("", allocWindow(w[0], bytes + 64, 0, &src));  // [0, bytes): A's source, [bytes, +8): B's
  ASSERT_EQ("", allocWindow(w[1], bytes + 64, 0, &dst));
  ASSERT_EQ("", allocWindow(w[1], 64, rdma::kWindowSignal, &sig));
  ASSERT_EQ("", allocWindow(w[0], 64, rdma::kWindowSignal, &ack));
  em::EmulatedGpuQp *qa = nullptr, *qb = nullptr, *q10 = nullptr;
  ASSERT_EQ("", connectQp(w[0], w[1], src.w.lkey, kTimeoutNs, nullptr, &qa));
  ASSERT_EQ("", connectQp(w[0], w[1], src.w.lkey, kTimeoutNs, nullptr, &qb));
  ASSERT_EQ("", connectQp(w[1], w[0], 0, kTimeoutNs, nullptr, &q10));
  ASSERT_EQ("", startNics(w));
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  OrderObserve obs{kind,
                   q10->view(),
                   dst.ptr,
                   reinterpret_cast<const uint64_t*>(dst.ptr + bytes),
                   reinterpret_cast<const uint64_t*>(sig.ptr),
                   bytes,
                   ack.addr(),
                   ack.w.rkey,
                   tries,
                   st.dev};
  OrderSend send{
      kind,       qa->view(), qb->view(),      src.ptr,    src.ptr + bytes, bytes,
      dst.addr(), dst.w.rkey, dst.addr(bytes), sig.addr(), sig.w.rkey,      reinterpret_cast<const uint64_t*>(ack.ptr),
      tries,      st.dev};
  const auto t0 = std::chrono::steady_clock::now();
  orderObserveKernel<<<1, kThreads, 0, w.streams[1]>>>(obs);
  orderSendKernel<<<1, kThreads, 0, w.streams[0]>>>(send);
  CUDA_OK(cudaGetLastError());
  const std::string waited = waitStreams(w, kHostTimeoutS, "ordering test");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%.3f s; %s\n", secs, describeStatus(*st.host).c_str());
  dumpWorld(w);
  ASSERT_EQ("", waited);
  EXPECT_EQ(0, st.host->failed) << describeStatus(*st.host);
  EXPECT_EQ(0, w[0].error.host->code) << ib::describeNetError(*w[0].error.host, kTimeoutNs);
  EXPECT_EQ(0, w[1].error.host->code) << ib::describeNetError(*w[1].error.host, kTimeoutNs);
  EXPECT_FALSE(w[0].backend->failed()) << w[0].backend->error();
  EXPECT_FALSE(w[1].backend->failed()) << w[1].backend->error();
  *out = *st.host;
}

TEST(TransportLitmus, CrossQpReorderingIsObserved) {
  TestStatus s{};
  runOrderTest(OrderTest::kCrossQp, 256u << 10, 200, &s);
  if (HasFatalFailure() || IsSkipped()) return;
  std::printf("CrossQpReordering: B's word seen before all of A's data in %llu of 200 tries\n", s.count);
  EXPECT_GT(s.count, 0ull) << "no cross-QP reordering seen: chaos does not interleave QPs";
  EXPECT_EQ(0ull, s.corrupt) << "bytes that are neither the old nor the new value";
}

TEST(TransportLitmus, PollingTheLastByteSeesIncompleteData) {
  TestStatus s{};
  runOrderTest(OrderTest::kLastByte, 64u << 10, 300, &s);
  if (HasFatalFailure() || IsSkipped()) return;
  std::printf(
      "LastBytePolling: the wrong consumer saw incomplete data in %llu of 300 tries; the signal-trusting "
      "consumer saw %llu wrong bytes\n",
      s.count, s.mismatches);
  EXPECT_GT(s.count, 0ull) << "polling the last byte never saw incomplete data: chaos is not adversarial enough";
  EXPECT_EQ(0ull, s.mismatches) << "data incomplete after its signal";
  EXPECT_EQ(0ull, s.corrupt);
}

TEST(TransportLitmus, SourceOverwrittenBeforeCompletionIsSeen) {
  TestStatus s{};
  runOrderTest(OrderTest::kSourceOverwrite, 64u << 10, 100, &s);
  if (HasFatalFailure() || IsSkipped()) return;
  std::printf("SourceOverwrite: the receiver saw the overwritten value in %llu of 100 tries\n", s.count);
  EXPECT_GT(s.count, 0ull) << "a source rewritten right after its doorbell never reached the receiver";
  EXPECT_EQ(0ull, s.corrupt) << "bytes that are neither the written nor the overwritten value";
}

TEST(TransportLitmus, ConcurrentProducersShareOneQp) {
  const uint64_t seed = testChaosSeed();
  World w;
  WORLD_OR_SKIP(w, seed);
  constexpr uint32_t kBlocks = 8, kPerBlock = 40, kSlotBytes = 4096;
  std::printf("ConcurrentProducers: chaos seed %" PRIu64 ", %u blocks x %u put_signal on one QP of 64 WQEBBs\n", seed,
              kBlocks, kPerBlock);
  DevWindow src, dst, sig;
  ASSERT_EQ("", allocWindow(w[0], kBlocks * kSlotBytes, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], kBlocks * kSlotBytes, 0, &dst));
  ASSERT_EQ("", allocWindow(w[1], 64, rdma::kWindowSignal, &sig));
  std::vector<uint8_t> pattern(kBlocks * kSlotBytes);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(1 + (i / kSlotBytes) * 29 + i % 7);
  CUDA_OK(cudaMemcpy(src.ptr, pattern.data(), pattern.size(), cudaMemcpyHostToDevice));
  em::EmulatedGpuQp* q = nullptr;
  ASSERT_EQ("", connectQp(w[0], w[1], src.w.lkey, kTimeoutNs, nullptr, &q));
  ASSERT_EQ("", startNics(w));
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  const auto t0 = std::chrono::steady_clock::now();
  concurrentSendKernel<<<kBlocks, 32, 0, w.streams[0]>>>(ConcurrentArgs{
      q->view(), src.addr(), dst.addr(), dst.w.rkey, kSlotBytes, sig.addr(), sig.w.rkey, kPerBlock, st.dev});
  CUDA_OK(cudaGetLastError());
  const std::string waited = waitStreams(w, kHostTimeoutS, "ConcurrentProducers");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("ConcurrentProducers: %.3f s; %s\n", secs, describeStatus(*st.host).c_str());
  dumpWorld(w);
  ASSERT_EQ("", waited);
  EXPECT_EQ(0, st.host->failed) << describeStatus(*st.host);
  EXPECT_EQ(0, w[0].error.host->code) << ib::describeNetError(*w[0].error.host, kTimeoutNs);
  EXPECT_EQ(em::QpState::kReady, w[0].nic->qpState(q->qp())) << w[0].nic->qpError(q->qp());
  EXPECT_EQ(uint64_t{kBlocks} * kPerBlock, w[0].nic->counters().atomics);
  EXPECT_EQ(2u * kBlocks * kPerBlock, w[0].nic->qpRetired(q->qp()));
  uint64_t signal = 0;
  CUDA_OK(cudaMemcpy(&signal, sig.ptr, sizeof(signal), cudaMemcpyDeviceToHost));
  EXPECT_EQ(uint64_t{kBlocks} * kPerBlock, signal);
  std::vector<uint8_t> got(pattern.size());
  CUDA_OK(cudaMemcpy(got.data(), dst.ptr, got.size(), cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += got[i] != pattern[i] ? 1 : 0;
  EXPECT_EQ(0u, bad) << "bytes of the slots that differ from their sources";
}

// MissingDoorbell and DoorbellProxyStalled: rank 0's 4096-byte source (filled with `fill`), rank 1's destination, and
// one QP 0 -> 1 whose waits give up after kShortTimeoutNs (`doorbell_proxy`: it rings a mailbox, connectQp); the NICs
// run. "" or what failed.
constexpr uint64_t kShortTimeoutNs = 200ull * 1000 * 1000;
std::string oneQpWorld(World& w, uint8_t fill, bool doorbell_proxy, DevWindow* src, DevWindow* dst,
                       em::EmulatedGpuQp** q) {
  std::string e;
  if (!(e = allocWindow(w[0], 4096, 0, src)).empty() || !(e = allocWindow(w[1], 4096, 0, dst)).empty()) return e;
  if (cudaMemset(src->ptr, fill, 4096) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess)
    return "filling the source failed";
  if (!(e = connectQp(w[0], w[1], src->w.lkey, kShortTimeoutNs, nullptr, q, 64, 64, doorbell_proxy)).empty()) return e;
  return startNics(w);
}

// After a late doorbell (`how`): the NIC retires the QP's one WQE within 10 s and the destination holds `fill`.
void expectLateCompletion(World& w, em::EmulatedGpuQp* q, const DevWindow& dst, uint8_t fill, const char* how) {
  const auto start = std::chrono::steady_clock::now();
  while (w[0].nic->qpRetired(q->qp()) != 1u &&
         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 10.0)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  dumpWorld(w);
  ASSERT_EQ(1u, w[0].nic->qpRetired(q->qp())) << "the WQE " << how << " did not complete within 10 s";
  std::vector<uint8_t> got(4096);
  CUDA_OK(cudaMemcpy(got.data(), dst.ptr, 4096, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(fill, got[i]) << "byte " << i;
}

TEST(TransportLitmus, MissingDoorbellTimesOutNamingTheQp) {
  const uint64_t seed = testChaosSeed();
  World w;
  WORLD_OR_SKIP(w, seed);
  DevWindow src, dst;
  em::EmulatedGpuQp* q = nullptr;
  ASSERT_EQ("", oneQpWorld(w, 0x5a, false, &src, &dst, &q));
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  singleOpKernel<<<1, 1, 0, w.streams[0]>>>(
      SingleArgs{SingleOp::kPutNoDoorbell, q->view(), src.addr(), dst.addr(), dst.w.rkey, 4096, st.dev});
  CUDA_OK(cudaGetLastError());
  ASSERT_EQ("", waitStreams(w, kHostTimeoutS, "MissingDoorbell kernel"));
  const ErrorRecord rec = *w[0].error.host;
  const std::string msg = ib::describeNetError(rec, kShortTimeoutNs);
  std::printf("MissingDoorbell: quiet %s; record: %s\n", (st.host->call_result & 2) ? "returned true" : "timed out",
              msg.c_str());
  EXPECT_EQ(1, st.host->call_result) << "the put (without doorbell) must succeed and quiet must fail";
  EXPECT_EQ(nccl_moe::kErrTimeout, rec.code);
  EXPECT_EQ(static_cast<int>(Phase::kNetQuiet), rec.phase);
  EXPECT_EQ(0, rec.rank);
  EXPECT_EQ(1, rec.peer);
  EXPECT_EQ(static_cast<int>(q->qpn()), rec.qpn);
  EXPECT_EQ(1, rec.expected);
  EXPECT_EQ(0, rec.detail) << "announced index";
  EXPECT_NE(std::string::npos, msg.find("never rung")) << msg;
  EXPECT_EQ(0u, w[0].nic->qpAnnounced(q->qp()));
  // The WQE was well-formed, only unannounced: ring it from the host and it completes.
  __atomic_store_n(&q->memory().hostSqDbrec()[nccl_moe::mlx5::kSendDbrIndex], nccl_moe::mlx5::sq_dbr_value(1).raw,
                   __ATOMIC_RELEASE);
  __atomic_store_n(q->memory().hostDoorbell(), nccl_moe::mlx5::sq_doorbell_word(1, q->qpn()), __ATOMIC_RELEASE);
  expectLateCompletion(w, q, dst, 0x5a, "rung late by the host");
}

// Doorbell proxy: the GPU rings the QP's mailbox, but no proxy thread runs yet, so the NIC never hears of the WQE:
// quiet times out naming the QP (the GPU did ring: announced == expected), the proxy's describe() names the mailbox
// index it has not forwarded; once the proxy thread starts, the WQE completes and the data arrives.
TEST(TransportLitmus, DoorbellProxyStalledTimesOutThenForwards) {
  const uint64_t seed = testChaosSeed();
  World w;
  WORLD_OR_SKIP(w, seed);
  DevWindow src, dst;
  em::EmulatedGpuQp* q = nullptr;
  ASSERT_EQ("", oneQpWorld(w, 0x6b, true, &src, &dst, &q));  // the doorbell proxy is not started
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  singleOpKernel<<<1, 1, 0, w.streams[0]>>>(
      SingleArgs{SingleOp::kPut, q->view(), src.addr(), dst.addr(), dst.w.rkey, 4096, st.dev});
  CUDA_OK(cudaGetLastError());
  ASSERT_EQ("", waitStreams(w, kHostTimeoutS, "DoorbellProxyStalled kernel"));
  const ErrorRecord rec = *w[0].error.host;
  const std::string msg = ib::describeNetError(rec, kShortTimeoutNs);
  const std::string proxy = w[0].doorbells->describe(true);
  std::printf("DoorbellProxyStalled: record: %s; %s\n", msg.c_str(), proxy.c_str());
  EXPECT_EQ(1, st.host->call_result) << "the put posts (and rings the mailbox); quiet must fail";
  EXPECT_EQ(nccl_moe::kErrTimeout, rec.code);
  EXPECT_EQ(static_cast<int>(Phase::kNetQuiet), rec.phase);
  EXPECT_EQ(static_cast<int>(q->qpn()), rec.qpn);
  EXPECT_EQ(1, rec.peer);
  EXPECT_EQ(1, rec.detail) << "the GPU rang (its mailbox): announced 1";
  EXPECT_EQ(0u, w[0].nic->qpAnnounced(q->qp())) << "the NIC heard nothing";
  EXPECT_NE(std::string::npos, proxy.find("mailbox index 1, forwarded 0")) << proxy;
  ASSERT_EQ("", startDoorbellProxies(w));
  expectLateCompletion(w, q, dst, 0x6b, "whose doorbell the proxy forwarded late");
  EXPECT_EQ(1u, w[0].doorbells->forwarded());
}

TEST(TransportLitmus, AccessErrorsFailTheQpAndAreRecorded) {
  const uint64_t seed = testChaosSeed();
  World w;
  WORLD_OR_SKIP(w, seed);
  DevWindow src, dst, sig;
  ASSERT_EQ("", allocWindow(w[0], 4096, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], 4096, 0, &dst));
  ASSERT_EQ("", allocWindow(w[1], 64, rdma::kWindowSignal, &sig));
  ASSERT_EQ("", startNics(w));
  struct Case {
    const char* name;
    SingleOp op;
    uint64_t remote;
    uint32_t rkey;
    uint32_t bytes;
    uint8_t syndrome;
    em::EmuFault fault;
  };
  const Case cases[] = {
      {"bad rkey", SingleOp::kPut, dst.addr(), dst.w.rkey + (1000u << 8), 64, 0x13, em::EmuFault::kBadRemoteKey},
      {"out of window", SingleOp::kPut, dst.addr(4096 - 32), dst.w.rkey, 64, 0x13, em::EmuFault::kRemoteOutOfWindow},
      {"misaligned atomic", SingleOp::kSignal, sig.addr(4), sig.w.rkey, 8, 0x12, em::EmuFault::kMisalignedAtomic},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Mapped<ErrorRecord> rec;  // one record per case: the first failure wins
    Mapped<TestStatus> st;
    ASSERT_NE(nullptr, rec.dev);
    ASSERT_NE(nullptr, st.dev);
    em::EmulatedGpuQp* q = nullptr;
    ASSERT_EQ("", connectQp(w[0], w[1], src.w.lkey, kTimeoutNs, rec.dev, &q));
    singleOpKernel<<<1, 1, 0, w.streams[0]>>>(
        SingleArgs{c.op, q->view(), src.addr(), c.remote, c.rkey, c.bytes, st.dev});
    CUDA_OK(cudaGetLastError());
    ASSERT_EQ("", waitStreams(w, kHostTimeoutS, c.name));
    const ErrorRecord r = *rec.host;
    const std::string msg = ib::describeNetError(r, kTimeoutNs);
    std::printf("AccessErrors[%s]: GPU record: %s\n  NIC: %s\n", c.name, msg.c_str(),
                w[0].nic->qpError(q->qp()).c_str());
    EXPECT_EQ(1, st.host->call_result) << "posting succeeds, quiet reports the error";
    EXPECT_EQ(nccl_moe::kErrNetCqe, r.code) << msg;
    EXPECT_EQ(static_cast<int>(Phase::kNetCqe), r.phase);
    EXPECT_EQ(0, r.rank);
    EXPECT_EQ(1, r.peer);
    EXPECT_EQ(static_cast<int>(q->qpn()), r.qpn);
    EXPECT_EQ(0, r.counter) << "the failed WQE is the QP's first";
    EXPECT_EQ(c.syndrome, r.detail & 0xff) << msg;
    EXPECT_EQ(static_cast<int>(c.fault), (r.detail >> 8) & 0xff) << msg;
    EXPECT_EQ(em::QpState::kError, w[0].nic->qpState(q->qp()));
    EXPECT_FALSE(w[0].nic->qpError(q->qp()).empty());
    EXPECT_EQ(0, w[0].error.host->code) << "the rank's own record is untouched (the QP had its own)";
  }
  dumpWorld(w);
}

TEST(TransportLitmus, SqOverrunFailsTheQpAndEveryRankReportsIt) {
  const uint64_t seed = testChaosSeed();
  World w;
  WORLD_OR_SKIP(w, seed);
  constexpr uint32_t kWqeCnt = 16;      // 17 CQEs (one error, 16 flushes) fit the CQ of 64: no CQ overrun on top
  constexpr uint32_t kN = kWqeCnt + 1;  // one WQEBB beyond the ring: WQE 16 overwrites WQE 0 (slot 0)
  constexpr uint64_t kPeerTimeoutNs = 300ull * 1000 * 1000;
  DevWindow src, dst, sig;
  ASSERT_EQ("", allocWindow(w[0], 4096, 0, &src));
  ASSERT_EQ("", allocWindow(w[1], 4096, 0, &dst));
  ASSERT_EQ("", allocWindow(w[1], 64, rdma::kWindowSignal, &sig));
  em::EmulatedGpuQp* q = nullptr;
  ASSERT_EQ("", connectQp(w[0], w[1], src.w.lkey, kTimeoutNs, nullptr, &q, kWqeCnt, 64));
  ASSERT_EQ("", startNics(w));
  Mapped<TestStatus> st;
  ASSERT_NE(nullptr, st.dev);
  peerWaitKernel<<<1, 1, 0, w.streams[1]>>>(PeerWaitArgs{reinterpret_cast<const uint64_t*>(sig.ptr), 1, kPeerTimeoutNs,
                                                         w[1].error.dev, 1, 0, static_cast<int>(q->qpn())});
  sqOverrunKernel<<<1, 1, 0, w.streams[0]>>>(
      OverrunArgs{q->view(), kN, src.addr(), dst.addr(), dst.w.rkey, 64, sig.addr(), sig.w.rkey, st.dev});
  CUDA_OK(cudaGetLastError());
  ASSERT_EQ("", waitStreams(w, kHostTimeoutS, "SqOverrun kernels"));
  const ErrorRecord r0 = *w[0].error.host;
  const ErrorRecord r1 = *w[1].error.host;
  const std::string msg0 = ib::describeNetError(r0, kTimeoutNs);
  const std::string msg1 = ib::describeNetError(r1, kPeerTimeoutNs);
  const std::string nic_msg = w[0].nic->qpError(q->qp());
  std::printf("SqOverrun: rank 0 (the producer): %s\n  rank 1 (its peer): %s\n  NIC: %s\n", msg0.c_str(), msg1.c_str(),
              nic_msg.c_str());
  dumpWorld(w);
  // The producer's rank: posting "succeeded" (nothing checks room), quiet polls the error CQE.
  EXPECT_EQ(1, st.host->call_result) << "posted, and quiet reports the error";
  EXPECT_EQ(nccl_moe::kErrNetCqe, r0.code) << msg0;
  EXPECT_EQ(static_cast<int>(Phase::kNetCqe), r0.phase) << msg0;
  EXPECT_EQ(0, r0.rank);
  EXPECT_EQ(1, r0.peer);
  EXPECT_EQ(static_cast<int>(q->qpn()), r0.qpn);
  EXPECT_EQ(0, r0.counter) << "the first WQE not fetched fails: WQE 0";
  EXPECT_EQ(0x02, r0.detail & 0xff) << "syndrome: local QP operation; " << msg0;
  EXPECT_EQ(static_cast<int>(em::EmuFault::kSqOverrun), (r0.detail >> 8) & 0xff) << msg0;
  EXPECT_NE(std::string::npos, msg0.find("net-cqe")) << msg0;
  EXPECT_NE(std::string::npos, msg0.find("0x02")) << msg0;
  // The NIC: the QP in error with the overrun named, nothing executed, every other announced WQE flushed.
  EXPECT_EQ(em::QpState::kError, w[0].nic->qpState(q->qp()));
  EXPECT_NE(std::string::npos, nic_msg.find("SQ overrun")) << nic_msg;
  EXPECT_NE(std::string::npos, nic_msg.find("wqe_cnt 16")) << nic_msg;
  const em::NicCounters c = w[0].nic->counters();
  EXPECT_EQ(1u, c.error_cqes);
  EXPECT_EQ(uint64_t{kN - 1}, c.flush_cqes);
  EXPECT_EQ(0u, c.bytes_placed);
  EXPECT_EQ(0u, c.atomics) << "the fetch-add was flushed";
  EXPECT_EQ(0u, c.lost_cqes);
  EXPECT_TRUE(w[0].nic->nicErrors().empty());
  // The peer: its signal never comes, so its bounded wait times out (the names in its record are the wait's own
  // arguments, peer_wait.cuh) and the signal word is untouched.
  EXPECT_EQ(nccl_moe::kErrTimeout, r1.code) << msg1;
  EXPECT_NE(std::string::npos, msg1.find("gave up")) << msg1;
  uint64_t signal = ~0ull;
  CUDA_OK(cudaMemcpy(&signal, sig.ptr, sizeof(signal), cudaMemcpyDeviceToHost));
  EXPECT_EQ(0u, signal);
}

}  // namespace
