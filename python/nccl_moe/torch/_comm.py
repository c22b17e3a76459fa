"""nccl_moe.torch.Comm: the native Python API on torch tensors.

One Comm is one ncclMoeComm_t (include/nccl_moe.h) plus what Python needs around it: a pool of routing handles, a
communication stream for async calls, views of library-owned memory. Every method maps to one C entry point (HT
dispatch without a routing also runs the notify first); the semantics, ordering rules and limits are the C ABI's
(include/nccl_moe.h, docs/reference.md).

Streams and events (DeepEP's meanings, python.md section 1.3):
  - default: the call is enqueued on `stream` (an int cudaStream_t or a torch stream) or the current stream; the
    returned event is None;
  - previous_event / async_finish / allocate_on_comm_stream: the call runs on the communicator's own stream, which
    first waits for previous_event (or for the current stream); outputs are allocated on the current stream, or on the
    communicator's stream with allocate_on_comm_stream (which needs both others, as in DeepEP); with async_finish an
    Event recorded on the communicator's stream is returned and the current stream does not wait (HT tensors get
    record_stream, LL tensors ride in the event's extra_tensors); without it the current stream waits at once.

Outputs: allocated per call, or passed by the caller through `out=` (any entry None is allocated). Allocation costs
about 3 us per tensor on CUDA; the low-latency calls' `out=` (or reuse_outputs=True) keeps them under 2 us.

Lifetimes: an HtRouting or LLHandle returns its native handle to the communicator's pool when it is dropped; handles
taken while a CUDA graph is being captured are never reused (the graph keeps their device addresses). The LL buffer
has two halves used alternately by successive LL dispatches: at most two LL results may be alive at once, and a
zero-copy combine buffer view is valid until the dispatch after next.
"""
import collections
import threading

import torch

from .. import Config
from .. import _C as _NATIVE
from ._runtime import CudaRuntime, Event

_INDEX_TYPES = {torch.int64: _NATIVE.INDEX_INT64, torch.int32: _NATIVE.INDEX_INT32}
_SCALE_FORMATS = {"float": _NATIVE.SCALE_FLOAT, "pow2": _NATIVE.SCALE_FLOAT_POW2, "ue8m0": _NATIVE.SCALE_UE8M0}
_PHASE_BOTH = _NATIVE.PHASE_BOTH
_PHASE_SEND = _NATIVE.PHASE_SEND
_PHASE_RECV = _NATIVE.PHASE_RECV
_BFLOAT16 = _NATIVE.BFLOAT16
_SCALE_FLOAT = _NATIVE.SCALE_FLOAT
_BF16 = torch.bfloat16
_FP8 = torch.float8_e4m3fn
_F32 = torch.float32
_I32 = torch.int32

HtDispatchResult = collections.namedtuple(
    "HtDispatchResult", "recv_x recv_x_scales recv_topk_idx recv_topk_weights routing event")
HtCombineResult = collections.namedtuple("HtCombineResult", "combined_x combined_topk_weights event")
LayoutResult = collections.namedtuple(
    "LayoutResult", "num_tokens_per_rank num_tokens_per_expert is_token_in_rank event")
LLDispatchResult = collections.namedtuple("LLDispatchResult", "recv_x recv_x_scales recv_count handle event hook")
LLCombineResult = collections.namedtuple("LLCombineResult", "combined_x event hook")


_tuple_new = tuple.__new__


class _Backend:
    """The native module the torch layer calls: the extension, or a stand-in with the same functions (tests)."""

    lib = _NATIVE


def _ceil_div(a, b):
    return (a + b - 1) // b




def _index_type(topk_idx, what="topk_idx"):
    t = _INDEX_TYPES.get(topk_idx.dtype)
    if t is None:
        raise TypeError(f"{what}: dtype {topk_idx.dtype}, expected torch.int64 or torch.int32")
    return t


def _check_rows(t, name, shape, dtype):
    """A tensor the library reads or writes with packed rows: exact shape, dtype, contiguous, on the device."""
    if t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (the library reads packed rows)")


class _HandlePool:
    """Native handles (device memory) of one communicator. Creating one allocates and freeing one waits for the
    device, so they are made ahead (and on demand) and freed only with the communicator."""

    def __init__(self, comm, prealloc):
        self._comm = comm
        self._free = []
        self._all = []
        for _ in range(prealloc):
            self._free.append(self._make())

    def _make(self):
        h = self._comm._lib.Handle(self._comm._native)
        self._all.append(h)
        return h

    def take(self):
        return self._free.pop() if self._free else self._make()

    def give(self, h):
        self._free.append(h)

    def destroy(self):
        for h in self._all:
            h.destroy()
        self._all.clear()
        self._free.clear()


class HtRouting:
    """The routing of one high-throughput notify, reused by combine and by cached re-dispatch.

    Attributes:
        num_tokens, topk: T and K of the notify; index_dtype: dtype of its topk_idx (recv_topk_idx has it too).
        expert_alignment: per-expert receive counts are rounded up to it.
        num_worst_tokens: 0 (host-count mode) or the worst-case receive capacity (CUDA-graph capturable).
        num_recv_tokens: N_recv (host-count mode), else None (the count is in `recv_count`, on the device).
        num_recv_tokens_per_expert: [E_l] aligned counts (list, host-count mode), else None.
        rows: rows of the dispatch outputs (N_recv, or num_worst_tokens).
    Device views (valid while this object lives; they keep it alive): recv_count [1] int32, recv_count_per_expert
    [E_l] int32, recv_src_info [rows] int32 = (source rank << 24) | source token of each received row.
    """

    __slots__ = ("_comm", "_handle", "_pinned", "_views", "num_tokens", "topk", "index_dtype", "expert_alignment",
                 "num_worst_tokens", "num_recv_tokens", "num_recv_tokens_per_expert", "rows", "__weakref__")

    def __init__(self, comm, handle, pinned):
        self._comm = comm
        self._handle = handle
        self._pinned = pinned
        self._views = None

    def __del__(self):
        try:
            comm = self._comm
            if not self._pinned and not comm._destroyed:
                comm._pool._free.append(self._handle)  # _HandlePool.give, without its call
        except Exception:  # interpreter shutdown
            pass

    def _device_views(self):
        if self._views is None:
            count, per_expert, src_info = self._handle.ht_device_pointers()
            rt = self._comm._rt
            e_l = self._comm.num_local_experts
            cap = self._comm.num_ranks * self._comm.config.max_tokens_per_rank
            self._views = (rt.tensor_at(count, (1,), _I32, self), rt.tensor_at(per_expert, (e_l,), _I32, self),
                           rt.tensor_at(src_info, (cap,), _I32, self))
        return self._views

    @property
    def recv_count(self):
        return self._device_views()[0]

    @property
    def recv_count_per_expert(self):
        return self._device_views()[1]

    @property
    def recv_src_info(self):
        return self._device_views()[2][: self.rows]


