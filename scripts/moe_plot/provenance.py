"""Where a chart's rows came from: the moe-perf command, the date, and the reference points (anchors).

The command is taken from the rows when they carry one (a `command` key). Rows written so far do not, so the
command is looked up in docs/performance.md: every backticked `moe-perf ...` command (or `scripts/device_session.sh`
with its PERF_*_ARGS) in the paragraphs that cite the rows' file, then in those paragraphs' sections, is parsed with
moe-perf's own defaults (perf/options.cc) and kept only when it would have produced exactly these rows (mode, GPUs,
token sweep, shape, dtypes, SM list, iterations, warm-ups, routing, seed). When no single command fits, the caption
says so and names the section that describes the run instead of guessing. Text between `<!-- moe-plot begin -->`
and `<!-- moe-plot end -->` (the embedded captions themselves) is skipped.
"""

import json
import math
import os
import re
import shlex

# moe-perf's defaults (perf/options.cc: modeDefaults, Options): tokens, hidden, topk, experts, dtype per mode.
MODE_DEFAULTS = {
    "ht": {"tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256, "dtype": "bf16"},
    "ll": {"tokens": 128, "hidden": 7168, "topk": 8, "experts": 288, "dtype": "fp8"},
}
GPU_ITERS, GPU_WARMUP = 20, 5

# Options of moe-perf that take a value, by every spelling (perf/options.cc optionTable).
VALUE_OPTIONS = {
    "-b": "min_tokens", "--min-tokens": "min_tokens", "-e": "max_tokens", "--max-tokens": "max_tokens",
    "-f": "step_factor", "--step-factor": "step_factor", "-i": "step_tokens", "--step-tokens": "step_tokens",
    "-n": "iters", "--iters": "iters", "-w": "warmup", "--warmup-iters": "warmup", "-c": "check", "--check": "check",
    "-t": "threads", "--nthreads": "threads", "-g": "gpus", "--ngpus": "gpus", "-J": "json", "--json": "json",
    "--mode": "mode", "--tokens": "tokens", "--hidden": "hidden", "--topk": "topk", "--experts": "experts",
    "--dtype": "dtype", "--sms": "sms", "--routing": "routing", "--seed": "seed", "--procs": "procs",
    "--alignment": "alignment", "--timeout": "timeout", "--timer": "timer",
}
FLAG_OPTIONS = {"--cpu", "--require-moe", "--allow-missing-moe", "-h", "--help"}


def parse_count(text):
    """moe-perf's parseCount: an integer with an optional K or M suffix (x1024, x1024^2)."""
    mult = 1
    if text[-1:] in ("K", "k"):
        mult, text = 1024, text[:-1]
    elif text[-1:] in ("M", "m"):
        mult, text = 1024 * 1024, text[:-1]
    return int(text) * mult


def parse_moe_perf_args(args):
    """Parses moe-perf's arguments into a dict of the options given; None when they are not moe-perf's."""
    opts = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, value = arg, None
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name, value = arg[:2], arg[2:]
        if name in FLAG_OPTIONS:
            opts[name.lstrip("-")] = True
        elif name in VALUE_OPTIONS:
            if value is None:
                if i + 1 >= len(args):
                    return None
                i += 1
                value = args[i]
            opts[VALUE_OPTIONS[name]] = value
        else:
            return None
        i += 1
    return opts


def token_sweep(lo, hi, factor, step):
    """perf/options.cc tokenSweep."""
    sizes = []
    hi = max(hi, lo)
    t = lo
    while t <= hi:
        sizes.append(t)
        nxt = t + step if step > 0 else int(math.floor(t * factor))
        t = nxt if nxt > t else t + 1
    return sizes


def command_fits(opts, rows):
    """Whether moe-perf run with `opts` writes rows like these (every row of the group)."""
    try:
        modes = opts.get("mode", "all").split(",")
        modes = ["ht", "ll"] if "all" in modes else modes
        for row in rows:
            mode = row.get("mode")
            if mode not in modes or mode not in MODE_DEFAULTS:
                return False
            d = MODE_DEFAULTS[mode]
            if "tokens" in opts:
                lo = hi = parse_count(opts["tokens"])
            else:
                lo = parse_count(opts["min_tokens"]) if "min_tokens" in opts else d["tokens"]
                hi = parse_count(opts["max_tokens"]) if "max_tokens" in opts else lo
            sweep = token_sweep(lo, hi, float(opts.get("step_factor", 2)), int(opts.get("step_tokens", 0)))
            if row.get("tokens") not in sweep:
                return False
            for key in ("hidden", "topk", "experts"):
                if row.get(key) != (int(opts[key]) if key in opts else d[key]):
                    return False
            dtypes = opts["dtype"].split(",") if "dtype" in opts else [d["dtype"]]
            if row.get("dtype") not in dtypes:
                return False
            sms = [int(s) for s in opts["sms"].split(",")] if "sms" in opts and mode == "ht" else [0]
            if row.get("sms") not in sms:
                return False
            if row.get("iters") is not None and row.get("iters") != int(opts.get("iters", GPU_ITERS)):
                return False
            if row.get("warmup") is not None and row.get("warmup") != int(opts.get("warmup", GPU_WARMUP)):
                return False
            if row.get("routing") is not None and row.get("routing") != opts.get("routing", "uniform"):
                return False
            if row.get("seed") is not None and row.get("seed") != int(opts.get("seed", 1)):
                return False
            threads = int(opts.get("threads", 1))
            if "procs" in opts:
                if row.get("gpus") != int(opts["procs"]) * threads * int(opts.get("gpus", 1)):
                    return False
            elif "gpus" in opts and row.get("gpus") != threads * int(opts["gpus"]):
                return False
            # Timer: rows that carry the key and were event-timed without a per-row reason came from --timer event
            # (the kernel timer is the default where CUPTI works, as on the machines these rows come from).
            timer = opts.get("timer")
            if row.get("timer") is not None and row.get("op") != "notify_dispatch":
                if timer == "kernel" and row.get("timer") != "kernel":
                    return False
                if timer == "event" and row.get("timer") != "event":
                    return False
                if timer in (None, "auto") and row.get("timer") == "event" and not row.get("timer_note"):
                    return False
            if opts.get("cpu") and row.get("backend") != "cpu":
                return False
        # ...and the run wrote every size, dtype and SM budget of its sweep (a file of a sub-sweep is another run)
        for mode in {row.get("mode") for row in rows}:
            m_rows = [row for row in rows if row.get("mode") == mode]
            d = MODE_DEFAULTS[mode]
            if "tokens" in opts:
                lo = hi = parse_count(opts["tokens"])
            else:
                lo = parse_count(opts["min_tokens"]) if "min_tokens" in opts else d["tokens"]
                hi = parse_count(opts["max_tokens"]) if "max_tokens" in opts else lo
            sweep = token_sweep(lo, hi, float(opts.get("step_factor", 2)), int(opts.get("step_tokens", 0)))
            if {row.get("tokens") for row in m_rows} != set(sweep):
                return False
            dtypes = opts["dtype"].split(",") if "dtype" in opts else [d["dtype"]]
            if {row.get("dtype") for row in m_rows} != set(dtypes):
                return False
            if mode == "ht" and "sms" in opts:
                if {row.get("sms") for row in m_rows} != {int(x) for x in opts["sms"].split(",")}:
                    return False
        return True
    except (ValueError, TypeError, KeyError):
        return False


# --- docs/performance.md -------------------------------------------------------------------------------------

BACKTICK_RE = re.compile(r"`([^`]+)`", re.S)
DEVICE_ARGS_RE = re.compile(r"`?(PERF_HT_ARGS|PERF_LL_ARGS|PERF_LL_EXTRA)=\"([^\"]*)\"`?")


def expand_braces(text):
    """a_{x,y}_b -> [a_x_b, a_y_b] (every brace group, no nesting)."""
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    out = []
    for part in m.group(1).split(","):
        out.extend(expand_braces(text[: m.start()] + part + text[m.end():]))
    return out


def cited_names(block):
    """File names a paragraph cites: full names, brace lists, and '..._suffix' abbreviations (as suffixes)."""
    names = []
    for span in BACKTICK_RE.findall(block):
        span = " ".join(span.split())
        if not re.search(r"\.(jsonl|txt)\b", span):
            continue
        for name in expand_braces(span):
            name = name.strip()
            if name.startswith("...") or name.startswith("\u2026"):
                names.append(("suffix", name.lstrip(".\u2026")))
            else:
                names.append(("name", os.path.basename(name)))
    return names


def cites(block, file_name):
    for kind, name in cited_names(block):
        if kind == "name" and name == file_name:
            return True
        if kind == "suffix" and file_name.endswith(name) and name.startswith("_"):
            return True
    return False


def commands_in(block):
    """(command text as written, parsed options) for every moe-perf command a paragraph shows."""
    found = []
    for span in BACKTICK_RE.findall(block):
        text = " ".join(span.split())
        try:
            words = shlex.split(text)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if word == "moe-perf" or word.endswith("/moe-perf"):
                opts = parse_moe_perf_args(words[i + 1:])
                if opts is not None:
                    found.append((text, opts))
                break
    # scripts/device_session.sh runs `build/perf/moe-perf --mode ht|ll -g <GPUs> -J ... $PERF_*_ARGS`
    # (and a second LL run with $PERF_LL_EXTRA): the paragraph gives the arguments, the script the rest.
    session = re.search(r"`(scripts/device_session\.sh[^`]*)`", block)
    if session:
        for var, value in DEVICE_ARGS_RE.findall(block):
            mode = "ht" if var == "PERF_HT_ARGS" else "ll"
            try:
                opts = parse_moe_perf_args(["--mode", mode] + shlex.split(value))
            except ValueError:
                opts = None
            if opts is not None:
                text = '%s="%s" %s' % (var, value, " ".join(session.group(1).split()))
                found.append((text, opts))
    return found


def split_sections(text):
    """[(title, [paragraph, ...])] of a Markdown document; paragraphs are blank-line separated blocks."""
    sections = []
    title, lines = "", []
    for line in text.splitlines():
        if re.match(r"^#{1,6} ", line):
            sections.append((title, lines))
            title, lines = line.lstrip("#").strip(), []
        else:
            lines.append(line)
    sections.append((title, lines))
    out = []
    for title, lines in sections:
        blocks = [b for b in re.split(r"\n\s*\n", "\n".join(lines)) if b.strip()]
        out.append((title, blocks))
    return out


class PerfDoc:
    """docs/performance.md, searched for the command of a results file."""

    def __init__(self, path):
        self.path = path
        self.sections = []
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            # moe-plot's own captions, embedded between these markers, are not a source of commands
            text = re.sub(r"<!-- moe-plot begin -->.*?<!-- moe-plot end -->", "", text, flags=re.S)
            self.sections = split_sections(text)

    def find_command(self, file_name, rows):
        """(command or None, section title or None) for the rows of one file."""
        cited_blocks, cited_sections = [], []
        for title, blocks in self.sections:
            hit = [b for b in blocks if cites(b, file_name)]
            if hit:
                cited_blocks.extend(hit)
                cited_sections.append((title, blocks))
        if not cited_blocks:
            return None, None
        for scope in (cited_blocks, [b for _, blocks in cited_sections for b in blocks]):
            fitting = []
            for block in scope:
                for text, opts in commands_in(block):
                    if command_fits(opts, rows) and text not in fitting:
                        fitting.append(text)
            if len(fitting) == 1:
                return fitting[0], cited_sections[0][0]
            if len(fitting) > 1:
                break  # several commands fit: do not guess
        return None, cited_sections[0][0]


# --- anchors (docs/perf-anchors.json) -------------------------------------------------------------------------


class Anchors:
    """Reference points (DeepEP V1 on the same machines) to draw next to the rows they compare with."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        self.points = []
        if path:
            with open(path, encoding="utf-8") as f:
                self.data = json.load(f)
            self.points = self.data.get("points", [])

    @property
    def label(self):
        return self.data.get("label", "reference")

    def matching(self, mode, gpus, shape):
        """Points of one mode and GPU count whose shape (hidden, topk, experts; HT tokens) equals the chart's."""
        out = []
        for p in self.points:
            if p.get("mode") != mode or p.get("gpus") != gpus:
                continue
            if any(p.get(k) is not None and p.get(k) != v for k, v in shape.items() if v is not None):
                continue
            out.append(p)
        return out
