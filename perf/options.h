// moe-perf command line and byte accounting: pure functions, no CUDA, no NCCL (unit-tested on the CPU).
//
// Contract
//   - parseOptions() accepts nccl-tests letters where they mean the same thing (-b/-e/-f/-i token sweep,
//     -n iterations, -w warm-up, -c check, -t threads per process, -g GPUs per thread, -J JSON path) plus
//     the MoE long options (--mode, --tokens, --hidden, --topk, --experts, --dtype, --sms, --routing, --seed,
//     --procs, --cpu, --timer, --metrics, -q, ...). --mode transport (alone) selects the transport mode
//     (perf/transport.h), where -b/-e/-i are message bytes and --net-mode / --batch apply. "-b 4096", "-b4096",
//     "--tokens 4096" and "--tokens=4096" are all accepted; token counts take a K suffix (x1024). Errors come back as
//     text, never exit().
//   - Values the user did not give stay "unset" (-1 / empty) so each backend and each mode can apply its own
//     default (resolveMode()). Nothing here knows how many ranks there are; rank-dependent checks
//     (experts % ranks) happen where the rank count is known (checkShape()).
//   - Byte accounting follows docs/moe-perf.md and the project's performance rules ("How performance is reported"):
//       HT dispatch  N_recv * H * 2              (bf16)
//                    N_recv * H * (1 + 4/128)    (fp8 e4m3 + one float scale per 128 channels)
//       HT combine   N_recv * H * 2              (always bf16)
//       LL dispatch  S * (H + H/128*4 + 16)      (fp8: data + float scales + 16-byte header per row)
//                    S * H * 2                   (bf16)
//       LL combine   S * H * 2
//     N_recv = rows this rank receives in a HT dispatch (its own tokens included), S = valid (token, expert)
//     selections of this rank's tokens (no deduplication).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe::perf {

enum class Mode : int { kHt = 0, kLl = 1 };
enum class DType : int { kBf16 = 0, kFp8 = 1 };
// --net-mode (transport mode): how the GPU reaches the NIC. kIbgda: the GPU writes WQEs and rings the doorbell
// (src/transport/rdma/ibgda/); kProxy: the GPU writes 64-byte requests that a CPU thread posts
// (src/transport/rdma/proxy/); kDbProxy: the GPU writes WQEs and rings a mailbox a CPU thread forwards to the
// doorbell (src/transport/rdma/dbproxy/). The names are NCCL_MOE_NET_MODE's.
enum class NetBackend : int { kIbgda = 0, kProxy = 1, kDbProxy = 2 };

// --timer: how GPU calls are timed (docs/moe-perf.md, "Timers"). kAuto = kernel when the CUPTI kernel timer works,
// else event. CPU mode ignores it.
enum class TimerChoice : int { kAuto = 0, kKernel = 1, kEvent = 2 };

// --metrics: the comparable metrics measured besides the default median (docs/moe-perf.md, "Comparable metrics").
// GPU backend, HT and LL dispatch/combine only; every other row, and CPU mode, reports them as null.
struct MetricsChoice {
  bool boundary = false;  // common-boundary time: host-synchronised entry, event pair around the call, slowest rank
  bool fresh = false;     // fresh-entry p50: drained + barrier before every call, median over calls of the slowest
  bool chained = false;   // chained pair period: N dispatch+combine pairs back to back after one barrier, total / N
  bool any() const { return boundary || fresh || chained; }
};
// "default" | "extra" (all three) | a comma list of boundary, fresh, chained; items accumulate ("default" clears).
bool parseMetrics(const std::string& text, MetricsChoice* out, std::string* error);
// Canonical spelling: "default" or the selected names in the order boundary,fresh,chained.
std::string metricsText(const MetricsChoice& metrics);

const char* modeName(Mode mode);           // "ht" | "ll"
const char* dtypeName(DType dtype);        // "bf16" | "fp8"
const char* timerName(TimerChoice timer);  // "auto" | "kernel" | "event"

// --routing uniform | skewed:<ratio> | masked:<fraction> | group:<g>, components may be joined by ','
// ("skewed:2,masked:0.1", "group:4,masked:0.1"). group:<g> (each token's experts within at most g nodes, nodes
// chosen as DeepEP's internode tests choose them) needs a node count (--ranks-per-node) and excludes skewed; the
// checks that need the rank count are in checkNodes().
struct RoutingChoice {
  double skew = 1.0;             // >= 1: an expert on rank r is picked with weight skew^-r (1 = uniform)
  double masked_fraction = 0.0;  // [0, 1): probability that a top-k slot is -1
  int group_nodes = 0;           // > 0: group-limited routing to at most this many nodes; 0 = unconstrained
  std::string text = "uniform";  // canonical spelling, echoed in the output and JSON
};
bool parseRouting(const std::string& text, RoutingChoice* out, std::string* error);

