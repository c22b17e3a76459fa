"""nccl_moe.torch.dispatch / combine as autograd Functions, and the example MoE layer against a dense one-device
reference (forward output and every parameter's gradient)."""
import os
import sys

import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import reference as ref
from harness import Problem, assert_same_bits, prewarm
from nccl_moe.torch import Comm, combine, dispatch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import moe_layer  # noqa: E402

pytestmark = pytest.mark.torch


def test_backward_is_combine_and_cached_dispatch(backend):
    """dispatch backward: x.grad[t] = sum over receiving ranks of the row gradients; w.grad[t, k] = the gradient of
    the received weight at the rank holding expert k. combine backward: the rows' gradient is grad_out of their
    token. Exact with values whose sums are exact."""
    R = 2
    p = Problem(R, 4, 128, 2, [6, 5], seed=31)
    world = backend.world(R)

    def rank_body(r):
        prewarm(backend)
        comm = Comm(world.group(r), num_experts=4, hidden=128, max_topk=2, max_tokens_per_rank=8)
        try:
            x = backend.to(p.x[r]).requires_grad_()
            w = backend.to(p.weights[r]).requires_grad_()
            recv_x, recv_idx, recv_w, routing = dispatch(comm, x, backend.to(p.topk_idx[r]), w)
            n = recv_x.shape[0]
            g_rows = backend.to(ref.make_rows(n, 128, rank=r, seed=41).float())
            g_w = backend.to(ref.make_weights(n, 2, seed=43 + r))
            loss = (recv_x.float() * g_rows).sum() + (recv_w * g_w).sum()
            # Combine of the received rows (a differentiable identity per receiving rank).
            y = recv_x.detach().clone().requires_grad_()
            out, _ = combine(comm, y, routing)
            g_out = backend.to(ref.make_rows(out.shape[0], 128, rank=r, seed=47).float())
            loss = loss + (out.float() * g_out).sum()
            loss.backward()
            return dict(x_grad=x.grad.cpu(), w_grad=w.grad.cpu(), y_grad=y.grad.cpu(), g_rows=g_rows.cpu(),
                        g_w=g_w.cpu(), g_out=g_out.cpu(), recv_idx=recv_idx.cpu())
        finally:
            comm.destroy()

    got = world.run(rank_body)
    want = ref.ht_dispatch(p.topk_idx, 4, x=p.x, weights=p.weights)
    grad_x = [torch.zeros((t, 128), dtype=torch.float32) for t in p.tokens]
    grad_w = [torch.zeros((t, 2), dtype=torch.float32) for t in p.tokens]
    for d in range(R):
        for i, (s, t) in enumerate(want[d]["src"]):
            grad_x[s][t] += got[d]["g_rows"][i]
            local = got[d]["recv_idx"][i] >= 0
            grad_w[s][t] += torch.where(local, got[d]["g_w"][i], torch.zeros(2))
        # combine backward: each row's gradient is its token's grad_out, as bf16.
        want_y = torch.stack([got[s]["g_out"][t] for s, t in want[d]["src"]]).to(torch.bfloat16)
        assert_same_bits(got[d]["y_grad"], want_y, f"rank {d} combine backward")
    for s in range(R):
        assert_same_bits(got[s]["x_grad"], grad_x[s].to(torch.bfloat16), f"rank {s} dispatch backward x")
        assert_same_bits(got[s]["w_grad"], grad_w[s], f"rank {s} dispatch backward weights")


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_moe_layer_matches_dense_reference(backend, num_ranks):
    E, H, F, K = 4 * num_ranks, 128, 64, 2
    tokens = [12, 9][:num_ranks]
    gate, w1, w2 = moe_layer.init_parameters(E, H, F, seed=5)
    xs = [torch.randn((t, H), generator=torch.Generator().manual_seed(100 + r)) for r, t in enumerate(tokens)]
    gs = [torch.randn((t, H), generator=torch.Generator().manual_seed(200 + r)) for r, t in enumerate(tokens)]
    world = backend.world(num_ranks)

    def rank_body(r):
        prewarm(backend)
        torch.backends.cuda.matmul.allow_tf32 = False
        comm = Comm(world.group(r), num_experts=E, hidden=H, max_topk=K, max_tokens_per_rank=max(tokens))
        try:
            layer = moe_layer.MoELayer(comm, backend.to(gate), backend.to(w1), backend.to(w2), K)
            x = backend.to(xs[r]).requires_grad_()
            out = layer(x)
            (out * backend.to(gs[r])).sum().backward()
            return dict(out=out.detach().cpu(), x_grad=x.grad.cpu(), gate_grad=layer.gate.grad.cpu(),
                        w1_grad=layer.w1.grad.cpu(), w2_grad=layer.w2.grad.cpu())
        finally:
            comm.destroy()

    got = world.run(rank_body)
    # The dense reference with autograd on one device (CPU, float32 math, the layer's bf16 roundings).
    gate_r, w1_r, w2_r = (t.clone().requires_grad_() for t in (gate, w1, w2))
    xs_r = [x.clone().requires_grad_() for x in xs]
    outs = moe_layer.dense_reference(xs_r, gate_r, w1_r, w2_r, K, num_ranks)
    sum((o * g).sum() for o, g in zip(outs, gs)).backward()
    E_l = E // num_ranks

    def close(a, b, what, tol=2e-2):
        scale = b.abs().max().item() + 1e-6
        err = (a - b).abs().max().item()
        assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"

    for r in range(num_ranks):
        close(got[r]["out"], outs[r].detach(), f"rank {r} output")
        close(got[r]["x_grad"], xs_r[r].grad, f"rank {r} x.grad")
        close(got[r]["w1_grad"], w1_r.grad[r * E_l:(r + 1) * E_l], f"rank {r} w1.grad")
        close(got[r]["w2_grad"], w2_r.grad[r * E_l:(r + 1) * E_l], f"rank {r} w2.grad")
    # The gate is replicated: data parallel over ranks, its gradients add up.
    close(sum(g["gate_grad"] for g in got), gate_r.grad, "gate.grad summed over ranks")
