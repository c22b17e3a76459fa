"""The semantics of every NCCL-MoE operation on plain torch CPU tensors, for all ranks at once: the tests' oracle.

Written from docs/reference.md and include/nccl_moe.h (not from the C++ reference):
  - HT dispatch: rows at rank d in the order source rank ascending, then source token ascending, each token once per
    receiving rank; recv_topk_idx holds local ids (e - d*E_l) where the expert lives on d, else -1; weights 0.0 there.
  - HT combine: out[s][t] = bf16(((0.0f + x_d0[row]) + x_d1[row] + ...) + bias0 + bias1), d ascending, FP32 adds.
  - LL dispatch: one row per valid (token, slot) in slab e % E_l of rank e / E_l, source rank ascending, then token,
    then slot; recv_count per slab; fp8 rows are cast_row_to_fp8 of the source row.
  - LL combine: per expert rank d ascending, acc = FMA chain over t's slots on d (k ascending), partial = bf16(acc),
    sum = sum + float(partial); out = bf16(sum).
The FMA is computed as one multiply and one add in FP32: equal to fmaf when the product is exact in FP32, which the
tests' data guarantees (bf16 values times weights k/64); with other data compare with a tolerance.
"""
import torch

_BF16 = torch.bfloat16


def ceil_div(a, b):
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------------------------
# Test data that makes comparisons exact
# ------------------------------------------------------------------------------------------------------------------


def make_topk(num_tokens, topk, num_experts, *, seed, masked_fraction=0.0, empty_fraction=0.0, skew=None,
              dtype=torch.int64):
    """[T, K] distinct expert ids per token, -1 for masked slots (any position) and for empty tokens."""
    g = torch.Generator().manual_seed(seed)
    if skew is None:
        scores = torch.rand((num_tokens, num_experts), generator=g)
    else:
        # Experts of low ranks are picked more often (imbalance).
        scores = torch.rand((num_tokens, num_experts), generator=g) * torch.arange(1, num_experts + 1) ** -float(skew)
    idx = scores.topk(topk, dim=1).indices
    if masked_fraction > 0:
        idx[torch.rand(idx.shape, generator=g) < masked_fraction] = -1
    if empty_fraction > 0:
        idx[torch.rand((num_tokens,), generator=g) < empty_fraction] = -1
    return idx.to(dtype)


def make_weights(num_tokens, topk, *, seed):
    """[T, K] float32 weights (1 + n) / 64: products with bf16 values are exact in FP32."""
    g = torch.Generator().manual_seed(seed + 7919)
    return (torch.randint(0, 64, (num_tokens, topk), generator=g).float() + 1.0) / 64.0


