"""Low-latency dispatch and combine through nccl_moe.torch.Comm, several ranks of a LocalWorld, against
tests/reference.py: dispatch rows and fp8 bytes/scales bit for bit (first recv_count rows of each slab), combine bit
for bit (two-level order: per expert rank an FMA chain, rounded to bf16, then an FP32 sum over ranks ascending)."""
import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import reference as ref
from harness import Problem, assert_same_bits, ll_sources, prewarm
from nccl_moe.torch import Comm

pytestmark = pytest.mark.torch


def _check_dispatch(p, got, want, use_fp8, fmt):
    for d in range(p.num_ranks):
        count = got[d]["recv_count"]
        assert_same_bits(count, want[d]["recv_count"], f"rank {d} recv_count")
        for j in range(p.num_local_experts):
            n = int(count[j])
            if n == 0:
                continue
            assert_same_bits(got[d]["recv_x"][j, :n], want[d]["recv_x"][j], f"rank {d} slab {j} recv_x")
            if use_fp8:
                assert_same_bits(got[d]["recv_x_scales"][j, :n], want[d]["recv_x_scales"][j],
                                 f"rank {d} slab {j} scales ({fmt})")


def _expert_outputs(p, d, recv_x, recv_count):
    """y = expert_fn(row) for the valid rows of every slab (zeros elsewhere)."""
    y = torch.zeros((p.num_local_experts, recv_x.shape[1], p.hidden), dtype=torch.bfloat16)
    for j in range(p.num_local_experts):
        n = int(recv_count[j])
        rows = recv_x[j, :n].float().to(torch.bfloat16) if recv_x.dtype != torch.bfloat16 else recv_x[j, :n]
        y[j, :n] = ref.expert_fn(rows, d, j, p.num_local_experts)
    return y


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("mode", ["bf16", "float", "pow2", "ue8m0"])
def test_ll_dispatch_combine(backend, num_ranks, mode):
    use_fp8 = mode != "bf16"
    max_tokens = 8
    tokens = [8, 3, 0, 6][:num_ranks]
    p = Problem(num_ranks, 2 * num_ranks, 512 if mode == "ue8m0" else 384, 3, tokens, seed=7 + num_ranks,
                kind="wide" if use_fp8 else "exact")
    world = backend.world(num_ranks)
    # Weights given to the combine, to the dispatch only, or to both (cycled by rank count).
    weights_to = ["combine", "dispatch", "both"][num_ranks % 3]

    def rank_body(r):
        prewarm(backend)
        comm = Comm(world.group(r), num_experts=p.num_experts, hidden=p.hidden, max_topk=p.topk,
                    ll_max_tokens_per_rank=max_tokens)
        try:
            idx, w, x = backend.to(p.topk_idx[r]), backend.to(p.weights[r]), backend.to(p.x[r])
            stats = backend.to(torch.full((p.num_local_experts,), 5, dtype=torch.int32))
            res = comm.ll_dispatch(x, idx, use_fp8=use_fp8, scale_format=mode if use_fp8 else "float",
                                   cumulative_recv_stats=stats,
                                   topk_weights=w if weights_to in ("dispatch", "both") else None)
            got = dict(recv_x=res.recv_x.cpu(), recv_count=res.recv_count.cpu(), stats=stats.cpu(),
                       recv_x_scales=None if res.recv_x_scales is None else res.recv_x_scales.cpu())
            y = backend.to(_expert_outputs(p, r, got["recv_x"], got["recv_count"]))
            comb = comm.ll_combine(y, res.handle, topk_idx=idx,
                                   topk_weights=w if weights_to in ("combine", "both") else None)
            got["combined"] = comb.combined_x.cpu()
            return got
        finally:
            comm.destroy()

    got = world.run(rank_body)
    want = ref.ll_dispatch(p.topk_idx, p.num_experts, max_tokens, x=p.x, use_fp8=use_fp8, scale_format=mode)
    _check_dispatch(p, got, want, use_fp8, mode)
    for d in range(num_ranks):
        assert_same_bits(got[d]["stats"], want[d]["recv_count"] + 5, f"rank {d} cumulative stats")
    ys = [_expert_outputs(p, d, got[d]["recv_x"], got[d]["recv_count"]) for d in range(num_ranks)]
    outs = ref.ll_combine(p.topk_idx, p.weights, want, ys, p.num_experts)
    for s in range(num_ranks):
        assert_same_bits(got[s]["combined"], outs[s], f"rank {s} combined_x")


