"""docs/reference.md's ordering and accumulation rules, pinned by cases only the written order satisfies, checked on
tests/reference.py and through nccl_moe.torch on each backend (the library itself on a GPU)."""
import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import reference as ref
from harness import assert_same_bits, prewarm
from nccl_moe.torch import Comm

pytestmark = pytest.mark.torch

TINY = 2.0**-30


def _bf16(v):
    return torch.tensor(v, dtype=torch.float32).to(torch.bfloat16)


def test_reference_pins_the_orders():
    # HT combine: (0 + 1) + (-1) + 2^-30 over ranks 0, 1, 2 ascending is 2^-30; any other order loses it.
    topk = [torch.tensor([[0, 1, 2]]), torch.zeros((0, 3), dtype=torch.int64), torch.zeros((0, 3), dtype=torch.int64)]
    d = ref.ht_dispatch(topk, 3)
    rows = [_bf16([[1.0] * 8]), _bf16([[-1.0] * 8]), _bf16([[TINY] * 8])]
    out, _ = ref.ht_combine(d, rows, num_tokens=[1, 0, 0])
    assert out[0].float().eq(TINY).all()
    # Biases after the sum, bias_0 first: 1 + 2^-30 rounds to 1, then -1 gives 0.
    d1 = ref.ht_dispatch([torch.tensor([[0]])], 1)
    out, _ = ref.ht_combine(d1, [_bf16([[1.0] * 8])], num_tokens=[1], bias0=[_bf16([[TINY] * 8])],
                            bias1=[_bf16([[-1.0] * 8])])
    assert out[0].float().eq(0.0).all() and not out[0].view(torch.int16).ne(0).any()
    # LL combine: per expert rank, then over ranks: slots (rank 1: 1, rank 0: 2^-30, rank 1: -1) give 2^-30.
    topk = [torch.tensor([[2, 0, 3]]), torch.zeros((0, 3), dtype=torch.int64)]
    x = [_bf16([[1.0] * 128]), torch.zeros((0, 128), dtype=torch.bfloat16)]
    disp = ref.ll_dispatch(topk, 4, 1, x=x)
    ys = []
    for r, value in ((0, TINY), (1, None)):
        y = torch.zeros((2, 2, 128), dtype=torch.bfloat16)
        for j, slab in enumerate(disp[r]["slabs"]):
            for i, (_, _, k) in enumerate(slab):
                y[j, i] = _bf16([[1.0, TINY, -1.0][k]] * 128)
        ys.append(y)
    out = ref.ll_combine(topk, [torch.ones((1, 3)), torch.zeros((0, 3))], disp, ys, 4)
    assert out[0].float().eq(TINY).all()


def test_ht_combine_order_through_the_library(backend):
    world = backend.world(3)
    H = 128

    def rank_body(r):
        prewarm(backend)
        comm = Comm(world.group(r), num_experts=3, hidden=H, max_topk=3, max_tokens_per_rank=1)
        try:
            idx = backend.to(torch.tensor([[0, 1, 2]]) if r == 0 else torch.zeros((0, 3), dtype=torch.int64))
            x = backend.to(torch.ones((idx.shape[0], H), dtype=torch.bfloat16))
            res = comm.ht_dispatch(x, idx)
            value = [1.0, -1.0, TINY][r]
            back = torch.full_like(res.recv_x, value)
            out = comm.ht_combine(back, res.routing).combined_x
            bias = None
            if r == 0:
                bias = (backend.to(_bf16([[TINY] * H])), backend.to(_bf16([[-1.0] * H])))
            # The output starts as NaN, so a row the kernel never wrote shows as NaN, not as whatever the allocator
            # left there (a failed run returned 0, 1, 0, 1, ...: float32 1.0 words read as bf16 pairs); a device wait
            # that gave up is reported as the error it recorded.
            with_bias = comm.ht_combine(torch.full_like(res.recv_x, 1.0 if r == 0 else 0.0), res.routing,
                                        bias=bias if r == 0 else (torch.zeros_like(x), torch.zeros_like(x)),
                                        out=torch.full_like(x, float("nan"))).combined_x
            backend.sync()
            comm.check_async_error()
            return out.cpu(), with_bias.cpu()
        finally:
            comm.destroy()

    got = world.run(rank_body)
    assert got[0][0].float().eq(TINY).all(), got[0][0]
    assert_same_bits(got[0][1], torch.zeros((1, H), dtype=torch.bfloat16), "bias order")


def test_ll_combine_grouping_through_the_library(backend):
    world = backend.world(2)
    H = 128

    def rank_body(r):
        prewarm(backend)
        comm = Comm(world.group(r), num_experts=4, hidden=H, max_topk=3, ll_max_tokens_per_rank=1)
        try:
            idx = backend.to(torch.tensor([[2, 0, 3]]) if r == 0 else torch.zeros((0, 3), dtype=torch.int64))
            w = backend.to(torch.ones((idx.shape[0], 3)))
            x = backend.to(torch.ones((idx.shape[0], H), dtype=torch.bfloat16))
            res = comm.ll_dispatch(x, idx)
            y = torch.zeros_like(res.recv_x)
            # Rank 0 holds slot 1 (expert 0) -> 2^-30; rank 1 holds slots 0 (expert 2) -> 1 and 2 (expert 3) -> -1.
            if r == 0:
                y[0, 0] = TINY
            else:
                y[0, 0] = 1.0
                y[1, 0] = -1.0
            # NaN-filled out= and the device error record, as in the HT test above: an unwritten row (a device
            # wait that gave up; one run returned 0, 1, 0, 1, ... here) is told from a wrong sum.
            out = comm.ll_combine(y, res.handle, topk_weights=w,
                                  out=torch.full((idx.shape[0], H), float("nan"), dtype=torch.bfloat16,
                                                 device=x.device)).combined_x
            backend.sync()
            comm.check_async_error()
            return out.cpu()
        finally:
            comm.destroy()

    got = world.run(rank_body)
    assert got[0].float().eq(TINY).all(), got[0]
