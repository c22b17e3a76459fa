"""Drawing one chart (a figure of two panels) per group of rows with matplotlib's Agg backend.

HT: logical GB/s against the SM budget, a dispatch panel (one line per dtype) and a combine panel, each with the
NCCL baseline of the same rows (dashed, x markers) and the anchors (stars). LL: latency against tokens per rank
(log-log), a dispatch and a combine panel, each with the call with both phases, its send and receive halves,
the NCCL baseline and the anchors.
"""

import io
import statistics
import textwrap

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

plt.rcParams.update(
    {
        "svg.fonttype": "none",  # text stays text in the SVG: smaller files, searchable captions
        "svg.hashsalt": "moe-plot",  # stable element ids, so re-rendering the same rows gives the same SVG
        "font.size": 9,
        "axes.titlesize": 10,
        "legend.fontsize": 7.5,
        "figure.dpi": 100,
    }
)

DTYPE_STYLE = {"bf16": {"color": "#1f77b4", "marker": "o"}, "fp8": {"color": "#ff7f0e", "marker": "s"}}
LL_STYLE = {
    "both": {"color": "#1f77b4", "marker": "o", "linestyle": "-", "linewidth": 2.0},
    "send": {"color": "#2ca02c", "marker": "^", "linestyle": "--", "linewidth": 1.3},
    "recv": {"color": "#d62728", "marker": "v", "linestyle": ":", "linewidth": 1.6},
    "baseline": {"color": "#7f7f7f", "marker": "x", "linestyle": "-.", "linewidth": 1.2},
}
UNVERIFIED_STYLE = {"marker": "X", "s": 70, "facecolors": "none", "edgecolors": "red", "linewidths": 1.5, "zorder": 6}
ANCHOR_STYLE = {"marker": "*", "s": 160, "edgecolors": "black", "linewidths": 0.8, "zorder": 7}


def dtype_name(dtype):
    return {"bf16": "BF16", "fp8": "FP8"}.get(dtype, str(dtype))


def _series(rows, x_of, y_of):
    """[(x, median y, [all y])] over the rows that have a y, sorted by x (repeated runs give several y per x)."""
    by_x = {}
    for r in rows:
        y = y_of(r)
        if y is None:
            continue
        by_x.setdefault(x_of(r), []).append(y)
    return [(x, statistics.median(ys), ys) for x, ys in sorted(by_x.items())]


def _plot(ax, series, label, style, annotate=False, fmt="%.0f"):
    if not series:
        return
    xs = [s[0] for s in series]
    ys = [s[1] for s in series]
    ax.plot(xs, ys, label=label, markersize=5, **style)
    repeats = [(x, y) for x, _, all_y in series if len(all_y) > 1 for y in all_y]
    if repeats:  # every run's value, the line goes through their median
        ax.scatter([p[0] for p in repeats], [p[1] for p in repeats], s=12, color=style["color"], alpha=0.5, zorder=5)
    if annotate:
        for x, y in zip(xs, ys):
            ax.annotate(fmt % y, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7.5, color=style["color"])


def _unverified(ax, rows, x_of, y_of, labelled):
    pts = [(x_of(r), y_of(r)) for r in rows if y_of(r) is not None]
    if not pts:
        return labelled
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=None if labelled else "UNVERIFIED row (not in lines)",
               **UNVERIFIED_STYLE)
    return True


def _anchor(ax, x, point, color, label, value_key):
    value = point.get(value_key)
    rng = point.get(value_key + "_range")
    if value is None and rng:
        lo, hi = rng
        ax.errorbar([x], [(lo + hi) / 2.0], yerr=[[(hi - lo) / 2.0], [(hi - lo) / 2.0]], fmt="none", ecolor="black",
                    elinewidth=2.0, capsize=5, zorder=7)
        ax.scatter([x], [(lo + hi) / 2.0], color=color, label=label, **ANCHOR_STYLE)
        text, y = "%g\u2013%g" % (lo, hi), hi
    elif value is not None:
        ax.scatter([x], [value], color=color, label=label, **ANCHOR_STYLE)
        text, y = "%g" % value, value
    else:
        return
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(9, -3), ha="left", fontsize=7.5, color="black")