@pytest.mark.parametrize("ll_num_sms", [0, 2])
def test_ll_recv_src_info_and_ll_num_sms(backend, ll_num_sms):
    """Comm.ll_recv_src_info / LLHandle.recv_src_info ((rank << 24) | token per received row) against the routing;
    Config.ll_num_sms reaches the communicator (with a budget of 2 SMs an LL call runs as two kernels on the GPU)."""
    num_ranks, max_tokens = 3, 8
    p = Problem(num_ranks, 2 * num_ranks, 256, 3, [8, 5, 0], seed=41)
    world = backend.world(num_ranks)

    def rank_body(r):
        prewarm(backend)
        comm = Comm(world.group(r), num_experts=p.num_experts, hidden=p.hidden, max_topk=p.topk,
                    ll_max_tokens_per_rank=max_tokens, ll_num_sms=ll_num_sms)
        try:
            assert comm.config.ll_num_sms == ll_num_sms and comm._native.ll_num_sms == ll_num_sms
            idx, x = backend.to(p.topk_idx[r]), backend.to(p.x[r])
            got = []
            for hook_mode in (True, False):  # through the hook, and with both phases in one call
                res = comm.ll_dispatch(x, idx, return_recv_hook=hook_mode)
                if hook_mode:
                    res.hook()
                view = res.handle.recv_src_info
                assert view.dtype == torch.int32 and tuple(view.shape) == (p.num_local_experts,
                                                                            num_ranks * max_tokens)
                assert view.data_ptr() == comm.ll_recv_src_info(res.handle).data_ptr()
                got.append((res.recv_count.cpu(), view.cpu()))
            return got
        finally:
            comm.destroy()

    got = world.run(rank_body)
    for d in range(num_ranks):
        want = ll_sources(p.topk_idx, p.num_experts, d)
        for count, src_info in got[d]:
            for j, rows in enumerate(want):
                assert int(count[j]) == len(rows), f"rank {d} expert {j} count"
                assert src_info[j, : len(rows)].tolist() == [(s << 24) | t for s, t in rows], f"rank {d} expert {j}"


