"""Streams, events and raw-pointer views of one device, as the extension wants them (integers).

Everything the torch layer does with streams goes through a Runtime, so the per-call cost stays visible and small:
  - the current stream is torch._C._cuda_getCurrentRawStream(index) (~0.1 us; torch.cuda.current_stream() costs
    several us), falling back to the public API when that private function is missing;
  - events are the extension's cudaEvent_t wrappers without timing (~0.2 us; torch.cuda.Event() + record ~7 us);
  - library-owned memory (the zero-copy LL combine buffer, handle arrays) is wrapped once as a tensor through
    __cuda_array_interface__ and cached by the caller.
"""
import functools

import torch

# torch dtype -> (__cuda_array_interface__ typestr, view dtype): CAI has no bf16/fp8, so those come in as same-size
# integers and are viewed afterwards.
_CAI_TYPES = {
    torch.bfloat16: ("<i2", torch.bfloat16),
    torch.float16: ("<f2", None),
    torch.float32: ("<f4", None),
    torch.int32: ("<i4", None),
    torch.int64: ("<i8", None),
    torch.uint8: ("|u1", None),
    torch.float8_e4m3fn: ("|u1", torch.float8_e4m3fn),
}


class _CudaArray:
    """A __cuda_array_interface__ (v2: no stream, so torch adds no synchronisation) over memory someone else owns;
    the tensor made from it keeps this object, and through it `owner`, alive."""

    __slots__ = ("__cuda_array_interface__", "_owner")

    def __init__(self, address, shape, typestr, owner):
        self.__cuda_array_interface__ = {
            "data": (int(address), False),
            "shape": tuple(int(s) for s in shape),
            "typestr": typestr,
            "strides": None,
            "version": 2,
        }
        self._owner = owner


class Event:
    """A CUDA event on one device (no timing), recorded at construction. DeepEP's EventHandle semantics:
    `current_stream_wait()`.

    Made by the package for async calls (then `extra_tensors` holds the call's tensors until the event is dropped,
    DeepEP's graph-safe replacement of record_stream for low-latency calls); `Event.record_current(device)` records
    one on the current stream.
    """

    __slots__ = ("_event", "_runtime", "extra_tensors")

    def __init__(self, runtime, stream=None, extra_tensors=None):
        self._runtime = runtime
        self._event = runtime.new_native_event()
        self._event.record(runtime.current_stream() if stream is None else stream)
        self.extra_tensors = extra_tensors

    @classmethod
    def record_current(cls, device=None):
        return cls(runtime_for(device))

    def wait(self, stream=None):
        """Makes `stream` (an int cudaStream_t, a torch stream, or None: the current stream) wait for the event."""
        self._event.wait(self._runtime.as_stream_handle(stream))

    def current_stream_wait(self):
        self._event.wait(self._runtime.current_stream())

    def query(self) -> bool:
        return self._event.query()

    def synchronize(self):
        self._event.synchronize()


class CudaRuntime:
    """The CUDA device `index`: current stream, a communication stream, events, views of raw device memory."""

    def __init__(self, index, lib):
        self.index = int(index)
        self.device = torch.device("cuda", self.index)
        self.lib = lib
        self._bind()
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is not None:
            # One C call per use (the method below stays as the documented fallback).
            self.current_stream = functools.partial(raw, self.index)

    # -- streams -------------------------------------------------------------------------------------------------
    def current_stream(self) -> int:
        return torch.cuda.current_stream(self.index).cuda_stream

    def current_torch_stream(self):
        return torch.cuda.current_stream(self.index)

    def new_stream(self):
        """A new torch stream on this device (a communicator's stream for async calls)."""
        return torch.cuda.Stream(self.device)

    def synchronize_streams(self, *streams):
        """Waits for the work of this thread's current stream and of `streams` (torch streams or None)."""
        torch.cuda.current_stream(self.index).synchronize()
        for s in streams:
            if s is not None:
                s.synchronize()

    def as_stream_handle(self, stream) -> int:
        if stream is None:
            return self.current_stream()
        if isinstance(stream, int):
            return stream
        return stream.cuda_stream

    def stream_context(self, stream):
        return torch.cuda.stream(stream)

    def is_capturing(self, stream_handle: int) -> bool:
        return self.lib.stream_is_capturing(stream_handle)

    def _bind(self):
        # The extension's function itself, without a Python frame in between.
        self.is_capturing = self.lib.stream_is_capturing

    # -- events --------------------------------------------------------------------------------------------------
    def new_native_event(self):
        return self.lib.Event(self.index)

    def wait_event(self, event, stream_handle: int):
        """`event` may be our Event, a DeepEP-style EventOverlap/EventHandle (anything with .event or
        .current_stream_wait), or a torch.cuda.Event."""
        if not isinstance(event, (Event, torch.cuda.Event)) and hasattr(event, "event"):
            event = event.event  # DeepEP's EventOverlap
            if event is None:
                return
        if isinstance(event, Event):
            event._event.wait(stream_handle)
        elif isinstance(event, torch.cuda.Event):
            event.wait(torch.cuda.ExternalStream(stream_handle, device=self.device))
        else:
            raise TypeError(f"previous_event: expected an event (nccl_moe Event, EventOverlap, torch.cuda.Event), "
                            f"got {type(event).__name__}")

    def record_stream(self, tensor, stream):
        if tensor is not None:
            tensor.record_stream(stream)

    # -- memory --------------------------------------------------------------------------------------------------
    def tensor_at(self, address: int, shape, dtype, owner):
        """A tensor over device memory at `address` (not owned by torch); keeps `owner` alive."""
        typestr, view = _CAI_TYPES[dtype]
        t = torch.as_tensor(_CudaArray(address, shape, typestr, owner), device=self.device)
        return t.view(view) if view is not None else t

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)


_RUNTIMES = {}


def runtime_for(device=None, lib=None):
    """The (cached) CudaRuntime of a device index / torch.device / None (current device); the stand-in's runtime
    when the torch layer runs on a stand-in of the extension (tests)."""
    if lib is None:
        from ._comm import _Backend

        lib = _Backend.lib
    make_runtime = getattr(lib, "make_runtime", None)
    if make_runtime is not None:
        return make_runtime(0 if device is None or not isinstance(device, int) else device)
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        index = torch.device(device).index
        if index is None:
            index = torch.cuda.current_device()
    rt = _RUNTIMES.get(index)
    if rt is None:
        rt = _RUNTIMES[index] = CudaRuntime(index, lib)
    return rt

