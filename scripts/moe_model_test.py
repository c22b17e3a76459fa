#!/usr/bin/env python3
"""Tests of scripts/moe-model (unittest, standard library only). Registered with ctest as `moe_model` (label unit).

Byte formulas on hand-computed worlds (2 nodes x 1 GPU, 2 x 2), the routing statistics (exact enumeration,
group-limited routing), the model's metric, the row filter, a run on the committed rows, and that
docs/performance.md's model block is what the tool prints for the command written above it.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOOL = os.path.join(HERE, "moe-model")
PERF_DOC = os.path.join(REPO, "docs", "performance.md")

sys.dont_write_bytecode = True  # no __pycache__ left in the source tree
sys.path.insert(0, HERE)

from moe_model import predict, rates, routing, traffic  # noqa: E402


class RecordSizes(unittest.TestCase):
    def test_h7168_top8(self):
        self.assertEqual(traffic.fp8_row_bytes(7168), 7168 + 56 * 4)  # 7392: DeepEP's H (1 + 4/128)
        self.assertEqual(traffic.bf16_row_bytes(7168), 14336)
        # The internode kernels' record (src/mem/ht_net_layout.h, pinned in tests/unit/layout_test.cc): 96 + 7392.
        self.assertEqual(traffic.ht_dispatch_header_bytes(8), 96)
        self.assertEqual(traffic.ht_dispatch_record_bytes(7168, 8), 7488)
        self.assertEqual(traffic.ht_combine_record_bytes(7168, 8), 14368)
        self.assertEqual(traffic.ht_combine_record_bytes(7168, 8), 14336 + 32)
        self.assertEqual(traffic.ht_combine_record_bytes(7168, 8, fp8=True), 7392 + 32)
        self.assertEqual(traffic.ll_dispatch_msg_bytes(7168), 128 + 7392)
        self.assertEqual(traffic.ll_combine_msg_bytes(7168), 14336)


class TwoNodesOneGpu(unittest.TestCase):
    """2 nodes x 1 GPU, 2 experts (expert e on rank e = node e): every remote copy is RDMA, nothing on NVLink."""

    def setUp(self):
        self.topo = traffic.Topology(2, 1, 2)

    def test_token_counts(self):
        self.assertEqual(traffic.ht_token_rows(self.topo, 0, [0, 1]), (2, 1, 0))
        self.assertEqual(traffic.ht_token_rows(self.topo, 0, [0, -1]), (1, 0, 0))  # masked slot ignored
        self.assertEqual(traffic.ht_token_rows(self.topo, 1, [0]), (1, 1, 0))
        self.assertEqual(traffic.ll_token_msgs(self.topo, 0, [0, 1]), (2, 1, 0))
        self.assertEqual(traffic.ll_token_msgs(self.topo, 1, [1, 1]), (1, 0, 0))

    def test_world(self):
        routing_ = {0: [[0, 1], [1, -1], [0]], 1: [[0]]}
        ht = traffic.ht_world_rows(self.topo, routing_)
        self.assertEqual(ht[0], {"rdma_send": 2, "rdma_recv": 1, "nvl_send": 0, "nvl_recv": 0, "nodes_all": 4})
        self.assertEqual(ht[1], {"rdma_send": 1, "rdma_recv": 2, "nvl_send": 0, "nvl_recv": 0, "nodes_all": 1})
        ll = traffic.ll_world_msgs(self.topo, routing_)
        self.assertEqual(ll[0], {"rdma_send": 2, "rdma_recv": 1, "nvl_send": 0, "nvl_recv": 0, "recv_all": 3})
        self.assertEqual(ll[1], {"rdma_send": 1, "rdma_recv": 2, "nvl_send": 0, "nvl_recv": 0, "recv_all": 2})


class TwoNodesTwoGpus(unittest.TestCase):
    """2 nodes x 2 GPUs, 4 experts: ranks 0, 1 on node 0, ranks 2, 3 on node 1; expert e on rank e."""

    def setUp(self):
        self.topo = traffic.Topology(2, 2, 4)

    def test_token_of_rank0_to_ranks_1_2_3(self):
        # Node 0: rank 0 forwards to rank 1 over NVLink. Node 1: one RDMA record to the rail rank 2 (local index 0),
        # which keeps its copy and forwards one row to rank 3.
        self.assertEqual(traffic.ht_token_rows(self.topo, 0, [1, 2, 3]), (2, 1, 2))
        # LL: one message per destination rank: rank 1 over NVLink, ranks 2 and 3 over RDMA.
        self.assertEqual(traffic.ll_token_msgs(self.topo, 0, [1, 2, 3]), (3, 2, 1))

    def test_rail_is_the_same_local_index(self):
        # A token of rank 1 (local index 1) to rank 2 only: RDMA to rank 3 (the rail), then NVLink 3 -> 2.
        self.assertEqual(traffic.ht_token_rows(self.topo, 1, [2]), (1, 1, 1))
        w = traffic.ht_world_rows(self.topo, {1: [[2]]})
        self.assertEqual((w[1]["rdma_send"], w[3]["rdma_recv"], w[3]["nvl_send"], w[2]["nvl_recv"]), (1, 1, 1, 1))
        self.assertEqual(sum(v["rdma_recv"] for v in w.values()), 1)
        # LL sends it straight to rank 2.
        ll = traffic.ll_world_msgs(self.topo, {1: [[2]]})
        self.assertEqual((ll[1]["rdma_send"], ll[2]["rdma_recv"], ll[3]["rdma_recv"]), (1, 1, 0))

    def test_world_means_equal_exact_uniform_stats(self):
        # Every rank sends one token per 2-subset of 8 experts (2 per rank): the world's per-rank means over
        # tokens are the exact expectations of uniform top-2.
        topo = traffic.Topology(2, 2, 8)
        subsets = [list(s) for s in itertools.combinations(range(8), 2)]
        world = {r: subsets for r in range(4)}
        ht = traffic.ht_world_rows(topo, world)
        ll = traffic.ll_world_msgs(topo, world)
        st = routing.uniform_stats(2, 2, 8, 2)
        n = len(subsets)
        for key, stat in (("rdma_send", "nodes_remote"), ("nvl_send", "ht_nvl_rows"), ("nodes_all", "nodes_all")):
            self.assertAlmostEqual(sum(v[key] for v in ht.values()) / (4 * n), st[stat], places=12, msg=key)
        self.assertAlmostEqual(sum(v["rdma_send"] for v in ll.values()) / (4 * n), st["ll_rdma_msgs"], places=12)
        self.assertAlmostEqual(sum(v["nvl_send"] for v in ll.values()) / (4 * n), st["ll_nvl_msgs"], places=12)
        self.assertAlmostEqual(sum(v["recv_all"] for v in ll.values()) / (4 * n), st["ranks_all"], places=12)
        # Sends and receives balance over the world.
        for d in (ht, ll):
            for link in ("rdma", "nvl"):
                self.assertEqual(sum(v[link + "_send"] for v in d.values()), sum(v[link + "_recv"] for v in d.values()))


class RoutingStats(unittest.TestCase):
    def test_hypergeometric_by_hand(self):
        # 4 experts, top-2, a group of 2 experts misses both with chance C(2,2)/C(4,2) = 1/6.
        self.assertAlmostEqual(routing.p_group_hit(4, 2, 2), 5 / 6)
        self.assertAlmostEqual(routing.uniform_stats(2, 1, 4, 2)["nodes_all"], 5 / 3)
        self.assertAlmostEqual(routing.uniform_stats(2, 1, 4, 2)["nodes_remote"], 5 / 6)

    def test_group_limited_to_one_node(self):
        # 2 nodes, every token limited to 1 node: exactly one destination node, remote for half the sources.
        st = routing.group_limited_stats(2, 2, 16, 4, group_nodes=1, samples=500, seed=3)
        self.assertEqual(st["nodes_all"], 1.0)
        self.assertEqual(st["nodes_remote"], 0.5)
        self.assertLessEqual(st["ranks_all"], 2.0)

    def test_group_limit_never_exceeded(self):
        import random
        rng = random.Random(7)
        for _ in range(300):
            top = routing.group_limited_topk(rng, 8, 256, 8, 4)
            self.assertEqual(len(set(top)), 8)
            self.assertLessEqual(len({e // 32 for e in top}), 4)

    def test_limit_not_binding_matches_uniform(self):
        import random
        rng = random.Random(5)
        samples = 3000
        nodes = sum(len({e // 64 for e in routing.group_limited_topk(rng, 4, 256, 8, 4)}) for _ in range(samples))
        self.assertAlmostEqual(nodes / samples, routing.uniform_stats(4, 8, 256, 8)["nodes_all"], delta=0.03)

    def test_deepseek_shapes(self):
        # EP64 group-limited to 4 of 8 nodes: at most 4 nodes per token, nearly always 4.
        st = routing.group_limited_stats(8, 8, 256, 8, 4, samples=2000, seed=1)
        self.assertTrue(3.9 < st["nodes_all"] <= 4.0, st)
        self.assertAlmostEqual(st["nodes_remote"], st["nodes_all"] * 7 / 8)


class Model(unittest.TestCase):
    NVL = {"dispatch": {"gbps": 250.0}, "combine": {"gbps": 300.0}}

    def params(self):
        return {k: v[0] for k, v in predict.PARAMS.items()}

    def test_ht_metric_is_deepep_definition(self):
        prm = self.params()
        c = predict.ht_case(32, "dispatch", prm, self.NVL)
        st = c["routing"]
        expected = prm["ht_tokens"] * st["nodes_all"] * 7168 * (1 + 4 / 128) / c["time_us"] / 1e3
        self.assertAlmostEqual(c["deepep_metric_gbps"], expected)
        self.assertAlmostEqual(c["rdma_bytes"], prm["ht_tokens"] * st["nodes_remote"] * 7488)
        self.assertAlmostEqual(c["time_us"], c["fixed_us"] + max(c["t_nic_us"], c["t_nvl_us"]))
        self.assertEqual(c["bound"], "NIC")

    def test_fp8_combine_halves_nic_time(self):
        prm = self.params()
        bf16 = predict.ht_case(64, "combine", prm, self.NVL)
        fp8 = predict.ht_case(64, "combine", prm, self.NVL, fp8_combine=True)
        self.assertAlmostEqual(fp8["t_nic_us"] / bf16["t_nic_us"], 7424 / 14368)
        self.assertEqual(fp8["nvl_bytes"], bf16["nvl_bytes"])

    def test_ll_fp8_combine_rdma_bytes(self):
        prm = self.params()
        fits = {op: {"intercept_us": 5.0, "gbps": 200.0} for op in rates.LL_HALVES}
        bf16 = predict.ll_case(32, "combine", prm, fits)
        fp8 = predict.ll_case(32, "combine", prm, fits, fp8_combine=True)
        self.assertAlmostEqual(fp8["rdma_bytes"] / bf16["rdma_bytes"], 7392 / 14336)
        self.assertEqual((fp8["nvl_bytes"], fp8["recv_bytes"]), (bf16["nvl_bytes"], bf16["recv_bytes"]))

    def test_ll_sum_of_terms(self):
        prm = self.params()
        fits = {op: {"intercept_us": 5.0, "gbps": 200.0} for op in rates.LL_HALVES}
        c = predict.ll_case(16, "dispatch", prm, fits)
        self.assertAlmostEqual(c["rdma_bytes"], 128 * c["routing"]["ll_rdma_msgs"] * 7520)
        self.assertAlmostEqual(c["time_us"], 5.0 + max(c["t_nic_us"], c["t_nvl_us"]) + 6.0 + c["t_recv_us"])
        self.assertGreater(c["imbalance"], 1.0)

    def test_expected_max_normal(self):
        self.assertAlmostEqual(predict.expected_max_normal(2), 1 / 3.141592653589793 ** 0.5, places=4)


class RowFilter(unittest.TestCase):
    BASE = {"mode": "ht", "op": "dispatch", "dtype": "bf16", "backend": "gpu", "gpus": 2, "ranks": 2, "sms": 24,
            "tokens": 4096, "hidden": 7168, "topk": 8, "routing": "uniform", "verified": True, "timer": "kernel",
            "logical_gbps": 500.0}

    def test_shared_gpu_and_one_rank_rows_are_not_used(self):
        self.assertTrue(rates.usable(self.BASE))
        for change in ({"shared_gpu": True}, {"ranks": 1}, {"gpus": 1, "ranks": 1}, {"verified": False},
                       {"timer": "event"}, {"transport": "software_nic"}):
            self.assertFalse(rates.usable(dict(self.BASE, **change)), change)

    def test_internode_ll_rows_through_the_software_nic_are_not_used(self):
        # An LL row as moe-perf writes it for virtual nodes (NCCL_MOE_EMULATE_NODES=2, 4 ranks on one GPU) ...
        ll = dict(self.BASE, mode="ll", op="dispatch", dtype="fp8", sms=0, tokens=64, nodes=2, ranks=4, gpus=1,
                  shared_gpu=True, transport="software_nic", software_nic=True,
                  label="software NIC \u2014 correctness/functional timing, not performance")
        self.assertFalse(rates.usable(ll))
        # ... and each of its software-NIC keys alone refuses an otherwise usable LL row.
        alone = dict(self.BASE, mode="ll", op="dispatch_send", dtype="fp8", sms=0, tokens=64)
        self.assertTrue(rates.usable(alone))
        for change in ({"software_nic": True}, {"transport": "software_nic"},
                       {"transport": "software_nic", "software_nic": True, "nodes": 2}):
            self.assertFalse(rates.usable(dict(alone, **change)), change)
        rows = [dict(alone, op=op, tokens=t, software_nic=True, transport="software_nic", _file="x")
                for op in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv") for t in (32, 64, 128)]
        self.assertEqual([], [r for r in rows if rates.usable(r)])

    def test_peer_rate(self):
        rows = [dict(self.BASE, _file="a"), dict(self.BASE, gpus=4, ranks=4, logical_gbps=400.0, _file="b")]
        got = rates.ht_nvl_rates(rows)
        self.assertAlmostEqual(got[(2, "dispatch", "bf16")][0], 250.0)
        self.assertAlmostEqual(got[(4, "dispatch", "bf16")][0], 300.0)


class Tool(unittest.TestCase):
    def run_tool(self, *args):
        return subprocess.run([sys.executable, TOOL] + list(args), capture_output=True, text=True, timeout=120)

    def test_runs_on_committed_rows(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "m.json")
            p = self.run_tool("--markdown", "--json", out)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("Model, not measurement", p.stdout)
            with open(out, encoding="utf-8") as f:
                res = json.load(f)
        self.assertEqual(res["model"], "prediction, not measurement")
        self.assertEqual([(c["ep"], c["op"]) for c in res["ht"]],
                         [(ep, op) for ep in (16, 32, 64) for op in ("dispatch", "combine")])
        self.assertEqual(len(res["ll"]), 6)
        self.assertEqual(len(res["ht_fp8_combine"]), 3)
        self.assertEqual(len(res["ll_fp8_combine"]), 3)
        for c in res["ht"] + res["ll"]:
            self.assertIn(c["bound"], ("NIC", "NVLink"))
            self.assertGreater(c["time_us"], 0)
        for name in predict.PARAMS:
            self.assertIn(name, res["params"])

    def test_bad_set_is_an_error(self):
        p = self.run_tool("--set", "no_such=1")
        self.assertEqual(p.returncode, 2)
        self.assertIn("--set", p.stderr)

    def test_doc_block_is_the_tool_output(self):
        with open(PERF_DOC, encoding="utf-8") as f:
            doc = f.read()
        m = re.search(r"<!-- moe-model begin: (.*?) -->\n(.*?)<!-- moe-model end -->", doc, re.S)
        self.assertIsNotNone(m, "docs/performance.md has no moe-model block")
        argv = m.group(1).split()
        self.assertEqual(argv[0], "scripts/moe-model")
        p = subprocess.run([sys.executable, TOOL] + argv[1:], capture_output=True, text=True, timeout=120, cwd=REPO)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(m.group(2), p.stdout, "regenerate the block: %s" % m.group(1))


if __name__ == "__main__":
    unittest.main()