def test_ll_hooks_two_results_zero_copy_out_reset(backend):
    """Split halves (hooks) with other work between them, two results alive at once (the second one combined
    zero-copy), caller-provided and reused outputs, a reset, then another round."""
    num_ranks, max_tokens = 2, 6
    p = Problem(num_ranks, 4, 256, 2, [6, 4], seed=21)
    q = Problem(num_ranks, 4, 256, 2, [3, 6], seed=22)
    world = backend.world(num_ranks)

    def rank_body(r):
        prewarm(backend)
        comm = Comm(world.group(r), num_experts=4, hidden=256, max_topk=2, ll_max_tokens_per_rank=max_tokens)
        try:
            out = {}
            idx_a, w_a, x_a = backend.to(p.topk_idx[r]), backend.to(p.weights[r]), backend.to(p.x[r])
            idx_b, w_b, x_b = backend.to(q.topk_idx[r]), backend.to(q.weights[r]), backend.to(q.x[r])
            a = comm.ll_dispatch(x_a, idx_a, return_recv_hook=True)
            assert a.hook is not None and a.handle.recv_pending
            filler = x_a.float().sum()  # other work between the halves
            a.hook()
            with pytest.raises(RuntimeError, match="already run"):
                a.hook()
            # The second result in caller-provided outputs.
            E_l, rows = comm.num_local_experts, num_ranks * max_tokens
            mine = (backend.to(torch.empty((E_l, rows, 256), dtype=torch.bfloat16)), None,
                    backend.to(torch.empty((E_l,), dtype=torch.int32)))
            b = comm.ll_dispatch(x_b, idx_b, topk_weights=w_b, out=mine)
            assert b.recv_x is mine[0] and b.recv_count is mine[2]
            assert a.handle.half != b.handle.half
            out["a"] = (a.recv_x.cpu(), a.recv_count.cpu())
            out["b"] = (b.recv_x.cpu(), b.recv_count.cpu())
            ya = backend.to(_expert_outputs(p, r, out["a"][0], out["a"][1]))
            ca = comm.ll_combine(ya, a.handle, topk_weights=w_a, return_recv_hook=True)
            filler = filler + 1
            ca.hook()
            out["ca"] = ca.combined_x.cpu()
            # Zero copy for b: the expert outputs go straight into the library's buffer.
            buf = comm.ll_combine_buffer(b.handle)
            assert tuple(buf.shape) == (E_l, rows, 256) and buf.dtype == torch.bfloat16
            buf.copy_(backend.to(_expert_outputs(q, r, out["b"][0], out["b"][1])))
            result = backend.to(torch.empty((q.tokens[r], 256), dtype=torch.bfloat16))
            cb = comm.ll_combine(None, b.handle, zero_copy=True, out=result)  # weights carried by the dispatch
            assert cb.combined_x is result
            out["cb"] = result.cpu()
            # No LL result alive across the reset; their handles go back to the pool, so the dispatches below
            # create none (creating one allocates device memory, which must not happen while a peer waits for us).
            del a, b, ca, cb
            comm.ll_reset()
            # Reused outputs alternate with the halves after the reset.
            c1 = comm.ll_dispatch(x_a, idx_a, reuse_outputs=True)
            c2 = comm.ll_dispatch(x_a, idx_a, reuse_outputs=True)
            c3 = comm.ll_dispatch(x_a, idx_a, reuse_outputs=True)
            assert c1.recv_x is c3.recv_x and c1.recv_x is not c2.recv_x
            out["c3"] = (c3.recv_x.cpu(), c3.recv_count.cpu())
            del c1, c2, c3
            return out
        finally:
            comm.destroy()

    got = world.run(rank_body)
    wa = ref.ll_dispatch(p.topk_idx, 4, max_tokens, x=p.x)
    wb = ref.ll_dispatch(q.topk_idx, 4, max_tokens, x=q.x)
    for d in range(num_ranks):
        for key, want in (("a", wa), ("b", wb), ("c3", wa)):
            recv_x, count = got[d][key]
            assert_same_bits(count, want[d]["recv_count"], f"rank {d} {key} recv_count")
            for j in range(2):
                n = int(count[j])
                if n:
                    assert_same_bits(recv_x[j, :n], want[d]["recv_x"][j], f"rank {d} {key} slab {j}")
    ya = [_expert_outputs(p, d, got[d]["a"][0], got[d]["a"][1]) for d in range(num_ranks)]
    yb = [_expert_outputs(q, d, got[d]["b"][0], got[d]["b"][1]) for d in range(num_ranks)]
    outs_a = ref.ll_combine(p.topk_idx, p.weights, wa, ya, 4)
    outs_b = ref.ll_combine(q.topk_idx, q.weights, wb, yb, 4)
    for s in range(num_ranks):
        assert_same_bits(got[s]["ca"], outs_a[s], f"rank {s} combine a")
        assert_same_bits(got[s]["cb"], outs_b[s], f"rank {s} combine b (zero copy)")


