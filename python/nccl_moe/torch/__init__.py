"""The torch layer of nccl_moe: communicators and operations on torch tensors.

    Comm          an NCCL-MoE communicator from a ProcessGroup (torch's NCCL communicator borrowed, or one of our
                  own over any group), an mpi4py communicator, or a LocalWorld rank
    LocalWorld    R ranks in this process (ncclMoeCommInitAll; devices may repeat), one thread per rank
    Event         CUDA event without timing (DeepEP EventHandle semantics)
    HtRouting, LLHandle
    dispatch, combine   differentiable HT dispatch/combine (nccl_moe.torch.autograd)
    cast_to_fp8   bf16 -> fp8 e4m3 + per-128-channel scales

Importing this module imports torch.
"""
import torch  # noqa: F401  (documents the dependency; nccl_moe itself imported it first when present)

from ._comm import (Comm, HtCombineResult, HtDispatchResult, HtRouting, LayoutResult, LLCombineResult,
                    LLDispatchResult, LLHandle, cast_to_fp8)
from ._runtime import Event
from ._world import LocalGroup, LocalWorld
from .autograd import combine, dispatch

LLResult = LLDispatchResult

__all__ = ["Comm", "LocalWorld", "LocalGroup", "Event", "HtRouting", "LLHandle", "HtDispatchResult",
           "HtCombineResult", "LLDispatchResult", "LLCombineResult", "LayoutResult", "LLResult", "dispatch",
           "combine", "cast_to_fp8"]
