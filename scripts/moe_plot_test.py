#!/usr/bin/env python3
"""Tests of scripts/moe-plot (unittest only). Registered with ctest as `moe_plot` (label unit).

Without matplotlib the script exits 77, which ctest reports as skipped (SKIP_RETURN_CODE): install
scripts/moe-plot-requirements.txt to run it (.ci/run does).
"""

import contextlib
import copy
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOOL = os.path.join(HERE, "moe-plot")
RESULTS = os.path.join(REPO, "perf", "results")
PERF_DOC = os.path.join(REPO, "docs", "performance.md")
CHARTS_DIR = os.path.join(REPO, "docs", "charts")
SKIP = 77

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

sys.dont_write_bytecode = True  # no __pycache__ left in the source tree
sys.path.insert(0, HERE)

# The files behind docs/performance.md's charts (its "Charts" section).
DOC_FILES = [
    "2026-11-28_h200x2_ht_1bdaf96.jsonl",
    "2026-11-28_h200x4_ht_61a7f8e.jsonl",
    "2026-11-28_h200x4_ll_g2_3893034.jsonl",
    "2026-11-28_h200x4_ll_3893034.jsonl",
]


def check_png(test, path):
    with open(path, "rb") as f:
        data = f.read()
    test.assertGreater(len(data), 1000, path)
    test.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n", path)
    length, kind = struct.unpack(">I4s", data[8:16])
    test.assertEqual((length, kind), (13, b"IHDR"), path)
    width, height = struct.unpack(">II", data[16:24])
    test.assertGreater(width, 300, path)
    test.assertGreater(height, 200, path)
    test.assertEqual(data[-8:-4], b"IEND", path)
    import matplotlib.image

    test.assertEqual(matplotlib.image.imread(path).shape[:2], (height, width), path)  # decodes


def check_svg(test, path):
    test.assertGreater(os.path.getsize(path), 1000, path)
    root = ET.parse(path).getroot()
    test.assertEqual(root.tag, "{http://www.w3.org/2000/svg}svg", path)
    test.assertGreater(len(list(root.iter())), 50, path)
    with open(path, encoding="utf-8") as f:
        return f.read()


def run_main(args):
    """moe-plot's main() in this process: (exit code, stdout, stderr)."""
    from moe_plot.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def committed_rows(name, **match):
    with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@unittest.skipUnless(HAVE_MATPLOTLIB, "matplotlib is not installed")
