"""Reading moe-perf JSON Lines rows and deciding which of them may be drawn as performance.

The row schema is docs/moe-perf.md's "JSON (-J PATH)" table, written by perf/report.cc (toJson). Older rows lack
some keys (`timer`, `event_median_us`, ... before git 9a9a235); keys that later versions may add (`ranks` on rows
that predate it, `shared_gpu`, `transport`, `software_nic`, `date`, `command`) are read when present.
"""

import glob
import json
import os
import re

# Rows whose op is charted, per mode. HT notify_dispatch (the first call, with its host wait, always event-timed)
# is left out: it is a different quantity from the cached dispatch next to it.
CHARTED_OPS = {
    "ht": ("dispatch", "combine"),
    "ll": ("dispatch", "combine", "dispatch_send", "dispatch_recv", "combine_send", "combine_recv"),
}

# Transports under which a GPU row measures the hardware it names: NVLink between GPUs, reached through peer access
# (threads) or CUDA IPC (processes). Anything else (a socket, a CPU thread acting as a NIC, a proxy) is not drawn.
GPU_TRANSPORTS = {"nvlink", "nvl", "p2p", "peer", "ipc", "cuda_ipc", "cuda-ipc"}

FILE_NAME_RE = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})_(?P<machine>[A-Za-z0-9]+)_(?P<rest>.+)$")


class Row:
    """One moe-perf result row plus where it came from."""

    __slots__ = ("data", "path", "line")

    def __init__(self, data, path, line):
        self.data = data
        self.path = path
        self.line = line

    def get(self, key, default=None):
        return self.data.get(key, default)

    def __getitem__(self, key):
        return self.data[key]

    def where(self):
        return "%s:%d" % (self.path, self.line)


def input_files(inputs):
    """Expands the command line's inputs: files as given, directories to their *.jsonl files (sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.jsonl")))
            if not found:
                raise OSError("%s: no *.jsonl files in this directory" % item)
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise OSError("%s: no such file or directory" % item)
    return files


def read_rows(path, messages):
    """All JSON objects of one JSON Lines file; malformed lines are reported and skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            text = text.strip()
            if not text:
                continue
            try:
                data = json.loads(text)
            except ValueError as e:
                messages.append("%s:%d: not JSON (%s): line skipped" % (path, number, e))
                continue
            if not isinstance(data, dict):
                messages.append("%s:%d: not a JSON object: line skipped" % (path, number))
                continue
            rows.append(Row(data, path, number))
    return rows


def file_info(path):
    """Date (YYYY-MM-DD) and machine tag (e.g. h200x2) from a results file name, None where it does not say."""
    m = FILE_NAME_RE.match(os.path.basename(path))
    if not m:
        return None, None
    return m.group("date"), m.group("machine")


def shared_gpu_reason(row):
    """Why a row does not measure one rank per GPU over GPU links, or None when it does.

    Such rows (ranks sharing a GPU under MPS or time slicing, a software NIC, a socket transport) are correct runs
    but not performance of the hardware; they are never drawn, with or without --show-unverified.
    """
    gpus = row.get("gpus")
    ranks = row.get("ranks")  # absent on rows older than the key: then ranks == gpus by construction
    if ranks is not None and gpus is not None and ranks != gpus:
        return "ranks %s != gpus %s (ranks share a GPU)" % (ranks, gpus)
    if row.get("shared_gpu") not in (None, False, 0):
        return "shared_gpu is %s" % json.dumps(row.get("shared_gpu"))
    for key in ("software_nic", "soft_nic"):
        if row.get(key) not in (None, False, 0):
            return "%s is %s" % (key, json.dumps(row.get(key)))
    ranks_per_gpu = row.get("ranks_per_gpu")
    if isinstance(ranks_per_gpu, (int, float)) and ranks_per_gpu > 1:
        return "ranks_per_gpu is %s" % ranks_per_gpu
    transport = row.get("transport")
    if transport is not None and str(transport).lower() not in GPU_TRANSPORTS:
        return "transport %s is not a GPU link" % json.dumps(transport)
    return None


def not_performance_reason(row):
    """Why a row is no GPU measurement at all (CPU mode, unavailable op, no time), or None."""
    if row.get("backend", "gpu") != "gpu":
        return "backend %s (CPU reference timing, not a GPU measurement)" % json.dumps(row.get("backend"))
    if row.get("available") is False or row.get("median_us") is None:
        return "op not available (%s)" % (row.get("error") or "no median_us")
    if row.get("mode") not in CHARTED_OPS:
        return "unknown mode %s" % json.dumps(row.get("mode"))
    return None


def is_verified(row):
    """Only `"verified": true` counts; a row without the key was never shown to be correct."""
    return row.get("verified") is True


def group_key(row):
    """Rows of one chart: one source file, one mode, one GPU count, one shape (HT: one token count too)."""
    mode = row.get("mode")
    return (
        row.path,
        mode,
        row.get("gpus"),
        row.get("hidden"),
        row.get("topk"),
        row.get("experts"),
        row.get("routing"),
        row.get("seed"),
        row.get("tokens") if mode == "ht" else None,
    )


class Selection:
    """The rows of one input set, sorted into drawable groups, refused rows and messages."""

    def __init__(self):
        self.groups = {}  # group_key -> {"rows": [...], "unverified": [...], "refused": {reason: n}, "total": n}
        self.messages = []
        self.refused_shared = []  # (row, reason)
        self.refused_unverified = []
        self.skipped = []  # (row, reason): not a performance row or op not charted


def select(rows, show_unverified, messages=None):
    """Applies the drawing rules to rows (list of Row). Returns a Selection."""
    sel = Selection()
    if messages is not None:
        sel.messages = messages
    for row in rows:
        key = group_key(row)
        group = sel.groups.setdefault(key, {"rows": [], "unverified": [], "total": 0, "refused": {}, "ops": set()})
        group["total"] += 1
        group["ops"].add(row.get("op"))
        reason = shared_gpu_reason(row)
        if reason:
            sel.refused_shared.append((row, reason))
            group["refused"]["shared GPU / not a GPU link"] = group["refused"].get("shared GPU / not a GPU link", 0) + 1
            continue
        reason = not_performance_reason(row)
        if reason:
            sel.skipped.append((row, reason))
            group["refused"]["not a GPU measurement"] = group["refused"].get("not a GPU measurement", 0) + 1
            continue
        if row.get("op") not in CHARTED_OPS[row.get("mode")]:
            sel.skipped.append((row, "op %s is not charted" % row.get("op")))
            continue
        if not is_verified(row):
            if show_unverified:
                group["unverified"].append(row)
            else:
                sel.refused_unverified.append(row)
                group["refused"]["unverified"] = group["refused"].get("unverified", 0) + 1
            continue
        group["rows"].append(row)
    for row, reason in sel.refused_shared:
        sel.messages.append("%s: refused, not drawn as performance: %s" % (row.where(), reason))
    for row in sel.refused_unverified:
        sel.messages.append(
            "%s: refused: %s %s row is not verified (verified=%s); --show-unverified draws such rows, marked"
            % (row.where(), row.get("mode"), row.get("op"), json.dumps(row.get("verified", "missing")))
        )
    for row, reason in sel.skipped:
        if not reason.startswith("op "):
            sel.messages.append("%s: not drawn: %s" % (row.where(), reason))
    return sel
