// The put_signal litmus of the scale-out transport over whole worlds, in the three GPU modes (IBGDA: ibgda.cuh on
// EmulatedGpuQp; doorbell proxy: the same, each QP's doorbell forwarded from a mailbox by a CPU thread per rank;
// request proxy: proxy.cuh into one EmulatedGpuProxy ring per rank), on ONE GPU: R ranks in virtual
// nodes of G consecutive ranks (2x1, 2x2, 4x1), each rank with its own software NIC and executor thread, chaos on.
//
// Flows: every ordered pair (sender, receiver) of ranks on DIFFERENT nodes is one flow with its own data QP
// (sender -> receiver) and ack QP (receiver -> sender): 2x1 has 2 flows, 2x2 8, 4x1 12. All flows run at once:
//   sender block    fill its source slot with iteration i's payload (log-uniform 1 B..4 MB, a pattern unique to the
//                   flow and the iteration), fence, put_signal (WRITE + fetch-add on the data QP), wait for the ack
//   receiver block  wait for the signal (the only thing it trusts), check every byte, ack with a fetch-add on the
//                   ack QP (the sender may then refill its source)
// so the aggregate rate grows with the number of NICs (every NIC carries its rank's data and ack QPs).
//
// GPU residency: ONE kernel per rank on the rank's stream, one block per flow side of that rank (4x1: 3 sending
// and 3 receiving blocks per rank, 24 blocks in all), and every backend on one stream (makeWorld's one_stream):
// 2R streams do work however many QPs there are, far below CUDA_DEVICE_MAX_CONNECTIONS (gpu_env.cc sets 32), so no
// NIC copy or atomic kernel queues behind a spinning test block, and the NICs' one-thread kernels find free SMs.
//
// Knobs: MOE_LITMUS_ITERATIONS = the TOTAL iterations of one world (default 2000 ibgda / 1000 proxy), split evenly
// over its flows; NCCL_MOE_EMU_CHAOS = the chaos seed (rank r's NIC uses seed + r; a fixed non-zero seed when unset).
// Every device wait is bounded (kTimeoutNs, per flow); the host wait too; every failure names world, flow and QPs.
// The acceptance run is MOE_LITMUS_ITERATIONS=1000000 (docs/transport.md, "GPU producer (IBGDA) and the CUDA
// backend").
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include "transport/emulated/proxy_queues.h"
#include "transport/rdma/ibgda/ibgda.cuh"
#include "transport/rdma/proxy/proxy.cuh"
#include "transport_world.h"