class CommittedRows(unittest.TestCase):
    def test_directory_of_committed_rows(self):
        """The executable on perf/results: one PNG and one SVG per committed file of performance rows, all valid;
        none for a file whose rows all come from ranks sharing a GPU (committed as correctness evidence)."""
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, TOOL, RESULTS, "-o", out], capture_output=True, text=True)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            made = sorted(os.listdir(out))
            for name in sorted(os.listdir(RESULTS)):
                if not name.endswith(".jsonl"):
                    continue
                stem = name[: -len(".jsonl")]
                pngs = [m for m in made if m.startswith(stem) and m.endswith(".png")]
                shared = all(r.get("shared_gpu") for r in committed_rows(name))
                if shared:
                    self.assertFalse(pngs, "a chart of %s, whose ranks shared a GPU" % name)
                    continue
                self.assertTrue(pngs, "no chart of %s" % name)
                for png in pngs:
                    check_png(self, os.path.join(out, png))
                    check_svg(self, os.path.join(out, png[:-4] + ".svg"))
            with open(os.path.join(out, "charts.md"), encoding="utf-8") as f:
                self.assertEqual(f.read(), proc.stdout)
            # Every committed row is verified; only rows of ranks sharing a GPU are refused (as performance).
            for line in proc.stderr.splitlines():
                if "refused" in line:
                    self.assertIn("ranks share a GPU", line)

    def test_captions_of_the_docs_charts(self):
        with tempfile.TemporaryDirectory() as out:
            code, md, err = run_main(["-o", out] + [os.path.join(RESULTS, f) for f in DOC_FILES])
            self.assertEqual(code, 0, err)
            captions = [c for c in md.split("\n\n") if c.startswith("*")]
            self.assertEqual(len(captions), 4, md)
            by_stem = {}
            for c in captions:
                m = re.search(r"perf/results/(\S+)\.jsonl", c)
                by_stem[m.group(1)] = c
            ll4 = by_stem["2026-11-28_h200x4_ll_3893034"]
            for text in ("4 GPUs", "git 3893034", "2026-11-28", "moe-perf --mode ll -g 4 -b 1 -e 256 -f 2 -n 40",
                         "timer: CUPTI kernel time", "DeepEP V1"):
                self.assertIn(text, ll4)
            ll2 = by_stem["2026-11-28_h200x4_ll_g2_3893034"]
            self.assertIn("2 GPUs", ll2)
            self.assertIn("moe-perf --mode ll -g 2 -b 1 -e 256 -f 2", ll2)  # not the 4-GPU command of its section
            ht2 = by_stem["2026-11-28_h200x2_ht_1bdaf96"]
            for text in ("2 GPUs", "git 1bdaf96", "--sms 8,12,16,20,24,48", "notify_dispatch not charted"):
                self.assertIn(text, ht2)
            ht4 = by_stem["2026-11-28_h200x4_ht_61a7f8e"]
            for text in ("4 GPUs", "git 61a7f8e", 'PERF_HT_ARGS="-n 10"', "drawn at 24 SMs"):
                self.assertIn(text, ht4)
            svg = check_svg(self, os.path.join(out, "2026-11-28_h200x4_ll_3893034.svg"))
            self.assertIn("4 GPUs", svg)  # the title is text in the SVG
            self.assertIn("git 3893034", svg)

    def test_docs_embed_committed_charts(self):
        with open(PERF_DOC, encoding="utf-8") as f:
            doc = f.read()
        self.assertTrue("\n## Charts\n" in doc, "docs/performance.md has no '## Charts' section")
        for f in DOC_FILES:
            stem = f[: -len(".jsonl")]
            for ext in ("png", "svg"):
                self.assertTrue("(charts/%s.%s)" % (stem, ext) in doc, "docs/performance.md lacks charts/%s.%s"
                                % (stem, ext))
            check_png(self, os.path.join(CHARTS_DIR, stem + ".png"))
            check_svg(self, os.path.join(CHARTS_DIR, stem + ".svg"))
        total = sum(os.path.getsize(os.path.join(CHARTS_DIR, n)) for n in os.listdir(CHARTS_DIR))
        self.assertLess(total, 500 * 1024, "docs/charts grew past 500 KB")


