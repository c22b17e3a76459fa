"""nccl_moe.deep_ep: DeepEP-written code (tests/deep_ep_style.py, `import deep_ep` through the alias) run unchanged
with several ranks of a LocalWorld, checked against tests/reference.py; the module's own surface (Config, hints,
tables, events, unsupported arguments)."""
import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import deep_ep_style as style
import reference as ref
from harness import Problem, assert_same_bits, ll_sources, prewarm

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def deep_ep_alias():
    import nccl_moe.deep_ep

    nccl_moe.deep_ep.install_alias()
    import deep_ep

    assert deep_ep is nccl_moe.deep_ep
    return deep_ep


def test_surface(deep_ep_alias):
    import deep_ep
    from deep_ep.utils import EventHandle, EventOverlap  # noqa: F401  (Megatron's imports)

    assert deep_ep.topk_idx_t == torch.int64
    c = deep_ep.Config()
    assert c.num_sms == 20
    with pytest.raises(AssertionError):
        deep_ep.Config(20, 8, 8)  # send chunk must be below the receive chunk
    assert deep_ep.Config(24, 6, 256, 6, 130).num_max_rdma_chunked_recv_tokens == 132  # aligned up to the send chunk
    assert deep_ep.Buffer.get_dispatch_config(8).num_max_nvl_chunked_send_tokens == 6
    assert deep_ep.Buffer.get_combine_config(2).num_max_nvl_chunked_send_tokens == 10
    with pytest.raises(AssertionError, match="Unsupported number of EP ranks: 3"):
        deep_ep.Buffer.get_dispatch_config(3)
    with pytest.raises(AssertionError, match="even"):
        deep_ep.Buffer.set_num_sms(23)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    with pytest.raises(NotImplementedError, match="scale-out"):
        c.get_rdma_buffer_size_hint(7168 * 2, 16)
    # The NVL hint is NCCL-MoE's size for the default capacity: a Buffer sized with it gets at least that many tokens.
    import nccl_moe

    hint = c.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert hint == nccl_moe.Config(num_experts=4096, hidden=7168, max_topk=16,
                                   max_tokens_per_rank=4096).buffer_size(8)
    # ... whatever the experts: a Buffer sized with the hint holds 4096 tokens per rank.
    for experts in (8, 256, 288, 4096):
        buffer = deep_ep.Buffer.__new__(deep_ep.Buffer)
        buffer.num_nvl_bytes, buffer.group_size = hint, 8
        assert buffer._ht_capacity(experts, 7168, 0) >= 4096
    ll = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert ll == nccl_moe.Config(num_experts=256, hidden=7168, max_topk=16, ll_max_tokens_per_rank=128).buffer_size(8)
    assert deep_ep.Buffer.is_sm90_compiled()
    ov = EventOverlap()
    assert ov.event is None and ov.extra_tensors is None
    with ov:
        pass
    with pytest.raises(ValueError, match="Either 'group' or 'comm'"):
        deep_ep.Buffer(None)


def _ll_expert(p, recv_count):
    def expert(out, recv_x_device):
        rows = out["recv_x"]
        y = torch.zeros((rows.shape[0], rows.shape[1], p.hidden), dtype=torch.bfloat16)
        for j in range(rows.shape[0]):
            n = int(recv_count[j]) if recv_count is not None else int(out["recv_count"][j])
            y[j, :n] = rows[j, :n].float().to(torch.bfloat16)
        return y.to(recv_x_device.device)

    return expert