def test_ll_argument_errors(backend):
    world = backend.world(1)

    def rank_body(r):
        comm = Comm(world.group(r), num_experts=2, hidden=256, max_topk=2, ll_max_tokens_per_rank=4)
        try:
            x = backend.to(torch.zeros((4, 256), dtype=torch.bfloat16))
            idx = backend.to(torch.tensor([[0, 1]] * 4, dtype=torch.int64))
            with pytest.raises(ValueError, match="exclusive"):
                comm.ll_dispatch(x, idx, async_finish=True, return_recv_hook=True)
            with pytest.raises(ValueError, match="scale_format"):
                comm.ll_dispatch(x, idx, use_fp8=True, scale_format="e8m0")
            with pytest.raises(TypeError, match="x: dtype"):
                comm.ll_dispatch(x.float(), idx)
            res = comm.ll_dispatch(x, idx, return_recv_hook=True)
            with pytest.raises(RuntimeError, match="receive hook has not been called"):
                comm.ll_combine(res.recv_x, res.handle, topk_weights=backend.to(torch.ones((4, 2))))
            res.hook()
            with pytest.raises(ValueError, match="x: required without zero_copy"):
                comm.ll_combine(None, res.handle)
            import nccl_moe

            with pytest.raises(nccl_moe.NcclMoeError, match="topk_weights is NULL"):
                comm.ll_combine(res.recv_x, res.handle)
        finally:
            comm.destroy()

    world.run(rank_body)


def test_ll_handle_pool_and_capture_pinning(monkeypatch):
    """The LL hot path's handle bookkeeping, on the CPU stand-in only (it fakes a CUDA-graph capture through the
    extension's ll_dispatch result, which says whether the stream was being captured): a dropped result's native
    handle goes back to the pool, a failed dispatch returns it at once, a captured dispatch pins it (never reused)
    and sets ever_captured; hook and async_finish results still come out of the fast path's early return."""
    import nccl_moe
    import sim_backend
    from nccl_moe.torch import Event, LocalWorld, _comm

    monkeypatch.setattr(_comm._Backend, "lib", sim_backend)
    world = LocalWorld(1, devices=[0], lib=sim_backend)

    def rank_body(r):
        comm = Comm(world.group(r), num_experts=4, hidden=256, max_topk=2, ll_max_tokens_per_rank=4)
        try:
            free = comm._pool._free
            x = torch.randn((3, 256)).to(torch.bfloat16)
            idx = torch.tensor([[0, 1], [2, -1], [3, 0]])
            w = torch.rand((3, 2))
            res = comm.ll_dispatch(x, idx, topk_weights=w)
            native = res.handle._handle
            assert native not in free and res.event is None and res.hook is None
            del res
            assert native in free
            n = len(free)
            with pytest.raises(nccl_moe.NcclMoeArgumentError, match="num_tokens is 5"):
                comm.ll_dispatch(torch.zeros((5, 256), dtype=torch.bfloat16), torch.zeros((5, 2), dtype=torch.int64))
            assert len(free) == n

            real = sim_backend.ll_dispatch
            with monkeypatch.context() as m:
                m.setattr(sim_backend, "ll_dispatch", lambda *args: real(*args) or True)
                assert not comm.ever_captured
                res = comm.ll_dispatch(x, idx)
                native = res.handle._handle
                assert comm.ever_captured and res.handle._pinned
                del res
                assert native not in free

            a = comm.ll_dispatch(x, idx, topk_weights=w, async_finish=True)
            assert isinstance(a.event, Event) and a.hook is None and any(t is x for t in a.event.extra_tensors)
            c = comm.ll_combine(a.recv_x, a.handle, async_finish=True)
            assert isinstance(c.event, Event) and c.hook is None
            assert_same_bits(c.combined_x, comm.ll_combine(a.recv_x, a.handle).combined_x, "async combine")
            b = comm.ll_dispatch(x, idx, topk_weights=w, return_recv_hook=True)
            assert b.event is None and b.handle.recv_pending
            b.hook()
            assert not b.handle.recv_pending
            assert_same_bits(b.recv_count, a.recv_count, "hooked recv_count")
            with pytest.raises(RuntimeError, match="already run"):
                b.hook()
            d = comm.ll_combine(b.recv_x, b.handle, return_recv_hook=True)
            assert d.event is None and b.handle.combine_pending
            d.hook()
            assert not b.handle.combine_pending
            assert_same_bits(d.combined_x, c.combined_x, "hooked combine")
        finally:
            comm.destroy()

    world.run(rank_body)
