// moe-perf table and JSON Lines output (contract in report.h).
#include "report.h"

#include <cmath>
#include <cstdio>
#include <sstream>

#include "transport.h"  // kSoftNicLabel, kSoftNicTransport

namespace nccl_moe::perf {

namespace {

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

std::string jsonNumber(double v, int decimals) {
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

// The columns of the selected comparable metrics after bl#wrong: their titles (values == null), else the row's
// values ("-" where it has none).
std::string metricColumns(const MetricsChoice& m, const ReducedMetrics* values, bool available) {
  std::string text;
  auto column = [&](bool selected, const char* title, double v) {
    if (!selected) return;
    char buf[64];
    if (values == nullptr) {
      std::snprintf(buf, sizeof(buf), " %14s", title);
    } else {
      std::snprintf(buf, sizeof(buf), " %14s", available && v >= 0 ? fmt("%.2f", v).c_str() : "-");
    }
    text += buf;
  };
  column(m.boundary, "boundary_us", values ? values->common_boundary_us : -1);
  column(m.fresh, "fresh_p50_us", values ? values->fresh_p50_us : -1);
  column(m.chained, "pair_period_us", values ? values->chained_pair_period_us : -1);
  return text;
}

}  // namespace

std::string tableHeader(const MetricsChoice& metrics) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "#%7s %7s %5s %8s %6s %5s %5s %4s  %-16s %10s %12s %12s %13s %7s %8s", "tokens",
                "hidden", "topk", "experts", "dtype", "sms", "ranks", "gpus", "op", "time_us", "logical_GB/s",
                "baseline_us", "baseline_GB/s", "#wrong", "bl#wrong");
  return buf + metricColumns(metrics, nullptr, false) + "\n";
}

std::string tableRow(const ResultRow& r, const MetricsChoice& metrics) {
  const std::string sms = r.backend == "cpu" ? "-" : (r.sms == 0 ? "auto" : std::to_string(r.sms));
  std::string time = "n/a", bw = "n/a", wrong = "n/a";
  if (r.available) {
    time = fmt("%.2f", r.median_us);
    bw = r.has_gbps ? fmt("%.2f", r.logicalGbps()) : "-";
    wrong = r.checked ? std::to_string(r.wrong) : "-";
  }
  std::string bl_time = "-", bl_bw = "-", bl_wrong = "-";
  if (r.has_baseline) {
    bl_time = fmt("%.2f", r.baseline_median_us);
    bl_bw = r.has_gbps ? fmt("%.2f", r.baselineGbps()) : "-";
    bl_wrong = r.checked ? std::to_string(r.baseline_wrong) : "-";
  }
  const std::string gpus = r.backend == "cpu" ? "-" : std::to_string(r.gpus);
  char buf[512];
  std::snprintf(buf, sizeof(buf), " %7lld %7d %5d %8d %6s %5s %5d %4s  %-16s %10s %12s %12s %13s %7s %8s",
                static_cast<long long>(r.tokens), r.hidden, r.topk, r.experts, dtypeName(r.dtype), sms.c_str(), r.ranks,
                gpus.c_str(), r.op.c_str(), time.c_str(), bw.c_str(), bl_time.c_str(), bl_bw.c_str(), wrong.c_str(),
                bl_wrong.c_str());
  std::string line = buf + metricColumns(metrics, &r.metrics, r.available);
  if (!r.available) line += "  not available: " + oneLine(r.error, 160);
  if (!r.timer_note.empty()) line += "  [event-timed: " + oneLine(r.timer_note, 120) + "]";
  if (!r.has_baseline && !r.baseline_note.empty()) line += "  baseline: n/a (" + oneLine(r.baseline_note, 80) + ")";
  if (r.shared_gpu) line += "  [shared GPU: correctness only]";
  if (r.ranks == 1) line += "  [1 rank: everything local]";
  if (r.nodes > 1 && r.rdma_bytes_per_rank >= 0 && r.nvl_bytes_per_rank >= 0) {
    char nodes[128];
    std::snprintf(nodes, sizeof(nodes), "  [%d nodes: RDMA %.3f MB, NVLink %.3f MB per rank]", r.nodes,
                  r.rdma_bytes_per_rank / 1e6, r.nvl_bytes_per_rank / 1e6);
    line += nodes;
  }
  if (r.software_nic) line += std::string("  [") + kSoftNicLabel + "]";
  return line + "\n";
}

std::string jsonString(const std::string& text) {
  std::string s = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"':
        s += "\\\"";
        break;
      case '\\':
        s += "\\\\";
        break;
      case '\n':
        s += "\\n";
        break;
      case '\r':
        s += "\\r";
        break;
      case '\t':
        s += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          s += buf;
        } else {
          s += static_cast<char>(c);
        }
    }
  }
  return s + "\"";
}

