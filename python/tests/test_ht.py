"""High-throughput layout, notify + dispatch, cached dispatch and combine through nccl_moe.torch.Comm, several ranks
of a LocalWorld, against tests/reference.py (exact: the contract promises bit-equal copies and a fixed FP32
summation order)."""
import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import reference as ref
from harness import Problem, assert_same_bits, prewarm
from nccl_moe.torch import Comm

pytestmark = pytest.mark.torch


def _run_ht(backend, p, *, alignment=1, fp8=None, worst_case=False, bias=True, cached=True):
    world = backend.world(p.num_ranks)
    max_tokens = max(p.tokens + [1])

    def rank_body(r):
        prewarm(backend)
        comm = Comm(world.group(r), num_experts=p.num_experts, hidden=p.hidden, max_topk=p.topk,
                    max_tokens_per_rank=max_tokens)
        try:
            out = {}
            idx = backend.to(p.topk_idx[r])
            w = backend.to(p.weights[r])
            x = backend.to(p.x[r])
            out["layout"] = [t.cpu() for t in comm.dispatch_layout(idx)[:3]]
            kwargs = dict(expert_alignment=alignment)
            if worst_case:
                kwargs["num_worst_tokens"] = p.num_ranks * max_tokens
            if fp8 is None:
                res = comm.ht_dispatch(x, idx, w, **kwargs)
            else:
                q, s = ref.cast_to_fp8(p.x[r], fp8)
                # Scales as a column-major view: the library reads them through both strides.
                s_cm = backend.to(s.t().contiguous()).t()
                res = comm.ht_dispatch((backend.to(q), s_cm), idx, w, **kwargs)
            routing = res.routing
            out["dispatch"] = dict(recv_x=res.recv_x.cpu(), recv_x_scales=None if res.recv_x_scales is None else
                                   res.recv_x_scales.cpu(), recv_topk_idx=res.recv_topk_idx.cpu(),
                                   recv_topk_weights=res.recv_topk_weights.cpu(),
                                   per_expert=routing.num_recv_tokens_per_expert,
                                   num_recv=routing.num_recv_tokens, src_info=routing.recv_src_info.cpu(),
                                   recv_count=routing.recv_count.cpu(), rows=routing.rows,
                                   recv_count_per_expert=routing.recv_count_per_expert.cpu())
            if cached and fp8 is None:
                x2 = backend.to(ref.make_rows(p.tokens[r], p.hidden, rank=r, seed=99))
                out["cached"] = comm.ht_dispatch(x2, routing=routing).recv_x.cpu()
            # Combine: every rank sends back what it received (bf16 rows), with the received weights.
            back = res.recv_x if fp8 is None else backend.to(out["dispatch"]["recv_x"].float().to(torch.bfloat16))
            biases = None
            if bias:
                biases = (backend.to(ref.make_rows(p.tokens[r], p.hidden, rank=r, seed=5)),
                          backend.to(ref.make_rows(p.tokens[r], p.hidden, rank=r, seed=6)))
            comb = comm.ht_combine(back, routing, topk_weights=res.recv_topk_weights, bias=biases)
            out["combine"] = (comb.combined_x.cpu(), comb.combined_topk_weights.cpu())
            return out
        finally:
            comm.destroy()

    results = world.run(rank_body)
    want = ref.ht_dispatch(p.topk_idx, p.num_experts, x=p.x, weights=p.weights, expert_alignment=alignment,
                           x_scales=None if fp8 is None else [ref.cast_to_fp8(x, fp8)[1] for x in p.x])
    for r in range(p.num_ranks):
        got = results[r]
        per_rank, per_expert, in_rank = ref.layout(p.topk_idx[r], p.num_ranks, p.num_experts)
        assert_same_bits(got["layout"][0], per_rank, f"rank {r} num_tokens_per_rank")
        assert_same_bits(got["layout"][1], per_expert, f"rank {r} num_tokens_per_expert")
        assert_same_bits(got["layout"][2], in_rank, f"rank {r} is_token_in_rank")
        d, w = got["dispatch"], want[r]
        n = len(w["src"])
        assert int(d["recv_count"][0]) == n
        assert_same_bits(d["src_info"][:n], w["src_info"], f"rank {r} recv_src_info")
        assert d["recv_count_per_expert"].tolist() == w["num_recv_per_expert"]
        if worst_case:
            assert d["num_recv"] is None and d["per_expert"] is None and d["rows"] == p.num_ranks * max(p.tokens)
            assert (d["recv_topk_idx"][n:] == -1).all(), "rows past N_recv hold -1 ids"
        else:
            assert d["num_recv"] == n and d["per_expert"] == w["num_recv_per_expert"] and d["rows"] == n
        if fp8 is None:
            assert_same_bits(d["recv_x"][:n], w["recv_x"], f"rank {r} recv_x")
        else:
            q_want = torch.stack([ref.cast_to_fp8(p.x[s], fp8)[0][t] for s, t in w["src"]]) if n else None
            if n:
                assert_same_bits(d["recv_x"][:n], q_want, f"rank {r} recv_x fp8")
                assert_same_bits(d["recv_x_scales"][:n], w["recv_x_scales"], f"rank {r} recv_x_scales")
        assert_same_bits(d["recv_topk_idx"][:n], w["recv_topk_idx"], f"rank {r} recv_topk_idx")
        assert_same_bits(d["recv_topk_weights"][:n], w["recv_topk_weights"], f"rank {r} recv_topk_weights")
        if "cached" in got:
            x2 = [ref.make_rows(p.tokens[s], p.hidden, rank=s, seed=99) for s in range(p.num_ranks)]
            if n:
                assert_same_bits(got["cached"][:n], torch.stack([x2[s][t] for s, t in w["src"]]),
                                 f"rank {r} cached recv_x")
    rows = [results[d]["dispatch"]["recv_x"][:len(want[d]["src"])] for d in range(p.num_ranks)]
    if fp8 is not None:
        rows = [x.float().to(torch.bfloat16) for x in rows]
    wts = [results[d]["dispatch"]["recv_topk_weights"][:len(want[d]["src"])] for d in range(p.num_ranks)]
    b0 = [ref.make_rows(p.tokens[s], p.hidden, rank=s, seed=5) for s in range(p.num_ranks)] if bias else None
    b1 = [ref.make_rows(p.tokens[s], p.hidden, rank=s, seed=6) for s in range(p.num_ranks)] if bias else None
    outs, wouts = ref.ht_combine(want, rows, num_tokens=p.tokens, weights=wts, bias0=b0, bias1=b1)
    for s in range(p.num_ranks):
        assert_same_bits(results[s]["combine"][0], outs[s], f"rank {s} combined_x")
        assert_same_bits(results[s]["combine"][1], wouts[s], f"rank {s} combined_topk_weights")
        # Every weight comes back exactly from the one rank that holds its expert.
        assert_same_bits(results[s]["combine"][1], torch.where(p.topk_idx[s] >= 0, p.weights[s],
                                                               torch.zeros_like(p.weights[s])), f"rank {s} weights")


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ht_bf16(backend, num_ranks):
    # Uneven token counts and a rank without tokens.
    tokens = [13, 0, 7, 20][:num_ranks] if num_ranks > 2 else [13, 5]
    p = Problem(num_ranks, 4 * num_ranks, 256, 4, tokens, seed=num_ranks)
    _run_ht(backend, p)


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_ht_fp8(backend, fmt):
    p = Problem(2, 8, 640, 3, [9, 12], seed=3, kind="wide")
    _run_ht(backend, p, fp8=fmt, cached=False)


