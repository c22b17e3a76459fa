// moe-perf transport mode: configuration, labels, timestamp reduction, table and JSON (contract in transport.h).
#include "transport.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "cpu_baseline.h"  // median()
#include "report.h"        // jsonString()

namespace nccl_moe::perf {

const char* const kSoftNicLabel = "software NIC \xe2\x80\x94 correctness/functional timing, not performance";

const char* const kSoftNicTransport = "software_nic";

const char* transportOpName(TransportOp op) { return op == TransportOp::kPut ? "put" : "put_signal"; }
const char* netBackendName(NetBackend backend) {
  return backend == NetBackend::kIbgda ? "ibgda" : backend == NetBackend::kProxy ? "proxy" : "dbproxy";
}

TransportConfig resolveTransport(const Options& o) {
  TransportConfig c;
  const int64_t lo = o.min_tokens > 0 ? o.min_tokens : 8;
  const int64_t hi = o.max_tokens > 0 ? o.max_tokens : (o.min_tokens > 0 ? lo : int64_t{4} << 20);
  c.sizes = tokenSweep(lo, hi, o.step_factor, o.step_tokens);
  c.backends = o.net_backends.empty()
                   ? std::vector<NetBackend>{NetBackend::kIbgda, NetBackend::kDbProxy, NetBackend::kProxy}
                   : o.net_backends;
  c.batch = o.batch > 0 ? o.batch : 8;
  c.iters = o.iters > 0 ? o.iters : 20;
  c.warmup = o.warmup >= 0 ? o.warmup : 5;
  c.check = o.check != 0;
  return c;
}

std::string checkTransportNet(const char* net) {
  const std::string v = net == nullptr ? "" : net;
  if (v == "emulated") return "";
  if (v.empty() || v == "auto" || v == "ib")
    return "NCCL_MOE_NET=" + (v.empty() ? std::string("auto (unset)") : v) +
           ": the transport mode needs a scale-out transport, and there is no verbs backend yet; set "
           "NCCL_MOE_NET=emulated for the software NIC (correctness/functional timing, not performance)";
  return "NCCL_MOE_NET='" + v + "': expected auto, ib or emulated (the transport mode runs with emulated)";
}

std::string checkTransportOptions(const Options& o) {
  if (o.procs > 0) return "--mode transport runs in one process (two virtual nodes on GPU 0): no --procs";
  if (o.ranks_per_gpu > 1)
    return "--mode transport places its two ranks itself (two virtual nodes on GPU 0): no --ranks-per-gpu";
  if (o.ranks_per_node > 0) return "--mode transport has one rank per virtual node: no --ranks-per-node";
  if (o.metrics.any()) return "--metrics belongs to HT/LL dispatch and combine, not to --mode transport";
  if (o.inject_skipped_write) return "--inject-skipped-write belongs to HT/LL verification, not to --mode transport";
  return "";
}

std::string checkTransportConfig(const TransportConfig& c) {
  if (c.sizes.empty() || c.backends.empty()) return "--mode transport: no size or no backend to run";
  const int64_t in_flight = TransportConfig::slotBytes(c.maxBytes()) * c.batch;
  if (in_flight > kMaxBytesInFlight) {
    std::ostringstream os;
    os << "--mode transport: --batch " << c.batch << " x " << c.maxBytes() << " B (the largest size) = " << in_flight
       << " B in flight exceeds " << kMaxBytesInFlight
       << " B (the software NIC stages every byte in flight in a 64 MiB arena): lower -e or --batch";
    return os.str();
  }
  return "";
}

bool summarizeTransport(const TransportTimes& t, int64_t bytes, int batch, TransportStats* out, std::string* error) {
  const size_t n = t.lat_start_ns.size(), m = t.batch_start_ns.size();
  if (n == 0 || m == 0 || t.lat_end_ns.size() != n || t.batch_end_ns.size() != m) {
    *error = "no timed iteration (or start and end counts differ)";
    return false;
  }
  std::vector<double> lat(n), bat(m);
  for (size_t i = 0; i < n; ++i) {
    if (t.lat_end_ns[i] < t.lat_start_ns[i] || t.lat_start_ns[i] == 0) {
      *error = "latency iteration " + std::to_string(i) + ": end before start (or not recorded)";
      return false;
    }
    lat[i] = static_cast<double>(t.lat_end_ns[i] - t.lat_start_ns[i]) / 1e3;
  }
  for (size_t i = 0; i < m; ++i) {
    if (t.batch_end_ns[i] < t.batch_start_ns[i] || t.batch_start_ns[i] == 0) {
      *error = "stream batch " + std::to_string(i) + ": end before start (or not recorded)";
      return false;
    }
    bat[i] = static_cast<double>(t.batch_end_ns[i] - t.batch_start_ns[i]) / 1e3;
  }
  TransportStats s;
  s.median_us = median(lat);
  s.min_us = *std::min_element(lat.begin(), lat.end());
  s.max_us = *std::max_element(lat.begin(), lat.end());
  s.batch_median_us = median(bat);
  s.bandwidth_gbps = gbps(static_cast<double>(bytes) * batch, s.batch_median_us);
  *out = s;
  return true;
}

namespace {

std::string number(double v, int decimals) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", decimals, v);
  return buf;
}

std::string oneLine(const std::string& text, size_t max_chars) {
  std::string s;
  for (char c : text) s += (c == '\n' || c == '\r' || c == '\t') ? ' ' : c;
  if (s.size() > max_chars) s = s.substr(0, max_chars - 3) + "...";
  return s;
}

}  // namespace