@unittest.skipUnless(HAVE_MATPLOTLIB, "matplotlib is not installed")
class Rules(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.out = os.path.join(self.dir, "out")
        self.ll = committed_rows("2026-11-28_h200x4_ll_3893034.jsonl")
        self.ht = committed_rows("2026-11-28_h200x2_ht_1bdaf96.jsonl")

    def tearDown(self):
        self.tmp.cleanup()

    def rows_file(self, rows, name="2026-12-01_h200x4_ll_test.jsonl"):
        path = os.path.join(self.dir, name)
        write_rows(path, rows)
        return path

    def pngs(self):
        return sorted(n for n in os.listdir(self.out) if n.endswith(".png")) if os.path.isdir(self.out) else []

    def test_unverified_rows_refused_by_default(self):
        rows = copy.deepcopy(self.ll)
        rows[0]["verified"] = False  # dispatch, 1 token
        del rows[1]["verified"]  # combine, 1 token: a row that never said it was checked
        path = self.rows_file(rows)
        code, md, err = run_main([path, "-o", self.out])
        self.assertEqual(code, 0, err)
        self.assertRegex(err, r"test\.jsonl:1: refused: ll dispatch row is not verified \(verified=false\)")
        self.assertRegex(err, r"test\.jsonl:2: refused: ll combine row is not verified \(verified=\"missing\"\)")
        self.assertIn("52 of the file's 54 rows in this group drawn", md)
        self.assertIn("2 refused (unverified)", md)
        svg = check_svg(self, os.path.join(self.out, self.pngs()[0][:-4] + ".svg"))
        self.assertNotIn("UNVERIFIED", svg)

    def test_only_unverified_rows_draw_nothing(self):
        rows = copy.deepcopy(self.ll)
        for r in rows:
            r["verified"] = False
        code, _, err = run_main([self.rows_file(rows), "-o", self.out])
        self.assertEqual(code, 1)
        self.assertIn("nothing to draw", err)
        self.assertEqual(self.pngs(), [])

    def test_show_unverified_marks_them(self):
        rows = copy.deepcopy(self.ht)
        rows[0]["verified"] = False  # dispatch bf16, 8 SMs
        code, md, err = run_main([self.rows_file(rows, "2026-12-01_h200x2_ht_test.jsonl"), "-o", self.out,
                                  "--show-unverified"])
        self.assertEqual(code, 0, err)
        self.assertNotIn("refused", err)
        self.assertIn("23 verified, 1 UNVERIFIED drawn as red X", md)
        png = self.pngs()[0]
        check_png(self, os.path.join(self.out, png))
        svg = check_svg(self, os.path.join(self.out, png[:-4] + ".svg"))
        self.assertIn("UNVERIFIED row (not in lines)", svg)  # legend
        self.assertIn("includes 1 UNVERIFIED rows (red X)", svg)  # under the title

    def test_shared_gpu_and_software_nic_rows_never_drawn(self):
        cases = [
            ({"ranks": 2, "gpus": 1}, "ranks 2 != gpus 1"),
            ({"shared_gpu": True}, "shared_gpu is true"),
            ({"transport": "socket"}, 'transport "socket" is not a GPU link'),
            ({"software_nic": True}, "software_nic is true"),
            ({"ranks_per_gpu": 2}, "ranks_per_gpu is 2"),
        ]
        for change, reason in cases:
            with self.subTest(change=change):
                rows = copy.deepcopy(self.ll)
                for r in rows:
                    r.update(change)
                out = os.path.join(self.dir, "out_%s" % "_".join(change))
                for extra in ([], ["--show-unverified"]):
                    code, _, err = run_main([self.rows_file(rows), "-o", out] + extra)
                    self.assertEqual(code, 1, err)
                    self.assertIn("refused, not drawn as performance: " + reason, err)
                    self.assertFalse(os.path.isdir(out) and os.listdir(out))

    def test_internode_ll_rows_through_the_software_nic_never_drawn(self):
        # LL rows as moe-perf writes them on virtual nodes (NCCL_MOE_EMULATE_NODES): refused as performance, and so
        # are rows that carry only their software-NIC keys (one rank per GPU otherwise).
        internode = {"nodes": 2, "transport": "software_nic", "software_nic": True,
                     "label": "software NIC \u2014 correctness/functional timing, not performance"}
        for change, reason in (
            (dict(internode, ranks=4, gpus=1, shared_gpu=True), "ranks 4 != gpus 1"),
            (internode, "software_nic is true"),
            ({"transport": "software_nic"}, 'transport "software_nic" is not a GPU link'),
        ):
            with self.subTest(change=change):
                rows = copy.deepcopy(self.ll)
                for r in rows:
                    r.update(change)
                out = os.path.join(self.dir, "out_internode_%d" % len(change))
                for extra in ([], ["--show-unverified"]):
                    code, _, err = run_main([self.rows_file(rows), "-o", out] + extra)
                    self.assertEqual(code, 1, err)
                    self.assertIn("refused, not drawn as performance: " + reason, err)
                    self.assertFalse(os.path.isdir(out) and os.listdir(out))

    def test_shared_gpu_rows_left_out_of_a_mixed_file(self):
        shared = copy.deepcopy(self.ll[:6])
        for r in shared:
            r.update({"ranks": 8, "gpus": 4})
        code, md, err = run_main([self.rows_file(self.ll + shared), "-o", self.out])
        self.assertEqual(code, 0, err)
        self.assertEqual(err.count("ranks share a GPU"), 6)
        self.assertIn("54 of the file's 60 rows in this group drawn", md)
        self.assertIn("6 refused (shared GPU / not a GPU link)", md)

    def test_older_rows_without_newer_keys(self):
        rows = copy.deepcopy(self.ll)
        for r in rows:
            for key in ("ranks", "timer", "event_median_us", "baseline_event_median_us", "timer_note"):
                r.pop(key, None)
        code, md, err = run_main([self.rows_file(rows), "-o", self.out])
        self.assertEqual(code, 0, err)
        self.assertIn("timer: not in the rows", md)
        self.assertEqual(len(self.pngs()), 1)

    def test_caption_fields(self):
        rows = copy.deepcopy(self.ll)
        code, md, err = run_main([self.rows_file(rows), "-o", self.out, "--perf-doc", "none"])
        self.assertEqual(code, 0, err)
        self.assertIn("*LL, 4 GPUs (NVIDIA H200), git 3893034, 2026-12-01.*", md)  # date from the file name
        self.assertIn("(machine h200x4)", md)
        self.assertIn("Command: not recorded in the rows", md)
        for r in rows:
            r["date"] = "2026-12-24T10:00:00Z"
            r["command"] = "moe-perf --mode ll -g 4 -b 1 -e 256 -f 2 -n 40"
            r["git_sha"] = "abcdef1"
        code, md, err = run_main([self.rows_file(rows, "rows.jsonl"), "-o", self.out])
        self.assertEqual(code, 0, err)
        self.assertIn("*LL, 4 GPUs (NVIDIA H200), git abcdef1, 2026-12-24.*", md)  # date from the rows
        self.assertIn("Command: `moe-perf --mode ll -g 4 -b 1 -e 256 -f 2 -n 40` (from the rows)", md)

    def test_file_name_sha_that_differs_from_the_rows(self):
        code, md, err = run_main([self.rows_file(self.ll, "2026-12-01_h200x4_ll_1234567.jsonl"), "-o", self.out])
        self.assertEqual(code, 0, err)
        self.assertIn("git 3893034 (the file name says 1234567)", md)

    def test_markdown_prefix(self):
        md_path = os.path.join(self.dir, "doc", "perf.md")
        code, md, err = run_main([self.rows_file(self.ll), "-o", os.path.join(self.dir, "doc", "charts"),
                                  "--markdown", md_path])
        self.assertEqual(code, 0, err)
        self.assertIn("](charts/2026-12-01_h200x4_ll_test.png)](charts/2026-12-01_h200x4_ll_test.svg)", md)
        with open(md_path, encoding="utf-8") as f:
            self.assertEqual(f.read(), md)

    def test_markdown_on_stdout_only(self):
        code, md, err = run_main([self.rows_file(self.ll), "-o", self.out, "--markdown", "-"])
        self.assertEqual(code, 0, err)
        prefix = os.path.relpath(self.out).replace(os.sep, "/")  # the images as seen from the working directory
        self.assertIn("](%s/2026-12-01_h200x4_ll_test.png)" % prefix, md)
        self.assertEqual(sorted(os.listdir(self.out)),
                         ["2026-12-01_h200x4_ll_test.png", "2026-12-01_h200x4_ll_test.svg"])  # no charts.md

    def test_bad_input(self):
        code, _, err = run_main([os.path.join(self.dir, "missing.jsonl"), "-o", self.out])
        self.assertEqual(code, 2)
        self.assertIn("no such file", err)


class CommandLookup(unittest.TestCase):
    """docs/performance.md's command for a file: only a command that would have written exactly these rows."""

    DOC = """# Perf

## Run A (git 1111111)

`build/perf/moe-perf --mode ll -g 4 -b 1 -e 4 -n 40`, then `build/perf/moe-perf --mode ll -g 2 -b 1 -e 4
-n 40` on two of the GPUs. Files: `perf/results/2026-12-01_h200x4_ll_{1111111,g2_1111111}.jsonl`.

## Run B

`scripts/device_session.sh build perf` with `PERF_LL_ARGS="-b 2 -e 2 -n 10"`: `..._ll_2222222.jsonl`.

## Charts

<!-- moe-plot begin -->
Caption: `moe-perf --mode ll -g 2 --tokens 2 -n 10`, rows `2026-12-01_h200x2_ll_2222222.jsonl`.
<!-- moe-plot end -->

## Run C

`moe-perf --mode ll -g 4 --tokens 2` and `moe-perf --mode ll -g 4 --tokens 2 -J x.json`:
`2026-12-01_h200x4_ll_3333333.jsonl`.
"""

    def rows(self, gpus, tokens, iters):
        return [{"mode": "ll", "op": "dispatch", "dtype": "fp8", "gpus": gpus, "tokens": t, "hidden": 7168, "topk": 8,
                 "experts": 288, "sms": 0, "iters": iters, "warmup": 5, "routing": "uniform", "seed": 1,
                 "timer": "kernel"} for t in tokens]

    def setUp(self):
        from moe_plot.provenance import PerfDoc

        self.tmp = tempfile.TemporaryDirectory()
        path = os.path.join(self.tmp.name, "performance.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.DOC)
        self.doc = PerfDoc(path)

    def tearDown(self):
        self.tmp.cleanup()

    def test_the_command_that_fits(self):
        cmd, section = self.doc.find_command("2026-12-01_h200x4_ll_1111111.jsonl", self.rows(4, [1, 2, 4], 40))
        self.assertEqual(cmd, "build/perf/moe-perf --mode ll -g 4 -b 1 -e 4 -n 40")
        self.assertEqual(section, "Run A (git 1111111)")
        cmd, _ = self.doc.find_command("2026-12-01_h200x4_ll_g2_1111111.jsonl", self.rows(2, [1, 2, 4], 40))
        self.assertEqual(cmd, "build/perf/moe-perf --mode ll -g 2 -b 1 -e 4 -n 40")  # across a line break

    def test_no_command_fits(self):
        cmd, section = self.doc.find_command("2026-12-01_h200x4_ll_1111111.jsonl", self.rows(4, [1, 2], 40))
        self.assertIsNone(cmd)  # a sub-sweep is another run
        self.assertEqual(section, "Run A (git 1111111)")
        self.assertEqual(self.doc.find_command("other.jsonl", self.rows(4, [1, 2, 4], 40)), (None, None))

    def test_device_session_arguments(self):
        cmd, _ = self.doc.find_command("2026-12-01_h200x2_ll_2222222.jsonl", self.rows(2, [2], 10))
        self.assertEqual(cmd, 'PERF_LL_ARGS="-b 2 -e 2 -n 10" scripts/device_session.sh build perf')

    def test_embedded_captions_are_no_source(self):
        cmd, section = self.doc.find_command("2026-12-01_h200x2_ll_2222222.jsonl", self.rows(2, [2], 10))
        self.assertEqual(section, "Run B")  # the caption between the markers would fit too, but it is moe-plot's

    def test_ambiguous_commands_are_not_guessed(self):
        cmd, section = self.doc.find_command("2026-12-01_h200x4_ll_3333333.jsonl", self.rows(4, [2], 20))
        self.assertIsNone(cmd)
        self.assertEqual(section, "Run C")


if __name__ == "__main__":
    if not HAVE_MATPLOTLIB:
        print("SKIP: matplotlib is not installed (python3 -m pip install -r scripts/moe-plot-requirements.txt)")
        sys.exit(SKIP)
    unittest.main(verbosity=2)