def test_ht_alignment_int32_ids_worst_case(backend):
    p = Problem(3, 6, 128, 2, [10, 4, 8], seed=5, index_dtype=torch.int32)
    _run_ht(backend, p, alignment=4, worst_case=True, bias=False)


def test_ht_skewed_everything_to_rank0(backend):
    p = Problem(2, 4, 256, 2, [16, 16], seed=11, masked=0.0, empty=0.0)
    for r in range(2):
        p.topk_idx[r] = torch.tensor([[0, 1]] * 16, dtype=torch.int64)
    _run_ht(backend, p)


def test_ht_argument_errors(backend):
    world = backend.world(1)

    def rank_body(r):
        comm = Comm(world.group(r), num_experts=4, hidden=256, max_topk=4, max_tokens_per_rank=8)
        try:
            x = backend.to(torch.zeros((4, 256), dtype=torch.bfloat16))
            idx = backend.to(torch.zeros((4, 2), dtype=torch.int64))
            with pytest.raises(TypeError, match="x: dtype torch.float32"):
                comm.ht_dispatch(x.float(), idx)
            with pytest.raises(TypeError, match="topk_idx: dtype torch.int16"):
                comm.ht_dispatch(x, idx.to(torch.int16))
            with pytest.raises(ValueError, match="topk_idx: required"):
                comm.ht_dispatch(x)
            with pytest.raises(ValueError, match="x_scales: required"):
                comm.ht_dispatch(x.to(torch.float8_e4m3fn), idx)
            res = comm.ht_dispatch(x, idx)
            with pytest.raises(ValueError, match="topk_idx: must be None with routing="):
                comm.ht_dispatch(x, idx, routing=res.routing)
            with pytest.raises(ValueError, match="x: shape"):
                comm.ht_combine(res.recv_x[:1], res.routing)
            with pytest.raises(ValueError, match="allocate_on_comm_stream=True needs previous_event"):
                comm.ht_dispatch(x, idx, allocate_on_comm_stream=True)
            # The library's own checks come back with its message.
            import nccl_moe

            big = backend.to(torch.zeros((9, 256), dtype=torch.bfloat16))
            with pytest.raises(nccl_moe.NcclMoeError, match="num_tokens is 9"):
                comm.ht_dispatch(big, backend.to(torch.zeros((9, 2), dtype=torch.int64)))
        finally:
            comm.destroy()

    world.run(rank_body)