def _check_intranode(p, got, x2):
    want = ref.ht_dispatch(p.topk_idx, p.num_experts, x=p.x, weights=p.weights)
    for d in range(p.num_ranks):
        g, w = got[d]["intranode"], want[d]
        per_rank, per_expert, in_rank = ref.layout(p.topk_idx[d], p.num_ranks, p.num_experts)
        assert_same_bits(g["layout"][0], per_rank, "num_tokens_per_rank")
        assert_same_bits(g["layout"][1], per_expert, "num_tokens_per_expert")
        assert_same_bits(g["layout"][2], in_rank, "is_token_in_rank")
        assert_same_bits(g["recv_x"], w["recv_x"], f"rank {d} recv_x")
        assert_same_bits(g["recv_topk_idx"], w["recv_topk_idx"], f"rank {d} recv_topk_idx")
        assert_same_bits(g["recv_topk_weights"], w["recv_topk_weights"], f"rank {d} recv_topk_weights")
        assert g["per_expert"] == w["num_recv_per_expert"]
        assert_same_bits(g["recv_src_idx"], w["src_info"] & 0xFFFFFF, f"rank {d} recv_src_idx")
        assert_same_bits(g["cached_recv_x"], torch.stack([x2[s][t] for s, t in w["src"]]) if w["src"] else
                         g["cached_recv_x"], f"rank {d} cached dispatch")
    rows = [got[d]["intranode"]["recv_x"] for d in range(p.num_ranks)]
    wts = [got[d]["intranode"]["recv_topk_weights"] for d in range(p.num_ranks)]
    outs, wouts = ref.ht_combine(want, rows, num_tokens=p.tokens, weights=wts)
    for s in range(p.num_ranks):
        assert_same_bits(got[s]["intranode"]["combined_x"], outs[s], f"rank {s} combined_x")
        assert_same_bits(got[s]["intranode"]["combined_topk_weights"], wouts[s], f"rank {s} combined weights")


def _check_ll(p, got, key, max_tokens, use_fp8, fmt):
    want = ref.ll_dispatch(p.topk_idx, p.num_experts, max_tokens, x=p.x, use_fp8=use_fp8, scale_format=fmt)
    E_l = p.num_local_experts
    ys = []
    for d in range(p.num_ranks):
        g = got[d][key]
        assert_same_bits(g["recv_count"], want[d]["recv_count"], f"{key} rank {d} recv_count")
        if use_fp8:
            S, RM = g["scales_shape"][2], g["scales_shape"][1]
            assert g["scales_stride"] == (S * RM, 1, RM), f"scales are not column-major: {g['scales_stride']}"
        y = torch.zeros((E_l, g["recv_x"].shape[1], p.hidden), dtype=torch.bfloat16)
        for j in range(E_l):
            n = int(g["recv_count"][j])
            if n:
                assert_same_bits(g["recv_x"][j, :n], want[d]["recv_x"][j], f"{key} rank {d} slab {j}")
                if use_fp8:
                    assert_same_bits(g["recv_x_scales"][j, :n], want[d]["recv_x_scales"][j], f"{key} scales")
                y[j, :n] = g["recv_x"][j, :n].float().to(torch.bfloat16)
        ys.append(y)
    outs = ref.ll_combine(p.topk_idx, p.weights, want, ys, p.num_experts)
    for s in range(p.num_ranks):
        assert_same_bits(got[s][key]["combined_x"], outs[s], f"{key} rank {s} combined_x")
    _check_ll_handle(p, got, key, max_tokens)


