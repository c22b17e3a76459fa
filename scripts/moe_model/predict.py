"""The time model per case, its named parameters, DeepEP's published figures and the issue's targets.

A MODEL, not a measurement: no machine this project can use has a NIC. Every assumption is a named parameter
below with its source; `scripts/moe-model` prints them all with the result.

HT (per rank, the busiest link decides; NIC and NVLink work in a pipeline of chunks):
    t = launch + rdma_latency + signal_fence + chunk_rdma + chunk_nvl + nvl_flag          (fill and drain)
        + max(B_rdma / (nic_line * nic_efficiency), rows_nvl * row / nvl_rate)
  B_rdma   = T * nodes_remote * record           (one record per (token, other destination node), to the rail rank)
  rows_nvl = T * ht_nvl_rows                      (forwarded rows; nvl_rate = measured intranode peer GB/s per GPU,
                                                   in the same logical row bytes that moe-perf counts)
  DeepEP's "RDMA bandwidth" = T * nodes_all * row / t, row = H (1 + 4/128) for FP8 dispatch and 2 H for BF16
  combine, nodes_all counting the own node (tests/test_internode.py: num_rdma_token_sent = (token, node) pairs after
  dedup, own node included, times hidden * 2 * the FP8 factor (1 + 4/128) / 2). It is a logical rate: it can
  exceed the NIC's line rate.

LL (per rank; split halves, the NIC moves the data while no kernel is resident):
    t = send_intercept + max(imbalance * B_rdma / nic, B_nvl / nvl_send_rate) + rdma_latency + signal_fence
        + recv_intercept + B_recv / recv_rate
  B_rdma = T * ll_rdma_msgs * msg, B_nvl = T * ll_nvl_msgs * msg, B_recv = T * ranks_all * msg; the intercepts and
  rates are least-squares fits of the measured 4-GPU split halves (rates.ll_half_fits).
"""

import math

from . import routing, traffic

# (value, unit, source). Printed by the tool; change with --set NAME=VALUE.
PARAMS = {
    "gpus_per_node": (8, "GPUs", "the target: 8 H200 per node, one ConnectX-7 per GPU (issue 14)"),
    "hidden": (7168, "elements", "DeepSeek-V3 (DeepEP's published settings)"),
    "topk": (8, "experts", "DeepSeek-V3"),
    "experts": (256, "experts", "DeepSeek-V3; DeepEP's LL test defaults to 288 (scale-out.md §1.4), see --set"),
    "ht_tokens": (4096, "tokens/rank", "DeepEP's HT setting"),
    "ll_tokens": (128, "tokens/rank", "DeepEP's LL setting"),
    "group_nodes": (4, "nodes", "HT group-limited routing: a token's experts lie in at most 4 nodes "
                    "(DeepSeek-V3; DeepEP's tests use top-min(nodes, 4) groups)"),
    "nic_line_gbps": (50.0, "GB/s", "400 Gb/s ConnectX-7 (NDR) per GPU, one direction"),
    "nic_efficiency": (0.90, "fraction", "assumed: DeepEP's NIC-bound H800 figures (EP32/64) imply 44-45 GB/s "
                       "under this model's bytes (printed as 'calibration'); not measured here, no NIC"),
    "rdma_latency_us": (3.0, "µs", "assumed: one-way GPU-initiated RDMA WRITE (doorbell over PCIe, WQE and payload "
                        "fetch, one switch hop, remote PCIe write); not measured here"),
    "signal_fence_us": (3.0, "µs", "assumed: the count/tail signal behind the data on the same QP; on adaptive-"
                        "routing CX7 fabrics the atomic waits for the earlier writes to complete, about one more "
                        "round trip (DeepEP PR #437, scale-out.md §1.4)"),
    "launch_us": (3.8, "µs", "shared/anchors.md: back-to-back empty kernel launches on H200"),
    "nvl_flag_us": (1.2, "µs", "shared/anchors.md: one-way NVLink flag between two H200"),
    "ht_chunk_tokens": (32, "tokens", "chunked tail signals (scale-out.md §6.1: 8-32 tokens per put_signal); "
                        "sets the pipeline fill and drain"),
    "mc_samples": (4096, "tokens", "Monte Carlo sample of the group-limited routing where the limit binds (EP64)"),
    "mc_seed": (1, "", "Monte Carlo seed (reproducible output)"),
}

# DeepEP V1 README (H800, one CX7 400 Gb/s per GPU; scale-out.md §1.4).
DEEPEP_HT_GBPS = {16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0)}  # dispatch / combine, "RDMA bandwidth"
DEEPEP_LL_US = {16: (118.0, 195.0), 32: (155.0, 273.0), 64: (173.0, 314.0)}  # dispatch / combine, kernel µs
CASES = (16, 32, 64)


