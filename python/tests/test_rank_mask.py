"""Rank masks (include/nccl_moe.h "Rank masks") through nccl_moe.torch.Comm and nccl_moe.deep_ep.Buffer's shrink
mode: argument checks before anything is sent, and in a 4-rank LocalWorld a mask leaving rank 3 out (LL dispatch and
combine on ranks 0-2 against tests/reference.py without rank 3: its experts receive nothing, its partials are
absent), then a clear that brings it back (the full reference again)."""
import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import reference as ref
from harness import Problem, assert_same_bits, prewarm
from nccl_moe.torch import Comm

pytestmark = pytest.mark.torch

R, E, H, K, M = 4, 8, 256, 3, 4


def _comm(world, r, **kw):
    return Comm(world.group(r), num_experts=E, hidden=H, max_topk=K, ll_max_tokens_per_rank=M, **kw)


def test_rank_mask_argument_checks(backend):
    world = backend.world(2)

    def rank_body(r):
        plain = _comm(world, r)
        try:
            for call in (lambda: plain.query_rank_mask(), lambda: plain.set_rank_mask([0, 0]),
                         lambda: plain.clear_rank_mask(), lambda: plain.query_rank_mask_host()):
                with pytest.raises(RuntimeError, match="enable_rank_masks=True"):
                    call()
        finally:
            plain.destroy()
        comm = _comm(world, r, enable_rank_masks=True)
        try:
            assert comm.config.enable_rank_masks is True
            other = 1 - r
            with pytest.raises(ValueError, match="3 entries, expected the world size 2"):
                comm.set_rank_mask([0, 0, 0])
            with pytest.raises(ValueError, match=r"mask\[1\] is 2, expected 0 \(active\) or 1 \(masked\)"):
                comm.set_rank_mask([0, 2])
            with pytest.raises(ValueError, match=rf"mask\[{r}\] is 1 on rank {r} itself"):
                comm.set_rank_mask([1, 1])
            with pytest.raises(TypeError, match="dtype torch.float32"):
                comm.set_rank_mask(torch.zeros(2))
            with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
                comm.set_rank_mask(torch.zeros((1, 2), dtype=torch.int32))
            with pytest.raises(ValueError, match="out"):
                comm.query_rank_mask(out=backend.to(torch.zeros(3, dtype=torch.int32)))
            with pytest.raises(TypeError, match="out"):
                comm.query_rank_mask(out=backend.to(torch.zeros(2, dtype=torch.int64)))
            q = comm.query_rank_mask()
            assert q.dtype == torch.int32 and q.shape == (2,) and q.device.type == backend.device.type
            assert q.tolist() == [0, 0] and comm.query_rank_mask_host() == [0, 0]
            # A valid set over both ranks (nobody masked), then a clear: both collective, every rank calls them.
            comm.set_rank_mask([0, 0] if other else [False, False])
            comm.clear_rank_mask()
            backend.sync()
            assert comm.query_rank_mask_host() == [0, 0]
        finally:
            comm.destroy()
        return True

    assert world.run(rank_body) == [True, True]


