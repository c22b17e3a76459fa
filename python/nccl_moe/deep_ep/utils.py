"""deep_ep.utils of the DeepEP-compatible module: EventHandle, EventOverlap (DeepEP V1's documented semantics)."""
from ..torch._runtime import Event, runtime_for


class EventHandle(Event):
    """DeepEP's deep_ep_cpp.EventHandle: a CUDA event recorded on the current stream when constructed;
    `current_stream_wait()` makes the (then) current stream wait for it."""

    __slots__ = ()

    def __init__(self, _runtime=None, _stream=None, _extra_tensors=None):
        super().__init__(_runtime if _runtime is not None else runtime_for(None), _stream, _extra_tensors)


class EventOverlap:
    """DeepEP's EventOverlap: `event` (an EventHandle, or None for synchronous calls: `event.event is None` is part
    of the contract) and `extra_tensors` (kept alive until this object goes: DeepEP's graph-safe record_stream)."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None
        self.event.current_stream_wait()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.event is not None:
            self.event.current_stream_wait()


def check_nvlink_connections(group) -> None:
    """DeepEP checks PCIe GPUs pairwise with NVML; NCCL-MoE's init checks peer access itself and fails clearly."""
    return None


__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]