class LLHandle:
    """The routing of one low-latency dispatch, for its combine (and the zero-copy combine buffer).

    Attributes: num_tokens, hidden, topk, topk_idx (the dispatch's tensor; the combine's default), use_fp8,
    scale_format, half (which LL buffer half it used), recv_pending (send half issued, receive half not yet).
    Device view: recv_src_info [E_l, R*M] int32 (Comm.ll_recv_src_info; keeps this object alive).
    """

    # Made by Comm.ll_dispatch only, which sets every field right after the C call (no __init__: a Python __init__
    # call is a noticeable part of the LL dispatch's host time).
    __slots__ = ("_comm", "_handle", "_pinned", "num_tokens", "hidden", "topk", "topk_idx", "use_fp8",
                 "scale_format", "half", "recv_pending", "combine_pending", "__weakref__")

    @property
    def recv_src_info(self):
        """The source of every received row: see Comm.ll_recv_src_info."""
        return self._comm.ll_recv_src_info(self)

    def __del__(self):
        try:
            comm = self._comm
            if not self._pinned and not comm._destroyed:
                comm._pool._free.append(self._handle)  # _HandlePool.give, without its call
        except Exception:
            pass


class Comm:
    """An NCCL-MoE communicator on torch tensors. Collective to create and to destroy.

    Comm(group=None, *, num_experts, hidden, max_topk=8, max_tokens_per_rank=0, ll_max_tokens_per_rank=0,
         num_sms=0, ll_num_sms=0, enable_rank_masks=False, config=None, device=None, comm_source="auto",
         mpi_comm=None)

    The NCCL communicator under it comes from `group` (nccl_moe.torch._group says how):
      - an NCCL ProcessGroup: torch's own communicator (ProcessGroupNCCL._comm_ptr(), after a barrier when torch
        initialises it lazily), never destroyed by us;
      - any other ProcessGroup (gloo works): an NCCL communicator of our own, from a unique id broadcast over it;
      - `mpi_comm` (an mpi4py communicator, group=None): likewise, broadcast with MPI;
      - a LocalGroup (nccl_moe.torch.LocalWorld): the one-process world of ncclMoeCommInitAll.
    comm_source: "auto" (borrow when possible), "borrow", or "own" (NCCL_MOE_REUSE_TORCH_COMM=0 also forces "own").
    The config (nccl_moe.Config, or its fields as keywords) must be equal on every rank, except ll_num_sms (a per-rank
    SM budget; a LocalWorld has one config for all ranks). enable_rank_masks=True: LL waits that time out mask the
    peer instead of failing (query_rank_mask, set_rank_mask, clear_rank_mask).
    """

    def __init__(self, group=None, *, config=None, device=None, comm_source="auto", mpi_comm=None, **config_fields):
        from . import _group

        config = _group.make_config(config, config_fields)
        native, owned_nccl, lib = _group.create_native(group, config, device, comm_source, mpi_comm, _Backend.lib)
        self._setup(native, lib, config, owned_nccl, group)
        from ._world import LocalGroup

        if isinstance(group, LocalGroup):
            # No rank's first collective kernel may start (and wait for us) while another still allocates its
            # handles: ranks of one process must not cudaMalloc while a peer's kernel waits for them.
            group.world.barrier()

    @classmethod
    def _from_native(cls, native, lib, config, owned_nccl=0, group=None):
        self = cls.__new__(cls)
        self._setup(native, lib, config, owned_nccl, group)
        return self

    @classmethod
    def from_nccl_comm(cls, nccl_comm: int, config: Config, device=None):
        """Collective over `nccl_comm` (an ncclComm_t as int, of the libnccl this process loaded); the NCCL
        communicator stays the caller's and must outlive this one."""
        lib = _Backend.lib
        ptr = int(nccl_comm)
        if device is None:
            device = lib.nccl_comm_info(ptr)[2]  # the communicator's own device
        elif not isinstance(device, int):
            device = torch.device(device).index
        native = lib.Comm.init(ptr, int(device), *config._args())
        return cls._from_native(native, lib, config)

    def _setup(self, native, lib, config, owned_nccl, group):
        self._native = native
        self._lib = lib
        self.config = config
        self._owned_nccl = owned_nccl
        self.group = group
        self.rank = native.rank
        self.num_ranks = native.num_ranks
        self.num_local_experts = config.num_experts // native.num_ranks
        make_runtime = getattr(lib, "make_runtime", None)
        self._rt = make_runtime(native.device) if make_runtime is not None else CudaRuntime(native.device, lib)
        self.device = self._rt.device
        self._destroyed = False
        self._comm_stream = None
        self._sync_event = None
        self._ll_next_half = 0
        self._ll_outputs = {}
        self._ll_checked_out = None
        self._ll_checked_key = None
        self._ll_x_shapes = {}
        self._zero_copy_views = {}
        self._event_cls = Event
        # torch gives empty tensors a NULL data_ptr(); the library reads "NULL" as "not given" (and rejects a NULL
        # output), so a given but empty tensor is passed as this small allocation instead.
        self._dummy = self._rt.empty((256,), torch.uint8)
        self._dummy_ptr = self._dummy.data_ptr()
        self.ever_captured = False  # a call of this communicator was captured into a CUDA graph
        # Two handles made now (before any kernel runs): enough for two LL results or an HT + an LL one.
        self._pool = _HandlePool(self, 2)
        # Bound once for the LL hot path (each saves an attribute lookup per call); all three stay valid for the
        # Comm's life: _rt and _pool are never replaced and the free list is only appended to, popped and cleared.
        self._free_handles = self._pool._free
        self._current_stream = self._rt.current_stream
        self._is_capturing = self._rt.is_capturing

    # -- communicator ------------------------------------------------------------------------------------------------
    @staticmethod
    def buffer_size(config: Config, num_ranks: int) -> int:
        return config.buffer_size(num_ranks)

    @property
    def comm_stream(self):
        """This communicator's own stream (async calls and previous_event run on it)."""
        if self._comm_stream is None:
            self._comm_stream = self._rt.new_stream()
        return self._comm_stream

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def check_async_error(self):
        """Raises NcclMoeError if a device-side wait failed (timeout, peer abort, worst-case capacity exceeded)."""
        from .. import NcclMoeError

        code, message = self._native.async_error()
        if code != 0:
            raise NcclMoeError(code, message)

    def destroy(self):
        """Collective for communicators over an NCCL communicator (a barrier over it), so every rank calls it at the
        same point, before torch.distributed.destroy_process_group(). Collective too for the ranks of a LocalWorld
        destroying on their rank threads inside LocalWorld.run. Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        from ._world import LocalGroup

        if isinstance(self.group, LocalGroup) and self.group.world.driving(self.rank):
            # Ranks of one process, each destroying its Comm on its own thread inside LocalWorld.run (collective
            # there: every rank calls it): every rank's kernels end before any rank frees. Freeing (cudaFree, below)
            # waits for the whole device and holds up the other threads' launches meanwhile, so a rank freeing while
            # a peer's kernel still waits for a rank that has yet to launch would hang until the device timeout
            # (seen on the H200: two ranks in destroy, one blocked launching its combine, one waiting for that
            # combine). Work the caller put on streams of its own (stream=) must be finished by the caller. One
            # thread destroying every rank's Comm (LocalWorld.comms) meets nobody: not collective there.
            self._rt.synchronize_streams(self._comm_stream)
            try:
                self.group.world.barrier()
            except threading.BrokenBarrierError:
                pass  # another rank failed (its error is what the world's run reports); free what is ours anyway
        self._pool.destroy()
        self._ll_outputs.clear()
        self._zero_copy_views.clear()
        self._native.destroy()
        if self._owned_nccl:
            self._lib.nccl_comm_destroy(self._owned_nccl)
            self._owned_nccl = 0

    def __repr__(self):
        return (f"nccl_moe.torch.Comm(rank={self.rank}, num_ranks={self.num_ranks}, device={self.device}, "
                f"config={self.config}{', destroyed' if self._destroyed else ''})")

    # -- streams, events ---------------------------------------------------------------------------------------------
    def _overlap_begin(self, previous_event, async_finish, allocate_on_comm_stream):
        """The slow path: run on the communicator's stream after previous_event (or the current stream)."""
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as in DeepEP)")
        rt = self._rt
        if previous_event is not None and not isinstance(previous_event, Event) and hasattr(previous_event, "event") \
                and not isinstance(previous_event, torch.cuda.Event):
            previous_event = previous_event.event  # DeepEP's EventOverlap; EventOverlap(None) means "none"
        compute = rt.current_stream()
        comm_stream = self.comm_stream
        comm_handle = rt.as_stream_handle(comm_stream)
        if previous_event is not None:
            rt.wait_event(previous_event, comm_handle)
        else:
            ev = self._fork_join_event()
            ev.record(compute)
            ev.wait(comm_handle)
        return compute, comm_stream, comm_handle

    def _fork_join_event(self):
        # One event serves every fork and join: a wait uses the event's state when it is enqueued.
        if self._sync_event is None:
            self._sync_event = self._rt.new_native_event()
        return self._sync_event

    def _overlap_end(self, compute, comm_stream, comm_handle, async_finish, allocate_on_comm_stream, tensors,
                     record_streams=True):
        rt = self._rt
        if async_finish:
            if record_streams and not rt.is_capturing(comm_handle):
                compute_stream = rt.current_torch_stream() if allocate_on_comm_stream else None
                for t in tensors:
                    if t is not None:
                        rt.record_stream(t, comm_stream)
                        if compute_stream is not None:
                            rt.record_stream(t, compute_stream)
            return self._event_cls(rt, comm_handle,
                                   None if record_streams else tuple(t for t in tensors if t is not None))
        ev = self._fork_join_event()
        ev.record(comm_handle)
        ev.wait(compute)
        return None

    def _alloc_context(self, allocate_on_comm_stream, comm_stream):
        return self._rt.stream_context(comm_stream) if allocate_on_comm_stream else _NO_CONTEXT

    def _p(self, t):
        """Device address of a given tensor (never 0, even when it is empty), 0 for None."""
        return 0 if t is None else (t.data_ptr() or self._dummy_ptr)

    def _take_handle(self, stream_handle):
        capturing = self._rt.is_capturing(stream_handle)
        if capturing:
            self.ever_captured = True
        return self._pool.take(), capturing

    # -- layout ------------------------------------------------------------------------------------------------------
    def dispatch_layout(self, topk_idx, *, out=None, stream=None, previous_event=None, async_finish=False,
                        allocate_on_comm_stream=False) -> LayoutResult:
        """ncclMoeGetDispatchLayout (local): (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool, event). `out`: a 3-tuple of those tensors (entries may be None)."""
        T, K = topk_idx.shape
        idx_type = _index_type(topk_idx)
        if not topk_idx.is_contiguous():
            raise ValueError("topk_idx: must be contiguous")
        overlap = previous_event is not None or async_finish or allocate_on_comm_stream
        if overlap:
            compute, comm_stream, s = self._overlap_begin(previous_event, async_finish, allocate_on_comm_stream)
        else:
            s = self._rt.as_stream_handle(stream)
        per_rank, per_expert, in_rank = out if out is not None else (None, None, None)
        R, E = self.num_ranks, self.config.num_experts
        with self._alloc_context(overlap and allocate_on_comm_stream, comm_stream if overlap else None):
            if per_rank is None:
                per_rank = self._rt.empty((R,), _I32)
            if per_expert is None:
                per_expert = self._rt.empty((E,), _I32)
            if in_rank is None:
                in_rank = self._rt.empty((T, R), torch.bool)
        _check_rows(per_rank, "num_tokens_per_rank", (R,), _I32)
        _check_rows(per_expert, "num_tokens_per_expert", (E,), _I32)
        _check_rows(in_rank, "is_token_in_rank", (T, R), torch.bool)
        p = self._p
        self._lib.layout(self._native, p(topk_idx), idx_type, T, K, p(per_rank), p(per_expert), p(in_rank), s)
        event = None
        if overlap:
            event = self._overlap_end(compute, comm_stream, s, async_finish, allocate_on_comm_stream,
                                      (topk_idx, per_rank, per_expert, in_rank))
        return LayoutResult(per_rank, per_expert, in_rank, event)

    # -- high throughput ---------------------------------------------------------------------------------------------
    def _notify(self, topk_idx, expert_alignment, num_worst_tokens, s):
        T, K = topk_idx.shape
        idx_type = _index_type(topk_idx)
        if not topk_idx.is_contiguous():
            raise ValueError("topk_idx: must be contiguous")
        handle, pinned = self._take_handle(s)
        routing = HtRouting(self, handle, pinned)
        num_recv, per_expert = self._lib.ht_notify(self._native, handle, self._p(topk_idx), idx_type, T, K,
                                                   int(expert_alignment), int(num_worst_tokens), s)
        routing.num_tokens = T
        routing.topk = K
        routing.index_dtype = topk_idx.dtype
        routing.expert_alignment = int(expert_alignment)
        routing.num_worst_tokens = int(num_worst_tokens)
        if num_worst_tokens > 0:
            routing.num_recv_tokens = None
            routing.num_recv_tokens_per_expert = None
            routing.rows = int(num_worst_tokens)
        else:
            routing.num_recv_tokens = num_recv
            routing.num_recv_tokens_per_expert = list(per_expert)
            routing.rows = num_recv
        return routing

    def ht_notify(self, topk_idx, *, expert_alignment=1, num_worst_tokens=0, stream=None) -> HtRouting:
        """ncclMoeDispatchNotify (collective): routing of this rank's tokens. num_worst_tokens > 0 is worst-case mode
        (no host wait, CUDA-graph capturable; outputs then have num_worst_tokens rows), else host-count mode (waits
        for N_recv on the host)."""
        return self._notify(topk_idx, expert_alignment, num_worst_tokens, self._rt.as_stream_handle(stream))

    def ht_dispatch(self, x, topk_idx=None, topk_weights=None, *, routing=None, x_scales=None, expert_alignment=1,
                    num_worst_tokens=0, out=None, num_sms=0, stream=None, previous_event=None, async_finish=False,
                    allocate_on_comm_stream=False) -> HtDispatchResult:
        """High-throughput dispatch (collective). Without `routing`: notify with topk_idx, then dispatch; with a
        `routing` of an earlier call: cached re-dispatch of new data (topk_idx must be None).

        x: [T, H] bf16, or fp8 e4m3 with x_scales (or x as a tuple (fp8, scales)): float32 [T, ceil(H/128)] or packed
            ue8m0 int32 [T, ceil(H/512)], any strides.
        topk_idx: [T, K] int64/int32, -1 = unused slot; topk_weights: optional [T, K] float32.
        Returns HtDispatchResult(recv_x [rows, H], recv_x_scales [rows, G] or None, recv_topk_idx [rows, K] local
        expert ids (-1 where not local; None in cached mode), recv_topk_weights [rows, K] or None, routing, event).
        Rows: source rank ascending, then source token ascending (docs/reference.md).
        out: a 4-tuple (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights), entries may be None.
        """
        if isinstance(x, tuple):
            if x_scales is not None:
                raise ValueError("x: a (fp8, scales) tuple and x_scales are exclusive")
            x, x_scales = x
        T, H = x.shape
        x_dtype = x.dtype
        if x_dtype is _BF16:
            dtype, scale_format = _BFLOAT16, _SCALE_FLOAT
            if x_scales is not None:
                raise ValueError("x_scales: only with fp8 x")
        elif x_dtype is _FP8:
            dtype = _NATIVE.FP8_E4M3
            if x_scales is None:
                raise ValueError("x_scales: required with fp8 x")
            if x_scales.dtype == _F32:
                scale_format, num_scale_cols = _NATIVE.SCALE_FLOAT, _ceil_div(H, 128)
            elif x_scales.dtype == _I32:
                scale_format, num_scale_cols = _NATIVE.SCALE_UE8M0, _ceil_div(H, 512)
            else:
                raise TypeError(f"x_scales: dtype {x_scales.dtype}, expected float32 or packed ue8m0 int32")
            if tuple(x_scales.shape) != (T, num_scale_cols):
                raise ValueError(f"x_scales: shape {tuple(x_scales.shape)}, expected ({T}, {num_scale_cols})")
        else:
            raise TypeError(f"x: dtype {x.dtype}, expected torch.bfloat16 or torch.float8_e4m3fn")
        if not x.is_contiguous():
            raise ValueError("x: must be contiguous ([T, H] rows)")
        if topk_weights is not None:
            _check_rows(topk_weights, "topk_weights", (T, topk_weights.shape[1] if topk_weights.dim() == 2 else -1),
                        _F32)

        overlap = previous_event is not None or async_finish or allocate_on_comm_stream
        if overlap:
            compute, comm_stream, s = self._overlap_begin(previous_event, async_finish, allocate_on_comm_stream)
        elif stream is None:
            s = self._rt.current_stream()
        else:
            s = self._rt.as_stream_handle(stream)

        cached = routing is not None
        if cached:
            if topk_idx is not None:
                raise ValueError("topk_idx: must be None with routing= (cached dispatch reuses the routing)")
            if routing._comm is not self:
                raise ValueError("routing: belongs to another communicator")
            if T != routing.num_tokens:
                raise ValueError(f"x: {T} tokens, the routing has {routing.num_tokens}")
        else:
            if topk_idx is None:
                raise ValueError("topk_idx: required without routing=")
            if topk_idx.shape[0] != T:
                raise ValueError(f"topk_idx: {topk_idx.shape[0]} rows, x has {T}")
            routing = self._notify(topk_idx, expert_alignment, num_worst_tokens, s)
        K = routing.topk
        if topk_weights is not None:
            if topk_weights.shape[1] != K:
                raise ValueError(f"topk_weights: {topk_weights.shape[1]} columns, expected K = {K}")
        rows = routing.rows

        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights = out if out is not None else (None,) * 4
        if (recv_x is None or (x_scales is not None and recv_x_scales is None) or (not cached and recv_topk_idx is None)
                or (topk_weights is not None and recv_topk_weights is None)):
            with self._alloc_context(overlap and allocate_on_comm_stream, comm_stream if overlap else None):
                if recv_x is None:
                    recv_x = self._rt.empty((rows, H), x.dtype)
                if dtype == _NATIVE.FP8_E4M3 and recv_x_scales is None:
                    recv_x_scales = self._rt.empty((rows, x_scales.shape[1]), x_scales.dtype)
                if not cached and recv_topk_idx is None:
                    recv_topk_idx = self._rt.empty((rows, K), routing.index_dtype)
                if topk_weights is not None and recv_topk_weights is None:
                    recv_topk_weights = self._rt.empty((rows, K), _F32)
        if recv_x.dtype is not x_dtype or recv_x.shape != (rows, H) or not recv_x.is_contiguous():
            _check_rows(recv_x, "recv_x", (rows, H), x_dtype)
        if recv_x_scales is not None:
            _check_rows(recv_x_scales, "recv_x_scales", (rows, x_scales.shape[1]), x_scales.dtype)
        if recv_topk_idx is not None:
            _check_rows(recv_topk_idx, "recv_topk_idx", (rows, K), routing.index_dtype)
        if recv_topk_weights is not None:
            _check_rows(recv_topk_weights, "recv_topk_weights", (rows, K), _F32)

        if x_scales is not None:
            scale_token_stride, scale_channel_stride = x_scales.stride()
        else:
            scale_token_stride = scale_channel_stride = 0
        p = self._p
        self._lib.ht_dispatch(self._native, routing._handle, x.data_ptr() or self._dummy_ptr, dtype, H, p(x_scales),
                              scale_format, scale_token_stride, scale_channel_stride, p(topk_weights),
                              recv_x.data_ptr() or self._dummy_ptr, p(recv_x_scales), p(recv_topk_idx),
                              p(recv_topk_weights), int(num_sms), s)
        if overlap:
            event = self._overlap_end(compute, comm_stream, s, async_finish, allocate_on_comm_stream,
                                      (x, x_scales, topk_idx, topk_weights, recv_x, recv_x_scales, recv_topk_idx,
                                       recv_topk_weights))
            return HtDispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, routing, event)
        return _tuple_new(HtDispatchResult, (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, routing, None))

    def ht_combine(self, x, routing, *, topk_weights=None, bias=None, out=None, num_sms=0, stream=None,
                   previous_event=None, async_finish=False, allocate_on_comm_stream=False) -> HtCombineResult:
        """High-throughput combine (collective): the reverse of the dispatch recorded in `routing`,
        combined_x[t] = sum over the ranks that received t (ascending) of x[row of t], in FP32, + bias_0 + bias_1,
        rounded to bf16 (no weights: a plain sum). topk_weights [rows, K] float32 are summed the same way.

        x: [rows, H] bf16 in the dispatch's output order. bias: None, a [T, H] bf16 tensor, or a 2-tuple of them.
        out: combined_x, or a 2-tuple (combined_x, combined_topk_weights). Returns HtCombineResult.
        """
        # A hot path like the LL calls: each check is a comparison, _check_rows only formats the error.
        if routing._comm is not self:
            raise ValueError("routing: belongs to another communicator")
        rows, T, K = routing.rows, routing.num_tokens, routing.topk
        H = x.shape[1]
        if x.dtype is not _BF16 or x.shape != (rows, H) or not x.is_contiguous():
            _check_rows(x, "x", (rows, H), _BF16)
        if topk_weights is not None:
            _check_rows(topk_weights, "topk_weights", (rows, K), _F32)
        bias_0 = bias_1 = None
        if bias is not None:
            if isinstance(bias, (tuple, list)):
                if len(bias) != 2:
                    raise ValueError("bias: a tensor or a 2-tuple of tensors")
                bias_0, bias_1 = bias
                if bias_0 is None:
                    bias_0, bias_1 = bias_1, None
            else:
                bias_0 = bias
            for name, b in (("bias_0", bias_0), ("bias_1", bias_1)):
                if b is not None:
                    _check_rows(b, name, (T, H), _BF16)

        overlap = previous_event is not None or async_finish or allocate_on_comm_stream
        if overlap:
            compute, comm_stream, s = self._overlap_begin(previous_event, async_finish, allocate_on_comm_stream)
        elif stream is None:
            s = self._rt.current_stream()
        else:
            s = self._rt.as_stream_handle(stream)
        if out is None or isinstance(out, (tuple, list)):
            combined_x, combined_w = out if out is not None else (None, None)
        else:
            combined_x, combined_w = out, None
        if combined_x is None or (topk_weights is not None and combined_w is None):
            with self._alloc_context(overlap and allocate_on_comm_stream, comm_stream if overlap else None):
                if combined_x is None:
                    combined_x = self._rt.empty((T, H), _BF16)
                if topk_weights is not None and combined_w is None:
                    combined_w = self._rt.empty((T, K), _F32)
        if combined_x.dtype is not _BF16 or combined_x.shape != (T, H) or not combined_x.is_contiguous():
            _check_rows(combined_x, "combined_x", (T, H), _BF16)
        if combined_w is not None:
            _check_rows(combined_w, "combined_topk_weights", (T, K), _F32)
        dummy = self._dummy_ptr
        self._lib.ht_combine(self._native, routing._handle, x.data_ptr() or dummy, H,
                             0 if topk_weights is None else (topk_weights.data_ptr() or dummy),
                             0 if bias_0 is None else (bias_0.data_ptr() or dummy),
                             0 if bias_1 is None else (bias_1.data_ptr() or dummy), combined_x.data_ptr() or dummy,
                             0 if topk_weights is None else (combined_w.data_ptr() or dummy), int(num_sms), s)
        if overlap:
            event = self._overlap_end(compute, comm_stream, s, async_finish, allocate_on_comm_stream,
                                      (x, topk_weights, bias_0, bias_1, combined_x, combined_w))
            return HtCombineResult(combined_x, combined_w if topk_weights is not None else None, event)
        return _tuple_new(HtCombineResult, (combined_x, combined_w if topk_weights is not None else None, None))

    # -- low latency -------------------------------------------------------------------------------------------------
    def _ll_output_set(self, half, H, use_fp8, scale_format):
        key = (half, H, use_fp8, scale_format)
        outs = self._ll_outputs.get(key)
        if outs is None:
            outs = self._ll_outputs[key] = self._ll_alloc(H, use_fp8, scale_format)
        return outs

    def _ll_alloc(self, H, use_fp8, scale_format):
        E_l, rows = self.num_local_experts, self.num_ranks * self.config.ll_max_tokens_per_rank
        recv_x = self._rt.empty((E_l, rows, H), _FP8 if use_fp8 else _BF16)
        if use_fp8:
            if scale_format == _NATIVE.SCALE_UE8M0:
                scales = self._rt.empty((E_l, rows, _ceil_div(H, 512)), _I32)
            else:
                scales = self._rt.empty((E_l, rows, H // 128), _F32)
        else:
            scales = None
        return recv_x, scales, self._rt.empty((E_l,), _I32)

    def ll_dispatch(self, x, topk_idx, *, topk_weights=None, use_fp8=False, scale_format="float",
                    cumulative_recv_stats=None, out=None, reuse_outputs=False, return_recv_hook=False,
                    async_finish=False, stream=None) -> LLDispatchResult:
        """Low-latency dispatch (collective; CUDA-graph capturable).

        x: [T, H] bf16 (T <= ll_max_tokens_per_rank, H % 128 == 0); topk_idx: [T, K] int64/int32, -1 = unused.
        topk_weights: optional [T, K] float32, carried to the expert ranks so the combine may omit them.
        use_fp8 / scale_format ("float", "pow2", "ue8m0"): cast to fp8 e4m3 in the kernel, per 128 channels.
        cumulative_recv_stats: optional [E_l] int32, receive counts added to it.
        Returns LLDispatchResult(recv_x [E_l, R*M, H] bf16 or fp8, recv_x_scales (float [E_l, R*M, H/128] or packed
        ue8m0 int32 [E_l, R*M, ceil(H/512)], row-major) or None, recv_count [E_l] int32, handle, event, hook).
        Slab j holds recv_count[j] rows, source rank ascending, then token, then slot; later rows are stale.
        return_recv_hook: only the send half runs now; hook() runs the receive half on the stream that was current
        (outputs are valid after it). async_finish: runs on the communicator's stream and returns an Event.
        out: a 3-tuple (recv_x, recv_x_scales, recv_count), or reuse_outputs=True: two package-owned sets that
        alternate with the LL buffer halves (valid until the dispatch after next, like the library's halves).
        """
        # The hot path of decode: every check is one attribute read or comparison (the benchmark,
        # python/benchmarks/overhead.py, holds it to <= 2 us over the C call).
        T, H = x.shape
        idx_shape = topk_idx.shape  # read once: each .shape makes a new torch.Size
        T_idx, K = idx_shape
        idx_type = _INDEX_TYPES.get(topk_idx.dtype)
        fmt = _SCALE_FORMATS.get(scale_format)
        if (x.dtype is not _BF16 or idx_type is None or T_idx != T or fmt is None or not x.is_contiguous()
                or not topk_idx.is_contiguous() or (async_finish and return_recv_hook)):
            self._ll_dispatch_argument_error(x, topk_idx, scale_format, async_finish, return_recv_hook)
        use_fp8 = 1 if use_fp8 else 0
        w_ptr = 0
        if topk_weights is not None:
            if topk_weights.dtype is not _F32 or topk_weights.shape != idx_shape or not topk_weights.is_contiguous():
                _check_rows(topk_weights, "topk_weights", (T, K), _F32)
            # Never NULL when given (the ranks must agree on passing weights, T may be 0 here).
            w_ptr = topk_weights.data_ptr() or self._dummy_ptr
        stats_ptr = 0
        if cumulative_recv_stats is not None:
            _check_rows(cumulative_recv_stats, "cumulative_recv_stats", (self.num_local_experts,), _I32)
            stats_ptr = cumulative_recv_stats.data_ptr()

        if async_finish:
            compute, comm_stream, s = self._overlap_begin(None, True, False)
        elif stream is None:
            s = self._current_stream()
        else:
            s = self._rt.as_stream_handle(stream)
        half = self._ll_next_half
        if out is not None:
            if out is not self._ll_checked_out or self._ll_checked_key != (H, use_fp8, fmt):
                out = self._ll_fill_and_check(out, H, use_fp8, fmt)
            recv_x, recv_x_scales, recv_count = out
        elif reuse_outputs:
            recv_x, recv_x_scales, recv_count = self._ll_output_set(half, H, use_fp8, fmt)
        else:
            recv_x, recv_x_scales, recv_count = self._ll_alloc(H, use_fp8, fmt)

        free = self._free_handles
        handle = free.pop() if free else self._pool.take()
        # x and topk_idx may be NULL when T == 0; outputs are never empty.
        scales_ptr = 0 if recv_x_scales is None else recv_x_scales.data_ptr()
        try:
            # The extension queries the stream's capture status right before enqueueing (one C call instead of a
            # separate stream_is_capturing): True when this dispatch went into a CUDA graph being captured.
            capturing = self._lib.ll_dispatch(
                self._native, handle, x.data_ptr(), topk_idx.data_ptr(), idx_type, T, H, K, use_fp8, fmt,
                recv_x.data_ptr(), scales_ptr, recv_count.data_ptr(), stats_ptr,
                _PHASE_SEND if return_recv_hook else _PHASE_BOTH, w_ptr, s)
        except BaseException:
            self._ll_dispatch_failed(handle, s)
            raise
        if capturing:
            self.ever_captured = True  # a handle used in a capture is never reused (the graph keeps its addresses)
        self._ll_next_half = half ^ 1
        h = LLHandle()
        h._comm = self
        h._handle = handle
        h._pinned = capturing
        h.num_tokens = T
        h.hidden = H
        h.topk = K
        h.topk_idx = topk_idx
        h.use_fp8 = use_fp8
        h.scale_format = fmt
        h.half = half
        h.recv_pending = return_recv_hook
        h.combine_pending = False

        if not (return_recv_hook or async_finish):
            return _tuple_new(LLDispatchResult, (recv_x, recv_x_scales, recv_count, h, None, None))
        keep = (x, topk_idx, topk_weights, recv_x, recv_x_scales, recv_count, cumulative_recv_stats)
        hook = event = None
        if return_recv_hook:
            hook = self._ll_dispatch_recv_hook(h, keep, idx_type, scales_ptr, stats_ptr, s)
        else:
            event = self._overlap_end(compute, comm_stream, s, True, False, keep, record_streams=False)
        return _tuple_new(LLDispatchResult, (recv_x, recv_x_scales, recv_count, h, event, hook))

    def _ll_dispatch_recv_hook(self, h, keep, idx_type, scales_ptr, stats_ptr, s):
        """The receive half of `h`'s dispatch as a function. Made here, not in ll_dispatch: a closure there would
        turn every variable it uses into a cell of ll_dispatch's frame, created on each call, hook or not."""
        lib, native, handle = self._lib, self._native, h._handle
        T, H, K, use_fp8, fmt = h.num_tokens, h.hidden, h.topk, h.use_fp8, h.scale_format

        def recv_hook():  # keeps `keep` (the call's tensors) alive as long as the hook lives
            if not h.recv_pending:
                raise RuntimeError("ll_dispatch hook: the receive half was already run")
            lib.ll_dispatch(native, handle, 0, 0, idx_type, T, H, K, use_fp8, fmt, keep[3].data_ptr(), scales_ptr,
                            keep[5].data_ptr(), stats_ptr, _PHASE_RECV, 0, s)
            h.recv_pending = False

        return recv_hook

    def _ll_dispatch_failed(self, handle, s):
        """A failed ll_dispatch call: its native handle goes back to the pool, unless the stream is being captured
        (then the failed call may still have left work in the graph that refers to it: pinned, as before)."""
        try:
            capturing = self._is_capturing(s)
        except Exception:
            capturing = True
        if capturing:
            self.ever_captured = True
        elif not self._destroyed:
            self._free_handles.append(handle)

    def _ll_dispatch_argument_error(self, x, topk_idx, scale_format, async_finish, return_recv_hook):
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook are exclusive (as in DeepEP)")
        if x.dtype != _BF16:
            raise TypeError(f"x: dtype {x.dtype}, expected torch.bfloat16")
        _index_type(topk_idx)
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"topk_idx: shape {tuple(topk_idx.shape)}, expected ({x.shape[0]}, K)")
        if scale_format not in _SCALE_FORMATS:
            raise ValueError(f"scale_format: {scale_format!r}, expected 'float', 'pow2' or 'ue8m0'")
        raise ValueError("x and topk_idx must be contiguous")

    def _ll_fill_and_check(self, out, H, use_fp8, fmt):
        """`out` with its None entries allocated, checked; remembered so the same tuple is not checked again."""
        recv_x, recv_x_scales, recv_count = out
        if recv_x is None or recv_count is None or (use_fp8 and recv_x_scales is None):
            a_x, a_s, a_c = self._ll_alloc(H, use_fp8, fmt)
            full = (a_x if recv_x is None else recv_x, a_s if recv_x_scales is None else recv_x_scales,
                    a_c if recv_count is None else recv_count)
            self._ll_check_outputs(*full, H, use_fp8, fmt)
            return full
        self._ll_check_outputs(recv_x, recv_x_scales, recv_count, H, use_fp8, fmt)
        self._ll_checked_out = out
        self._ll_checked_key = (H, use_fp8, fmt)
        return out

    def _ll_check_outputs(self, recv_x, recv_x_scales, recv_count, H, use_fp8, fmt):
        E_l, rows = self.num_local_experts, self.num_ranks * self.config.ll_max_tokens_per_rank
        _check_rows(recv_x, "recv_x", (E_l, rows, H), _FP8 if use_fp8 else _BF16)
        if use_fp8:
            if fmt == _NATIVE.SCALE_UE8M0:
                _check_rows(recv_x_scales, "recv_x_scales", (E_l, rows, _ceil_div(H, 512)), _I32)
            else:
                _check_rows(recv_x_scales, "recv_x_scales", (E_l, rows, H // 128), _F32)
        _check_rows(recv_count, "recv_count", (E_l,), _I32)

    def ll_combine(self, x, handle, *, topk_idx=None, topk_weights=None, zero_copy=False, out=None,
                   return_recv_hook=False, async_finish=False, stream=None) -> LLCombineResult:
        """Low-latency combine (collective): out[t] = sum over expert ranks d ascending of bf16(FMA chain over d's
        valid slots k ascending of w[t,k] * y(t,k)), in FP32 (docs/reference.md, bit-reproducible).

        x: [E_l, R*M, H] bf16 expert outputs in the dispatch's layout, or None with zero_copy=True (the outputs were
        written into ll_combine_buffer(handle)). topk_idx: as given to the dispatch (default: the dispatch's tensor).
        topk_weights: [T, K] float32, or None to use the weights the dispatch carried.
        out: [T, H] bf16 (allocated if None). Returns LLCombineResult(combined_x, event, hook).
        """
        if (async_finish and return_recv_hook) or handle._comm is not self or handle.recv_pending:
            self._ll_combine_argument_error(handle, async_finish, return_recv_hook)
        T, H, K = handle.num_tokens, handle.hidden, handle.topk
        if topk_idx is None:
            topk_idx = handle.topk_idx
        elif topk_idx is not handle.topk_idx and (tuple(topk_idx.shape) != (T, K) or
                                                  topk_idx.dtype != handle.topk_idx.dtype):
            raise ValueError(f"topk_idx: {tuple(topk_idx.shape)} {topk_idx.dtype}, expected the dispatch's "
                             f"({T}, {K}) {handle.topk_idx.dtype}")
        if zero_copy:
            if x is not None and x.data_ptr() != self._ll_combine_buffer_address(handle):
                raise ValueError("x: with zero_copy=True pass None or the tensor from ll_combine_buffer(handle)")
            x_ptr = 0
        else:
            if x is None:
                raise ValueError("x: required without zero_copy")
            if (x.dtype is not _BF16 or x.shape != (self._ll_x_shapes.get(H) or self._ll_x_shape(H))
                    or not x.is_contiguous()):
                E_l, rows = self.num_local_experts, self.num_ranks * self.config.ll_max_tokens_per_rank
                _check_rows(x, "x", (E_l, rows, H), _BF16)
            x_ptr = x.data_ptr()
        w_ptr = 0
        if topk_weights is not None:
            if topk_weights.dtype is not _F32 or topk_weights.shape != (T, K) or not topk_weights.is_contiguous():
                _check_rows(topk_weights, "topk_weights", (T, K), _F32)
            w_ptr = topk_weights.data_ptr() or self._dummy_ptr
        if async_finish:
            compute, comm_stream, s = self._overlap_begin(None, True, False)
        elif stream is None:
            s = self._current_stream()
        else:
            s = self._rt.as_stream_handle(stream)
        if out is None:
            out = self._rt.empty((T, H), _BF16)
        elif out.dtype is not _BF16 or out.shape != (T, H) or not out.is_contiguous():
            _check_rows(out, "out", (T, H), _BF16)
        self._lib.ll_combine(self._native, handle._handle, x_ptr, 1 if zero_copy else 0, topk_idx.data_ptr(), w_ptr, T,
                             H, K, out.data_ptr(), _PHASE_SEND if return_recv_hook else _PHASE_BOTH, s)
        if not (return_recv_hook or async_finish):
            return _tuple_new(LLCombineResult, (out, None, None))
        keep = (x, topk_idx, topk_weights, out)
        hook = event = None
        if return_recv_hook:
            handle.combine_pending = True
            hook = self._ll_combine_recv_hook(handle, keep, w_ptr, s)
        else:
            event = self._overlap_end(compute, comm_stream, s, True, False, keep, record_streams=False)
        return _tuple_new(LLCombineResult, (out, event, hook))

    def _ll_combine_recv_hook(self, handle, keep, w_ptr, s):
        """The receive half of an LL combine as a function (a closure in ll_combine would make its locals cells on
        every call: see _ll_dispatch_recv_hook)."""
        lib, native, p = self._lib, self._native, self._p
        T, H, K = handle.num_tokens, handle.hidden, handle.topk

        def recv_hook():  # keeps `keep` (the call's tensors) alive as long as the hook lives
            if not handle.combine_pending:
                raise RuntimeError("ll_combine hook: the receive half was already run")
            lib.ll_combine(native, handle._handle, 0, 0, p(keep[1]), w_ptr, T, H, K, p(keep[3]), _PHASE_RECV, s)
            handle.combine_pending = False

        return recv_hook

    def _ll_x_shape(self, H):
        shape = self._ll_x_shapes.get(H)
        if shape is None:
            shape = self._ll_x_shapes[H] = torch.Size(
                (self.num_local_experts, self.num_ranks * self.config.ll_max_tokens_per_rank, H))
        return shape

    def _ll_combine_argument_error(self, handle, async_finish, return_recv_hook):
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook are exclusive (as in DeepEP)")
        if handle._comm is not self:
            raise ValueError("handle: belongs to another communicator")
        raise RuntimeError("handle: its dispatch's receive hook has not been called yet")

    def _ll_combine_buffer_address(self, handle):
        return self._lib.ll_combine_buffer(self._native, handle._handle)

    def ll_combine_buffer(self, handle):
        """The library-owned [E_l, R*M, H] bf16 region the expert outputs may be written into for a zero-copy
        combine of `handle`'s dispatch (ncclMoeLowLatencyCombineBuffer). Valid until the dispatch after next."""
        address = self._ll_combine_buffer_address(handle)
        H = handle.hidden
        view = self._zero_copy_views.get((address, H))
        if view is None:
            shape = (self.num_local_experts, self.num_ranks * self.config.ll_max_tokens_per_rank, H)
            view = self._zero_copy_views[(address, H)] = self._rt.tensor_at(address, shape, _BF16, self)
        return view

    def ll_recv_src_info(self, handle):
        """The source of every row `handle`'s LL dispatch received (ncclMoeLowLatencyRecvSrcInfo): an int32
        [E_l, R*M] view of library memory (M = ll_max_tokens_per_rank), row j of local expert e holding
        (source rank << 24) | source token for j < recv_count[e]; rows past the count are unspecified.

        Rows of a slab are in the library's order: source rank ascending, then source token, then slot
        (docs/reference.md), so each source rank's rows are contiguous. The memory belongs to the native handle, which
        each LL dispatch through that handle rewrites (stream-ordered, by the receive half: read it after the hook
        when return_recv_hook=True). The handle is not reused while `handle` (or this view, which keeps it alive)
        lives, so the view stays valid that long; a handle taken during a CUDA graph capture is rewritten by every
        replay of that graph."""
        if handle._comm is not self:
            raise ValueError("handle: belongs to another communicator")
        # Not cached on the handle: the view keeps the handle alive, and a cached one would make a cycle that delays
        # the handle's return to the pool until a garbage collection.
        address = self._lib.ll_recv_src_info(self._native, handle._handle)
        shape = (self.num_local_experts, self.num_ranks * self.config.ll_max_tokens_per_rank)
        return self._rt.tensor_at(address, shape, _I32, handle)

    def ll_reset(self, stream=None):
        """ncclMoeLowLatencyReset (collective, no LL result alive): needed when a buffer used by HT goes back to
        LL after a failure or as DeepEP's clean_low_latency_buffer; the next dispatch uses half 0."""
        self._lib.ll_reset(self._native, self._rt.as_stream_handle(stream))
        self._ll_next_half = 0

    # -- rank masks (include/nccl_moe.h "Rank masks"; Config(enable_rank_masks=True)) -------------------------------
    def _check_rank_masks(self, api):
        if self._destroyed:
            raise RuntimeError(f"{api}: the communicator was destroyed")
        if not self.config.enable_rank_masks:
            raise RuntimeError(f"{api}: the communicator was created without rank masks; pass enable_rank_masks=True "
                               "to Comm (or nccl_moe.Config) on every rank")

    def _rank_mask_list(self, mask, api):
        """mask (a sequence or tensor of R values, each 0/1 or False/True) as a list of R ints, checked here so that
        nothing is sent when it is wrong."""
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 1:
                raise ValueError(f"{api}: mask has shape {tuple(mask.shape)}, expected [{self.num_ranks}]")
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"{api}: mask has dtype {mask.dtype}, expected an integer or bool tensor")
            values = mask.tolist()  # a device tensor is read once here (one host wait)
        else:
            values = list(mask)
        if len(values) != self.num_ranks:
            raise ValueError(f"{api}: mask has {len(values)} entries, expected the world size {self.num_ranks}")
        out = []
        for r, v in enumerate(values):
            if isinstance(v, bool):
                v = int(v)
            if not isinstance(v, int) or v not in (0, 1):
                raise ValueError(f"{api}: mask[{r}] is {v!r}, expected 0 (active) or 1 (masked)")
            out.append(v)
        return out

    def query_rank_mask(self, stream=None, out=None):
        """This rank's view of the rank masks after the LL work enqueued so far on `stream` (ncclMoeQueryRankMask,
        stream-ordered, capturable): an int32 [num_ranks] tensor on the communicator's device, 1 = masked, 0 = active.
        `out`: an int32 [num_ranks] contiguous tensor on the device to write instead of a new one."""
        self._check_rank_masks("query_rank_mask")
        if out is None:
            out = self._rt.empty((self.num_ranks,), _I32)
        else:
            _check_rows(out, "out", (self.num_ranks,), _I32)
            if out.device != self.device:
                raise ValueError(f"out: on {out.device}, expected {self.device}")
        self._lib.query_rank_mask(self._native, out.data_ptr(), self._rt.as_stream_handle(stream))
        return out

    def query_rank_mask_host(self, stream=None):
        """query_rank_mask as a list of num_ranks ints, read into host memory: waits for `stream`'s earlier work."""
        self._check_rank_masks("query_rank_mask_host")
        return list(self._lib.query_rank_mask_host(self._native, self._rt.as_stream_handle(stream)))

    def set_rank_mask(self, mask, stream=None):
        """ncclMoeSetRankMask: collective over the ranks with mask[r] == 0 (ranks masked in `mask` do not call it);
        every participant passes the same mask (not checked) and gets it as its view; resets the LL state of the
        participants (no LL result may be alive; the next LL dispatch uses half 0). `mask`: num_ranks values, each 0
        (active) or 1 (masked), this rank's 0."""
        self._check_rank_masks("set_rank_mask")
        values = self._rank_mask_list(mask, "set_rank_mask")
        if values[self.rank]:
            raise ValueError(f"set_rank_mask: mask[{self.rank}] is 1 on rank {self.rank} itself; a rank the new mask "
                             "leaves out does not call set_rank_mask")
        if not self.config.ll_max_tokens_per_rank:
            raise RuntimeError("set_rank_mask: the communicator has no low-latency capacity (ll_max_tokens_per_rank)")
        self._lib.set_rank_mask(self._native, values, self._rt.as_stream_handle(stream))
        self._ll_next_half = 0

    def clear_rank_mask(self, stream=None):
        """ncclMoeClearRankMask: every rank active again. Collective over ALL ranks, masked ones included (this is how
        they rejoin); resets every rank's LL state like set_rank_mask."""
        self._check_rank_masks("clear_rank_mask")
        if not self.config.ll_max_tokens_per_rank:
            raise RuntimeError("clear_rank_mask: the communicator has no low-latency capacity "
                               "(ll_max_tokens_per_rank)")
        self._lib.clear_rank_mask(self._native, self._rt.as_stream_handle(stream))
        self._ll_next_half = 0

    # -- helpers -----------------------------------------------------------------------------------------------------
    def cast_to_fp8(self, x, scale_format="float", out=None, stream=None):
        """ncclMoeCastToFp8 (local): bf16 [T, H] -> (fp8 e4m3 [T, H], scales float [T, ceil(H/128)] or packed ue8m0
        int32 [T, ceil(H/512)]), one scale per 128 channels (amax/448; pow2/ue8m0 rounded up to a power of two)."""
        return cast_to_fp8(x, scale_format, out=out, stream=stream, runtime=self._rt, lib=self._lib)


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_CONTEXT = _NoContext()


def cast_to_fp8(x, scale_format="float", *, out=None, stream=None, runtime=None, lib=None):
    """ncclMoeCastToFp8 on x's device: see Comm.cast_to_fp8."""
    from ._runtime import runtime_for

    if x.dtype != _BF16 or x.dim() != 2 or not x.is_contiguous():
        raise ValueError("x: expected a contiguous [T, H] bf16 tensor")
    fmt = _SCALE_FORMATS.get(scale_format)
    if fmt is None:
        raise ValueError(f"scale_format: {scale_format!r}, expected 'float', 'pow2' or 'ue8m0'")
    T, H = x.shape
    rt = runtime if runtime is not None else runtime_for(x.device)
    lib = lib if lib is not None else _Backend.lib
    q, scales = out if out is not None else (None, None)
    if q is None:
        q = torch.empty((T, H), dtype=_FP8, device=x.device)
    if scales is None:
        if fmt == _NATIVE.SCALE_UE8M0:
            scales = torch.empty((T, _ceil_div(H, 512)), dtype=_I32, device=x.device)
        else:
            scales = torch.empty((T, _ceil_div(H, 128)), dtype=_F32, device=x.device)
    lib.cast_to_fp8(x.data_ptr(), T, H, fmt, q.data_ptr(), scales.data_ptr(), rt.as_stream_handle(stream))
    return q, scales