namespace {

using namespace nccl_moe::transport_test;  // NOLINT(build/namespaces): the tests' shared helpers

constexpr int kMaxFlows = 12;                        // 4x1: 4 x 3 ordered pairs
constexpr int kMaxSides = 6;                         // blocks of one rank's kernel (4x1: 3 sending + 3 receiving)
constexpr uint64_t kMaxFlowIterations = 1ull << 24;  // the pattern id is flow << 24 | iteration
constexpr uint64_t kWordBytes = 64;                  // signal and ack words, one line each

// ---- Device: the two modes behind one posting interface ----

// IBGDA: addresses (iova = the owner's device address on the software NIC); the QP's lkey covers the source.
struct IbgdaLink {
  ib::GpuQp qp;
  uint64_t local = 0;   // sender: its source slot
  uint64_t remote = 0;  // sender: the receiver's destination slot
  uint32_t rkey = 0;
  uint64_t word = 0;  // the remote word the fetch-add goes to (the receiver's signal, the sender's ack)
  uint32_t word_rkey = 0;
  __device__ bool put_signal(uint32_t bytes) const {
    return ib::put_signal(qp, local, remote, rkey, bytes, word, word_rkey, 1);
  }
  __device__ bool signal() const { return ib::signal(qp, word, word_rkey, 1); }
  __device__ bool quiet() const { return ib::quiet(qp); }
};

// Request proxy: (key, offset) pairs; the ring's lkey is the rank's source window.
struct ProxyLink {
  px::GpuProxyQp q;
  uint64_t local = 0;  // offsets into the source window, the destination window (rkey) and the words window
  uint64_t remote = 0;
  uint32_t rkey = 0;
  uint64_t word = 0;
  uint32_t word_rkey = 0;
  __device__ bool put_signal(uint32_t bytes) const {
    return px::put_signal(q, local, remote, rkey, bytes, word, word_rkey, 1);
  }
  __device__ bool signal() const { return px::signal(q, word, word_rkey, 1); }
  __device__ bool quiet() const { return px::quiet(q); }
};

struct FlowClock {  // %globaltimer of the sending block's first post and of its final quiet
  unsigned long long start_ns;
  unsigned long long end_ns;
};
struct FlowRecords {  // mapped host memory, one entry per flow
  TestStatus st[kMaxFlows];
  FlowClock clock[kMaxFlows];
};

template <class Link>
struct Side {
  Link link;             // sender: the data QP; receiver: the ack QP
  int send;              // 1: this block sends its flow, 0: it receives it
  uint8_t* buf;          // sender: its source slot; receiver: its destination slot
  const uint64_t* word;  // sender: its ack word; receiver: its signal word (both in this rank's memory)
  uint64_t iterations;
  uint64_t seed;  // the flow's size sequence
  uint32_t key;   // pattern id of iteration i: key + i
  TestStatus* st;
  FlowClock* clock;
};
template <class Link>
struct RankSides {
  Side<Link> side[kMaxSides];
};

template <class Link>
__device__ void sendFlow(const Side<Link>& a) {
  __shared__ int abort_flag;
  if (threadIdx.x == 0) {
    abort_flag = 0;
    a.clock->start_ns = dev::globaltimer_ns();
  }
  __syncthreads();
  for (uint64_t i = 0; i < a.iterations; ++i) {
    const uint32_t bytes = litmusBytes(a.seed, i);
    fillLitmusSource(a.buf, a.key + i, bytes);
    __threadfence_system();  // the NIC's copy (or the proxy) reads the source: every thread's stores before the post
    __syncthreads();
    if (threadIdx.x == 0) {
      if (!a.link.put_signal(bytes)) {
        failStatus(a.st, 2, kWherePut, i, 0, 0);
        abort_flag = 1;
      } else if (!waitGeq(a.word, i + 1, a.st, kWhereAck, i)) {
        abort_flag = 1;
      }
    }
    __syncthreads();
    if (abort_flag != 0) return;
  }
  if (threadIdx.x == 0) {
    if (!a.link.quiet()) failStatus(a.st, 2, kWhereQuiet, a.iterations, 0, 0);
    a.clock->end_ns = dev::globaltimer_ns();
  }
}

template <class Link>
__device__ void receiveFlow(const Side<Link>& a) {
  __shared__ int abort_flag;
  if (threadIdx.x == 0) abort_flag = 0;
  __syncthreads();
  for (uint64_t i = 0; i < a.iterations; ++i) {
    if (threadIdx.x == 0 && !waitGeq(a.word, i + 1, a.st, kWhereSignal, i)) abort_flag = 1;
    __syncthreads();
    if (abort_flag != 0) return;
    checkLitmusDestination(a.buf, a.key + i, litmusBytes(a.seed, i), a.st);
    __syncthreads();  // every read of this iteration's data before the ack lets the sender refill its source
    if (threadIdx.x == 0) {
      if (!a.link.signal()) {
        failStatus(a.st, 2, kWhereAckSend, i, 0, 0);
        abort_flag = 1;
      }
      *reinterpret_cast<volatile unsigned long long*>(&a.st->count) = i + 1;  // progress, for the host
    }
    __syncthreads();
    if (abort_flag != 0) return;
  }
  if (threadIdx.x == 0 && !a.link.quiet()) failStatus(a.st, 2, kWhereQuiet, a.iterations, 0, 0);
}

// One kernel per rank: block b plays side b (every block is resident: 1..6 blocks per rank, 24 at most).
template <class Link>
__global__ void rankKernel(RankSides<Link> a) {
  const Side<Link>& s = a.side[blockIdx.x];
  if (s.send != 0)
    sendFlow(s);
  else
    receiveFlow(s);
}

// ---- Host ----

// kDbProxy: the IBGDA kernels, but each QP's doorbell goes to a mailbox a CPU thread per rank forwards.
enum class Mode { kIbgda, kProxy, kDbProxy };
const char* modeName(Mode m) { return m == Mode::kIbgda ? "ibgda" : m == Mode::kProxy ? "proxy" : "dbproxy"; }
struct WorldParam {
  Mode mode;
  int nodes;
  int per_node;  // G consecutive ranks per node
};
std::string worldName(const WorldParam& p) {
  return std::to_string(p.nodes) + "x" + std::to_string(p.per_node) + " " + modeName(p.mode);
}
void PrintTo(const WorldParam& p, std::ostream* os) { *os << worldName(p); }  // gtest's listing

struct Flow {
  int from = 0, to = 0;
  int send_slot = 0;  // index among the sender's outgoing flows (source slot, ack word)
  int recv_slot = 0;  // index among the receiver's incoming flows (destination slot, signal word)
  uint64_t iterations = 0;
  uint32_t data_qpn = 0, ack_qpn = 0;
};

struct RankWindows {
  DevWindow src;    // [send_slot * 4 MB, + 4 MB): a source slot per outgoing flow
  DevWindow dst;    // [recv_slot * 4 MB, + 4 MB): a destination slot per incoming flow
  DevWindow words;  // [recv_slot * 64]: signal words of incoming flows; [(in + send_slot) * 64]: ack words
  int out = 0, in = 0;
  uint64_t wordOffset(bool ack, int slot) const { return (ack ? in + slot : slot) * kWordBytes; }
};

std::string describeError(Mode mode, const ErrorRecord& rec) {
  if (rec.code == 0) return "none";
  return mode != Mode::kProxy ? ib::describeNetError(rec, kTimeoutNs) : px::describeProxyError(rec, kTimeoutNs);
}

// Fills the sides of every rank: senders first (by send_slot), then receivers (by recv_slot), which is also the order
// of a proxy ring's QPs. `link(flow, send)` gives the Link of that side.
template <class Link, class MakeLink>
std::vector<RankSides<Link>> buildSides(World& w, const std::vector<Flow>& flows, std::vector<RankWindows>& win,
                                        uint64_t seed, FlowRecords* rec_dev, MakeLink link, std::vector<int>* counts) {
  std::vector<RankSides<Link>> out(static_cast<size_t>(w.size()));
  counts->assign(static_cast<size_t>(w.size()), 0);
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t f = 0; f < flows.size(); ++f) {
      const Flow& fl = flows[f];
      const bool send = pass == 0;
      const int r = send ? fl.from : fl.to;
      RankWindows& rw = win[static_cast<size_t>(r)];
      Side<Link>& s = out[static_cast<size_t>(r)].side[(*counts)[static_cast<size_t>(r)]++];
      s.link = link(f, send);
      s.send = send ? 1 : 0;
      s.buf = send ? rw.src.ptr + static_cast<uint64_t>(fl.send_slot) * kMaxLitmusBytes
                   : rw.dst.ptr + static_cast<uint64_t>(fl.recv_slot) * kMaxLitmusBytes;
      s.word =
          reinterpret_cast<const uint64_t*>(rw.words.ptr + rw.wordOffset(send, send ? fl.send_slot : fl.recv_slot));
      s.iterations = fl.iterations;
      s.seed = mix64(seed ^ (0x5eedull << 32) ^ f);
      s.key = static_cast<uint32_t>(f << 24);
      s.st = &rec_dev->st[f];
      s.clock = &rec_dev->clock[f];
    }
  }
  return out;
}

