"""Routing statistics per token, averaged over tokens and over source ranks (every rank plays the same role).

Uniform top-k (scores i.i.d., so the chosen k experts are a uniformly random k-subset of E): exact, from the
hypergeometric chance that a group of m experts holds none of the k, C(E - m, k) / C(E, k).

Group-limited (DeepEP's tests, tests/test_internode.py at 29d31c0: scores |N(0,1)| + 1, a node's score is the
maximum over its experts, the top-g nodes are kept, then the top-k experts among them): Monte Carlo with a fixed
seed. When g >= nodes the limit does not bind and the exact uniform formulas apply.

Every function returns a dict of per-token means:
  nodes_all     destination nodes, the own node included (DeepEP's num_rdma_token_sent / tokens)
  nodes_remote  destination nodes other than the own one (HT RDMA records per token)
  ranks_all     destination ranks, the own rank included
  ht_nvl_rows   HT NVLink rows per token: destination GPUs other than the rail rank of each destination node
  ll_rdma_msgs  LL messages to ranks of other nodes
  ll_nvl_msgs   LL messages to the other ranks of the own node
"""

import heapq
import random
from math import comb


def p_group_hit(num_experts, group_experts, topk):
    """Chance that a group of `group_experts` experts holds at least one of a uniform top-k."""
    return 1.0 - comb(num_experts - group_experts, topk) / comb(num_experts, topk)


def _derived(nodes_all, ranks_all, num_nodes, gpus_per_node):
    """Per-token means over source ranks. Routing does not depend on the source, so the own node is each
    destination node with chance 1/N, the own rank each destination rank with chance 1/R, and the rail rank of a
    destination node each of its destination GPUs with chance 1/G."""
    G, N = gpus_per_node, num_nodes
    R = N * G
    p_rank = ranks_all / R  # chance that a given rank is a destination
    return {
        "nodes_all": nodes_all,
        "nodes_remote": nodes_all * (N - 1) / N,
        "ranks_all": ranks_all,
        "ht_nvl_rows": ranks_all * (G - 1) / G,
        "ll_rdma_msgs": p_rank * (R - G),
        "ll_nvl_msgs": p_rank * (G - 1),
    }


def uniform_stats(num_nodes, gpus_per_node, num_experts, topk):
    """Exact means for uniform top-k routing."""
    R = num_nodes * gpus_per_node
    if num_experts % R:
        raise ValueError("%d experts do not divide over %d ranks" % (num_experts, R))
    nodes_all = num_nodes * p_group_hit(num_experts, num_experts // num_nodes, topk)
    ranks_all = R * p_group_hit(num_experts, num_experts // R, topk)
    return _derived(nodes_all, ranks_all, num_nodes, gpus_per_node)


def group_limited_topk(rng, num_nodes, num_experts, topk, group_nodes):
    """One token of DeepEP's test routing: its top-k expert ids (a list)."""
    epn = num_experts // num_nodes
    scores = [abs(rng.gauss(0.0, 1.0)) + 1.0 for _ in range(num_experts)]
    node_score = [max(scores[n * epn:(n + 1) * epn]) for n in range(num_nodes)]
    chosen = heapq.nlargest(group_nodes, range(num_nodes), key=node_score.__getitem__)
    cand = [e for n in chosen for e in range(n * epn, (n + 1) * epn)]
    return heapq.nlargest(topk, cand, key=scores.__getitem__)


def group_limited_stats(num_nodes, gpus_per_node, num_experts, topk, group_nodes, samples=4096, seed=1):
    """Means for DeepEP's group-limited test routing (exact when the limit does not bind)."""
    g = min(group_nodes, num_nodes)
    if g >= num_nodes:
        return dict(uniform_stats(num_nodes, gpus_per_node, num_experts, topk), method="exact (limit not binding)")
    rng = random.Random(seed)
    R = num_nodes * gpus_per_node
    epn, epr = num_experts // num_nodes, num_experts // R
    nodes = ranks = 0
    for _ in range(samples):
        top = group_limited_topk(rng, num_nodes, num_experts, topk, g)
        nodes += len({e // epn for e in top})
        ranks += len({e // epr for e in top})
    stats = _derived(nodes / samples, ranks / samples, num_nodes, gpus_per_node)
    stats["method"] = "Monte Carlo, %d tokens, seed %d" % (samples, seed)
    return stats
