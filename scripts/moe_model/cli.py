"""Command line of scripts/moe-model: Markdown tables and JSON of the scale-out model."""

import argparse
import json
import os
import sys

from . import predict, rates

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROWS = os.path.join(os.path.dirname(HERE), "perf", "results")
# The newest LL kernels with committed 4-GPU split-half rows (docs/performance.md, section of git 3893034).
DEFAULT_LL_GIT = "3893034"

DESCRIPTION = """Analytic model of internode HT and LL dispatch/combine at EP16/32/64 (2, 4, 8 nodes of 8 H200, one
400 Gb/s ConnectX-7 per GPU), from the bytes each link moves and the intranode NVLink rates measured in committed
moe-perf rows, next to DeepEP's published H800 figures. A PREDICTION, NOT A MEASUREMENT."""

EXAMPLES = """examples:
  scripts/moe-model --markdown                       # the tables of docs/performance.md
  scripts/moe-model --json -                         # everything as JSON
  scripts/moe-model --set nic_efficiency=0.95        # another assumption
  scripts/moe-model --nvl-dispatch-gbps 200 --rows perf/results/2026-11-28_h200x4_ll_3893034.jsonl
"""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="moe-model", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=[DEFAULT_ROWS], metavar="PATH",
                   help="moe-perf JSON Lines files or directories with the measured intranode rows "
                        "(default: perf/results)")
    p.add_argument("--ll-git", default=DEFAULT_LL_GIT, metavar="SHA",
                   help="git sha of the LL rows whose split halves are fitted (default %(default)s)")
    p.add_argument("--nvl-dispatch-gbps", type=float, metavar="GB/s",
                   help="HT forwarding NVLink rate per GPU for FP8 dispatch records, instead of the rows")
    p.add_argument("--nvl-combine-gbps", type=float, metavar="GB/s",
                   help="HT NVLink rate per GPU for BF16 combine rows, instead of the rows")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a model parameter (names: the Parameters table)")
    p.add_argument("--markdown", action="store_true", help="print the Markdown tables (the default output)")
    p.add_argument("--json", metavar="FILE|-", help="write the whole result as JSON (- = stdout)")
    return p.parse_args(argv)


def parameters(overrides):
    prm = {k: v[0] for k, v in predict.PARAMS.items()}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in prm:
            raise ValueError("--set %s: expected NAME=VALUE with NAME one of %s" % (item, ", ".join(prm)))
        prm[name] = type(prm[name])(float(value)) if isinstance(prm[name], int) else float(value)
    return prm


def fmt(x, digits=0):
    return "%.*f" % (digits, x)