class TransportWorldLitmus : public ::testing::TestWithParam<WorldParam> {};

TEST_P(TransportWorldLitmus, PutSignalDataIsCompleteWhenTheSignalArrives) {
  const WorldParam p = GetParam();
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = worldName(p);
  const int num_ranks = p.nodes * p.per_node;
  const uint64_t seed = testChaosSeed();
  World w;
  {
    const std::string why = makeWorld(seed, &w, num_ranks, /*one_stream=*/true);
    if (why == "skip") GTEST_SKIP() << "no CUDA GPU: the transport litmus tests need one";
    ASSERT_EQ("", why) << name;
  }
  Proxies ps{&w, {}};  // after the World: destroyed first (proxy threads, then NICs, then the kernels' streams)

  // Flows: ordered pairs of ranks on different nodes; total iterations split evenly.
  std::vector<Flow> flows;
  std::vector<RankWindows> win(static_cast<size_t>(num_ranks));
  for (int s = 0; s < num_ranks; ++s)
    for (int r = 0; r < num_ranks; ++r)
      if (s / p.per_node != r / p.per_node) {
        Flow f;
        f.from = s;
        f.to = r;
        f.send_slot = win[static_cast<size_t>(s)].out++;
        f.recv_slot = win[static_cast<size_t>(r)].in++;
        flows.push_back(f);
      }
  ASSERT_LE(flows.size(), static_cast<size_t>(kMaxFlows));
  const uint64_t total = litmusIterations(p.mode != Mode::kProxy ? 2000 : 1000);
  const uint64_t nflows = flows.size();
  for (uint64_t f = 0; f < nflows; ++f) flows[f].iterations = total / nflows + (f < total % nflows ? 1 : 0);
  ASSERT_LT(flows[0].iterations, kMaxFlowIterations) << "MOE_LITMUS_ITERATIONS too large for the pattern ids";
  std::printf("WorldLitmus[%s]: chaos seed %" PRIu64 ", %" PRIu64
              " iterations in all (MOE_LITMUS_ITERATIONS) over %" PRIu64
              " flows, sizes 1 B..4 MB log-uniform; reproduce with NCCL_MOE_EMU_CHAOS=%" PRIu64
              " MOE_LITMUS_ITERATIONS=%" PRIu64 " nccl_moe_gpu_tests --gtest_filter='%s.%s'\n",
              name.c_str(), seed, total, nflows, seed, total, info->test_suite_name(), info->name());
  std::fflush(stdout);

  for (int r = 0; r < num_ranks; ++r) {
    RankWindows& rw = win[static_cast<size_t>(r)];
    ASSERT_EQ("", allocWindow(w[r], rw.out * kMaxLitmusBytes, 0, &rw.src)) << name << " rank " << r;
    ASSERT_EQ("", allocWindow(w[r], rw.in * kMaxLitmusBytes, 0, &rw.dst)) << name << " rank " << r;
    ASSERT_EQ("", allocWindow(w[r], (rw.in + rw.out) * kWordBytes, rdma::kWindowSignal, &rw.words))
        << name << " rank " << r;
  }
  Mapped<FlowRecords> rec;
  ASSERT_NE(nullptr, rec.dev);
  for (int f = 0; f < kMaxFlows; ++f) rec.host->st[f].first_bad_iter = -1;

  std::vector<int> num_sides;
  std::vector<em::EmulatedGpuProxy*> rings(static_cast<size_t>(num_ranks), nullptr);
  auto launch = [&](auto sides) {
    using Link = decltype(sides[0].side[0].link);
    for (int r = 0; r < num_ranks; ++r)
      rankKernel<Link><<<num_sides[static_cast<size_t>(r)], kThreads, 0, w.streams[static_cast<size_t>(r)]>>>(
          sides[static_cast<size_t>(r)]);
  };
  if (p.mode != Mode::kProxy) {
    const bool via_mailbox = p.mode == Mode::kDbProxy;
    std::vector<em::EmulatedGpuQp*> data(flows.size()), ack(flows.size());
    for (size_t f = 0; f < flows.size(); ++f) {
      Flow& fl = flows[f];
      GpuRank& s = w[fl.from];
      GpuRank& r = w[fl.to];
      ASSERT_EQ("", connectQp(s, r, win[static_cast<size_t>(fl.from)].src.w.lkey, kTimeoutNs, nullptr, &data[f], 64, 64,
                              via_mailbox))
          << name << " flow " << f;
      ASSERT_EQ("", connectQp(r, s, win[static_cast<size_t>(fl.to)].src.w.lkey, kTimeoutNs, nullptr, &ack[f], 64, 64,
                              via_mailbox))
          << name << " flow " << f;
      fl.data_qpn = data[f]->qpn();
      fl.ack_qpn = ack[f]->qpn();
    }
    ASSERT_EQ("", startNics(w)) << name;
    ASSERT_EQ("", startDoorbellProxies(w)) << name;
    const auto sides = buildSides<IbgdaLink>(
        w, flows, win, seed, rec.dev,
        [&](size_t f, bool send) {
          const Flow& fl = flows[f];
          const RankWindows& sw = win[static_cast<size_t>(fl.from)];
          const RankWindows& rw = win[static_cast<size_t>(fl.to)];
          IbgdaLink l;
          if (send) {
            l.qp = data[f]->view();
            l.local = sw.src.addr(static_cast<uint64_t>(fl.send_slot) * kMaxLitmusBytes);
            l.remote = rw.dst.addr(static_cast<uint64_t>(fl.recv_slot) * kMaxLitmusBytes);
            l.rkey = rw.dst.w.rkey;
            l.word = rw.words.addr(rw.wordOffset(false, fl.recv_slot));
            l.word_rkey = rw.words.w.rkey;
          } else {
            l.qp = ack[f]->view();
            l.word = sw.words.addr(sw.wordOffset(true, fl.send_slot));
            l.word_rkey = sw.words.w.rkey;
          }
          return l;
        },
        &num_sides);
    launch(sides);
  } else {
    // One ring per rank (a communicator rank has one per QP set; the litmus uses one set): QPs of its outgoing flows
    // (data), then of its incoming ones
    // (acks), in the order buildSides gives the blocks.
    std::vector<std::vector<int>> peers(static_cast<size_t>(num_ranks));
    std::vector<std::vector<size_t>> qp_of_flow(2, std::vector<size_t>(flows.size()));  // [send][flow]
    for (int pass = 0; pass < 2; ++pass)
      for (size_t f = 0; f < flows.size(); ++f) {
        const int r = pass == 0 ? flows[f].from : flows[f].to;
        auto& list = peers[static_cast<size_t>(r)];
        qp_of_flow[pass == 0 ? 1 : 0][f] = list.size();
        list.push_back(pass == 0 ? flows[f].to : flows[f].from);
      }
    for (int r = 0; r < num_ranks; ++r)
      ASSERT_EQ("", makeProxy(ps, r, peers[static_cast<size_t>(r)], 64, 0, win[static_cast<size_t>(r)].src.w.lkey,
                              kTimeoutNs, nullptr, &rings[static_cast<size_t>(r)]))
          << name << " rank " << r;
    for (size_t f = 0; f < flows.size(); ++f) {
      flows[f].data_qpn = rings[static_cast<size_t>(flows[f].from)]->qpn(qp_of_flow[1][f]);
      flows[f].ack_qpn = rings[static_cast<size_t>(flows[f].to)]->qpn(qp_of_flow[0][f]);
    }
    ASSERT_EQ("", startNics(w)) << name;
    ASSERT_EQ("", startProxies(ps)) << name;
    const auto sides = buildSides<ProxyLink>(
        w, flows, win, seed, rec.dev,
        [&](size_t f, bool send) {
          const Flow& fl = flows[f];
          const RankWindows& sw = win[static_cast<size_t>(fl.from)];
          const RankWindows& rw = win[static_cast<size_t>(fl.to)];
          ProxyLink l;
          if (send) {
            l.q = rings[static_cast<size_t>(fl.from)]->view(qp_of_flow[1][f]);
            l.local = static_cast<uint64_t>(fl.send_slot) * kMaxLitmusBytes;
            l.remote = static_cast<uint64_t>(fl.recv_slot) * kMaxLitmusBytes;
            l.rkey = rw.dst.w.rkey;
            l.word = rw.wordOffset(false, fl.recv_slot);
            l.word_rkey = rw.words.w.rkey;
          } else {
            l.q = rings[static_cast<size_t>(fl.to)]->view(qp_of_flow[0][f]);
            l.word = sw.wordOffset(true, fl.send_slot);
            l.word_rkey = sw.words.w.rkey;
          }
          return l;
        },
        &num_sides);
    launch(sides);
  }
  const auto t0 = std::chrono::steady_clock::now();
  CUDA_OK(cudaGetLastError());

  auto flowName = [&](size_t f) {
    const Flow& fl = flows[f];
    char buf[160];
    std::snprintf(buf, sizeof(buf),
                  "world %s, flow %zu: rank %d -> rank %d (data QP 0x%x on rank %d's NIC, ack QP 0x%x "
                  "on rank %d's NIC)",
                  name.c_str(), f, fl.from, fl.to, fl.data_qpn, fl.from, fl.ack_qpn, fl.to);
    return std::string(buf);
  };
  const double per_iteration_s = p.mode != Mode::kProxy ? 2e-3 : 4e-3;  // a bound, far above the rates seen
  const std::string waited =
      waitStreams(w, kHostTimeoutS + flows[0].iterations * per_iteration_s, ("WorldLitmus[" + name + "]").c_str(), [&] {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        uint64_t done = 0, slowest = ~0ull;
        for (size_t f = 0; f < flows.size(); ++f) {
          const uint64_t c = __atomic_load_n(&rec.host->st[f].count, __ATOMIC_RELAXED);
          done += c;
          slowest = std::min(slowest, c);
        }
        char line[200];
        std::snprintf(line, sizeof(line),
                      "%" PRIu64 " of %" PRIu64
                      " iterations checked after %.0f s (%.0f per s); slowest flow at %" PRIu64 " of %" PRIu64,
                      done, total, s, done / s, slowest, flows[0].iterations);
        return std::string(line);
      });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (size_t f = 0; f < flows.size(); ++f) {
    const FlowClock c = rec.host->clock[f];
    const double fs = c.end_ns > c.start_ns ? (c.end_ns - c.start_ns) * 1e-9 : 0.0;
    std::printf("WorldLitmus[%s] flow %zu (rank %d -> rank %d): %" PRIu64 " iterations in %.3f s, %.0f per s; %s\n",
                name.c_str(), f, flows[f].from, flows[f].to, flows[f].iterations, fs,
                fs > 0 ? flows[f].iterations / fs : 0.0, describeStatus(rec.host->st[f]).c_str());
  }
  std::printf("WorldLitmus[%s]: %" PRIu64
              " iterations over %zu flows in %.3f s: %.0f iterations/s in all (chaos seed "
              "%" PRIu64 ")\n",
              name.c_str(), total, flows.size(), secs, total / secs, seed);
  if (p.mode != Mode::kProxy)
    dumpWorld(w);
  else
    dumpProxies(w, ps, kTimeoutNs);
  ASSERT_EQ("", waited) << name;

  for (size_t f = 0; f < flows.size(); ++f) {
    const TestStatus& st = rec.host->st[f];
    EXPECT_EQ(0, st.failed) << flowName(f) << ": " << describeStatus(st);
    EXPECT_EQ(0ull, st.mismatches) << flowName(f) << ": " << describeStatus(st) << " (chaos seed " << seed << ")";
    EXPECT_EQ(flows[f].iterations, st.count) << flowName(f) << ": iterations checked by the receiver";
  }
  for (int r = 0; r < num_ranks; ++r) {
    EXPECT_EQ(0, w[r].error.host->code) << "world " << name << ", rank " << r << ": "
                                        << describeError(p.mode, *w[r].error.host);
    EXPECT_FALSE(w[r].backend->failed()) << "world " << name << ", rank " << r << ": " << w[r].backend->error();
    // Every fetch-add of this rank's NIC: one signal per iteration of its outgoing flows, one ack per iteration of
    // its incoming ones.
    uint64_t atomics = 0, descriptors = 0;
    for (const Flow& fl : flows)
      if (fl.from == r || fl.to == r) {
        atomics += fl.iterations;
        descriptors += fl.iterations + 1;  // and one quiet per block
      }
    EXPECT_EQ(atomics, w[r].nic->counters().atomics) << "world " << name << ", rank " << r;
    if (p.mode == Mode::kProxy) {
      em::EmulatedGpuProxy* ring = rings[static_cast<size_t>(r)];
      EXPECT_FALSE(ring->thread().failed()) << "world " << name << ", rank " << r << ": " << ring->thread().error();
      EXPECT_EQ(static_cast<uint32_t>(descriptors), ring->completed())
          << "world " << name << ", rank " << r << ": " << ring->describe();
    }
  }
}

std::string paramName(const ::testing::TestParamInfo<WorldParam>& info) {
  return std::string(modeName(info.param.mode)) + "_" + std::to_string(info.param.nodes) + "x" +
         std::to_string(info.param.per_node);
}

INSTANTIATE_TEST_SUITE_P(Worlds, TransportWorldLitmus,
                         ::testing::Values(WorldParam{Mode::kIbgda, 2, 1}, WorldParam{Mode::kIbgda, 2, 2},
                                           WorldParam{Mode::kIbgda, 4, 1}, WorldParam{Mode::kProxy, 2, 1},
                                           WorldParam{Mode::kProxy, 2, 2}, WorldParam{Mode::kProxy, 4, 1},
                                           WorldParam{Mode::kDbProxy, 2, 1}, WorldParam{Mode::kDbProxy, 2, 2},
                                           WorldParam{Mode::kDbProxy, 4, 1}),
                         paramName);

}  // namespace
