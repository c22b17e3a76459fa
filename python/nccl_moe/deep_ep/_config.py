"""deep_ep.Config of the DeepEP-compatible module.

Same constructor, defaults and checks as DeepEP V1's Config. Only num_sms is used (the SM budget of a
high-throughput call); NCCL-MoE has no chunked buffers, so the chunk sizes only pass DeepEP's checks.
get_nvl_buffer_size_hint returns NCCL-MoE's buffer size for NCCL_MOE_DEEP_EP_MAX_TOKENS tokens per rank (default
4096), so code that sizes Buffer(num_nvl_bytes=...) with it gets that high-throughput capacity (Buffer derives its
capacity from num_nvl_bytes).
"""
import os

from .. import MAX_EXPERTS, MAX_NVL_PEERS, MAX_TOPK
from .. import Config as _MoeConfig

# The shim sizes every communicator for the largest top-k (the buffer grows by about 2 MiB at hidden 7168).
SHIM_MAX_TOPK = int(os.environ.get("NCCL_MOE_DEEP_EP_MAX_TOPK", MAX_TOPK))
# Experts assumed by the size hints, which do not know them: the most there can be, so that a Buffer sized with the
# hint gets at least NCCL_MOE_DEEP_EP_MAX_TOKENS tokens of capacity whatever its experts (the buffer grows by a few KiB
# per thousand experts).
_HINT_EXPERTS = MAX_EXPERTS


def default_max_tokens() -> int:
    return int(os.environ.get("NCCL_MOE_DEEP_EP_MAX_TOKENS", "4096"))


def hint_hidden(hidden_bytes: int) -> int:
    """Hidden size (bf16 elements, a multiple of 128) that covers rows of `hidden_bytes` bytes."""
    h = max(1, (int(hidden_bytes) + 1) // 2)
    return (h + 127) // 128 * 128


def hint_experts(num_ranks: int) -> int:
    return max(num_ranks, _HINT_EXPERTS // num_ranks * num_ranks)


class Config:
    """Config(num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
    num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)"""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        assert num_sms >= 0
        assert num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0
        assert num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens
        assert num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0
        send, recv = num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens
        recv = (recv + send - 1) // send * send
        assert send < recv
        assert send <= recv // 2
        self.num_sms = int(num_sms)
        self.num_max_nvl_chunked_send_tokens = int(num_max_nvl_chunked_send_tokens)
        self.num_max_nvl_chunked_recv_tokens = int(num_max_nvl_chunked_recv_tokens)
        self.num_max_rdma_chunked_send_tokens = int(send)
        self.num_max_rdma_chunked_recv_tokens = int(recv)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if num_ranks > MAX_NVL_PEERS:
            raise NotImplementedError(f"num_ranks={num_ranks}: NCCL-MoE runs on the ranks of one node (at most "
                                      f"{MAX_NVL_PEERS}); the scale-out transport is not implemented")
        return _MoeConfig(num_experts=hint_experts(num_ranks), hidden=hint_hidden(hidden_bytes),
                          max_topk=SHIM_MAX_TOPK, max_tokens_per_rank=default_max_tokens()).buffer_size(num_ranks)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if num_ranks > MAX_NVL_PEERS:
            raise NotImplementedError(f"num_ranks={num_ranks}: internode (RDMA) buffers need the scale-out "
                                      "transport, which NCCL-MoE does not have yet")
        return 0

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens="
                f"{self.num_max_nvl_chunked_send_tokens}, num_max_nvl_chunked_recv_tokens="
                f"{self.num_max_nvl_chunked_recv_tokens}, num_max_rdma_chunked_send_tokens="
                f"{self.num_max_rdma_chunked_send_tokens}, num_max_rdma_chunked_recv_tokens="
                f"{self.num_max_rdma_chunked_recv_tokens})")