def ht_target(ep, op):
    """Issue 14's HT target (GB/s in DeepEP's metric): EP16 >= 1.5x DeepEP, EP32/64 >= DeepEP."""
    pub = DEEPEP_HT_GBPS[ep][0 if op == "dispatch" else 1]
    return (1.5 * pub, ">= 1.5x DeepEP") if ep == 16 else (pub, ">= DeepEP")


def ll_target(ep, op):
    """Issue 14's LL targets (µs): EP16 dispatch <= 100, combine <= 165; none stated at EP32/64."""
    if ep == 16:
        return (100.0, "<= 100 µs") if op == "dispatch" else (165.0, "<= 165 µs")
    return None, "none stated"


def expected_max_normal(n):
    """E[max of n i.i.d. standard normals], by numerical integration of 1 - F(x)^n (x >= 0) and F(x)^n (x < 0)."""
    if n <= 1:
        return 0.0
    step, total, x = 1e-3, 0.0, -10.0
    while x < 10.0:
        xm = x + step / 2
        cdf = 0.5 * (1 + math.erf(xm / math.sqrt(2)))
        total += ((1 - cdf ** n) if xm >= 0 else -(cdf ** n)) * step
        x += step
    return total


def ll_imbalance(p, trials, ranks):
    """Busiest rank's RDMA messages over the mean: 1 + E[max of R normals] * sd/mean, binomial(trials, p)."""
    mean = trials * p
    return 1.0 + expected_max_normal(ranks) * math.sqrt(trials * p * (1 - p)) / mean


def ht_case(ep, op, prm, nvl, fp8_combine=False):
    G = prm["gpus_per_node"]
    N = ep // G
    H, K, T = prm["hidden"], prm["topk"], prm["ht_tokens"]
    st = routing.group_limited_stats(N, G, prm["experts"], K, prm["group_nodes"], prm["mc_samples"], prm["mc_seed"])
    nic = prm["nic_line_gbps"] * prm["nic_efficiency"] * 1e3  # bytes per µs
    if op == "dispatch":
        record, row, metric_row = (traffic.ht_dispatch_record_bytes(H, K), traffic.fp8_row_bytes(H),
                                   traffic.fp8_row_bytes(H))
    else:
        record = traffic.ht_combine_record_bytes(H, K, fp8=fp8_combine)
        row = metric_row = traffic.bf16_row_bytes(H)
    nvl_rate = nvl[op]["gbps"] * 1e3
    b_rdma = T * st["nodes_remote"] * record
    rows_nvl = T * st["ht_nvl_rows"]
    b_nvl = rows_nvl * row
    t_nic, t_nvl = b_rdma / nic, b_nvl / nvl_rate
    c = prm["ht_chunk_tokens"]
    chunk_rdma = c * record / nic
    chunk_nvl = c * (st["ht_nvl_rows"] / st["nodes_all"]) * row / nvl_rate
    fixed = prm["launch_us"] + prm["rdma_latency_us"] + prm["signal_fence_us"] + chunk_rdma + chunk_nvl \
        + prm["nvl_flag_us"]
    t = fixed + max(t_nic, t_nvl)
    metric = T * st["nodes_all"] * metric_row / t / 1e3
    pub = DEEPEP_HT_GBPS[ep][0 if op == "dispatch" else 1]
    target, target_text = ht_target(ep, op)
    out = {
        "case": "HT", "ep": ep, "nodes": N, "op": op, "precision": ("fp8" if op == "dispatch" or fp8_combine
                                                                      else "bf16"),
        "routing": st, "record_bytes": record, "nvl_row_bytes": row,
        "rdma_bytes": b_rdma, "nvl_bytes": b_nvl, "t_nic_us": t_nic, "t_nvl_us": t_nvl, "fixed_us": fixed,
        "nvl_gbps": nvl[op]["gbps"], "time_us": t, "deepep_metric_gbps": metric,
        "bound": "NIC" if t_nic >= t_nvl else "NVLink", "nic_over_nvl": t_nic / t_nvl,
        "deepep_gbps": pub, "target_gbps": target, "target": target_text, "met": metric >= target,
    }
    # What would meet the target: the time it allows, and the NIC efficiency or NVLink rate that gives it.
    t_needed = T * st["nodes_all"] * metric_row / (target * 1e3)
    out["time_for_target_us"] = t_needed
    if not out["met"]:
        budget = t_needed - fixed
        out["nic_efficiency_for_target"] = b_rdma / budget / (prm["nic_line_gbps"] * 1e3) if budget > 0 else None
        out["nvl_gbps_for_target"] = b_nvl / budget / 1e3 if budget > 0 else None
        out["rdma_bytes_cut_for_target"] = 1 - budget * nic / b_rdma if budget > 0 else None
    return out