def draw_ht(fig, chart, anchors, auto_sms):
    rows, unverified = chart["rows"], chart["unverified"]

    def x_of(r):
        return r.get("sms") or auto_sms

    def gbps(r):
        return r.get("logical_gbps")

    def base_gbps(r):
        return r.get("baseline_gbps")

    axes = fig.subplots(1, 2, sharey=True)
    dtypes = [d for d in ("bf16", "fp8") if any(r.get("dtype") == d for r in rows + unverified)]
    dtypes += sorted({r.get("dtype") for r in rows + unverified} - set(dtypes))
    xs_all = set()
    labelled_unverified = False
    for ax, op in zip(axes, ("dispatch", "combine")):
        op_rows = [r for r in rows if r.get("op") == op]
        op_dtypes = [d for d in dtypes if any(r.get("dtype") == d for r in op_rows + unverified if r.get("op") == op)]
        for dtype in op_dtypes:
            style = DTYPE_STYLE.get(dtype, {"color": "#9467bd", "marker": "D"})
            d_rows = [r for r in op_rows if r.get("dtype") == dtype]
            series = _series(d_rows, x_of, gbps)
            xs_all.update(s[0] for s in series)
            few = len(series) <= 2
            if op == "dispatch":
                label = "NCCL-MoE %s dispatch" % dtype_name(dtype)
                base_label = "NCCL baseline %s (same run)" % dtype_name(dtype)
            else:
                run = " (run with %s dispatch)" % dtype_name(dtype) if len(op_dtypes) > 1 else ""
                label = "NCCL-MoE combine%s" % run
                base_label = "NCCL baseline combine%s" % run
            _plot(ax, series, label, {"color": style["color"], "marker": style["marker"], "linestyle": "-",
                                      "linewidth": 2.0}, annotate=few)
            _plot(ax, _series(d_rows, x_of, base_gbps), base_label,
                  {"color": style["color"], "marker": "x", "linestyle": "--", "linewidth": 1.2}, annotate=few)
            labelled_unverified = _unverified(
                ax, [r for r in unverified if r.get("op") == op and r.get("dtype") == dtype], x_of, gbps,
                labelled_unverified)
        for point in anchors:
            if point.get("op") != op or point.get("logical_gbps") is None:
                continue
            if op == "dispatch" and point.get("dtype") not in op_dtypes:
                continue  # no NCCL-MoE line of that dtype to compare with
            if op == "dispatch":
                color = DTYPE_STYLE.get(point.get("dtype"), {"color": "#9467bd"})["color"]
                what = dtype_name(point.get("dtype"))
            else:
                color, what = "#bbbbbb", "combine"
            label = "%s %s (its tests, same machines)" % (chart["anchor_label"], what)
            _, labels = ax.get_legend_handles_labels()
            _anchor(ax, point["sms"], point, color, None if label in labels else label, "logical_gbps")
            xs_all.add(point["sms"])
        ax.set_title("dispatch (cached handle)" if op == "dispatch" else "combine (BF16)")
        ax.set_xlabel("SMs per call (num_sms)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        if op_rows or any(r.get("op") == op for r in unverified):
            ax.legend(loc="lower right", framealpha=0.9)
        else:
            ax.text(0.5, 0.5, "no %s rows" % op, transform=ax.transAxes, ha="center", color="gray")
    axes[0].set_ylabel("logical GB/s (1 GB = 1e9 B, DeepEP byte accounting)")
    ticks = sorted(xs_all) or [auto_sms]
    auto_used = any(not r.get("sms") for r in rows + unverified)
    for ax in axes:
        ax.set_xlim(0, max(ticks) * 1.12 + 2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda v, _: "%d\nauto" % v if auto_used and int(round(v)) == auto_sms else "%d" % v))
    top = max([ax.get_ylim()[1] for ax in axes])
    for ax in axes:
        ax.set_ylim(0, top * 1.08)


