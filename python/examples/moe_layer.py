"""A small expert-parallel MoE layer on nccl_moe: gate, top-k, HT dispatch, per-expert MLP, HT combine.

Every rank holds the replicated gate and E/R experts (expert e on rank e // (E/R)). Forward:
    probs = softmax(x @ gate), (w, idx) = topk(probs, K)
    recv_x, recv_idx, recv_w = dispatch(x as bf16, idx, w)        # rows of every token routed to this rank
    y[row] = sum over slots k with a local expert j = recv_idx[row, k] of recv_w[row, k] * MLP_j(recv_x[row])
    out = combine(y as bf16)                                     # sum over the ranks that received the token
Backward runs through nccl_moe.torch.autograd: dispatch's backward is a combine of the gradients, combine's a cached
dispatch. The expert loop is dense over the received rows (no boolean indexing), so the backward pass never waits
on the host, which matters when several ranks share one GPU and one autograd device thread.

`dense_reference` computes the same function on one device from every rank's tokens and all experts, with the same
bf16 roundings, for tests (python/tests/test_autograd.py).
"""
import torch

from nccl_moe.torch import combine, dispatch


def init_parameters(num_experts, hidden, ffn, *, seed=0, device="cpu"):
    """(gate [H, E], w1 [E, H, F], w2 [E, F, H]) float32, the same on every rank for the same seed."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn((hidden, num_experts), generator=g) / hidden**0.5
    w1 = torch.randn((num_experts, hidden, ffn), generator=g) / hidden**0.5
    w2 = torch.randn((num_experts, ffn, hidden), generator=g) / ffn**0.5
    return gate.to(device), w1.to(device), w2.to(device)


def _expert(x, w1, w2):
    return torch.nn.functional.silu(x @ w1) @ w2


class MoELayer(torch.nn.Module):
    def __init__(self, comm, gate, w1, w2, topk):
        super().__init__()
        self.comm = comm
        self.topk = topk
        E_l = comm.num_local_experts
        first = comm.rank * E_l
        self.gate = torch.nn.Parameter(gate.clone())
        self.w1 = torch.nn.Parameter(w1[first:first + E_l].clone())
        self.w2 = torch.nn.Parameter(w2[first:first + E_l].clone())

    def forward(self, x):
        probs = torch.softmax(x @ self.gate, dim=-1)
        w, idx = probs.topk(self.topk, dim=-1)
        recv_x, recv_idx, recv_w, routing = dispatch(self.comm, x.to(torch.bfloat16), idx, w.float().contiguous())
        rows = recv_x.float()
        y = torch.zeros_like(rows)
        for j in range(self.w1.shape[0]):
            coef = (recv_w * (recv_idx == j)).sum(dim=-1, keepdim=True)
            y = y + coef * _expert(rows, self.w1[j], self.w2[j])
        out, _ = combine(self.comm, y.to(torch.bfloat16).contiguous(), routing)
        return out.float()


def dense_reference(xs, gate, w1, w2, topk, num_ranks):
    """The layer's output for every rank's tokens (list of [T_r, H] float32), on one device: per token and expert
    rank d, the partial sum over d's experts rounded to bf16, then the FP32 sum over d ascending rounded to bf16."""
    E = w1.shape[0]
    E_l = E // num_ranks
    outs = []
    for x in xs:
        probs = torch.softmax(x @ gate, dim=-1)
        w, idx = probs.topk(topk, dim=-1)
        rows = x.to(torch.bfloat16).float()
        total = torch.zeros_like(rows)
        for d in range(num_ranks):
            partial = torch.zeros_like(rows)
            for e in range(d * E_l, (d + 1) * E_l):
                coef = (w * (idx == e)).sum(dim=-1, keepdim=True)
                partial = partial + coef * _expert(rows, w1[e], w2[e])
            total = total + partial.to(torch.bfloat16).float()
        outs.append(total.to(torch.bfloat16).float())
    return outs