def markdown(result):
    out = []
    w = out.append
    w("**Model, not measurement.** `scripts/moe-model`; inputs: %s." % result["inputs_text"])
    w("")
    w("HT (%d tokens/rank, hidden %d, top-%d of %d, group-limited to %d nodes; FP8 dispatch, BF16 combine). "
      "GB/s in DeepEP's \"RDMA bandwidth\": (token, destination node) pairs, own node included, x hidden x (1 + "
      "4/128) for FP8 or x 2 for BF16, over the time of one call; per rank." % (
          result["params"]["ht_tokens"], result["params"]["hidden"], result["params"]["topk"],
          result["params"]["experts"], result["params"]["group_nodes"]))
    w("")
    w("| EP | op | nodes/token (remote) | RDMA MB | NVLink MB | NIC µs | NVLink µs | fixed µs | model µs | bound "
      "| model GB/s | DeepEP H800 GB/s | target | met |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in result["ht"]:
        st = c["routing"]
        w("| %d | %s | %.2f (%.2f) | %.1f | %.1f | %s | %s | %s | %s | %s (NIC/NVL %.2f) | **%.1f** | %.0f | %s "
          "(%.1f) | %s |" % (
              c["ep"], c["op"], st["nodes_all"], st["nodes_remote"], c["rdma_bytes"] / 1e6, c["nvl_bytes"] / 1e6,
              fmt(c["t_nic_us"]), fmt(c["t_nvl_us"]), fmt(c["fixed_us"]), fmt(c["time_us"]), c["bound"],
              c["nic_over_nvl"], c["deepep_metric_gbps"], c["deepep_gbps"], c["target"], c["target_gbps"],
              "yes" if c["met"] else "**no**"))
    w("")
    w("Stretch: FP8 (e4m3, per-128 float scales) combine partials over RDMA, BF16 on NVLink "
      "(GB/s: the same BF16-logical numerator as DeepEP's combine metric):")
    w("")
    w("| EP | RDMA MB | NIC µs | NVLink µs | model µs | bound | model GB/s | vs BF16 combine |")
    w("|---|---|---|---|---|---|---|---|")
    bf16 = {c["ep"]: c for c in result["ht"] if c["op"] == "combine"}
    for c in result["ht_fp8_combine"]:
        w("| %d | %.1f | %s | %s | %s | %s | **%.1f** | %.2fx |" % (
            c["ep"], c["rdma_bytes"] / 1e6, fmt(c["t_nic_us"]), fmt(c["t_nvl_us"]), fmt(c["time_us"]), c["bound"],
            c["deepep_metric_gbps"], c["deepep_metric_gbps"] / bf16[c["ep"]]["deepep_metric_gbps"]))
    w("")
    p = result["params"]
    w("LL (%d tokens/rank, hidden %d, top-%d of %d, uniform; FP8 dispatch, BF16 combine; one message per (token, "
      "destination rank), send and receive halves); µs per call:" % (
          p["ll_tokens"], p["hidden"], p["topk"], p["experts"]))
    w("")
    w("| EP | op | msgs/token RDMA / NVLink | RDMA MB | NVLink MB | send fixed | NIC x imbalance | NVLink | RDMA "
      "latency + signal | receive | **model µs** | bound | DeepEP H800 µs | target | met |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in result["ll"]:
        st = c["routing"]
        met = "-" if c["met"] is None else ("yes" if c["met"] else "**no**")
        w("| %d | %s | %.2f / %.2f | %.2f | %.2f | %.1f | %.1f (x%.3f) | %.1f | %.1f | %.1f | **%.1f** | %s | %.0f "
          "| %s | %s |" % (
              c["ep"], c["op"], st["ll_rdma_msgs"], st["ll_nvl_msgs"], c["rdma_bytes"] / 1e6, c["nvl_bytes"] / 1e6,
              c["t_send_fixed_us"], c["t_nic_us"], c["imbalance"], c["t_nvl_us"], c["t_latency_us"],
              c["t_recv_us"], c["time_us"], c["bound"], c["deepep_us"], c["target"], met))
    w("")
    w("Stretch: LL combine with FP8 partials over RDMA (NVLink and the receive term kept at BF16 bytes):")
    w("")
    w("| EP | RDMA MB | NIC x imbalance | model µs | vs BF16 combine | target |")
    w("|---|---|---|---|---|---|")
    ll_bf16 = {c["ep"]: c for c in result["ll"] if c["op"] == "combine"}
    for c in result["ll_fp8_combine"]:
        w("| %d | %.2f | %.1f | **%.1f** | %.2fx | %s |" % (
            c["ep"], c["rdma_bytes"] / 1e6, c["t_nic_us"], c["time_us"], c["time_us"] / ll_bf16[c["ep"]]["time_us"],
            c["target"] if c["met"] is None else "%s: %s" % (c["target"], "met" if c["met"] else "not met")))
    w("")
    w("Targets not met, and what would meet them (by the model):")
    w("")
    missed = [c for c in result["ht"] + result["ll"] if c["met"] is False]
    if not missed:
        w("- none")
    for c in missed:
        if c["case"] == "HT":
            w("- HT EP%d %s: %.1f GB/s against %.1f; needs %.0f µs instead of %.0f: NIC efficiency %.3f instead of "
              "%.2f, or %.1f%% fewer RDMA bytes%s." % (
                  c["ep"], c["op"], c["deepep_metric_gbps"], c["target_gbps"], c["time_for_target_us"],
                  c["time_us"], c["nic_efficiency_for_target"], p["nic_efficiency"],
                  100 * c["rdma_bytes_cut_for_target"],
                  "" if c["bound"] == "NIC" else " (and NVLink at %.0f GB/s)" % c["nvl_gbps_for_target"]))
        else:
            w("- LL EP%d %s: %.1f µs against %.0f; NIC efficiency %.3f instead of %.2f, or %.1f%% fewer RDMA "
              "bytes." % (c["ep"], c["op"], c["time_us"], c["target_us"], c["nic_efficiency_for_target"],
                          p["nic_efficiency"], 100 * c["rdma_bytes_cut_for_target"]))
    w("")
    w("Calibration: the NIC rate DeepEP's published HT figures imply under this model's routing and DeepEP's record "
      "sizes (no fixed costs; meaningful where DeepEP is NIC-bound, EP32/64):")
    w("")
    w("| EP | op | DeepEP GB/s | implied NIC GB/s |")
    w("|---|---|---|---|")
    for c in result["calibration"]:
        w("| %d | %s | %.0f | %.1f |" % (c["ep"], c["op"], c["deepep_gbps"], c["implied_nic_gbps"]))
    w("")
    w("Measured inputs:")
    w("")
    for op, v in sorted(result["nvl"].items()):
        w("- HT %s NVLink rate per GPU: %.0f GB/s (%s; %s)" % (op, v["gbps"], v["how"], ", ".join(v["files"])))
    for op, v in sorted(result["ll_fits"].items()):
        w("- LL %s: %.1f µs + bytes / %.0f GB/s (%d-GPU rows, %d points; %s)" % (
            op, v["intercept_us"], v["gbps"], v["gpus"], v["points"], ", ".join(v["files"])))
    w("")
    w("Parameters:")
    w("")
    w("| name | value | unit | source |")
    w("|---|---|---|---|")
    for name, (_, unit, source) in predict.PARAMS.items():
        w("| `%s` | %s | %s | %s |" % (name, result["params"][name], unit, source))
    return "\n".join(out) + "\n"


def compute(args):
    prm = parameters(args.set)
    rows = rates.load_rows(args.rows)
    nvl = rates.ht_forwarding_rates(rows)
    for op, value in (("dispatch", args.nvl_dispatch_gbps), ("combine", args.nvl_combine_gbps)):
        if value is not None:
            nvl[op] = {"gbps": value, "gpus": None, "files": [], "how": "given on the command line"}
    fits = rates.ll_half_fits(rows, args.ll_git)
    result = predict.run(prm, nvl, fits)
    result.update(params=prm, nvl=nvl, ll_fits=fits, model="prediction, not measurement",
                  inputs_text="the intranode moe-perf rows listed under \"Measured inputs\" (LL: kernels of git %s)"
                  % args.ll_git)
    return result


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = compute(args)
    except (OSError, ValueError) as e:
        print("moe-model: %s" % e, file=sys.stderr)
        return 2
    if args.json:
        text = json.dumps(result, indent=1, sort_keys=True) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text)
    if args.markdown or not args.json:
        sys.stdout.write(markdown(result))
    return 0
