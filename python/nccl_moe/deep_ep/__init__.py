"""A DeepEP-compatible module on NCCL-MoE: `from nccl_moe.deep_ep import Buffer, Config, EventOverlap, topk_idx_t`
and `nccl_moe.deep_ep.utils.EventHandle`, with DeepEP V1's argument names, defaults, return tuples, shapes and dtypes
for the calls frameworks make (python/README.md maps every method).

To make unchanged code that does `import deep_ep` use it (opt-in):
  - put nccl_moe.deep_ep.alias_path() on PYTHONPATH (a folder holding a `deep_ep` package that re-exports this one),
    e.g. PYTHONPATH=$(python -c "import nccl_moe.deep_ep as d; print(d.alias_path())"), or
  - call nccl_moe.deep_ep.install_alias() before the first `import deep_ep`.
"""
import os
import sys

import torch

from . import utils
from ._config import Config
from .buffer import Buffer
from .utils import EventHandle, EventOverlap

# DeepEP's topk_idx_t: int64 unless DeepEP was built with TOPK_IDX_BITS=32; NCCL-MoE takes both.
topk_idx_t = torch.int64


def alias_path() -> str:
    """The folder to put on PYTHONPATH so that `import deep_ep` resolves to this module."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_alias")


def install_alias() -> None:
    """Makes `import deep_ep` and `import deep_ep.utils` resolve to this module from now on (this process)."""
    existing = sys.modules.get("deep_ep")
    if existing is not None and existing is not sys.modules[__name__]:
        if getattr(existing, "__nccl_moe_alias__", False):
            return
        raise ImportError("deep_ep is already imported (the real DeepEP?); install the alias before any import of it")
    sys.modules["deep_ep"] = sys.modules[__name__]
    sys.modules["deep_ep.utils"] = utils


__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "utils", "alias_path", "install_alias"]