std::string toJson(const ResultRow& r) {
  std::ostringstream os;
  os << "{\"mode\":" << jsonString(modeName(r.mode)) << ",\"op\":" << jsonString(r.op)
     << ",\"dtype\":" << jsonString(dtypeName(r.dtype)) << ",\"backend\":" << jsonString(r.backend)
     << ",\"gpus\":" << r.gpus << ",\"ranks\":" << r.ranks << ",\"shared_gpu\":" << (r.shared_gpu ? "true" : "false")
     << ",\"sms\":" << r.sms << ",\"tokens\":" << r.tokens << ",\"hidden\":" << r.hidden << ",\"topk\":" << r.topk
     << ",\"experts\":" << r.experts << ",\"routing\":" << jsonString(r.routing) << ",\"seed\":" << r.seed
     << ",\"iters\":" << r.iters << ",\"warmup\":" << r.warmup << ",\"available\":" << (r.available ? "true" : "false");
  os << ",\"median_us\":" << (r.available ? jsonNumber(r.median_us, 3) : "null");
  os << ",\"min_us\":" << (r.available ? jsonNumber(r.min_us, 3) : "null");
  os << ",\"max_us\":" << (r.available ? jsonNumber(r.max_us, 3) : "null");
  os << ",\"logical_gbps\":" << (r.available && r.has_gbps ? jsonNumber(r.logicalGbps(), 3) : "null");
  os << ",\"bytes_per_rank\":" << jsonNumber(r.bytes_per_rank, 0);
  os << ",\"nodes\":" << r.nodes;
  const bool link_bytes = r.nodes > 1 && r.rdma_bytes_per_rank >= 0 && r.nvl_bytes_per_rank >= 0;
  os << ",\"rdma_bytes_per_rank\":" << (link_bytes ? jsonNumber(r.rdma_bytes_per_rank, 0) : "null");
  os << ",\"nvl_bytes_per_rank\":" << (link_bytes ? jsonNumber(r.nvl_bytes_per_rank, 0) : "null");
  if (r.software_nic)
    os << ",\"transport\":" << jsonString(kSoftNicTransport)
       << ",\"software_nic\":true,\"label\":" << jsonString(kSoftNicLabel);
  os << ",\"baseline_median_us\":" << (r.has_baseline ? jsonNumber(r.baseline_median_us, 3) : "null");
  os << ",\"baseline_gbps\":" << (r.has_baseline && r.has_gbps ? jsonNumber(r.baselineGbps(), 3) : "null");
  os << ",\"baseline_note\":" << (r.has_baseline || r.baseline_note.empty() ? "null" : jsonString(r.baseline_note));
  os << ",\"timer\":" << jsonString(r.timer);
  os << ",\"event_median_us\":" << (r.available && r.event_median_us >= 0 ? jsonNumber(r.event_median_us, 3) : "null");
  os << ",\"baseline_event_median_us\":"
     << (r.has_baseline && r.baseline_event_median_us >= 0 ? jsonNumber(r.baseline_event_median_us, 3) : "null");
  os << ",\"timer_note\":" << (r.timer_note.empty() ? "null" : jsonString(r.timer_note));
  auto metric = [&](double v) { return r.available && v >= 0 ? jsonNumber(v, 3) : std::string("null"); };
  os << ",\"common_boundary_us\":" << metric(r.metrics.common_boundary_us);
  os << ",\"fresh_p50_us\":" << metric(r.metrics.fresh_p50_us);
  os << ",\"chained_pair_period_us\":" << metric(r.metrics.chained_pair_period_us);
  os << ",\"checked\":" << (r.checked ? "true" : "false") << ",\"verified\":" << (r.verified() ? "true" : "false");
  os << ",\"wrong\":" << (r.checked && r.available ? std::to_string(r.wrong) : "null");
  os << ",\"baseline_wrong\":" << (r.checked && r.has_baseline ? std::to_string(r.baseline_wrong) : "null");
  os << ",\"baseline_verified\":" << (r.checked && r.has_baseline && r.baseline_wrong == 0 ? "true" : "false");
  os << ",\"error\":" << (r.available ? "null" : jsonString(r.error));
  os << ",\"gpu_name\":" << jsonString(r.gpu_name) << ",\"git_sha\":" << jsonString(r.git_sha) << "}";
  return os.str();
}

JsonLinesWriter::~JsonLinesWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

bool JsonLinesWriter::open(const std::string& path, std::string* error) {
  file_ = std::fopen(path.c_str(), "w");
  if (file_ == nullptr) {
    *error = "cannot open JSON output '" + path + "' for writing";
    return false;
  }
  return true;
}

void JsonLinesWriter::write(const ResultRow& row) { writeLine(toJson(row)); }

void JsonLinesWriter::writeLine(const std::string& json_object) {
  if (file_ == nullptr) return;
  const std::string line = json_object + "\n";
  std::fwrite(line.data(), 1, line.size(), file_);
  std::fflush(file_);
}

}  // namespace nccl_moe::perf