def _without(p, gone):
    """The problem as the active ranks see it once `gone` is masked: it sends nothing, and no slot reaches it."""
    E_l = p.num_local_experts
    topk = []
    for s in range(p.num_ranks):
        idx = p.topk_idx[s].clone()
        if s == gone:
            idx = idx[:0]
        else:
            idx[(idx >= 0) & (idx // E_l == gone)] = -1
        topk.append(idx)
    x = [p.x[s][:0] if s == gone else p.x[s] for s in range(p.num_ranks)]
    w = [p.weights[s][:0] if s == gone else p.weights[s] for s in range(p.num_ranks)]
    return topk, x, w


def _expert_outputs(p, d, recv_x, recv_count):
    y = torch.zeros((p.num_local_experts, recv_x.shape[1], p.hidden), dtype=torch.bfloat16)
    for j in range(p.num_local_experts):
        n = int(recv_count[j])
        y[j, :n] = ref.expert_fn(recv_x[j, :n], d, j, p.num_local_experts)
    return y


def _check(p, got, topk, x, w, ranks, what):
    want = ref.ll_dispatch(topk, p.num_experts, M, x=x)
    for d in ranks:
        count = got[d]["recv_count"]
        assert_same_bits(count, want[d]["recv_count"], f"{what}: rank {d} recv_count")
        for j in range(p.num_local_experts):
            n = int(count[j])
            if n:
                assert_same_bits(got[d]["recv_x"][j, :n], want[d]["recv_x"][j], f"{what}: rank {d} slab {j}")
    ys = [_expert_outputs(p, d, got[d]["recv_x"], got[d]["recv_count"]) if d in ranks
          else torch.zeros((p.num_local_experts, R * M, H), dtype=torch.bfloat16) for d in range(R)]
    outs = ref.ll_combine(topk, w, want, ys, p.num_experts)
    for s in ranks:
        assert_same_bits(got[s]["combined"], outs[s], f"{what}: rank {s} combined_x")


def test_mask_rank_3_then_clear(backend):
    gone = 3
    p = Problem(R, E, H, K, [4, 3, 4, 2], seed=23)
    world = backend.world(R)

    def ll_round(comm, r):
        idx, w, x = backend.to(p.topk_idx[r]), backend.to(p.weights[r]), backend.to(p.x[r])
        res = comm.ll_dispatch(x, idx)
        got = dict(recv_x=res.recv_x.cpu(), recv_count=res.recv_count.cpu())
        y = backend.to(_expert_outputs(p, r, got["recv_x"], got["recv_count"]))
        got["combined"] = comm.ll_combine(y, res.handle, topk_idx=idx, topk_weights=w).combined_x.cpu()
        del res
        return got

    def rank_body(r):
        prewarm(backend)
        comm = _comm(world, r, enable_rank_masks=True)
        try:
            out = {}
            if r != gone:  # the masked rank does not take part in the set, nor in the LL calls after it
                comm.set_rank_mask([1 if q == gone else 0 for q in range(R)])
                out["view"] = comm.query_rank_mask().cpu().tolist()
                out["masked"] = ll_round(comm, r)
                out["view_after"] = comm.query_rank_mask_host()
            world.barrier()
            comm.clear_rank_mask()  # every rank, the masked one included
            out["cleared"] = comm.query_rank_mask().cpu().tolist()
            out["full"] = ll_round(comm, r)
            return out
        finally:
            comm.destroy()

    got = world.run(rank_body)
    active = [q for q in range(R) if q != gone]
    expect = [1 if q == gone else 0 for q in range(R)]
    for r in active:
        assert got[r]["view"] == expect and got[r]["view_after"] == expect, (r, got[r]["view"])
    topk, x, w = _without(p, gone)
    _check(p, {r: got[r]["masked"] for r in active}, topk, x, w, active, "rank 3 masked")
    for r in range(R):
        assert got[r]["cleared"] == [0] * R, (r, got[r]["cleared"])
    _check(p, {r: got[r]["full"] for r in range(R)}, p.topk_idx, p.x, p.weights, list(range(R)), "after clear")


def test_deep_ep_shrink_mode(backend):
    """Buffer(enable_shrink=True) creates its communicator with rank masks; the mask buffer calls keep DeepEP's names
    and arguments (update is collective here, see python/README.md)."""
    world = backend.world(2)
    p = Problem(2, 4, H, 2, [3, 2], seed=5)

    def rank_body(r):
        prewarm(backend)
        import nccl_moe.deep_ep as deep_ep

        plain = deep_ep.Buffer(world.group(r), low_latency_mode=True)
        with pytest.raises(RuntimeError, match="enable_shrink=True"):
            plain.low_latency_query_mask_buffer(backend.to(torch.zeros(2, dtype=torch.int32)))
        buffer = deep_ep.Buffer(world.group(r), low_latency_mode=True, enable_shrink=True, explicitly_destroy=True)
        status = backend.to(torch.full((2,), 7, dtype=torch.int32))
        buffer.low_latency_query_mask_buffer(status)  # before the communicator exists: nothing masked
        assert status.cpu().tolist() == [0, 0]
        with pytest.raises(ValueError, match="mask_status"):
            buffer.low_latency_query_mask_buffer(backend.to(torch.zeros(3, dtype=torch.int32)))
        with pytest.raises(RuntimeError, match="no low-latency call"):
            buffer.low_latency_update_mask_buffer(1 - r, True)
        idx, x = backend.to(p.topk_idx[r]), backend.to(p.x[r])
        recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, M, p.num_experts, use_fp8=False)
        assert buffer.runtime.config.enable_rank_masks is True
        del recv_x, count, handle
        with pytest.raises(ValueError, match="rank_to_mask"):
            buffer.low_latency_update_mask_buffer(2, True)
        buffer.low_latency_update_mask_buffer(0, False)  # unmasking a rank nobody masked: a clear, every rank
        buffer.low_latency_clean_mask_buffer()
        buffer.low_latency_query_mask_buffer(status)
        backend.sync()
        out = status.cpu().tolist()
        buffer.destroy()
        return out

    assert world.run(rank_body) == [[0, 0], [0, 0]]