std::string transportTableHeader() {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "#%11s  %-7s %-10s %5s %10s %10s %10s %11s %9s %7s", "bytes", "backend", "op",
                "batch", "lat_us", "min_us", "max_us", "batch_us", "GB/s", "#wrong");
  return std::string(buf) + "\n";
}

std::string transportTableRow(const TransportRow& r) {
  std::string lat = "n/a", lo = "n/a", hi = "n/a", bat = "n/a", bw = "n/a", wrong = "n/a";
  if (r.available) {
    lat = number(r.stats.median_us, 2);
    lo = number(r.stats.min_us, 2);
    hi = number(r.stats.max_us, 2);
    bat = number(r.stats.batch_median_us, 2);
    bw = number(r.stats.bandwidth_gbps, 3);
    wrong = r.checked ? std::to_string(r.wrong) : "-";
  }
  char buf[256];
  std::snprintf(buf, sizeof(buf), " %11lld  %-7s %-10s %5d %10s %10s %10s %11s %9s %7s",
                static_cast<long long>(r.bytes), netBackendName(r.net_backend), transportOpName(r.op), r.batch,
                lat.c_str(), lo.c_str(), hi.c_str(), bat.c_str(), bw.c_str(), wrong.c_str());
  std::string line = buf;
  if (!r.available) line += "  not available: " + oneLine(r.error, 200);
  line += std::string("  [") + kSoftNicLabel + "]";
  return line + "\n";
}

std::string transportToJson(const TransportRow& r) {
  std::ostringstream os;
  const bool ok = r.available;
  os << "{\"mode\":\"transport\",\"op\":" << jsonString(transportOpName(r.op)) << ",\"backend\":\"gpu\""
     << ",\"transport\":\"software_nic\",\"software_nic\":true,\"net_backend\":"
     << jsonString(netBackendName(r.net_backend)) << ",\"label\":" << jsonString(kSoftNicLabel)
     << ",\"gpus\":" << r.gpus << ",\"ranks\":" << r.ranks
     << ",\"shared_gpu\":" << (r.ranks > r.gpus ? "true" : "false") << ",\"nodes\":" << r.nodes
     << ",\"bytes\":" << r.bytes << ",\"batch\":" << r.batch << ",\"iters\":" << r.iters << ",\"warmup\":" << r.warmup
     << ",\"chaos_seed\":" << r.chaos_seed << ",\"available\":" << (ok ? "true" : "false");
  os << ",\"median_us\":" << (ok ? number(r.stats.median_us, 3) : "null");
  os << ",\"min_us\":" << (ok ? number(r.stats.min_us, 3) : "null");
  os << ",\"max_us\":" << (ok ? number(r.stats.max_us, 3) : "null");
  os << ",\"batch_median_us\":" << (ok ? number(r.stats.batch_median_us, 3) : "null");
  os << ",\"bandwidth_gbps\":" << (ok ? number(r.stats.bandwidth_gbps, 3) : "null");
  os << ",\"timer\":\"globaltimer\"";
  os << ",\"checked\":" << (r.checked ? "true" : "false") << ",\"verified\":" << (r.verified() ? "true" : "false");
  os << ",\"wrong\":" << (r.checked && ok ? std::to_string(r.wrong) : "null");
  os << ",\"error\":" << (ok ? "null" : jsonString(r.error));
  os << ",\"gpu_name\":" << jsonString(r.gpu_name) << ",\"git_sha\":" << jsonString(r.git_sha) << "}";
  return os.str();
}

