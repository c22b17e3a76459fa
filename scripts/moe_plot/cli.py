"""moe-plot's command line: rows in, charts (PNG + SVG) and their Markdown captions out."""

import argparse
import os
import re
import sys

from . import rows as rowsmod
from .provenance import Anchors, PerfDoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_ANCHORS = os.path.join(REPO, "docs", "perf-anchors.json")
DEFAULT_PERF_DOC = os.path.join(REPO, "docs", "performance.md")
SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")

DESCRIPTION = """\
Charts of moe-perf JSON Lines rows (moe-perf -J), one chart per results file, mode and GPU count
(and shape), each written as PNG and SVG, with a Markdown caption per chart.

  HT: logical GB/s against the SM budget (--sms; 'auto' rows at --auto-sms), a dispatch panel with
      one line per dtype and a combine panel, with the NCCL baseline of the same rows.
  LL: time per call (us) against tokens per rank, a dispatch and a combine panel: the call with both
      phases, its send and receive halves (dispatch_send/_recv, combine_send/_recv) and the NCCL
      baseline of the same rows.
  Stars: reference points from --anchors (DeepEP V1 measured with its own test scripts on the same
  H200 machines) where their GPU count and shape equal the chart's.

Rules:
  - A row counts as verified only with "verified": true. Other rows (false or missing) are refused
    with a message on stderr; --show-unverified draws them instead as red hollow X markers, outside
    the lines, and the chart's subtitle and caption say how many there are.
  - Rows whose ranks share a GPU or that did not run over GPU links (ranks != gpus, shared_gpu,
    software_nic, ranks_per_gpu > 1, or a transport other than NVLink/peer/IPC) are never drawn as
    performance, not even with --show-unverified: each is refused with a message.
  - CPU-mode rows (backend cpu) and unavailable ops are not drawn. HT notify_dispatch is not charted.

Captions give the command (a row's "command" key, else the moe-perf command that docs/performance.md
cites for the file, checked against the rows' options; never guessed), the GPU count, the git sha, the
date (a row's "date" key, else the YYYY-MM-DD prefix of the file name), the rows' file and the timer.
The captions are written to --markdown and printed on stdout; messages go to stderr.

Exit status: 0 charts written; 1 nothing to draw (every row refused); 2 bad arguments or input;
3 matplotlib missing (pip install -r scripts/moe-plot-requirements.txt).
"""

EXAMPLES = """\
examples:
  scripts/moe-plot perf/results -o /tmp/charts                 # every committed file
  scripts/moe-plot perf/results/2026-11-28_h200x4_ll_3893034.jsonl -o /tmp/charts
  scripts/moe-plot -o docs/charts --markdown docs/charts/charts.md FILE...   # as docs/performance.md's charts
"""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="moe-plot", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="moe-perf JSON Lines files, or directories (their *.jsonl)")
    p.add_argument("-o", "--out", default="moe-plot-out", help="output directory (created; default %(default)s)")
    p.add_argument("--markdown", metavar="FILE|-",
                   help="where the captions go besides stdout (default OUT/charts.md; '-': stdout only)")
    p.add_argument("--md-prefix", metavar="PREFIX",
                   help="path of OUT as seen from the Markdown file's folder (default: computed from the two paths)")
    p.add_argument("--anchors", default=DEFAULT_ANCHORS, metavar="FILE|none",
                   help="reference points to draw (default docs/perf-anchors.json of this repository; 'none': none)")
    p.add_argument("--perf-doc", default=DEFAULT_PERF_DOC, metavar="FILE|none",
                   help="where to look up the command of rows that carry none (default docs/performance.md)")
    p.add_argument("--show-unverified", action="store_true",
                   help="draw rows without \"verified\": true as red hollow X markers instead of refusing them")
    p.add_argument("--auto-sms", type=int, default=24, metavar="N",
                   help="x position of HT rows with sms 0 (the library default: 24 SMs unless NCCL_MOE_NUM_SMS or "
                        "the config said otherwise; src/core/comm.cc) (default %(default)s)")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution (default %(default)s)")
    return p.parse_args(argv)


def display_path(path):
    full = os.path.abspath(path)
    if full.startswith(REPO + os.sep):
        return os.path.relpath(full, REPO)
    rel = os.path.relpath(full)
    return full if rel.startswith("..") else rel


def plain(text):
    """A Markdown heading as plain text (it goes inside captions and figure footers)."""
    return text.replace("`", "").replace("**", "")