def make_rows(num_tokens, hidden, *, rank, seed=0, kind="exact"):
    """[T, H] bf16 rows that encode (rank, token, channel).

    kind "exact": +-(1 + h % 15) / 16, sums of up to 17 of them are exact in FP32 and bf16.
    kind "wide": +-(1 + m/128) * 2^e, e in [-10, 9]: the FP8 cast across a wide range within one group.
    """
    t = torch.arange(num_tokens, dtype=torch.int64).view(-1, 1)
    c = torch.arange(hidden, dtype=torch.int64).view(1, -1)
    h = (t * 1000003 + c * 7919 + rank * 104729 + seed * 15485863) % 2147483647
    h = (h * 48271) % 2147483647
    sign = torch.where(h % 2 == 0, 1.0, -1.0)
    if kind == "exact":
        v = sign * (1.0 + (h // 2 % 15).double()) / 16.0
    else:
        e = (h // 2 % 20) - 10
        m = h // 64 % 128
        v = sign * (1.0 + m.double() / 128.0) * torch.pow(2.0, e.double())
    return v.to(torch.float32).to(_BF16)


# ------------------------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------------------------


def _round_up_pow2(scale):
    bits = scale.view(torch.int32)
    has_mantissa = (bits & 0x7FFFFF) != 0
    rounded = (bits + 0x800000) & ~0x7FFFFF
    return torch.where(has_mantissa, rounded, bits).view(torch.float32)


def cast_to_fp8(x, scale_format="float"):
    """bf16 [T, H] -> (fp8 e4m3 [T, H], scales): float [T, G] (float, pow2) or packed ue8m0 int32 [T, ceil(G/4)].

    Per 128-channel group: amax (NaN ignored), a = max(amax, 1e-4), scale = a / 448 (pow2/ue8m0: rounded up to a
    power of two), q = e4m3_rne_satfinite(x * (1 / scale)).
    """
    T, H = x.shape
    G = ceil_div(H, 128)
    xf = x.float()
    pad = G * 128 - H
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    groups = xp.view(T, G, 128).abs()
    groups = torch.where(torch.isnan(groups), torch.zeros_like(groups), groups)
    amax = groups.amax(dim=2)
    scale = torch.clamp(amax, min=1e-4) / 448.0
    if scale_format in ("pow2", "ue8m0"):
        scale = _round_up_pow2(scale)
    inv = 1.0 / scale
    inv_per_channel = inv.repeat_interleave(128, dim=1)[:, :H]
    y = xf * inv_per_channel
    y = torch.clamp(y, -448.0, 448.0)  # satfinite (only |y| = 448 + rounding can get there)
    q = y.to(torch.float8_e4m3fn)
    if scale_format != "ue8m0":
        return q, scale
    exps = ((scale.view(torch.int32) >> 23) & 0xFF).to(torch.int64)
    P = ceil_div(G, 4)
    padded = torch.zeros((T, P * 4), dtype=torch.int64)
    padded[:, :G] = exps
    words = padded.view(T, P, 4)
    packed = words[..., 0] | (words[..., 1] << 8) | (words[..., 2] << 16) | (words[..., 3] << 24)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return q, packed.to(torch.int32)


# ------------------------------------------------------------------------------------------------------------------
# Operations over all ranks (lists indexed by rank)
# ------------------------------------------------------------------------------------------------------------------


def layout(topk_idx, num_ranks, num_experts):
    """(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool) of one rank."""
    E_l = num_experts // num_ranks
    T = topk_idx.shape[0]
    per_expert = torch.zeros(num_experts, dtype=torch.int32)
    in_rank = torch.zeros((T, num_ranks), dtype=torch.bool)
    for t in range(T):
        for e in topk_idx[t].tolist():
            if e >= 0:
                per_expert[e] += 1
                in_rank[t, e // E_l] = True
    return in_rank.sum(0, dtype=torch.int32), per_expert, in_rank


def ht_dispatch(topk, num_experts, *, x=None, x_scales=None, weights=None, expert_alignment=1):
    """topk: per rank [T_s, K]; x / x_scales / weights: per rank or None. Returns one dict per receiving rank:
    src [(s, t)], src_info [N] int32, recv_x, recv_x_scales, recv_topk_idx [N, K] (dtype of topk), recv_topk_weights,
    num_recv_per_expert (aligned list), rank_prefix [R + 1]."""
    R = len(topk)
    E_l = num_experts // R
    out = []
    for d in range(R):
        src, prefix = [], [0]
        for s in range(R):
            for t in range(topk[s].shape[0]):
                if any(e >= 0 and e // E_l == d for e in topk[s][t].tolist()):
                    src.append((s, t))
            prefix.append(len(src))
        N = len(src)
        K = topk[0].shape[1]
        recv_idx = torch.full((N, K), -1, dtype=topk[0].dtype)
        recv_w = torch.zeros((N, K), dtype=torch.float32) if weights is not None else None
        counts = [0] * E_l
        for i, (s, t) in enumerate(src):
            for k, e in enumerate(topk[s][t].tolist()):
                if e >= 0 and e // E_l == d:
                    recv_idx[i, k] = e - d * E_l
                    counts[e - d * E_l] += 1
                    if recv_w is not None:
                        recv_w[i, k] = weights[s][t, k]
        aligned = [ceil_div(c, expert_alignment) * expert_alignment for c in counts]
        r = {
            "src": src,
            "src_info": torch.tensor([(s << 24) | t for s, t in src], dtype=torch.int32),
            "recv_topk_idx": recv_idx,
            "recv_topk_weights": recv_w,
            "num_recv_per_expert": aligned,
            "rank_prefix": prefix,
        }
        if x is not None:
            r["recv_x"] = (torch.stack([x[s][t] for s, t in src]) if N else
                           torch.empty((0, x[0].shape[1]), dtype=x[0].dtype))
        if x_scales is not None:
            r["recv_x_scales"] = (torch.stack([x_scales[s][t] for s, t in src]) if N else
                                  torch.empty((0, x_scales[0].shape[1]), dtype=x_scales[0].dtype))
        out.append(r)
    return out


def ht_combine(dispatched, x, *, num_tokens, weights=None, bias0=None, bias1=None):
    """dispatched: ht_dispatch's result; x: per receiving rank [N_d, H] bf16; weights: per receiving rank [N_d, K].
    Returns (out per source rank [T_s, H] bf16, weights per source rank [T_s, K] float32 or None)."""
    R = len(dispatched)
    H = x[0].shape[1]
    rows = [{st: i for i, st in enumerate(dispatched[d]["src"])} for d in range(R)]
    outs, wouts = [], []
    for s in range(R):
        T = num_tokens[s]
        acc = torch.zeros((T, H), dtype=torch.float32)
        wacc = torch.zeros((T, weights[0].shape[1]), dtype=torch.float32) if weights is not None else None
        for t in range(T):
            for d in range(R):
                i = rows[d].get((s, t))
                if i is not None:
                    acc[t] = acc[t] + x[d][i].float()
                    if wacc is not None:
                        wacc[t] = wacc[t] + weights[d][i]
        if bias0 is not None:
            acc = acc + bias0[s].float()
        if bias1 is not None:
            acc = acc + bias1[s].float()
        outs.append(acc.to(_BF16))
        wouts.append(wacc)
    return outs, (wouts if weights is not None else None)


def ll_dispatch(topk, num_experts, max_tokens, *, x, use_fp8=False, scale_format="float"):
    """Returns per receiving rank d: recv_count [E_l] int32, slabs (per local expert: [(s, t, k)] in row order),
    recv_x per slab (the first recv_count rows), recv_x_scales per slab (fp8)."""
    R = len(topk)
    E_l = num_experts // R
    casts = [cast_to_fp8(x[s], scale_format) for s in range(R)] if use_fp8 else None
    out = []
    for d in range(R):
        slabs = [[] for _ in range(E_l)]
        for s in range(R):
            assert topk[s].shape[0] <= max_tokens
            for t in range(topk[s].shape[0]):
                for k, e in enumerate(topk[s][t].tolist()):
                    if e >= 0 and e // E_l == d:
                        slabs[e % E_l].append((s, t, k))
        recv_x, recv_scales = [], []
        for j in range(E_l):
            if use_fp8:
                recv_x.append(torch.stack([casts[s][0][t] for s, t, _ in slabs[j]]) if slabs[j] else None)
                recv_scales.append(torch.stack([casts[s][1][t] for s, t, _ in slabs[j]]) if slabs[j] else None)
            else:
                recv_x.append(torch.stack([x[s][t] for s, t, _ in slabs[j]]) if slabs[j] else None)
        out.append({
            "recv_count": torch.tensor([len(sl) for sl in slabs], dtype=torch.int32),
            "slabs": slabs,
            "recv_x": recv_x,
            "recv_x_scales": recv_scales if use_fp8 else None,
        })
    return out


def ll_combine(topk, weights, dispatched, y, num_experts):
    """y: per expert rank d, [E_l, R*M, H] bf16 (rows in d's slab order). Returns out per source rank [T_s, H]."""
    R = len(topk)
    E_l = num_experts // R
    row_of = []
    for d in range(R):
        m = {}
        for j, slab in enumerate(dispatched[d]["slabs"]):
            for i, stk in enumerate(slab):
                m[stk] = (j, i)
        row_of.append(m)
    H = y[0].shape[2]
    outs = []
    for s in range(R):
        T = topk[s].shape[0]
        out = torch.zeros((T, H), dtype=torch.float32)
        for t in range(T):
            total = torch.zeros(H, dtype=torch.float32)
            ids = topk[s][t].tolist()
            for d in range(R):
                ks = [k for k, e in enumerate(ids) if e >= 0 and e // E_l == d]
                if not ks:
                    continue
                acc = torch.zeros(H, dtype=torch.float32)
                for k in ks:
                    j, i = row_of[d][(s, t, k)]
                    acc = acc + weights[s][t, k] * y[d][j, i].float()
                total = total + acc.to(_BF16).float()
            out[t] = total
        outs.append(out.to(_BF16))
    return outs


def expert_fn(rows, rank, local_expert, num_local_experts):
    """A known function of a row and of the expert it is at: y = x * c with c = (1 + expert) / 8 (exact in bf16 for
    the 'exact' rows and few experts)."""
    e = rank * num_local_experts + local_expert
    return (rows.float() * ((1 + e % 8) / 8.0)).to(_BF16)
