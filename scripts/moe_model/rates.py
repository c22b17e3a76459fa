"""Measured intranode inputs, read from committed moe-perf rows (perf/results/*.jsonl; docs/moe-perf.md, "JSON").

Only rows that measure real GPUs on NVLink are used: verified, `ranks` == `gpus` >= 2 (one GPU per rank: never
"shared_gpu" rows, never 1-rank rows), CUPTI kernel time (`timer` "kernel", as DeepEP's published times), uniform
routing, backend gpu, hidden 7168, top-8, and no software NIC (`software_nic` rows, or a `transport` other than an
NVLink/peer/IPC one: internode rows of virtual nodes through the emulator, which are correctness runs).

HT: per (GPU count, op, dtype) the median over rows at the default 24 SMs (sms 0 or 24) of the NVLink rate per GPU,
logical GB/s x (R - 1) / R: with uniform routing a rank receives the same expected rows from every rank, its own
1/R of them without a link. The model uses the largest GPU count measured (4 today) as the per-GPU rate of an
8-GPU node. FP8 dispatch has no 4-GPU row: it is the 4-GPU BF16 dispatch rate times the 2-GPU FP8/BF16 ratio
(FP8 rows are half as long, so per-row costs weigh more).

LL: the split halves (dispatch_send, dispatch_recv, combine_send, combine_recv) of one kernel version on the
largest GPU count, each fitted by least squares as time = intercept + bytes / rate over the token counts, where
bytes = the NVLink bytes a rank sends (send halves) or all message bytes it receives, own ones included (receive
halves), computed from the row's shape with routing.uniform_stats.
"""

import glob
import json
import os
import statistics

from . import routing, traffic

HT_SMS = (0, 24)  # 0 = the library default, 24 SMs (docs/moe-perf.md)
LL_HALVES = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")


def load_rows(paths):
    rows = []
    for path in paths:
        files = sorted(glob.glob(os.path.join(path, "*.jsonl"))) if os.path.isdir(path) else [path]
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        row = json.loads(line)
                        row["_file"] = os.path.basename(f)
                        rows.append(row)
    return rows


def usable(row):
    """A row that measures GPUs on NVLink (see the module's docstring)."""
    gpus, ranks = row.get("gpus"), row.get("ranks", row.get("gpus"))
    return (row.get("verified") is True and not row.get("shared_gpu") and not row.get("software_nic")
            and isinstance(gpus, int) and gpus >= 2
            and ranks == gpus and row.get("timer") == "kernel" and row.get("routing") == "uniform"
            and row.get("backend") == "gpu" and row.get("hidden") == 7168 and row.get("topk") == 8
            and row.get("transport", "nvlink") in ("nvlink", "nvl", "p2p", "peer", "ipc", "cuda_ipc"))


def ht_nvl_rates(rows):
    """{(gpus, op, dtype): (GB/s per GPU, [source files])} from HT rows at the default SMs."""
    groups = {}
    for r in rows:
        if (r.get("mode") == "ht" and usable(r) and r.get("op") in ("dispatch", "combine")
                and r.get("sms") in HT_SMS and r.get("tokens") == 4096 and r.get("logical_gbps")):
            R = r["gpus"]
            groups.setdefault((R, r["op"], r["dtype"]), []).append((r["logical_gbps"] * (R - 1) / R, r["_file"]))
    return {k: (statistics.median(v for v, _ in vals), sorted({f for _, f in vals})) for k, vals in groups.items()}


def ht_forwarding_rates(rows):
    """NVLink GB/s per GPU the model uses for an 8-GPU node: dispatch (FP8 records) and combine (BF16 rows)."""
    rates = ht_nvl_rates(rows)
    if not rates:
        raise ValueError("no usable HT rows (4096 tokens, default SMs, kernel time) in the inputs")
    top = max(g for g, _, _ in rates)
    out = {}
    combine = rates.get((top, "combine", "bf16"))
    bf16 = rates.get((top, "dispatch", "bf16"))
    fp8 = rates.get((top, "dispatch", "fp8"))
    if combine is None or bf16 is None:
        raise ValueError("no %d-GPU HT BF16 dispatch and combine rows" % top)
    out["combine"] = {"gbps": combine[0], "gpus": top, "files": combine[1], "how": "median of %d-GPU BF16 combine"
                      % top}
    if fp8 is not None:
        out["dispatch"] = {"gbps": fp8[0], "gpus": top, "files": fp8[1], "how": "median of %d-GPU FP8 dispatch" % top}
    else:
        pairs = [g for g, op, dt in rates if op == "dispatch" and dt == "fp8" and (g, "dispatch", "bf16") in rates]
        if not pairs:
            raise ValueError("no FP8 HT dispatch rows")
        g = max(pairs)
        ratio = rates[(g, "dispatch", "fp8")][0] / rates[(g, "dispatch", "bf16")][0]
        out["dispatch"] = {"gbps": bf16[0] * ratio, "gpus": top,
                           "files": sorted(set(bf16[1]) | set(rates[(g, "dispatch", "fp8")][1])),
                           "how": "%d-GPU BF16 dispatch %.0f GB/s x %d-GPU FP8/BF16 ratio %.3f"
                                  % (top, bf16[0], g, ratio)}
    return out


def ll_half_bytes(row):
    """Bytes behind one LL split-half row (see the module's docstring)."""
    R, T, H = row["gpus"], row["tokens"], row["hidden"]
    s = routing.uniform_stats(1, R, row["experts"], row["topk"])
    dispatch = row["op"].startswith("dispatch")
    msg = traffic.ll_dispatch_msg_bytes(H) if dispatch else traffic.ll_combine_msg_bytes(H)
    count = s["ll_nvl_msgs"] if row["op"].endswith("_send") else s["ranks_all"]
    return T * count * msg


def _fit(points):
    """Least squares y = a + b x over (x, y) points; returns (a, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def ll_half_fits(rows, git_sha):
    """{op: {"intercept_us", "gbps", "points", "gpus", "files"}} for the LL split halves of one kernel version."""
    picked = [r for r in rows if r.get("mode") == "ll" and usable(r) and r.get("op") in LL_HALVES
              and r.get("git_sha") == git_sha and r.get("median_us")]
    if not picked:
        raise ValueError("no usable LL split-half rows of git %s in the inputs" % git_sha)
    top = max(r["gpus"] for r in picked)
    out = {}
    for op in LL_HALVES:
        pts = [(ll_half_bytes(r), r["median_us"]) for r in picked if r["op"] == op and r["gpus"] == top]
        if len({x for x, _ in pts}) < 2:
            raise ValueError("LL %s: fewer than two token counts in git %s's %d-GPU rows" % (op, git_sha, top))
        a, b = _fit(pts)
        out[op] = {"intercept_us": a, "gbps": 1e-3 / b, "points": len(pts), "gpus": top,
                   "files": sorted({r["_file"] for r in picked if r["op"] == op and r["gpus"] == top})}
    return out
