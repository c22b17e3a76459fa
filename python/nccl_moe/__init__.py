"""NCCL-MoE for Python: Mixture-of-Experts dispatch and combine next to NCCL.

`import nccl_moe` needs neither a GPU nor torch: it gives the versions, buffer sizes and the library's argument
checks (errors carry ncclMoeGetLastError's text). The torch layer lives in `nccl_moe.torch` (communicators from a
torch ProcessGroup or a one-process world, HT/LL dispatch and combine on torch tensors, events, autograd) and the
DeepEP-compatible module in `nccl_moe.deep_ep`; both import torch when used.

Loading: torch (when installed) is imported before the extension so that exactly one libnccl is in the process;
a second copy is an ImportError (nccl_moe/_loader.py says why).
"""
import dataclasses as _dataclasses

from ._errors import RESULT_NAMES, NcclMoeArgumentError, NcclMoeError
from ._loader import check_single_libnccl as _check_single_libnccl
from ._loader import load as _load
from ._version import __version__

_C = _load()
_C._register_errors(NcclMoeError, NcclMoeArgumentError)

MAX_RANKS = _C.MAX_RANKS
MAX_NVL_PEERS = _C.MAX_NVL_PEERS
MAX_TOPK = _C.MAX_TOPK
MAX_EXPERTS = _C.MAX_EXPERTS


def _version_tuple(code: int):
    return (code // 10000, code // 100 % 100, code % 100)


def library_version():
    """(major, minor, patch) of the loaded libnccl_moe (ncclMoeGetVersion)."""
    return _version_tuple(_C.version())


def nccl_version():
    """(major, minor, patch) of the libnccl this process uses (ncclGetVersion)."""
    code = _C.nccl_version()
    # NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
    return _version_tuple(code)


def libnccl_path():
    """Path of the libnccl file loaded in this process (None if it cannot be told)."""
    return _check_single_libnccl()


def device_count() -> int:
    """CUDA devices visible to this process; 0 without a driver or a GPU."""
    return _C.device_count()


if _C.version() // 100 != _C.HEADER_VERSION_CODE // 100:
    raise ImportError(
        f"nccl_moe: the extension was built for libnccl_moe {_version_tuple(_C.HEADER_VERSION_CODE)} but "
        f"{library_version()} is loaded; reinstall the package (pip install ./python)"
    )


@_dataclasses.dataclass(frozen=True)
class Config:
    """ncclMoeConfig_t: what a communicator is sized for (all ranks pass the same one; ll_num_sms may differ).

    Attributes:
        num_experts: E, total experts (E % ranks == 0, E >= ranks, E <= MAX_EXPERTS).
        hidden: largest H any call uses (elements; H % 8 == 0, H % 128 == 0 with low-latency capacity).
        max_topk: largest K any call uses, 1..MAX_TOPK.
        max_tokens_per_rank: high-throughput capacity (largest T of an HT call on any rank); 0 = no HT.
        ll_max_tokens_per_rank: low-latency capacity (largest T of an LL call); 0 = no LL.
        num_sms: default SM budget of HT kernels; 0 = chosen from the hardware.
        ll_num_sms: SMs of this rank's LL kernels; 0 = all of the rank's SMs (its GPU's, or its share when ranks
            share the GPU; larger values are capped there). A smaller budget leaves SMs to other work (e.g. compute
            kernels on other streams during decode); an LL call with both phases then runs as two kernels (send,
            then receive). Unlike the other fields it may differ between ranks.
        enable_rank_masks: rank masks for low-latency calls (include/nccl_moe.h "Rank masks"): an LL wait that times
            out on a peer masks that peer instead of failing the communicator, and later LL calls skip masked ranks;
            needed by Comm.query_rank_mask / set_rank_mask / clear_rank_mask. Same on every rank. Default False.
    """

    num_experts: int
    hidden: int
    max_topk: int = 8
    max_tokens_per_rank: int = 0
    ll_max_tokens_per_rank: int = 0
    num_sms: int = 0
    ll_num_sms: int = 0
    enable_rank_masks: bool = False

    def _args(self):
        return (
            int(self.num_experts),
            int(self.hidden),
            int(self.max_topk),
            int(self.max_tokens_per_rank),
            int(self.ll_max_tokens_per_rank),
            int(self.num_sms),
            int(self.ll_num_sms),
            int(bool(self.enable_rank_masks)),
        )

    def buffer_size(self, num_ranks: int) -> int:
        """Bytes of device memory one rank's communication buffer needs on `num_ranks` ranks of one node
        (ncclMoeGetBufferSize; pure host arithmetic). Raises NcclMoeArgumentError for an invalid config."""
        return _C.buffer_size(*self._args(), int(num_ranks))

    def validate(self, num_ranks: int = 1) -> "Config":
        """Checks the config as ncclMoeCommInit will (for `num_ranks` ranks); returns self."""
        self.buffer_size(num_ranks)
        return self


def get_buffer_size(config: Config, num_ranks: int) -> int:
    """ncclMoeGetBufferSize(config, num_ranks)."""
    return config.buffer_size(num_ranks)


# The torch layer, imported on first use (it imports torch).
_TORCH_NAMES = (
    "Comm",
    "LocalWorld",
    "LocalGroup",
    "Event",
    "HtRouting",
    "LLResult",
    "LLHandle",
)


def __getattr__(name):
    if name in _TORCH_NAMES:
        from . import torch as _torch_layer

        return getattr(_torch_layer, name)
    raise AttributeError(f"module 'nccl_moe' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Config",
    "NcclMoeError",
    "NcclMoeArgumentError",
    "RESULT_NAMES",
    "get_buffer_size",
    "library_version",
    "nccl_version",
    "libnccl_path",
    "device_count",
    "MAX_RANKS",
    "MAX_NVL_PEERS",
    "MAX_TOPK",
    "MAX_EXPERTS",
] + list(_TORCH_NAMES)