def ll_case(ep, op, prm, fits, fp8_combine=False):
    G = prm["gpus_per_node"]
    N = ep // G
    H, K, T = prm["hidden"], prm["topk"], prm["ll_tokens"]
    st = routing.uniform_stats(N, G, prm["experts"], K)
    msg = traffic.ll_dispatch_msg_bytes(H) if op == "dispatch" else traffic.ll_combine_msg_bytes(H)
    # Stretch: FP8 partials (per-128 float scales) on RDMA only; NVLink and the receive term keep the BF16 bytes
    # (the receiver dequantizes; conservative).
    rdma_msg = traffic.fp8_row_bytes(H) if fp8_combine else msg
    send, recv = fits[op + "_send"], fits[op + "_recv"]
    nic = prm["nic_line_gbps"] * prm["nic_efficiency"] * 1e3
    p_rank = st["ranks_all"] / ep
    imb = ll_imbalance(p_rank, (ep - G) * T, ep)
    b_rdma = T * st["ll_rdma_msgs"] * rdma_msg
    b_nvl = T * st["ll_nvl_msgs"] * msg
    b_recv = T * st["ranks_all"] * msg
    t_nic = imb * b_rdma / nic
    t_nvl = b_nvl / (send["gbps"] * 1e3)
    t_recv = recv["intercept_us"] + b_recv / (recv["gbps"] * 1e3)
    latency = prm["rdma_latency_us"] + prm["signal_fence_us"]
    t = send["intercept_us"] + max(t_nic, t_nvl) + latency + t_recv
    pub = DEEPEP_LL_US[ep][0 if op == "dispatch" else 1]
    target, target_text = ll_target(ep, op)
    out = {
        "case": "LL", "ep": ep, "nodes": N, "op": op,
        "precision": "fp8" if op == "dispatch" or fp8_combine else "bf16",
        "routing": st, "msg_bytes": msg, "rdma_msg_bytes": rdma_msg, "rdma_bytes": b_rdma, "nvl_bytes": b_nvl,
        "recv_bytes": b_recv,
        "imbalance": imb, "t_send_fixed_us": send["intercept_us"], "t_nic_us": t_nic, "t_nvl_us": t_nvl,
        "t_latency_us": latency, "t_recv_us": t_recv, "time_us": t,
        "bound": "NIC" if t_nic >= t_nvl else "NVLink", "deepep_us": pub, "target_us": target,
        "target": target_text, "met": None if target is None else t <= target,
    }
    if out["met"] is False:
        budget = target - (t - t_nic)
        out["nic_efficiency_for_target"] = (imb * b_rdma / budget / (prm["nic_line_gbps"] * 1e3)
                                            if budget > 0 else None)
        out["rdma_bytes_cut_for_target"] = 1 - budget / t_nic if budget > 0 else None
    return out


def calibration(prm):
    """The NIC rate DeepEP's published HT figures imply under this model's routing and DeepEP's own record sizes
    (7472 B FP8 dispatch, 14384 B BF16 combine, internode.cu get_num_bytes_per_token at 29d31c0), ignoring fixed
    costs: rate = published * nodes_remote / nodes_all * record / row. Meaningful where DeepEP is NIC-bound
    (EP32/64; its EP16 is bound by H800's NVLink forwarding)."""
    G, H = prm["gpus_per_node"], prm["hidden"]
    out = []
    for ep in CASES:
        st = routing.group_limited_stats(ep // G, G, prm["experts"], prm["topk"], prm["group_nodes"],
                                         prm["mc_samples"], prm["mc_seed"])
        for i, (op, record, row) in enumerate((("dispatch", 7472, traffic.fp8_row_bytes(H)),
                                               ("combine", 14384, traffic.bf16_row_bytes(H)))):
            pub = DEEPEP_HT_GBPS[ep][i]
            out.append({"ep": ep, "op": op, "deepep_gbps": pub,
                        "implied_nic_gbps": pub * st["nodes_remote"] / st["nodes_all"] * record / row})
    return out


def run(prm, nvl, fits):
    ht = [ht_case(ep, op, prm, nvl) for ep in CASES for op in ("dispatch", "combine")]
    stretch = [ht_case(ep, "combine", prm, nvl, fp8_combine=True) for ep in CASES]
    ll = [ll_case(ep, op, prm, fits) for ep in CASES for op in ("dispatch", "combine")]
    ll_stretch = [ll_case(ep, "combine", prm, fits, fp8_combine=True) for ep in CASES]
    return {"ht": ht, "ht_fp8_combine": stretch, "ll": ll, "ll_fp8_combine": ll_stretch,
            "calibration": calibration(prm)}
