"""Helpers shared by the scenario tests: per-rank problem data, warm-up of the rank threads, exact comparisons."""
import contextlib

import torch

import reference as ref


def prewarm(backend, stream=None):
    """Fills the caching allocator of this rank thread's current stream (or of `stream`: a communicator's own stream,
    used by async calls) before the first collective call, and makes this thread's and the autograd engine's cuBLAS
    handles: a rank must not cudaMalloc (nor create a library handle) while a peer's kernel already waits for it
    (ncclMoeCommInitAll's rule). Call it before the ranks' first collective call, and barrier the ranks after it when
    a communicator already exists (its peers could otherwise start waiting for this rank meanwhile)."""
    if backend.name != "cuda":
        return
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        big = torch.empty(256 << 20, dtype=torch.uint8, device=backend.device)
        small = [torch.empty(512 << 10, dtype=torch.uint8, device=backend.device) for _ in range(64)]
        del big, small
        if stream is None:
            # cuBLAS handles and workspaces: this thread's (forward) and the autograd device thread's (backward).
            for dtype in (torch.float32, torch.bfloat16):
                a = torch.ones((16, 16), dtype=dtype, device=backend.device, requires_grad=True)
                (a @ a).float().sum().backward()
        torch.cuda.current_stream().synchronize()


class Problem:
    """Seeded routing and rows of every rank, so each rank can compute what every other rank sends it."""

    def __init__(self, num_ranks, num_experts, hidden, topk, tokens, *, seed=1, masked=0.2, empty=0.1,
                 index_dtype=torch.int64, kind="exact"):
        self.num_ranks, self.num_experts, self.hidden, self.topk = num_ranks, num_experts, hidden, topk
        self.num_local_experts = num_experts // num_ranks
        self.tokens = list(tokens)
        self.topk_idx = [ref.make_topk(t, topk, num_experts, seed=seed * 131 + r, masked_fraction=masked,
                                       empty_fraction=empty, dtype=index_dtype) for r, t in enumerate(self.tokens)]
        self.weights = [ref.make_weights(t, topk, seed=seed * 131 + r) for r, t in enumerate(self.tokens)]
        self.x = [ref.make_rows(t, hidden, rank=r, seed=seed, kind=kind) for r, t in enumerate(self.tokens)]


def same_bits(a, b):
    """Bitwise equality of two tensors of the same dtype and shape (NaN == NaN, -0 != +0)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    if a.dtype in (torch.bfloat16, torch.float16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def assert_same_bits(a, b, what):
    assert same_bits(a, b), f"{what}: differs\n got {a}\nwant {b}"


def ll_sources(topk_idx, num_experts, d):
    """[(source rank, source token) per row] of each local expert slab of rank d after an LL dispatch, straight from
    the routing (one row per valid slot naming the expert; source rank, then token, then slot ascending)."""
    num_ranks = len(topk_idx)
    E_l = num_experts // num_ranks
    slabs = [[] for _ in range(E_l)]
    for s in range(num_ranks):
        for t, row in enumerate(topk_idx[s].tolist()):
            for e in row:
                if e >= 0 and e // E_l == d:
                    slabs[e % E_l].append((s, t))
    return slabs
