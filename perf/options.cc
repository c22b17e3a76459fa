// moe-perf command line parsing, defaults and byte accounting (contract in options.h).
#include "options.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <sstream>

namespace nccl_moe::perf {

const char* modeName(Mode mode) { return mode == Mode::kHt ? "ht" : "ll"; }
const char* dtypeName(DType dtype) { return dtype == DType::kBf16 ? "bf16" : "fp8"; }
const char* timerName(TimerChoice timer) {
  return timer == TimerChoice::kKernel ? "kernel" : timer == TimerChoice::kEvent ? "event" : "auto";
}

namespace {

std::vector<std::string> splitList(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : text) {
    if (c == sep) {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  return parts;
}

bool parseDouble(const std::string& text, double* out) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (errno != 0 || end == nullptr || *end != '\0' || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

bool parseInt(const std::string& text, int64_t lo, int64_t hi, int64_t* out) {
  int64_t v = 0;
  if (!parseCount(text, &v) || v < lo || v > hi) return false;
  *out = v;
  return true;
}

}  // namespace

bool parseCount(const std::string& text, int64_t* out) {
  if (text.empty()) return false;
  int64_t mult = 1;
  std::string digits = text;
  const char last = text.back();
  if (last == 'K' || last == 'k') mult = 1024;
  if (last == 'M' || last == 'm') mult = 1024 * 1024;
  if (mult != 1) digits.pop_back();
  if (digits.empty()) return false;
  for (char c : digits)
    if (c < '0' || c > '9') return false;
  if (digits.size() > 12) return false;
  *out = std::stoll(digits) * mult;
  return true;
}

bool parseMetrics(const std::string& text, MetricsChoice* out, std::string* error) {
  MetricsChoice m;
  for (const std::string& item : splitList(text, ',')) {
    if (item == "default") {
      m = MetricsChoice();
    } else if (item == "extra" || item == "all") {
      m.boundary = m.fresh = m.chained = true;
    } else if (item == "boundary") {
      m.boundary = true;
    } else if (item == "fresh") {
      m.fresh = true;
    } else if (item == "chained") {
      m.chained = true;
    } else {
      *error = "--metrics: expected default, extra or a comma list of boundary, fresh, chained (got '" + text + "')";
      return false;
    }
  }
  *out = m;
  return true;
}

std::string metricsText(const MetricsChoice& m) {
  std::string text;
  if (m.boundary) text += ",boundary";
  if (m.fresh) text += ",fresh";
  if (m.chained) text += ",chained";
  return text.empty() ? "default" : text.substr(1);
}

bool parseRouting(const std::string& text, RoutingChoice* out, std::string* error) {
  RoutingChoice r;
  std::string canonical;
  for (const std::string& part : splitList(text, ',')) {
    const size_t colon = part.find(':');
    const std::string key = part.substr(0, colon);
    const std::string value = colon == std::string::npos ? "" : part.substr(colon + 1);
    if (key == "uniform" && colon == std::string::npos) {
      // Nothing to change; uniform is the default.
    } else if (key == "skewed") {
      double v = 0;
      if (!parseDouble(value, &v) || v < 1.0) {
        *error = "--routing skewed:<ratio> needs a ratio >= 1 (got '" + part + "')";
        return false;
      }
      r.skew = v;
    } else if (key == "masked") {
      double v = 0;
      if (!parseDouble(value, &v) || v < 0.0 || v >= 1.0) {
        *error = "--routing masked:<fraction> needs a fraction in [0, 1) (got '" + part + "')";
        return false;
      }
      r.masked_fraction = v;
    } else if (key == "group") {
      int64_t g = 0;
      if (!parseInt(value, 1, 1 << 20, &g)) {
        *error = "--routing group:<g> needs a node count g >= 1 (got '" + part + "')";
        return false;
      }
      r.group_nodes = static_cast<int>(g);
    } else {
      *error = "--routing: expected uniform, skewed:<ratio>, masked:<fraction> or group:<g> (got '" + part + "')";
      return false;
    }
  }
  if (r.group_nodes > 0 && r.skew != 1.0) {
    *error = "--routing: group:<g> cannot be combined with skewed:<ratio> (group routing draws its own scores)";
    return false;
  }
  std::ostringstream os;
  if (r.group_nodes > 0) os << "group:" << r.group_nodes;
  if (r.skew != 1.0) os << "skewed:" << r.skew;
  if (r.masked_fraction != 0.0) os << (r.skew != 1.0 || r.group_nodes > 0 ? "," : "") << "masked:" << r.masked_fraction;
  canonical = os.str();
  r.text = canonical.empty() ? "uniform" : canonical;
  *out = r;
  return true;
}

namespace {

struct OptionSpec {
  char letter;       // 0 = long only
  const char* name;  // long name without "--"
  bool takes_value;
  std::function<bool(Options*, const std::string&, std::string*)> apply;
};

// Builds an apply function for an integer option in [lo, hi].
template <typename T>
std::function<bool(Options*, const std::string&, std::string*)> intOption(T Options::*field, int64_t lo, int64_t hi,
                                                                          const char* what) {
  return [field, lo, hi, what](Options* o, const std::string& v, std::string* err) {
    int64_t x = 0;
    if (!parseInt(v, lo, hi, &x)) {
      std::ostringstream os;
      os << what << ": expected an integer in [" << lo << ", " << hi << "] (got '" << v << "')";
      *err = os.str();
      return false;
    }
    o->*field = static_cast<T>(x);
    return true;
  };
}

const std::vector<OptionSpec>& optionTable() {
  static const std::vector<OptionSpec> table = {
      {'b', "min-tokens", true, intOption(&Options::min_tokens, 1, 1 << 24, "-b/--min-tokens")},
      {'e', "max-tokens", true, intOption(&Options::max_tokens, 1, 1 << 24, "-e/--max-tokens")},
      {'f', "step-factor", true,
       [](Options* o, const std::string& v, std::string* err) {
         double x = 0;
         if (!parseDouble(v, &x) || x <= 1.0) {
           *err = "-f/--step-factor: expected a number > 1 (got '" + v + "')";
           return false;
         }
         o->step_factor = x;
         return true;
       }},
      {'i', "step-tokens", true, intOption(&Options::step_tokens, 1, 1 << 24, "-i/--step-tokens")},
      {'n', "iters", true, intOption(&Options::iters, 1, 1000000, "-n/--iters")},
      {'w', "warmup-iters", true, intOption(&Options::warmup, 0, 1000000, "-w/--warmup-iters")},
      {'c', "check", true, intOption(&Options::check, 0, 1, "-c/--check")},
      {'t', "nthreads", true, intOption(&Options::threads, 1, 1024, "-t/--nthreads")},
      {'g', "ngpus", true, intOption(&Options::gpus, 1, 1024, "-g/--ngpus")},
      {'J', "json", true,
       [](Options* o, const std::string& v, std::string* err) {
         if (v.empty()) {
           *err = "-J/--json: expected a file path";
           return false;
         }
         o->json_path = v;
         return true;
       }},
      {'h', "help", false, [](Options* o, const std::string&, std::string*) { return o->help = true; }},
      {'q', "quiet", false, [](Options* o, const std::string&, std::string*) { return o->quiet = true; }},
      {0, "inject-skipped-write", false,
       [](Options* o, const std::string&, std::string*) { return o->inject_skipped_write = true; }},
      {0, "mode", true,
       [](Options* o, const std::string& v, std::string* err) {
         o->modes.clear();
         o->transport = false;
         for (const std::string& m : splitList(v, ',')) {
           if (m == "transport") {
             o->transport = true;
           } else if (m == "ht") {
             o->modes.push_back(Mode::kHt);
           } else if (m == "ll") {
             o->modes.push_back(Mode::kLl);
           } else if (m == "all") {
             o->modes = {Mode::kHt, Mode::kLl};
           } else {
             *err = "--mode: expected ht, ll, all or transport (got '" + v + "')";
             return false;
           }
         }
         if (o->transport && !o->modes.empty()) {
           *err = "--mode transport runs alone (it measures the scale-out transport, not dispatch/combine; got '" + v +
                  "')";
           return false;
         }
         return true;
       }},
      {0, "net-mode", true,
       [](Options* o, const std::string& v, std::string* err) {
         o->net_backends.clear();
         for (const std::string& m : splitList(v, ',')) {
           if (m == "ibgda") {
             o->net_backends.push_back(NetBackend::kIbgda);
           } else if (m == "proxy") {
             o->net_backends.push_back(NetBackend::kProxy);
           } else if (m == "dbproxy") {
             o->net_backends.push_back(NetBackend::kDbProxy);
           } else {
             *err = "--net-mode: expected a list of ibgda, dbproxy, proxy (got '" + v + "')";
             return false;
           }
         }
         return true;
       }},
      {0, "batch", true, intOption(&Options::batch, 1, 32, "--batch")},
      {0, "tokens", true,
       [](Options* o, const std::string& v, std::string* err) {
         int64_t x = 0;
         if (!parseInt(v, 1, 1 << 24, &x)) {
           *err = "--tokens: expected an integer in [1, 16777216] (got '" + v + "')";
           return false;
         }
         o->min_tokens = o->max_tokens = x;
         return true;
       }},
      {0, "hidden", true, intOption(&Options::hidden, 8, 1 << 20, "--hidden")},
      {0, "topk", true, intOption(&Options::topk, 1, 16, "--topk")},
      {0, "experts", true, intOption(&Options::experts, 1, 1 << 20, "--experts")},
      {0, "dtype", true,
       [](Options* o, const std::string& v, std::string* err) {
         o->dtypes.clear();
         for (const std::string& d : splitList(v, ',')) {
           if (d == "bf16") {
             o->dtypes.push_back(DType::kBf16);
           } else if (d == "fp8") {
             o->dtypes.push_back(DType::kFp8);
           } else {
             *err = "--dtype: expected bf16, fp8 or a comma list of them (got '" + v + "')";
             return false;
           }
         }
         return true;
       }},
      {0, "sms", true,
       [](Options* o, const std::string& v, std::string* err) {
         o->sms.clear();
         for (const std::string& s : splitList(v, ',')) {
           int64_t x = 0;
           if (!parseInt(s, 0, 4096, &x)) {
             *err = "--sms: expected a count >= 0 or a comma list (0 = library default) (got '" + v + "')";
             return false;
           }
           o->sms.push_back(static_cast<int>(x));
         }
         return true;
       }},
      {0, "ll-sms", true, intOption(&Options::ll_sms, 0, 4096, "--ll-sms")},
      {0, "routing", true,
       [](Options* o, const std::string& v, std::string* err) { return parseRouting(v, &o->routing, err); }},
      {0, "seed", true,
       [](Options* o, const std::string& v, std::string* err) {
         if (v.empty() || v.size() > 19 || v.find_first_not_of("0123456789") != std::string::npos) {
           *err = "--seed: expected a non-negative integer (got '" + v + "')";
           return false;
         }
         o->seed = std::stoull(v);
         return true;
       }},
      {0, "procs", true, intOption(&Options::procs, 1, 1024, "--procs")},
      {0, "ranks-per-gpu", true, intOption(&Options::ranks_per_gpu, 1, 8, "--ranks-per-gpu")},
      {0, "ranks-per-node", true, intOption(&Options::ranks_per_node, 1, 1024, "--ranks-per-node")},
      {0, "cpu", false, [](Options* o, const std::string&, std::string*) { return o->cpu = true; }},
      {0, "require-moe", false, [](Options* o, const std::string&, std::string*) { return o->require_moe = true; }},
      {0, "allow-missing-moe", false,
       [](Options* o, const std::string&, std::string*) { return !(o->require_moe = false); }},
      {0, "alignment", true, intOption(&Options::expert_alignment, 1, 1 << 20, "--alignment")},
      {0, "timeout", true, intOption(&Options::timeout_s, 0, 1 << 24, "--timeout")},
      {0, "metrics", true,
       [](Options* o, const std::string& v, std::string* err) { return parseMetrics(v, &o->metrics, err); }},
      {0, "timer", true,
       [](Options* o, const std::string& v, std::string* err) {
         if (v == "kernel") {
           o->timer = TimerChoice::kKernel;
         } else if (v == "event") {
           o->timer = TimerChoice::kEvent;
         } else if (v == "auto") {
           o->timer = TimerChoice::kAuto;
         } else {
           *err = "--timer: expected kernel, event or auto (got '" + v + "')";
           return false;
         }
         return true;
       }},
  };
  return table;
}

}  // namespace

bool parseOptions(const std::vector<std::string>& args, Options* out, std::string* error) {
  Options o;
  const auto& table = optionTable();
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    const OptionSpec* spec = nullptr;
    std::string value;
    bool has_inline_value = false;
    if (arg.size() > 2 && arg[0] == '-' && arg[1] == '-') {
      std::string name = arg.substr(2);
      const size_t eq = name.find('=');
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_inline_value = true;
      }
      for (const auto& s : table)
        if (name == s.name) spec = &s;
      if (spec == nullptr) {
        *error = "unknown option '" + arg + "' (see --help)";
        return false;
      }
    } else if (arg.size() >= 2 && arg[0] == '-' && arg[1] != '-') {
      for (const auto& s : table)
        if (s.letter != 0 && arg[1] == s.letter) spec = &s;
      if (spec == nullptr) {
        *error = "unknown option '" + arg + "' (see --help)";
        return false;
      }
      if (arg.size() > 2) {
        value = arg.substr(2);
        has_inline_value = true;
      }
    } else {
      *error = "unexpected argument '" + arg + "' (see --help)";
      return false;
    }
    if (spec->takes_value && !has_inline_value) {
      if (i + 1 >= args.size()) {
        *error = "option '" + arg + "' needs a value";
        return false;
      }
      value = args[++i];
    } else if (!spec->takes_value && has_inline_value) {
      *error = "option '" + arg + "' takes no value";
      return false;
    }
    if (!spec->apply(&o, value, error)) return false;
  }
  if (o.min_tokens > 0 && o.max_tokens > 0 && o.max_tokens < o.min_tokens) {
    *error = "-e/--max-tokens must be >= -b/--min-tokens";
    return false;
  }
  if (!o.transport && (!o.net_backends.empty() || o.batch > 0)) {
    *error = "--net-mode and --batch belong to --mode transport";
    return false;
  }
  if (o.ranks_per_gpu > 1 && o.procs > 0) {
    *error =
        "--ranks-per-gpu runs every rank in one process (ranks sharing a GPU have no NCCL communicator): it "
        "cannot be combined with --procs";
    return false;
  }
  *out = o;
  return true;
}

std::string usageText() {
  return R"(usage: moe-perf [options]
Benchmarks NCCL-MoE dispatch/combine against an NCCL all-to-all baseline of the same routing (nccl-tests style).
Ranks = processes x threads (-t) x GPUs per thread (-g); every GPU is driven by its own host thread.

Sizes (tokens per rank)
  -b, --min-tokens N      smallest token count of the sweep        (default: mode default)
  -e, --max-tokens N      largest token count                     (default: = -b)
  -f, --step-factor F     multiply by F between sizes             (default 2)
  -i, --step-tokens N     add N between sizes instead of -f
      --tokens N          one size: -b N -e N
      --hidden H          hidden size (elements)                  (HT 7168, LL 7168)
      --topk K            experts per token, 1..16                (HT 8, LL 8)
      --experts E         total experts, E % ranks == 0           (HT 256, LL 288)
      --dtype D[,D]       bf16 | fp8 | bf16,fp8                   (HT bf16, LL fp8)
      --sms N[,N]         HT SM budget(s), 0 = library default    (default 0)
      --ll-sms N          LL SM budget (config.ll_num_sms): fewer than the rank's SMs runs LL as send and
                          receive kernels that leave the rest to other work; 0 = all of them (default 0)
      --routing R         uniform | skewed:<ratio> | masked:<fraction> | group:<g>, joinable with ','
                          (group:<g>: each token's experts within at most g nodes; needs --ranks-per-node)
      --seed S            routing/data seed, equal on every rank  (default 1)
      --alignment A       HT per-expert receive alignment         (default 1)
Modes
      --mode M            ht | ll | all | transport               (default all; defaults HT 4096 tokens, LL 128)
Transport mode (--mode transport; NCCL_MOE_NET=emulated): put and put_signal between two virtual nodes on GPU 0,
latency and a stream of --batch messages, every payload checked by the receiver after its signal. The NIC is the
SOFTWARE NIC (a CPU thread executing the WQE bytes): correctness/functional timing, not performance.
  -b, -e, -f, -i          message bytes instead of tokens           (default 8 .. 4M, x2)
      --net-mode B[,B]    ibgda | dbproxy | proxy, or a list        (default all three)
      --batch N           messages in flight in the stream loop, 1..32 (default 8)
Runs
  -n, --iters N           timed iterations (median reported)     (GPU 20, CPU 3)
  -w, --warmup-iters N    untimed warm-up iterations             (GPU 5, CPU 1)
  -c, --check 0|1         verify against the CPU reference        (default 1)
  -t, --nthreads N        threads per process                     (default 1)
  -g, --ngpus N           GPUs (ranks) per thread (each still gets its own thread)
                          (default: all visible GPUs in a single process, 1 with --procs/MPI; CPU mode: 2 ranks;
                          with --ranks-per-gpu N: N / -t, i.e. N ranks on one GPU)
      --ranks-per-gpu N   N ranks share each GPU (1..8; default 1): one process, rank i on GPU i / N, its kernels
                          get SMs/N; no NCCL (no baseline). A CORRECTNESS run: timings say nothing about NVLink.
                          Not with --procs/MPI. Sets CUDA_DEVICE_MAX_CONNECTIONS=32 and CUDA_MODULE_LOADING=EAGER unless already set.
      --ranks-per-node N  node layout of the ranks: rank r on node r / N (N must divide the rank count; default:
                          every rank on one node). Used by --routing group:<g> and for the RDMA/NVLink bytes
                          per rank (JSON nodes, rdma_bytes_per_rank, nvl_bytes_per_rank). It changes no kernel:
                          the bytes are what the internode path would move for this routing. A communicator split
                          into virtual nodes (NCCL_MOE_NET=emulated NCCL_MOE_EMULATE_NODES=n with --ranks-per-gpu)
                          brings its own layout: LL runs internode over the SOFTWARE NIC (correctness/functional
                          timing, not performance), HT too; a --ranks-per-node that disagrees is refused.
      --procs N           spawn N processes (one rank group each), rendezvous via NCCL_COMM_ID=127.0.0.1:<port>
      --cpu               run the CPU reference even when GPUs are present
      --require-moe       fail the run when an MoE operation is not available (the default)
      --allow-missing-moe report unavailable MoE operations as n/a without failing the run
      --timeout S         abort when no progress for S seconds (default 600, 0 = never)
      --timer T           kernel | event | auto: how GPU calls are timed (default auto = kernel when CUPTI works,
                          else event; ignored in CPU mode). kernel = CUPTI kernel records, first kernel start to
                          last kernel end of each call (as DeepEP's kineto-based tests measure); event = CUDA events
                          around each call (includes the launch gap). JSON rows carry both medians.
      --metrics M[,M]     comparable metrics besides the default median (GPU, HT/LL dispatch and combine):
                          boundary (common-boundary time), fresh (fresh-entry p50), chained (chained pair
                          period), extra = all three, default = none (the default). JSON keys common_boundary_us,
                          fresh_p50_us, chained_pair_period_us (null when not measured); extra table columns.
  -J, --json PATH         write one JSON object per result row (JSON Lines)
  -q, --quiet             no progress lines on stderr (by default, once a run has taken 3 s, global rank 0
                          prints where it is at most every 2 s: mode, dtype, tokens, phase, call k/n, elapsed time)
      --inject-skipped-write
                          verification self-test (GPU): after each verified dispatch and combine, one row the
                          call wrote is set back to the marker, as if the kernel had skipped it; those ops must
                          then report wrong rows and the run fails (outputs are filled with a marker before every
                          verified call, so a write a kernel skips is never hidden by an earlier result)
  -h, --help              this text
Under mpirun (OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/PMI_SIZE) each process is one rank group; set
NCCL_COMM_ID=<host of rank 0>:<port> for the rendezvous (see docs/moe-perf.md).
)";
}

ModeDefaults modeDefaults(Mode mode) {
  if (mode == Mode::kHt) return ModeDefaults{4096, 7168, 8, 256, DType::kBf16};
  return ModeDefaults{128, 7168, 8, 288, DType::kFp8};
}

std::vector<int64_t> tokenSweep(int64_t min_tokens, int64_t max_tokens, double factor, int64_t step) {
  std::vector<int64_t> sizes;
  if (min_tokens <= 0) return sizes;
  if (max_tokens < min_tokens) max_tokens = min_tokens;
  int64_t t = min_tokens;
  while (t <= max_tokens) {
    sizes.push_back(t);
    int64_t next = step > 0 ? t + step : static_cast<int64_t>(std::floor(static_cast<double>(t) * factor));
    if (next <= t) next = t + 1;
    t = next;
  }
  return sizes;
}

ModeConfig resolveMode(const Options& options, Mode mode) {
  const ModeDefaults d = modeDefaults(mode);
  ModeConfig c;
  c.mode = mode;
  const int64_t lo = options.min_tokens > 0 ? options.min_tokens : d.tokens;
  const int64_t hi = options.max_tokens > 0 ? options.max_tokens : lo;
  c.tokens = tokenSweep(lo, hi, options.step_factor, options.step_tokens);
  c.hidden = options.hidden > 0 ? options.hidden : d.hidden;
  c.topk = options.topk > 0 ? options.topk : d.topk;
  c.experts = options.experts > 0 ? options.experts : d.experts;
  c.dtypes = options.dtypes.empty() ? std::vector<DType>{d.dtype} : options.dtypes;
  c.sms = mode == Mode::kHt ? options.sms : std::vector<int>{options.ll_sms};
  if (c.sms.empty()) c.sms = {0};
  return c;
}

std::vector<Mode> resolveModes(const Options& options) {
  return options.modes.empty() ? std::vector<Mode>{Mode::kHt, Mode::kLl} : options.modes;
}

std::string checkSharedGpuSms(const std::vector<int>& sms, int device_sms, int ranks_per_gpu) {
  if (ranks_per_gpu <= 1) return "";
  const int budget = device_sms / ranks_per_gpu;
  for (int v : sms) {
    if (v <= budget) continue;
    std::ostringstream os;
    os << "--sms " << v << ": " << ranks_per_gpu << " ranks share each GPU of " << device_sms
       << " SMs, so an HT call of one rank may use at most " << budget << " SMs (SMs / ranks per GPU); use --sms 0 "
       << "(the library's default share) or a value <= " << budget;
    return os.str();
  }
  return "";
}

std::string checkShape(const ModeConfig& c, DType dtype, int num_ranks) {
  std::ostringstream os;
  if (num_ranks < 1) {
    os << "need at least one rank";
  } else if (c.experts % num_ranks != 0 || c.experts < num_ranks) {
    os << "--experts " << c.experts << " must be a multiple of the rank count " << num_ranks;
  } else if (c.topk < 1 || c.topk > 16 || c.topk > c.experts) {
    os << "--topk " << c.topk << " must be in 1..min(16, experts)";
  } else if (c.hidden % 8 != 0) {
    os << "--hidden " << c.hidden << " must be a multiple of 8 (16-byte bf16 rows)";
  } else if (dtype == DType::kFp8 && c.mode == Mode::kHt && c.hidden % 16 != 0) {
    os << "--hidden " << c.hidden << " must be a multiple of 16 for HT fp8";
  } else if (dtype == DType::kFp8 && c.mode == Mode::kLl && c.hidden % 128 != 0) {
    os << "--hidden " << c.hidden << " must be a multiple of 128 for LL fp8";
  } else if (c.mode == Mode::kLl && c.hidden % 128 != 0) {
    os << "--hidden " << c.hidden << " must be a multiple of 128 in LL mode";
  }
  return os.str();
}

int numNodes(int num_ranks, int ranks_per_node) {
  return ranks_per_node > 0 && num_ranks % ranks_per_node == 0 ? num_ranks / ranks_per_node : 1;
}

std::string checkNodes(const RoutingChoice& routing, int ranks_per_node, const ModeConfig& c, int num_ranks) {
  std::ostringstream os;
  if (ranks_per_node > 0 && (num_ranks < 1 || num_ranks % ranks_per_node != 0)) {
    os << "--ranks-per-node " << ranks_per_node << " must divide the rank count " << num_ranks;
    return os.str();
  }
  const int g = routing.group_nodes;
  if (g == 0) return "";
  if (ranks_per_node == 0) {
    os << "--routing group:" << g << " needs a node count: give --ranks-per-node N (rank r on node r / N)";
    return os.str();
  }
  const int nodes = num_ranks / ranks_per_node;
  if (g > nodes) {
    os << "--routing group:" << g << ": g must be in [1, nodes] = [1, " << nodes << "] (" << num_ranks
       << " ranks / --ranks-per-node " << ranks_per_node << ")";
  } else if (c.experts % num_ranks == 0 && static_cast<int64_t>(g) * (c.experts / nodes) < c.topk) {
    os << "--routing group:" << g << ": " << g << " node(s) of " << c.experts / nodes << " experts cannot hold --topk "
       << c.topk << " distinct experts";
  }
  return os.str();
}

double htDispatchBytes(int64_t num_recv, int hidden, DType dtype) {
  const double rows = static_cast<double>(num_recv), h = hidden;
  return dtype == DType::kBf16 ? rows * h * 2.0 : rows * h * (1.0 + 4.0 / 128.0);
}
double htCombineBytes(int64_t num_recv, int hidden) { return static_cast<double>(num_recv) * hidden * 2.0; }
double llDispatchBytes(int64_t num_selections, int hidden, DType dtype) {
  const double s = static_cast<double>(num_selections);
  if (dtype == DType::kBf16) return s * hidden * 2.0;
  return s * (static_cast<double>(hidden) + static_cast<double>(hidden / 128) * 4.0 + 16.0);
}
double llCombineBytes(int64_t num_selections, int hidden) { return static_cast<double>(num_selections) * hidden * 2.0; }
double gbps(double bytes, double us) { return us > 0 ? bytes / us / 1e3 : 0.0; }

}  // namespace nccl_moe::perf