struct Options {
  std::vector<Mode> modes;  // --mode; empty = {ht, ll}
  bool transport = false;   // --mode transport: put/put_signal over the software NIC (perf/transport.h); then
                            // modes is empty and -b/-e/-i are message bytes
  std::vector<NetBackend> net_backends;  // --net-mode ibgda,dbproxy,proxy (transport mode); empty = all three
  int batch = -1;                        // --batch N: messages in flight in the transport stream loop; -1 = 8
  int64_t min_tokens = -1;               // -b; -1 = mode default
  int64_t max_tokens = -1;               // -e; -1 = min_tokens
  double step_factor = 2.0;              // -f (used when step_tokens == 0)
  int64_t step_tokens = 0;               // -i: additive step; 0 = multiply by step_factor
  int hidden = -1;                       // --hidden; -1 = mode default
  int topk = -1;                         // --topk
  int experts = -1;                      // --experts
  std::vector<DType> dtypes;             // --dtype (comma list); empty = mode default
  std::vector<int> sms = {0};            // --sms (comma list); 0 = the library's default
  int ll_sms = 0;                        // --ll-sms N: LL SM budget (config.ll_num_sms); 0 = the library's default
  RoutingChoice routing;                 // --routing
  uint64_t seed = 1;                     // --seed
  int iters = -1;                        // -n; -1 = backend default
  int warmup = -1;                       // -w; -1 = backend default
  int check = 1;                         // -c 0|1
  int threads = -1;                      // -t threads per process; -1 = default
  int gpus = -1;                         // -g GPUs (ranks) per thread; -1 = default
  int ranks_per_gpu = 1;     // --ranks-per-gpu N: N ranks share each GPU (one process, no NCCL; correctness only)
  int ranks_per_node = 0;    // --ranks-per-node N: rank r on node r / N (group routing, RDMA/NVLink bytes);
                             // 0 = not given: every rank on one node
  int procs = 0;             // --procs N: spawn N processes; 0 = not given
  bool cpu = false;          // --cpu
  std::string json_path;     // -J / --json
  bool require_moe = true;   // MoE rows that are not available fail the run (--allow-missing-moe: they don't)
  int expert_alignment = 1;  // --alignment: per-expert receive counts rounded up to this (HT)
  int timeout_s = 600;       // --timeout: watchdog, seconds without progress before aborting
  bool help = false;         // -h / --help
  bool quiet = false;        // -q / --quiet: no progress lines on stderr
  bool inject_skipped_write = false;  // --inject-skipped-write: verification self-test (docs/moe-perf.md)
  // --timer kernel|event|auto (auto: kernel when the CUPTI kernel timer works)
  TimerChoice timer = TimerChoice::kAuto;
  MetricsChoice metrics;  // --metrics: comparable metrics besides the default (none by default)
};

// Parses argv[1..argc-1]. Returns false with *error set on unknown options, missing or malformed values and
// values out of range.
bool parseOptions(const std::vector<std::string>& args, Options* out, std::string* error);
std::string usageText();

// The shape of one mode after defaults are applied.
struct ModeDefaults {
  int tokens, hidden, topk, experts;
  DType dtype;
};
ModeDefaults modeDefaults(Mode mode);  // HT 4096/7168/8/256 bf16, LL 128/7168/8/288 fp8

struct ModeConfig {
  Mode mode = Mode::kHt;
  std::vector<int64_t> tokens;  // the sweep, ascending
  int hidden = 0, topk = 0, experts = 0;
  std::vector<DType> dtypes;
  std::vector<int> sms;  // HT: the --sms list; LL: {--ll-sms} (a communicator's budget, 0 = all of the rank's SMs)
};
ModeConfig resolveMode(const Options& options, Mode mode);
std::vector<Mode> resolveModes(const Options& options);

// Token sweep like nccl-tests' size sweep: min, then x factor (or + step) while <= max. Always contains min;
// contains max when the steps land on it.
std::vector<int64_t> tokenSweep(int64_t min_tokens, int64_t max_tokens, double factor, int64_t step);

// Ranks sharing a GPU split its SMs: each rank's HT calls may use at most device_sms / ranks_per_gpu SMs. Returns ""
// when every --sms value fits (0 = the library's default always does), else the reason.
std::string checkSharedGpuSms(const std::vector<int>& sms, int device_sms, int ranks_per_gpu);

// Checks a resolved shape against a rank count: E % R == 0, E >= R, K <= E, K <= 16, H % 8 == 0 (bf16),
// H % 16 == 0 (HT fp8), H % 128 == 0 (LL fp8). Returns "" when fine, else the reason.
std::string checkShape(const ModeConfig& config, DType dtype, int num_ranks);

// Nodes of a run: num_ranks / ranks_per_node, or 1 when ranks_per_node is 0 (not given). Call after checkNodes().
int numNodes(int num_ranks, int ranks_per_node);
// Checks the node layout and group routing against a rank count and shape: --ranks-per-node must divide the rank
// count; group:<g> needs --ranks-per-node, g in [1, nodes] and g * (experts per node) >= topk. "" when fine.
std::string checkNodes(const RoutingChoice& routing, int ranks_per_node, const ModeConfig& config, int num_ranks);

// Logical bytes (see the contract at the top of this file).
double htDispatchBytes(int64_t num_recv, int hidden, DType dtype);
double htCombineBytes(int64_t num_recv, int hidden);
double llDispatchBytes(int64_t num_selections, int hidden, DType dtype);
double llCombineBytes(int64_t num_selections, int hidden);
// GB/s (1e9 bytes per second) for `bytes` moved in `us` microseconds; 0 when us <= 0.
double gbps(double bytes, double us);

// Parses "4096", "4K" (x1024), "2M" (x1024^2). False on anything else or a negative value.
bool parseCount(const std::string& text, int64_t* out);

}  // namespace nccl_moe::perf