def _check_ll_handle(p, got, key, max_tokens):
    """DeepEP's LL handle internals against the routing: src_info [E_l, R*M] int32 = source token of each row (-1
    past recv_count); layout_range [E_l, R] int64 = (begin << 32) | count, the rows of source rank r being
    begin .. begin+count-1 (DeepEP: recv_range[src_rank] = pack2(num_recv_tokens, recv_token_begin_idx))."""
    R, E_l = p.num_ranks, p.num_local_experts
    for d in range(R):
        g = got[d][key]
        assert g["handle_scalars"] == (max_tokens, p.hidden, p.num_experts)
        assert g["src_info"].dtype == torch.int32 and tuple(g["src_info"].shape) == (E_l, R * max_tokens)
        assert g["layout_range"].dtype == torch.int64 and tuple(g["layout_range"].shape) == (E_l, R)
        for j, rows in enumerate(ll_sources(p.topk_idx, p.num_experts, d)):
            n = len(rows)
            assert g["src_info"][j, :n].tolist() == [t for _, t in rows], f"{key} rank {d} expert {j} src_info"
            assert (g["src_info"][j, n:] == -1).all()
            begin = 0
            for s in range(R):
                count = sum(1 for src, _ in rows if src == s)
                packed = int(g["layout_range"][j, s])
                assert (packed >> 32, packed & 0xFFFFFFFF) == (begin, count), f"{key} rank {d} expert {j} source {s}"
                # The range is exactly the rows from s: what DeepEP's combine relies on.
                assert all(src == s for src, _ in rows[begin:begin + count])
                begin += count


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_deep_ep_code_in_local_world(backend, num_ranks):
    H, K, max_tokens = 512, 3, 16
    E = 4 * num_ranks
    p = Problem(num_ranks, E, H, K, [16, 11][:num_ranks], seed=61, kind="wide")
    x2 = [ref.make_rows(t, H, rank=r, seed=62) for r, t in enumerate(p.tokens)]
    world = backend.world(num_ranks)

    def trace(r, buffer, label):
        # Diagnostics for the two-rank failure in the asynchronous round (python/README.md "State"): a device
        # allocation while a peer's kernel waits (a handle made lazily, a new caching-allocator segment) would stall
        # this rank's next launch behind that kernel. Printed per round; pytest shows them when the test fails.
        if backend.name != "cuda":
            return
        comm = buffer._comm
        segments = torch.cuda.memory_stats(backend.device).get("segment.all.allocated", -1)
        handles = len(comm._pool._all) if comm is not None else 0
        print(f"[rank {r}] after {label}: allocator segments so far {segments}, library handles {handles}", flush=True)

    def rank_body(r):
        prewarm(backend)
        buffer = style.make_buffer(world.group(r), hidden=H, num_experts=E, ll_tokens=max_tokens,
                                   low_latency_mode=True)
        try:
            # The async round allocates on the communicator's stream (allocate_on_comm_stream): warm it, then meet.
            prewarm(backend, buffer.get_comm_stream())
            world.barrier()
            x, idx, w = backend.to(p.x[r]), backend.to(p.topk_idx[r]), backend.to(p.weights[r])
            trace(r, buffer, "setup")
            out = {"intranode": style.intranode_round(buffer, x, idx, w, E, async_mode=False, x2=backend.to(x2[r]))}
            trace(r, buffer, "intranode round")
            out["intranode_async"] = style.intranode_round(buffer, x, idx, w, E, async_mode=True,
                                                           x2=backend.to(x2[r]))
            trace(r, buffer, "asynchronous intranode round")
            out["worst"] = style.worst_case_round(buffer, x, idx, E, num_worst_tokens=num_ranks * max_tokens)
            q, scales = ref.cast_to_fp8(p.x[r], "ue8m0")
            out["fp8"] = style.fp8_round(buffer, backend.to(q), backend.to(scales), idx, E)
            buffer.clean_low_latency_buffer(max_tokens, H, E)  # after HT use, as DeepEP requires
            out["ll_bf16"] = style.low_latency_round(buffer, x, idx, w, max_tokens, E, use_fp8=False, hook_mode=True,
                                                     zero_copy=True, expert=_ll_expert(p, None))
            out["ll_fp8"] = style.low_latency_round(buffer, x, idx, w, max_tokens, E, use_fp8=True, hook_mode=False,
                                                    zero_copy=False, expert=_ll_expert(p, None))
            out["ll_ue8m0"] = style.low_latency_round(buffer, x, idx, w, max_tokens, E, use_fp8=True,
                                                      round_scale=True, use_ue8m0=True, hook_mode=True,
                                                      zero_copy=False, expert=_ll_expert(p, None))
            out["unsupported"] = style.unsupported_arguments(buffer, x, idx, E, max_tokens)
            return out
        finally:
            buffer.destroy()

    got = world.run(rank_body)
    _check_intranode(p, got, x2)
    for d in range(num_ranks):
        for key in ("recv_x", "recv_topk_idx", "combined_x", "cached_recv_x"):
            assert_same_bits(got[d]["intranode_async"][key], got[d]["intranode"][key], f"async {key}")
        want = ref.ht_dispatch(p.topk_idx, E, x=p.x)[d]
        n = len(want["src"])
        assert_same_bits(got[d]["worst"]["recv_x"][:n], want["recv_x"], "worst-case recv_x")
        assert (got[d]["worst"]["recv_topk_idx"][n:] == -1).all()
        assert got[d]["unsupported"]
        scales = [ref.cast_to_fp8(x, "ue8m0") for x in p.x]
        if n:
            q_want = torch.stack([scales[s][0][t] for s, t in want["src"]])
            s_want = torch.stack([scales[s][1][t] for s, t in want["src"]])
            for key, skey in (("recv_x", "recv_x_scales"), ("again", "again_scales")):
                assert_same_bits(got[d]["fp8"][key], q_want, f"rank {d} fp8 {key}")
                assert_same_bits(got[d]["fp8"][skey], s_want, f"rank {d} fp8 {skey}")
        assert got[d]["fp8"]["per_expert"] == want["num_recv_per_expert"]
    _check_ll(p, got, "ll_bf16", max_tokens, False, "float")
    _check_ll(p, got, "ll_fp8", max_tokens, True, "float")
    _check_ll(p, got, "ll_ue8m0", max_tokens, True, "ue8m0")