def draw_ll(fig, chart, anchors):
    rows, unverified = chart["rows"], chart["unverified"]

    def x_of(r):
        return r.get("tokens")

    def us(r):
        return r.get("median_us")

    def base_us(r):
        return r.get("baseline_median_us")

    axes = fig.subplots(1, 2, sharey=True)
    xs_all = set()
    labelled_unverified = False
    for ax, op in zip(axes, ("dispatch", "combine")):
        parts = [
            ("both", op, "NCCL-MoE, both phases in one call (dispatch / combine)"),
            ("send", op + "_send", "send half (dispatch_send / combine_send)"),
            ("recv", op + "_recv", "receive half (dispatch_recv / combine_recv)"),
        ]
        for key, name, label in parts:
            series = _series([r for r in rows if r.get("op") == name], x_of, us)
            xs_all.update(s[0] for s in series)
            _plot(ax, series, label, LL_STYLE[key], annotate=len(series) <= 2, fmt="%.1f")
        both = [r for r in rows if r.get("op") == op]
        _plot(ax, _series(both, x_of, base_us), "NCCL baseline (same run)", LL_STYLE["baseline"],
              annotate=len(both) <= 2, fmt="%.1f")
        labelled_unverified = _unverified(ax, [r for r in unverified if r.get("op", "").startswith(op)], x_of, us,
                                          labelled_unverified)
        for point in anchors:
            if point.get("op") != op:
                continue
            if op == "dispatch" and both and point.get("dtype") not in {r.get("dtype") for r in both}:
                continue  # DeepEP's FP8 dispatch is no reference for a BF16 one
            label = "%s, its own tests on the same machines" % chart["anchor_label"]
            _anchor(ax, point["tokens"], point, "#bbbbbb", label, "median_us")
            xs_all.add(point["tokens"])
            # the NCCL-MoE value at the anchor's token count, written next to it (short series have all values)
            both_series = _series(both, x_of, us)
            for x, y, _ in both_series if len(both_series) > 2 else []:
                if x == point["tokens"]:
                    ax.annotate("%.1f" % y, (x, y), textcoords="offset points", xytext=(-6, 6), ha="right",
                                fontsize=7.5, color=LL_STYLE["both"]["color"], fontweight="bold")
        ax.set_title("dispatch (%s)" % ", ".join(sorted(dtype_name(d) for d in {r.get("dtype") for r in both}) or ["-"])
                     if op == "dispatch" else "combine (BF16, weighted)")
        ax.set_xlabel("tokens per rank")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        if not any(r.get("op", "").startswith(op) for r in rows + unverified):
            ax.text(0.5, 0.5, "no %s rows" % op, transform=ax.transAxes, ha="center", color="gray")
    # one legend for both panels (the same series in each), between the titles and the panels
    handles, labels = {}, []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
                labels.append(l)
    fig.legend([handles[l] for l in labels], labels, loc="upper center",
               bbox_to_anchor=(0.5, 0.905 - chart.get("header_extra", 0)), ncol=3, frameon=False)
    axes[0].set_ylabel("\u00b5s per call (log scale)")
    ticks = sorted(xs_all) or [128]
    for ax in axes:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "%d" % v))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "%g" % v))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _save_png(fig, path, dpi):
    """PNG with a 96-colour palette (Pillow, a matplotlib dependency): about a third of the RGBA file's size."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    try:
        from PIL import Image
    except ImportError:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return
    buf.seek(0)
    with Image.open(buf) as img:
        # fast octree keeps the few saturated line colours that median cut merges into the white background's shades
        img.convert("RGB").quantize(colors=96, method=2).save(path, format="PNG", optimize=True)


def render(chart, anchors, out_base, auto_sms=24, dpi=100):
    """Draws one chart and writes out_base.png and out_base.svg."""
    fig = plt.figure(figsize=(11.5, 5.6))
    chart = dict(chart, header_extra=0.03 if chart["unverified"] else 0.0)
    try:
        if chart["mode"] == "ht":
            draw_ht(fig, chart, anchors, auto_sms)
            top = 0.86 - chart["header_extra"]
        else:
            draw_ll(fig, chart, anchors)
            top = 0.80 - chart["header_extra"]
        fig.suptitle(chart["title"], fontsize=11, fontweight="bold", y=0.985)
        fig.text(0.5, 0.925, chart["subtitle"], ha="center", fontsize=8.5, color="#333333")
        if chart["unverified"]:
            fig.text(0.5, 0.895, "includes %d UNVERIFIED rows (red X): not checked against the reference, or wrong"
                     % len(chart["unverified"]), ha="center", fontsize=8.5, color="red", fontweight="bold")
        footer = "\n".join(textwrap.wrap(chart["footer"], 190))
        fig.text(0.01, 0.012, footer, fontsize=7, color="#444444", va="bottom")
        lines = footer.count("\n") + 1
        fig.subplots_adjust(left=0.06, right=0.99, top=top, bottom=0.135 + 0.022 * lines, wspace=0.05)
        _save_png(fig, out_base + ".png", dpi)
        fig.savefig(out_base + ".svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    return [out_base + ".png", out_base + ".svg"]