def shape_text(mode, rows):
    r = rows[0]
    parts = []
    if mode == "ht":
        parts.append("%s tokens per rank" % r.get("tokens"))
    parts.append("hidden %s, top-%s of %s experts" % (r.get("hidden"), r.get("topk"), r.get("experts")))
    if mode == "ll":
        dtypes = sorted({x.get("dtype") for x in rows if x.get("op", "").startswith("dispatch")})
        parts.append("%s dispatch" % "/".join(d.upper() for d in dtypes))
    parts.append("%s routing" % r.get("routing", "?"))
    return ", ".join(parts)


def timer_text(rows):
    timers = sorted({r.get("timer") or "none" for r in rows})
    names = {"kernel": "CUPTI kernel time", "event": "CUDA events", "host": "host clock",
             "none": "not in the rows (older moe-perf: CUDA events)"}
    return "timer: " + ", ".join(names.get(t, t) for t in timers)


def date_of(rows, path):
    dates = sorted({str(r.get("date"))[:10] for r in rows if r.get("date")})
    if dates:
        return ", ".join(dates)
    date, _ = rowsmod.file_info(path)
    return date or "date unknown"


def sha_text(rows, path):
    shas = sorted({str(r.get("git_sha", "unknown")) for r in rows})
    text = "git " + ", ".join(shas)
    last = os.path.splitext(os.path.basename(path))[0].split("_")
    named = [w for w in last[2:] if SHA_RE.match(w)]
    if named and named[-1] not in shas:
        text += " (the file name says %s)" % named[-1]
    return text


def build_charts(sel, anchors, perf_doc, auto_sms=24):
    charts = []
    for key, group in sorted(sel.groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][2] or 0, kv[0][0])):
        drawn = group["rows"] + group["unverified"]
        if not drawn:
            continue
        path, mode, gpus = key[0], key[1], key[2]
        first = drawn[0]
        gpu_names = sorted({str(r.get("gpu_name", "?")) for r in drawn})
        shape = {"hidden": first.get("hidden"), "topk": first.get("topk"), "experts": first.get("experts")}
        if mode == "ht":
            shape["tokens"] = first.get("tokens")
        points = anchors.matching(mode, gpus, shape) if anchors else []
        date = date_of(drawn, path)
        sha = sha_text(drawn, path)
        _, machine = rowsmod.file_info(path)
        commands = sorted({r.get("command") for r in drawn if r.get("command")})
        if commands and all(r.get("command") for r in drawn):
            command, command_note = "; ".join(commands), "from the rows"
        else:
            command, section = perf_doc.find_command(os.path.basename(path), drawn) if perf_doc else (None, None)
            if command:
                command_note = "as docs/performance.md cites it for these rows, section \u00ab%s\u00bb" % plain(section)
            elif section:
                command_note = ("not recorded in the rows; docs/performance.md, section \u00ab%s\u00bb, describes "
                                "the run" % plain(section))
            else:
                command_note = "not recorded in the rows, and docs/performance.md does not cite this file"
        what = "logical GB/s against SMs" if mode == "ht" else "time per call against tokens per rank"
        gpu_text = "%s GPU%s (%s)" % (gpus, "" if gpus == 1 else "s", ", ".join(gpu_names))
        n_ver, n_unv = len(group["rows"]), len(group["unverified"])
        counts = "%d of the file's %d rows in this group drawn" % (len(drawn), group["total"])
        not_charted = sorted(op for op in group["ops"] if op not in rowsmod.CHARTED_OPS.get(mode, ()))
        if not_charted:
            counts += " (%s not charted)" % ", ".join(not_charted)
        counts += "; " + ("all drawn rows verified" if not n_unv else
                          "%d verified, %d UNVERIFIED drawn as red X" % (n_ver, n_unv))
        for reason, n in sorted(group["refused"].items()):
            counts += "; %d refused (%s)" % (n, reason)
        if mode == "ht" and any(not r.get("sms") for r in drawn):
            counts += "; sms 0 (the library default) drawn at %d SMs" % auto_sms
        subtitle = "%s \u00b7 %s \u00b7 %s \u00b7 %s" % (shape_text(mode, drawn), sha, date, timer_text(drawn))
        footer = "rows: %s%s (%s). command: %s%s." % (
            display_path(path), " (machine %s)" % machine if machine else "", counts,
            "%s (%s)" % (command, command_note) if command else "", "" if command else command_note)
        if points:
            footer += " Stars: %s, its own test scripts on the same H200 machines (%s)." % (
                anchors.label, display_path(anchors.path))
        charts.append({
            "key": key, "path": path, "mode": mode, "gpus": gpus, "rows": group["rows"],
            "unverified": group["unverified"], "anchors": points, "anchor_label": anchors.label if anchors else "",
            "title": "NCCL-MoE %s: %s \u2014 %s" % (mode.upper(), what, gpu_text),
            "subtitle": subtitle, "footer": footer, "what": what, "gpu_text": gpu_text, "date": date, "sha": sha,
            "command": command, "command_note": command_note, "counts": counts, "machine": machine,
            "timer": timer_text(drawn), "shape": shape_text(mode, drawn),
        })
    # file names: the results file's stem, made unique where a file holds several groups
    stems = {}
    for c in charts:
        stems.setdefault(os.path.splitext(os.path.basename(c["path"]))[0], []).append(c)
    for stem, group in stems.items():
        for i, c in enumerate(group):
            name = stem if len(group) == 1 else "%s_%s_%sgpu" % (stem, c["mode"], c["gpus"])
            if len(group) > 1 and sum(1 for o in group if (o["mode"], o["gpus"]) == (c["mode"], c["gpus"])) > 1:
                name += "_%d" % i
            c["name"] = name
    return charts


