// moe-perf's transport mode (--mode transport): the scale-out transport's put and put_signal between two virtual
// nodes on one GPU, per backend (ibgda: the GPU writes WQEs and rings the doorbell; proxy: the GPU request proxy),
// executed by the software NIC. Pure host code (moe_perf_core, tests/unit/perf_transport_test.cc): the resolved
// configuration, the NCCL_MOE_NET check, the reduction of the kernels' timestamps, the labels, the table and the
// JSON row. The kernels and the world are perf/gpu_transport.cu.
//
// Contract
//   - Every row, banner and note says "software NIC — correctness/functional timing, not performance" (kSoftNicLabel):
//     the NIC is a CPU thread that executes the WQE bytes with cudaMemcpyAsync on this GPU, so its times describe
//     the emulator, never a NIC or a link (the project rule: timings of the software NIC are never performance).
//   - Sizes are message bytes: -b/-e/-f/-i as nccl-tests (default 8 B .. 4 MB, x2). Each size runs two loops per
//     (backend, op) after -w untimed iterations: latency (one message in flight, -n timed) and stream (--batch
//     messages in flight, -n timed batches). Every message carries a payload that is a function of (iteration,
//     offset); the receiver checks every byte after the signal that covers it (-c 0: not checked).
//   - Times come from the GPU's global timer (%globaltimer, one clock for both ranks: they share the GPU).
//       put         latency: post -> the sender's quiet returns (completion at the requester); stream: first post
//                   of the batch -> quiet after its last put. A signal after the quiet (untimed) tells the receiver
//                   to check.
//       put_signal  latency: post -> the receiver sees the signal (one way); stream: first post -> the receiver
//                   sees the batch's last signal.
//     median_us/min_us/max_us: the latency loop; batch_median_us: the stream loop;
//     bandwidth_gbps = batch * bytes / batch_median_us / 1e3.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "options.h"