std::string transportBanner(uint64_t chaos_seed) {
  std::ostringstream os;
  os << "# !!! " << kSoftNicLabel << "\n"
     << "# !!! SOFTWARE NIC: the scale-out transport's WQEs (ibgda) and proxy requests (proxy) are executed by a CPU\n"
     << "# !!! thread with cudaMemcpyAsync on this GPU (src/transport/emulated/); 2 ranks = 2 virtual nodes on GPU 0.\n"
     << "# !!! Every payload is checked after its signal, but the times are the emulator's: they say nothing about\n"
     << "# !!! a real NIC, PCIe, InfiniBand/RoCE or the GPU-initiated path on hardware.\n";
  if (chaos_seed != 0)
    os << "# chaos on: NCCL_MOE_EMU_CHAOS=" << chaos_seed
       << " (split/reordered writes, late source reads, stalls: the times include them)\n";
  else
    os << "# chaos off (NCCL_MOE_EMU_CHAOS unset or 0): in-order execution, whole WRITEs\n";
  return os.str();
}

std::string checkCommNodes(const std::vector<Mode>& modes, int ranks_per_node, int num_ranks, int comm_nodes) {
  if (comm_nodes <= 1) return "";
  std::ostringstream os;
  const std::string world = "the MoE communicators of this run span " + std::to_string(comm_nodes) + " nodes (" +
                            std::to_string(num_ranks) +
                            " ranks; virtual nodes of NCCL_MOE_EMULATE_NODES, reached "
                            "through the software NIC)";
  if (num_ranks < comm_nodes || num_ranks % comm_nodes != 0) {
    os << world << ", which does not split them into nodes of equal size";
    return os.str();
  }
  const int rpn = num_ranks / comm_nodes;
  if (ranks_per_node > 0 && ranks_per_node != rpn) {
    os << "--ranks-per-node " << ranks_per_node << " disagrees with the communicator: " << world << ", i.e. " << rpn
       << " ranks per node; leave --ranks-per-node out (the rows take the communicator's layout) or give "
       << "--ranks-per-node " << rpn;
    return os.str();
  }
  return "";
}

int layoutRanksPerNode(int ranks_per_node, int num_ranks, int comm_nodes) {
  if (comm_nodes > 1 && num_ranks % comm_nodes == 0) return num_ranks / comm_nodes;
  return ranks_per_node;
}

std::string softNicMoeBanner(int comm_nodes, int num_ranks, int num_gpus, bool processes) {
  std::ostringstream os;
  os << "# !!! " << kSoftNicLabel << "\n"
     << "# !!! INTERNODE OVER THE SOFTWARE NIC: " << num_ranks << (processes ? " processes" : " ranks") << " on "
     << num_gpus << " GPU" << (num_gpus == 1 ? "" : "s") << " form " << comm_nodes << " virtual nodes of "
     << num_ranks / comm_nodes << " ranks ("
     << (processes ? "a node per NCCL_HOSTID, NCCL_MOE_HOSTID empty" : "NCCL_MOE_EMULATE_NODES") << ");\n"
     << "# !!! ranks of other nodes are reached through the software NIC (a CPU thread executing the RDMA work\n"
     << "# !!! requests with cudaMemcpyAsync on this GPU, src/transport/emulated/). Every call is verified against "
        "the\n"
     << "# !!! CPU reference, but the times describe the emulator: nothing about a NIC, InfiniBand/RoCE or NVLink.\n";
  return os.str();
}

std::string transportNotes(int batch) {
  std::ostringstream os;
  os << "# lat_us (median of -n), min_us, max_us: one message in flight. put: post -> the sender's quiet returns;"
        " put_signal: post -> the receiver sees the signal.\n"
     << "# batch_us: " << batch
     << " messages in flight, first post -> put: the quiet after the last / put_signal: the receiver sees the last "
        "signal (median of -n batches). GB/s = "
     << batch << " x bytes / batch_us.\n"
     << "# #wrong: payload bytes that differed from the expected pattern when the receiver checked them after the "
        "signal covering them (every message, warm-up included).\n"
     << "# clock: %globaltimer of the GPU both ranks share. " << kSoftNicLabel << ".\n";
  return os.str();
}

}  // namespace nccl_moe::perf