def caption_markdown(chart, prefix, anchors_path):
    alt = "%s, %s: %s" % (chart["mode"].upper(), chart["gpu_text"], chart["what"])
    lines = ["[![%s](%s%s.png)](%s%s.svg)" % (alt, prefix, chart["name"], prefix, chart["name"]), ""]
    text = "*%s, %s, %s, %s.* " % (chart["mode"].upper(), chart["gpu_text"], chart["sha"], chart["date"])
    if chart["command"]:
        text += "Command: `%s` (%s). " % (chart["command"], chart["command_note"])
    else:
        text += "Command: %s. " % chart["command_note"]
    text += "Rows: `%s`%s, %s; %s; %s." % (
        display_path(chart["path"]), " (machine %s)" % chart["machine"] if chart["machine"] else "",
        chart["shape"], chart["counts"], chart["timer"])
    if chart["anchors"]:
        text += " Stars: %s, measured with its own test scripts on the same H200 machines (`%s`)." % (
            chart["anchor_label"], display_path(anchors_path))
    lines.append(text)
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from . import charts as chartsmod
    except ImportError as e:
        print("moe-plot: matplotlib is missing (%s): python3 -m pip install -r scripts/moe-plot-requirements.txt" % e,
              file=sys.stderr)
        return 3
    messages = []
    try:
        files = rowsmod.input_files(args.inputs)
        all_rows = []
        for path in files:
            all_rows.extend(rowsmod.read_rows(path, messages))
        anchors = None if args.anchors in ("none", "") else Anchors(args.anchors)
        perf_doc = None if args.perf_doc in ("none", "") else PerfDoc(args.perf_doc)
    except (OSError, ValueError) as e:
        print("moe-plot: %s" % e, file=sys.stderr)
        return 2
    sel = rowsmod.select(all_rows, args.show_unverified, messages)
    for m in sel.messages:
        print("moe-plot: " + m, file=sys.stderr)
    charts = build_charts(sel, anchors, perf_doc, args.auto_sms)
    if not charts:
        print("moe-plot: nothing to draw: %d rows read from %d files, none drawable (see the messages above)"
              % (len(all_rows), len(files)), file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    markdown = args.markdown or os.path.join(args.out, "charts.md")
    if args.md_prefix is not None:
        prefix = args.md_prefix
    else:
        md_dir = os.getcwd() if markdown == "-" else os.path.dirname(os.path.abspath(markdown))
        rel = os.path.relpath(os.path.abspath(args.out), md_dir)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
    parts = []
    for chart in charts:
        written = chartsmod.render(chart, chart["anchors"], os.path.join(args.out, chart["name"]), args.auto_sms,
                                   args.dpi)
        print("moe-plot: wrote %s" % ", ".join(written), file=sys.stderr)
        parts.append(caption_markdown(chart, prefix, anchors.path if anchors else ""))
    text = "\n".join(parts)
    if markdown != "-":
        os.makedirs(os.path.dirname(os.path.abspath(markdown)), exist_ok=True)
        with open(markdown, "w", encoding="utf-8") as f:
            f.write(text)
        print("moe-plot: wrote %s (%d captions)" % (markdown, len(parts)), file=sys.stderr)
    sys.stdout.write(text)
    return 0