namespace nccl_moe::perf {

// The label every transport row, banner and note carries.
extern const char* const kSoftNicLabel;

enum class TransportOp : int { kPut = 0, kPutSignal = 1 };
const char* transportOpName(TransportOp op);     // "put" | "put_signal"
const char* netBackendName(NetBackend backend);  // "ibgda" | "proxy" | "dbproxy"

struct TransportConfig {
  std::vector<int64_t> sizes;        // message bytes, ascending
  std::vector<NetBackend> backends;  // --net-mode; default ibgda, dbproxy, proxy
  std::vector<TransportOp> ops = {TransportOp::kPut, TransportOp::kPutSignal};
  int batch = 8;               // --batch: messages in flight in the stream loop
  int iters = 20, warmup = 5;  // -n / -w (per loop)
  bool check = true;           // -c
  int64_t maxBytes() const { return sizes.empty() ? 0 : sizes.back(); }
  // Bytes between consecutive messages of a batch in the receiver's window: 64-byte aligned, so every message
  // starts on an 8-byte word (the payload check reads words).
  static int64_t slotBytes(int64_t bytes) { return (bytes + 63) / 64 * 64; }
};
// Defaults: 8 B .. 4 MB, factor 2 (or the -b/-e/-f/-i given), both backends, batch 8, -n 20, -w 5.
TransportConfig resolveTransport(const Options& options);

// NCCL_MOE_NET as the transport mode reads it (nullptr = unset): "" when the software NIC was asked for
// (emulated), else why the mode cannot run (auto/ib: no verbs backend yet; anything else: not a value).
std::string checkTransportNet(const char* net);

// Options that mean nothing here: "" or the reason (exit 2). The mode is one process, two ranks on GPU 0.
std::string checkTransportOptions(const Options& options);

// Bytes a backend may have in flight: the software NIC stages every byte of the WRITEs it has fetched and not yet
// completed in its CUDA backend's 64 MiB arena (src/transport/emulated/cuda_backend.h), so batch x slot bytes of
// the largest size stays at or below half of it.
inline constexpr int64_t kMaxBytesInFlight = int64_t{32} << 20;
// "" or why the resolved configuration cannot run (exit 2): no sizes, or batch x largest slot > kMaxBytesInFlight.
std::string checkTransportConfig(const TransportConfig& config);

// The kernels' timestamps of one (backend, op, size): per timed iteration the start and end of the latency loop
// and of the stream loop, in ns of the global timer.
struct TransportTimes {
  std::vector<uint64_t> lat_start_ns, lat_end_ns;
  std::vector<uint64_t> batch_start_ns, batch_end_ns;
};
struct TransportStats {
  double median_us = 0, min_us = 0, max_us = 0;  // latency loop
  double batch_median_us = 0;                    // stream loop
  double bandwidth_gbps = 0;                     // batch * bytes / batch_median_us / 1e3
};
// False (with *error) when a timestamp pair is missing or runs backwards (end < start, or no timed iteration).
bool summarizeTransport(const TransportTimes& times, int64_t bytes, int batch, TransportStats* out, std::string* error);

struct TransportRow {
  NetBackend net_backend = NetBackend::kIbgda;
  TransportOp op = TransportOp::kPut;
  int64_t bytes = 0;
  int batch = 0;
  int iters = 0, warmup = 0;
  int ranks = 2, nodes = 2, gpus = 1;  // two virtual nodes of one rank each, on one GPU
  uint64_t chaos_seed = 0;             // NCCL_MOE_EMU_CHAOS of rank 0's NIC; 0 = chaos off
  bool available = false;              // both loops ran without a failed call, timeout or error record
  std::string error;
  TransportStats stats;
  bool checked = false;
  int64_t wrong = 0;  // payload bytes that differed from the pattern after their signal
  std::string gpu_name;
  std::string git_sha = "unknown";
  bool verified() const { return checked && available && wrong == 0; }
};

std::string transportTableHeader();
std::string transportTableRow(const TransportRow& row);
// One JSON object, no trailing newline: the common keys of report.h's rows where they mean the same thing (mode
// "transport", op, backend "gpu", gpus, ranks, shared_gpu true, nodes, iters, warmup, available, median_us, min_us,
// max_us, timer "globaltimer", checked, verified, wrong, error, gpu_name, git_sha) plus transport "software_nic",
// software_nic true, net_backend, bytes, batch, batch_median_us, bandwidth_gbps, chaos_seed and label
// (kSoftNicLabel). MoE-only keys (dtype, tokens, hidden, baseline_*) are absent.
std::string transportToJson(const TransportRow& row);

// The loud lines (each "# ..." and ending with '\n') printed in the header and under every table.
std::string transportBanner(uint64_t chaos_seed);

// ---- MoE rows (--mode ll) of a multi-node communicator: internode LL on virtual nodes ----
// NCCL_MOE_NET=emulated NCCL_MOE_EMULATE_NODES=n with --ranks-per-gpu R splits the one-process world of R ranks on
// one GPU into n nodes of R / n consecutive ranks (the library's node map, asked with ncclMoeCommNodeCount); ranks of
// other nodes are reached through the software NIC, the only scale-out transport of this build. Those rows are
// verified like every other, and labelled like the transport mode's: JSON transport "software_nic" (kSoftNicTransport),
// software_nic true and label kSoftNicLabel; every table line ends with "[" kSoftNicLabel "]"; the banner below is
// printed in the header and under every table.
extern const char* const kSoftNicTransport;  // "software_nic"

// Refusals (exit 2, before any MoE call) of a run whose MoE communicators span `comm_nodes` nodes; "" when it can run.
// With comm_nodes > 1: nodes of unequal size, and a --ranks-per-node (`ranks_per_node` > 0) whose layout is not the
// communicator's (R / comm_nodes ranks per node). HT and LL both run internode (src/kernels/ht_net, low_latency_net).
// With one node nothing is refused: --ranks-per-node keeps its meaning there (a modelled layout, no kernel changes).
std::string checkCommNodes(const std::vector<Mode>& modes, int ranks_per_node, int num_ranks, int comm_nodes);

// The node layout of the rows (group routing, `nodes`, RDMA/NVLink bytes): the communicator's when it spans several
// nodes (num_ranks / comm_nodes ranks per node), else --ranks-per-node (0: every rank on one node).
int layoutRanksPerNode(int ranks_per_node, int num_ranks, int comm_nodes);

// The loud lines (each "# ..." and ending with '\n') of an internode MoE run over the software NIC, printed in the
// header and under every table.
// processes: the ranks are processes whose NCCL_HOSTID makes the nodes (MPI, --procs), not threads split by
// NCCL_MOE_EMULATE_NODES.
std::string softNicMoeBanner(int comm_nodes, int num_ranks, int num_gpus, bool processes = false);
// The notes under the table: what each column measures.
std::string transportNotes(int batch);

}  // namespace nccl_moe::perf
