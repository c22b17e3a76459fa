# `import deep_ep.utils` -> nccl_moe.deep_ep.utils (EventHandle, EventOverlap).
from nccl_moe.deep_ep.utils import *  # noqa: F401,F403
from nccl_moe.deep_ep.utils import EventHandle, EventOverlap, check_nvlink_connections  # noqa: F401
