# `import deep_ep` -> nccl_moe.deep_ep (opt-in: this folder is on PYTHONPATH only when you put it there).
from nccl_moe.deep_ep import *  # noqa: F401,F403
from nccl_moe.deep_ep import Buffer, Config, EventHandle, EventOverlap, topk_idx_t, utils  # noqa: F401

__nccl_moe_alias__ = True