def test_handle_placeholders_raise(backend):
    world = backend.world(1)

    def rank_body(r):
        import deep_ep

        buffer = deep_ep.Buffer(world.group(r), num_nvl_bytes=64 << 20)
        x = backend.to(ref.make_rows(4, 256, rank=0))
        idx = backend.to(torch.tensor([[0, 1]] * 4))
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2)
        _, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, num_tokens_per_rank=per_rank,
                                                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        for i, name in ((0, "rank_prefix_matrix"), (1, "channel_prefix_matrix"), (5, "send_head")):
            with pytest.raises(NotImplementedError, match=name):
                handle[i].size(0)
        with pytest.raises(NotImplementedError, match="topk_idx=None"):
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert)
        with pytest.raises(AssertionError, match="explicitly_destroy"):
            buffer.destroy()
        buffer.runtime.destroy()
        return True

    assert world.run(rank_body) == [True]


def test_ll_handle_layout_from_packed_source_info():
    """The derivation alone (torch ops on CPU): source ranks grouped in any order give each rank's first row as begin;
    rows past recv_count are ignored whatever they hold; a source rank split in two is refused with check=True."""
    from nccl_moe.deep_ep.buffer import ll_handle_layout

    def packed(rows, n):
        out = [((9 << 24) | 0x123456)] * n  # rows past the count: garbage
        out[: len(rows)] = [(s << 24) | t for s, t in rows]
        return out

    # Expert 0: ranks 2, 0 (grouped, descending); expert 1: nothing; expert 2: rank 1 only, token repeated.
    slabs = [[(2, 5), (2, 7), (0, 1)], [], [(1, 3), (1, 3)]]
    info = torch.tensor([packed(r, 6) for r in slabs], dtype=torch.int32)
    count = torch.tensor([len(r) for r in slabs], dtype=torch.int32)
    src_info, layout_range = ll_handle_layout(info, count, 3, check=True)
    assert src_info.tolist() == [[5, 7, 1, -1, -1, -1], [-1] * 6, [3, 3, -1, -1, -1, -1]]
    pairs = [[(int(v) >> 32, int(v) & 0xFFFFFFFF) for v in row] for row in layout_range]
    assert pairs == [[(2, 1), (1, 0), (0, 2)], [(0, 0), (0, 0), (0, 0)], [(0, 0), (0, 2), (2, 0)]]
    split = torch.tensor([packed([(0, 1), (1, 2), (0, 3)], 6)], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="source rank 0 in local expert 0's slab are not contiguous"):
        ll_handle_layout(split, torch.tensor([3], dtype=torch.int32), 2, check=True)


def test_ll_handle_internals_need_the_receive_half(backend):
    world = backend.world(1)

    def rank_body(r):
        import deep_ep

        buffer = deep_ep.Buffer(world.group(r), low_latency_mode=True, explicitly_destroy=True)
        try:
            x = backend.to(ref.make_rows(4, 256, rank=0))
            idx = backend.to(torch.tensor([[0, 1]] * 4))
            _, recv_count, handle, _, hook = buffer.low_latency_dispatch(x, idx, 8, 2, use_fp8=False,
                                                                         return_recv_hook=True)
            with pytest.raises(RuntimeError, match="call the dispatch's hook first"):
                handle[0]
            assert handle[2:] == (8, 256, 2)  # the scalars need nothing
            hook()
            src_info, layout_range = handle[0], handle[1]
            backend.sync()
            return recv_count.cpu().tolist(), src_info[:, :4].cpu().tolist(), layout_range.cpu().tolist()
        finally:
            buffer.destroy()

    count, src_info, layout_range = world.run(rank_body)[0]
    assert count == [4, 4] and src_info == [[0, 1, 2, 3]] * 2 and layout_range == [[4], [4]]
