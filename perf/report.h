// moe-perf output: one ResultRow per (shape, op), printed as an nccl-tests-like table and written as JSON Lines.
//
// Contract
//   - Pure formatting, no CUDA/NCCL. A row whose MoE operation is not available keeps its baseline numbers; its
//     MoE columns print "n/a" and the row ends with "not available: <error>"; in JSON median_us/logical_gbps are
//     null, "available" is false and "error" holds the text.
//   - JSON Lines: one object per line, flushed after each row, file truncated when opened (docs/moe-perf.md has
//     the schema). `verified` is true only when the row was checked, the MoE operation ran and #wrong == 0.
//   - `timer` says what median_us/min_us/max_us and baseline_median_us measure ("kernel": CUPTI kernel spans,
//     "event": CUDA events, "host": CPU mode); event_median_us / baseline_event_median_us are the CUDA-event medians
//     of the same calls (GPU rows), so both timers are in every GPU row. A row that the kernel timer should have
//     timed but could not carries the reason in timer_note (table: "[event-timed: ...]").
//   - Comparable metrics (--metrics, metrics.h): JSON always has common_boundary_us, fresh_p50_us and
//     chained_pair_period_us (null where not measured, and on rows whose MoE op is not available); the table has
//     their columns only when they are selected.
//   - Honest labels: `ranks` is the rank count and `gpus` the distinct GPUs they used (0 in CPU mode); ranks that
//     share a GPU set `shared_gpu` (table: "[shared GPU: correctness only]"), and a row whose baseline could not run
//     says why in baseline_note (table: "baseline: n/a (<note>)", JSON baseline fields null). A row of one rank
//     moved nothing between GPUs (table: "[1 rank: everything local]").
//   - Several nodes (nodes > 1, --ranks-per-node): JSON rdma_bytes_per_rank / nvl_bytes_per_rank (null with one
//     node); the table line ends with "[N nodes: RDMA x MB, NVLink y MB per rank]". One node: output unchanged.
//   - A multi-node communicator (internode LL on virtual nodes, perf/transport.h): `software_nic` rows carry JSON
//     transport "software_nic", software_nic true and label "software NIC — correctness/functional timing, not
//     performance" (the transport mode's label), and the table line ends with "[<that label>]". Rows of a one-node
//     communicator have none of these keys (output unchanged).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "metrics.h"
#include "options.h"

namespace nccl_moe::perf {

struct ResultRow {
  std::string backend = "gpu";  // "gpu" | "cpu"
  Mode mode = Mode::kHt;
  std::string op;  // dispatch | combine | notify_dispatch | dispatch_send | dispatch_recv | ...
  DType dtype = DType::kBf16;
  int ranks = 0;
  int gpus = 0;             // distinct GPUs the ranks used (0 in CPU mode)
  bool shared_gpu = false;  // ranks shared GPUs (--ranks-per-gpu > 1): a correctness run, not NVLink timings
  int sms = 0;              // requested SM budget, 0 = library default ("auto")
  int64_t tokens = 0;
  int hidden = 0, topk = 0, experts = 0;
  std::string routing = "uniform";
  uint64_t seed = 1;
  int iters = 0, warmup = 0;

  bool available = false;           // the MoE operation ran
  std::string error;                // why not (when !available)
  double median_us = 0;             // max over ranks of the per-rank median
  double min_us = 0, max_us = 0;    // fastest / slowest single timed call over all ranks
  double bytes_per_rank = 0;        // logical bytes, averaged over ranks
  int nodes = 1;                    // nodes of the layout (--ranks-per-node; 1 = single node)
  double rdma_bytes_per_rank = -1;  // nodes > 1: RDMA bytes of the internode path, averaged over ranks (link_bytes.h);
  double nvl_bytes_per_rank = -1;   // and its NVLink bytes. < 0 (JSON null) when nodes == 1
  bool has_gbps = true;             // false for rows where bandwidth means nothing (send/recv halves)
  bool software_nic = false;        // the communicator spans several nodes, reached through the software NIC: a
                                    // correctness run (JSON transport/software_nic/label, table label)

  bool has_baseline = false;
  double baseline_median_us = 0;
  std::string baseline_note;  // why an op that has a baseline shows none ("" = it has one, or the op has none)

  std::string timer = "event";           // "kernel" | "event" (GPU), "host" (CPU mode)
  double event_median_us = -1;           // CUDA-event median of the MoE calls; < 0 = none (null in JSON)
  double baseline_event_median_us = -1;  // the same for the baseline
  std::string timer_note;                // why a kernel-timed row fell back to events ("" = it did not)
  ReducedMetrics metrics;                // --metrics (CUDA events); < 0 = not measured (null in JSON)

  bool checked = false;
  int64_t wrong = 0;           // MoE elements that differ from the reference
  int64_t baseline_wrong = 0;  // baseline elements that differ from the reference

  std::string gpu_name;
  std::string git_sha = "unknown";

  double logicalGbps() const { return has_gbps && available ? gbps(bytes_per_rank, median_us) : 0.0; }
  double baselineGbps() const { return has_baseline && has_gbps ? gbps(bytes_per_rank, baseline_median_us) : 0.0; }
  bool verified() const { return checked && available && wrong == 0; }
};

// "#  tokens  hidden ..." column titles, one line ending with '\n'. `metrics`: the selected comparable metrics get a
// column each after bl#wrong (none by default, so the default table is unchanged).
std::string tableHeader(const MetricsChoice& metrics = MetricsChoice());
// One table line, ends with '\n'; the selected metrics' columns print "-" where the row has no value.
std::string tableRow(const ResultRow& row, const MetricsChoice& metrics = MetricsChoice());
// One JSON object, no trailing newline.
std::string toJson(const ResultRow& row);
// JSON string literal of `text` (quotes included, control characters escaped).
std::string jsonString(const std::string& text);

class JsonLinesWriter {
 public:
  JsonLinesWriter() = default;
  ~JsonLinesWriter();
  JsonLinesWriter(const JsonLinesWriter&) = delete;
  JsonLinesWriter& operator=(const JsonLinesWriter&) = delete;
  // Truncates/creates `path`. False (with *error) when it cannot be opened.
  bool open(const std::string& path, std::string* error);
  bool isOpen() const { return file_ != nullptr; }
  void write(const ResultRow& row);
  // One JSON object (no newline) as its own line: rows of other shapes (the transport mode's, perf/transport.h).
  void writeLine(const std::string& json_object);

 private:
  std::FILE* file_ = nullptr;
};

}  // namespace nccl_moe::perf
