"""Helpers shared by the scenario tests: per-rank problem data, warm-up of the rank threads, exact comparisons."""
import torch

import reference as ref


def prewarm(backend):
    """Fills the caching allocator of this rank thread's stream before the first collective call: a rank must not
    cudaMalloc while a peer's kernel already waits for it (ncclMoeCommInitAll's rule)."""
    if backend.name != "cuda":
        return
    big = torch.empty(256 << 20, dtype=torch.uint8, device=backend.device)
    small = [torch.empty(512 << 10, dtype=torch.uint8, device=backend.device) for _ in range(64)]
    del big, small


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
