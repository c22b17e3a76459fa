"""deep_ep.Buffer on NCCL-MoE: DeepEP V1's Buffer API (argument names, defaults, return tuples, shapes, dtypes) for
the calls vLLM, SGLang, Megatron-LM and TensorRT-LLM make (python.md section 2.4), over nccl_moe.torch.Comm.

Differences that matter (python/README.md has the full table):
  - The communicator is created at the first collective call, when the experts, hidden size and low-latency
    capacity are known (DeepEP's constructor does not have them), or at construction when num_rdma_bytes is a value
    that Buffer.get_low_latency_rdma_size_hint just returned (its arguments are remembered). Every rank reaches that
    point together, as DeepEP's contract already requires (equal hidden, experts, num_max_dispatch_tokens_per_rank).
    A later call that needs more (a larger hidden, other experts, another LL token count, LL on an HT-only buffer)
    re-creates it, collectively, and never after a call was captured into a CUDA graph (that raises).
  - High-throughput capacity (tokens per rank) is the largest that fits in num_nvl_bytes (NCCL-MoE sizes its buffer
    for a token count; DeepEP streams through a fixed buffer), or NCCL_MOE_DEEP_EP_MAX_TOKENS. Config's size hint
    returns the bytes for NCCL_MOE_DEEP_EP_MAX_TOKENS (default 4096) tokens. A batch above the capacity raises on
    the rank that has it, and the other ranks then wait for it until NCCL_MOE_TIMEOUT_S: size generously.
  - Handle contents: the HT handle's rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix and
    send_head are placeholders that raise NotImplementedError when used (DeepEP-internal state that callers pass back
    without reading); recv_src_idx and is_token_in_rank are real. The LL handle's src_info and layout_range are real,
    derived on first access (handle[0], handle[1] or unpacking) from ncclMoeLowLatencyRecvSrcInfo and recv_count by
    a few torch ops on the current stream (see _LLHandle).
  - LL fp8 scales come back as DeepEP's column-major view (one extra copy kernel, see python/README.md).
Unsupported arguments raise NotImplementedError naming the argument.
"""
import os

import torch

from .. import MAX_NVL_PEERS
from .. import Config as _MoeConfig
from ..torch._comm import Comm as _Comm
from ..torch._world import LocalGroup as _LocalGroup
from . import _config
from ._config import Config
from .utils import EventHandle, EventOverlap

# Arguments of the last get_low_latency_rdma_size_hint calls, by the bytes they returned (for eager init).
_LL_HINTS = {}


class _Unsupported:
    """Stands for a DeepEP-internal handle entry that NCCL-MoE does not produce; any use raises."""

    __slots__ = ("_what",)

    def __init__(self, what):
        self._what = what

    def _fail(self, *args, **kwargs):
        raise NotImplementedError(f"{self._what}: DeepEP-internal handle state that NCCL-MoE does not expose "
                                  "(pass the handle back to combine/dispatch; see python/README.md)")

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        self._fail()

    __getitem__ = __len__ = __iter__ = __array__ = __index__ = __int__ = __float__ = __bool__ = _fail

    def __repr__(self):
        return f"<unsupported {self._what}>"


class _HtHandle(tuple):
    """DeepEP's intranode handle (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
    recv_src_idx, is_token_in_rank, send_head) with the NCCL-MoE routing attached (attribute _routing)."""


class _LLHandle(tuple):
    """DeepEP's low-latency handle (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)
    with the NCCL-MoE handle attached (attribute _moe).

    src_info [E_l, R*M] int32 (source token of each received row; -1 past recv_count, where DeepEP leaves garbage)
    and layout_range [E_l, R] int64 ((begin << 32) | count: the rows of source rank r in expert e's slab are
    begin .. begin+count-1) are made when first read (indexing, unpacking or iterating the handle), by torch ops on
    the current stream over the library's source info (ncclMoeLowLatencyRecvSrcInfo) and recv_count: read them when
    recv_x may be read (after the hook, or after waiting for the event), as in DeepEP. The common case, a handle
    passed back to combine unread, costs nothing. Exact: the library packs each slab by source rank ascending, then
    token (docs/reference.md), so every source rank's rows are contiguous, which layout_range needs; DeepEP's order
    of the source ranks and of the tokens within one source rank is arrival order, of which ours is one instance.
    A source rank with no rows gets count 0 and begin = the rows of lower source ranks (DeepEP: an arbitrary begin).
    """

    def _internals(self):
        done = self.__dict__.get("_derived")
        if done is None:
            h = self._moe
            if h.recv_pending:
                raise RuntimeError("low-latency handle: src_info/layout_range are read after the receive half; call "
                                   "the dispatch's hook first")
            done = self._derived = ll_handle_layout(h._comm.ll_recv_src_info(h), self._recv_count, h._comm.num_ranks)
        return done

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[k] for k in range(*i.indices(tuple.__len__(self))))
        j = i + 5 if isinstance(i, int) and i < 0 else i
        if j == 0 or j == 1:
            return self._internals()[j]
        return tuple.__getitem__(self, i)

    def __iter__(self):
        src_info, layout_range = self._internals()
        yield src_info
        yield layout_range
        yield from tuple.__iter__(tuple.__getitem__(self, slice(2, None)))

    def __repr__(self):
        return ("_LLHandle(src_info, layout_range, num_max_dispatch_tokens_per_rank={}, hidden={}, num_experts={})"
                .format(*tuple.__getitem__(self, slice(2, None))))


def ll_handle_layout(packed_src_info, recv_count, num_ranks, check=None):
    """DeepEP's (src_info, layout_range) from NCCL-MoE's packed LL source info [E_l, R*M] int32 ((rank << 24) |
    token per row, rows past recv_count unspecified) and recv_count [E_l] int32, with torch ops (no host wait).

    layout_range[e, r] = (begin << 32) | count, count = rows of expert e from source rank r, begin = the first such
    row. That is DeepEP's meaning when each source rank's rows are contiguous in the slab, which the library
    guarantees (docs/reference.md); check=True (default: NCCL_MOE_DEEP_EP_CHECK_LL_LAYOUT=1) verifies it, waiting
    for the device, and raises RuntimeError if a source rank's rows are not contiguous."""
    E_l, N = packed_src_info.shape
    dev = packed_src_info.device
    rows = torch.arange(N, device=dev, dtype=torch.int64).expand(E_l, N)
    valid = rows < recv_count.to(torch.int64).unsqueeze(1)
    packed = packed_src_info.to(torch.int64)
    # Rows past the count go to an extra bucket R, dropped below.
    rank = torch.where(valid, (packed >> 24).clamp(0, num_ranks), num_ranks)
    src_info = torch.where(valid, packed & 0xFFFFFF, -1).to(torch.int32)
    count = torch.zeros((E_l, num_ranks + 1), dtype=torch.int64, device=dev)
    count.scatter_add_(1, rank, valid.to(torch.int64))
    first = torch.full((E_l, num_ranks + 1), N, dtype=torch.int64, device=dev)
    first.scatter_reduce_(1, rank, rows, "amin")
    count, first = count[:, :num_ranks], first[:, :num_ranks]
    below = count.cumsum(1) - count
    begin = torch.where(count > 0, first, below)
    layout_range = (begin << 32) | count
    if check is None:
        check = os.environ.get("NCCL_MOE_DEEP_EP_CHECK_LL_LAYOUT", "0") == "1"
    if check:
        last = torch.full((E_l, num_ranks + 1), -1, dtype=torch.int64, device=dev)
        last.scatter_reduce_(1, rank, rows, "amax")
        bad = (count > 0) & (last[:, :num_ranks] - first + 1 != count)
        if bool(bad.any()):
            e, r = (int(v) for v in bad.nonzero()[0])
            raise RuntimeError(f"low-latency handle: the rows of source rank {r} in local expert {e}'s slab are not "
                               "contiguous, so DeepEP's layout_range cannot describe them (the library's documented "
                               "slab order groups them; docs/reference.md)")
    return src_info, layout_range


def _unwrap_event(previous_event):
    return None if previous_event is None else getattr(previous_event, "event", previous_event)


def _not_supported(name, why):
    raise NotImplementedError(f"{name}: {why}")


class Buffer:
    """DeepEP V1's Buffer over NCCL-MoE. See the module docstring and python/README.md."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, num_nvl_peers=None) -> None:
        if not allow_nvlink_for_low_latency_mode:
            _not_supported("allow_nvlink_for_low_latency_mode=False",
                           "NCCL-MoE's low-latency kernels use NVLink inside a node; there is no RDMA-only path")
        if use_fabric:
            _not_supported("use_fabric=True", "NCCL-MoE allocates its buffer itself (cudaMalloc, CUDA IPC)")
        if group is not None:
            self.rank = group.rank()
            self.group = group
            self.group_size = group.size()
            self._mpi_comm = None
        elif comm is not None:
            self.rank = comm.Get_rank()
            self.group = comm
            self.group_size = comm.Get_size()
            self._mpi_comm = comm
        else:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        if self.group_size > MAX_NVL_PEERS:
            _not_supported(f"a group of {self.group_size} ranks", f"NCCL-MoE runs on the ranks of one node (at most "
                           f"{MAX_NVL_PEERS}); the scale-out transport is not implemented")
        if num_nvl_peers is not None and num_nvl_peers != self.group_size:
            _not_supported(f"num_nvl_peers={num_nvl_peers}", "every rank of the group must be in one NVLink domain")
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self._comm = None
        self._destroyed = False
        self._comm_stream = None
        # Eager creation when the LL size is a hint we computed (vLLM, SGLang, TRT-LLM and DeepEP's tests do so).
        hint = _LL_HINTS.get(num_rdma_bytes) if low_latency_mode and num_rdma_bytes else None
        if hint is not None and hint[2] == self.group_size:
            m, hidden, _, num_experts = hint
            self._ensure(num_experts=num_experts, hidden=hidden, ll_tokens=m)

    # -- the communicator -----------------------------------------------------------------------------------------
    @property
    def runtime(self):
        """The nccl_moe.torch.Comm behind this Buffer (None until the first collective call)."""
        return self._comm

    def _ht_capacity(self, num_experts, hidden, ll_tokens):
        env = os.environ.get("NCCL_MOE_DEEP_EP_MAX_TOKENS")
        if env is not None:
            return int(env)
        if self.num_nvl_bytes <= 0:
            return 0

        def fits(c):
            size = _MoeConfig(num_experts=num_experts, hidden=hidden, max_topk=_config.SHIM_MAX_TOPK,
                              max_tokens_per_rank=c).buffer_size(self.group_size)
            return size <= self.num_nvl_bytes

        if not fits(1):
            raise ValueError(f"num_nvl_bytes={self.num_nvl_bytes} is smaller than NCCL-MoE's buffer for one token "
                             f"of hidden {hidden} (size it with Config.get_nvl_buffer_size_hint, or set "
                             "NCCL_MOE_DEEP_EP_MAX_TOKENS)")
        lo, hi = 1, (1 << 24) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _ensure(self, *, num_experts, hidden, ll_tokens=0, need_ht=False, need_ll=False):
        """The communicator for a call with these sizes (collective when it has to be created)."""
        if self._destroyed:
            raise RuntimeError("Buffer: destroy() was called")
        c = self._comm
        if c is not None:
            cfg = c.config
            ok = (cfg.num_experts == num_experts and hidden <= cfg.hidden and
                  (not need_ll or cfg.ll_max_tokens_per_rank == ll_tokens) and
                  (not need_ht or cfg.max_tokens_per_rank > 0))
            if ok:
                return c
            if c.ever_captured:
                raise RuntimeError(
                    f"Buffer: this call needs a communicator sized for experts={num_experts}, hidden={hidden}, "
                    f"low-latency tokens={ll_tokens}, but the current one ({cfg}) was used inside a CUDA graph and "
                    "cannot be re-created: make the first (eager) calls use the largest sizes")
            hidden = max(hidden, cfg.hidden)
            if not need_ll:
                ll_tokens = cfg.ll_max_tokens_per_rank
        ht_tokens = self._ht_capacity(num_experts, hidden, ll_tokens)
        if need_ht and ht_tokens == 0:
            raise RuntimeError("Buffer: num_nvl_bytes is 0, so this Buffer has no high-throughput capacity (pass "
                               "num_nvl_bytes from Config.get_nvl_buffer_size_hint, or set "
                               "NCCL_MOE_DEEP_EP_MAX_TOKENS)")
        config = _MoeConfig(num_experts=num_experts, hidden=hidden, max_topk=_config.SHIM_MAX_TOPK,
                            max_tokens_per_rank=ht_tokens, ll_max_tokens_per_rank=ll_tokens,
                            enable_rank_masks=bool(self.enable_shrink))
        config.validate(self.group_size)
        if c is not None:
            c.destroy()
            self._comm = None
        if isinstance(self.group, _LocalGroup):
            comm = _Comm(self.group, config=config)
        elif self._mpi_comm is not None:
            comm = _Comm(None, config=config, mpi_comm=self._mpi_comm)
        else:
            comm = _Comm(self.group, config=config)
        comm._event_cls = EventHandle
        if self._comm_stream is not None:
            comm._comm_stream = self._comm_stream
        self._comm = comm
        return comm

    def destroy(self):
        """Destroys the communicator (collective); needs explicitly_destroy=True, as in DeepEP."""
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None
        self._destroyed = True

    # -- static and class methods ---------------------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled():
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """NCCL-MoE's buffer bytes for low-latency calls of this shape (bf16 and fp8 use the same buffer)."""
        if num_ranks > MAX_NVL_PEERS:
            _not_supported(f"num_ranks={num_ranks}", "the scale-out transport is not implemented")
        size = _MoeConfig(num_experts=num_experts, hidden=hidden, max_topk=_config.SHIM_MAX_TOPK,
                          ll_max_tokens_per_rank=num_max_dispatch_tokens_per_rank).buffer_size(num_ranks)
        _LL_HINTS[size] = (num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
        return size

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        config_map = {
            2: Config(Buffer.num_sms, 24, 256, 6, 128),
            4: Config(Buffer.num_sms, 6, 256, 6, 128),
            8: Config(Buffer.num_sms, 6, 256, 6, 128),
            16: Config(Buffer.num_sms, 36, 288, 20, 128),
            24: Config(Buffer.num_sms, 32, 288, 8, 128),
            32: Config(Buffer.num_sms, 32, 288, 8, 128),
            48: Config(Buffer.num_sms, 32, 288, 8, 128),
            64: Config(Buffer.num_sms, 32, 288, 8, 128),
            96: Config(Buffer.num_sms, 20, 480, 12, 128),
            128: Config(Buffer.num_sms, 20, 560, 12, 128),
            144: Config(Buffer.num_sms, 32, 720, 12, 128),
            160: Config(Buffer.num_sms, 28, 720, 12, 128),
        }
        assert num_ranks in config_map, f"Unsupported number of EP ranks: {num_ranks}"
        return config_map[num_ranks]

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        config_map = {
            2: Config(Buffer.num_sms, 10, 256, 6, 128),
            4: Config(Buffer.num_sms, 9, 256, 6, 128),
            8: Config(Buffer.num_sms, 4, 256, 6, 128),
            16: Config(Buffer.num_sms, 4, 288, 12, 128),
            24: Config(Buffer.num_sms, 1, 288, 8, 128),
            32: Config(Buffer.num_sms, 1, 288, 8, 128),
            48: Config(Buffer.num_sms, 1, 288, 8, 128),
            64: Config(Buffer.num_sms, 1, 288, 8, 128),
            96: Config(Buffer.num_sms, 1, 480, 8, 128),
            128: Config(Buffer.num_sms, 1, 560, 8, 128),
            144: Config(Buffer.num_sms, 2, 720, 8, 128),
            160: Config(Buffer.num_sms, 2, 720, 8, 128),
        }
        assert num_ranks in config_map, f"Unsupported number of EP ranks: {num_ranks}"
        return config_map[num_ranks]

    # -- utilities --------------------------------------------------------------------------------------------------
    def get_comm_stream(self) -> torch.Stream:
        if self._comm is not None:
            return self._comm.comm_stream
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream()
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        _not_supported("get_local_buffer_tensor", "NCCL-MoE does not expose its communication buffer as raw memory")

    # -- shrink mode: NCCL-MoE's rank masks (include/nccl_moe.h "Rank masks") ----------------------------------------
    def _mask_comm(self, api):
        if not self.enable_shrink:
            raise RuntimeError(f"{api}: the Buffer was created without enable_shrink=True")
        if self._destroyed:
            raise RuntimeError(f"{api}: destroy() was called")
        return self._comm

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor):
        """Writes this rank's view of the masks into `mask_status` ([num_ranks] torch.int on the device; 1 = masked,
        0 = active), stream-ordered on the current stream (ncclMoeQueryRankMask). Before the first LL call has
        created the communicator no rank is masked (zeros)."""
        comm = self._mask_comm("low_latency_query_mask_buffer")
        if not isinstance(mask_status, torch.Tensor) or mask_status.dtype != torch.int32 or \
                tuple(mask_status.shape) != (self.group_size,) or not mask_status.is_contiguous():
            raise ValueError(f"mask_status: expected a contiguous [{self.group_size}] torch.int tensor")
        if comm is None:
            mask_status.zero_()
            return
        comm.query_rank_mask(out=mask_status)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False):
        """Masks (mask=True) or unmasks `rank_to_mask`. DeepEP changes one rank's local mask; NCCL-MoE's set is
        collective: the new mask is this rank's view (read with one host wait) with that entry changed, applied by
        ncclMoeSetRankMask over the ranks it holds active (ncclMoeClearRankMask, over every rank, when it masks
        none). So every rank active in the new mask calls it, with the same view; the rank being masked takes no part
        (its call returns at once), the rank being unmasked does. It resets the LL state (no LL result alive)."""
        comm = self._mask_comm("low_latency_update_mask_buffer")
        if not isinstance(rank_to_mask, int) or isinstance(rank_to_mask, bool) or \
                not 0 <= rank_to_mask < self.group_size:
            raise ValueError(f"rank_to_mask: {rank_to_mask!r}, expected a rank 0..{self.group_size - 1}")
        if comm is None:
            raise RuntimeError("low_latency_update_mask_buffer: no low-latency call has created the communicator yet "
                               "(NCCL-MoE sizes it at the first LL call, or at construction from a size hint)")
        if mask and rank_to_mask == self.rank:
            return  # a rank the new mask leaves out does not take part in ncclMoeSetRankMask
        view = comm.query_rank_mask_host()
        view[rank_to_mask] = 1 if mask else 0
        if any(view):
            comm.set_rank_mask(view)
        else:
            comm.clear_rank_mask()

    def low_latency_clean_mask_buffer(self):
        """Unmasks every rank: ncclMoeClearRankMask, collective over every rank, masked ones included (DeepEP's clean
        is local); resets the LL state."""
        comm = self._mask_comm("low_latency_clean_mask_buffer")
        if comm is None:
            return  # nothing masked yet
        comm.clear_rank_mask()

    def _num_sms(self, config):
        return (config.num_sms if config is not None else Buffer.num_sms)

    # -- high throughput --------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns (num_tokens_per_rank [R] int32, None (intranode), num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool, EventOverlap)."""
        comm = self._comm
        if comm is not None and comm.config.num_experts == num_experts:
            per_rank, per_expert, in_rank, event = comm.dispatch_layout(
                topk_idx, previous_event=_unwrap_event(previous_event), async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)
            return per_rank, None, per_expert, in_rank, EventOverlap(event)
        # Before the communicator exists (its hidden size is not known yet): the same counts with torch ops on the
        # current stream, after previous_event.
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True")
        if previous_event is not None:
            _unwrap_event(previous_event).current_stream_wait()
        per_rank, per_expert, in_rank = _layout_with_torch(topk_idx, num_experts, self.group_size)
        return per_rank, None, per_expert, in_rank, EventOverlap(EventHandle() if async_finish else None)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's intranode dispatch. Returns (recv_x | (recv_x, recv_x_scales), recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, EventOverlap); cached (handle=): (recv_x, None, None, None, None,
        EventOverlap)."""
        xs, x_scales = x if isinstance(x, tuple) else (x, None)
        num_sms = self._num_sms(config)
        prev = _unwrap_event(previous_event)
        if handle is not None:
            assert topk_idx is None and topk_weights is None
            routing = handle._routing
            res = routing._comm.ht_dispatch(xs, routing=routing, x_scales=x_scales, num_sms=num_sms,
                                            previous_event=prev, async_finish=async_finish,
                                            allocate_on_comm_stream=allocate_on_comm_stream)
            recv = (res.recv_x, res.recv_x_scales) if x_scales is not None else res.recv_x
            return recv, None, None, None, None, EventOverlap(res.event)
        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        if topk_idx is None:
            _not_supported("topk_idx=None", "NCCL-MoE's notify routes from topk_idx; routing from the layout tensors "
                           "alone needs a C ABI addition (python/README.md)")
        comm = self._ensure(num_experts=num_tokens_per_expert.shape[0], hidden=xs.shape[1], need_ht=True)
        res = comm.ht_dispatch(xs, topk_idx, topk_weights, x_scales=x_scales, expert_alignment=expert_alignment,
                               num_worst_tokens=num_worst_tokens, num_sms=num_sms, previous_event=prev,
                               async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        routing = res.routing
        recv_src_idx = routing.recv_src_info.bitwise_and(0xFFFFFF)
        new_handle = _HtHandle((_Unsupported("rank_prefix_matrix"), _Unsupported("channel_prefix_matrix"),
                                _Unsupported("recv_channel_prefix_matrix"), recv_src_idx, is_token_in_rank,
                                _Unsupported("send_head")))
        new_handle._routing = routing
        per_expert = [] if num_worst_tokens > 0 else routing.num_recv_tokens_per_expert
        recv = (res.recv_x, res.recv_x_scales) if x_scales is not None else res.recv_x
        return recv, res.recv_topk_idx, res.recv_topk_weights, per_expert, new_handle, EventOverlap(res.event)

    def combine(self, x: torch.Tensor, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's intranode combine (a sum without weights). Returns (combined_x, combined_topk_weights | None,
        EventOverlap)."""
        routing = handle._routing
        res = routing._comm.ht_combine(x, routing, topk_weights=topk_weights, bias=bias,
                                       num_sms=self._num_sms(config), previous_event=_unwrap_event(previous_event),
                                       async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        return res.combined_x, res.combined_topk_weights, EventOverlap(res.event)

    def internode_dispatch(self, *args, **kwargs):
        _not_supported("internode_dispatch", "the scale-out transport is not implemented")

    def internode_combine(self, *args, **kwargs):
        _not_supported("internode_combine", "the scale-out transport is not implemented")

    # -- low latency ------------------------------------------------------------------------------------------------
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        comm = self._ensure(num_experts=num_experts, hidden=hidden, ll_tokens=num_max_dispatch_tokens_per_rank,
                            need_ll=True)
        comm.ll_reset()

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False, return_recv_hook: bool = False):
        """Returns (recv_x | (recv_x fp8, recv_x_scales column-major view), recv_count [E_l] int32, handle,
        EventOverlap, hook | None)."""
        if dispatch_wait_recv_cost_stats is not None:
            _not_supported("dispatch_wait_recv_cost_stats", "NCCL-MoE's kernels do not time their waits per rank")
        if use_ue8m0:
            assert round_scale, "use_ue8m0 needs round_scale=True"
        comm = self._ensure(num_experts=num_experts, hidden=x.shape[1], ll_tokens=num_max_dispatch_tokens_per_rank,
                            need_ll=True)
        fmt = ("ue8m0" if use_ue8m0 else "pow2") if round_scale else "float"
        res = comm.ll_dispatch(x, topk_idx, use_fp8=use_fp8, scale_format=fmt,
                               cumulative_recv_stats=cumulative_local_expert_recv_stats,
                               return_recv_hook=return_recv_hook, async_finish=async_finish)
        handle = _LLHandle((None, None, num_max_dispatch_tokens_per_rank, x.shape[1], num_experts))
        handle._moe = res.handle
        handle._recv_count = res.recv_count
        hook = res.hook
        event = res.event
        col_major = None
        if use_fp8:
            # DeepEP returns the scales as a column-major (TMA-aligned) view: [E_l, S, R*M] transposed. The library
            # writes them row-major; one copy kernel after the receive makes DeepEP's layout (python/README.md).
            scales = res.recv_x_scales
            col_major = torch.empty((scales.shape[0], scales.shape[2], scales.shape[1]), dtype=scales.dtype,
                                    device=scales.device).transpose(1, 2)
            if hook is not None:
                recv_hook = hook

                def hook():
                    recv_hook()
                    col_major.copy_(scales)
            elif async_finish:
                with comm._rt.stream_context(comm.comm_stream):
                    col_major.copy_(scales)
                event = EventHandle(comm._rt, comm._rt.as_stream_handle(comm.comm_stream))
            else:
                col_major.copy_(scales)
            recv = (res.recv_x, col_major)
        else:
            recv = res.recv_x
        extra = None
        if async_finish:
            extra = (x, topk_idx, res.recv_x, res.recv_x_scales, col_major, res.recv_count,
                     cumulative_local_expert_recv_stats)
        return recv, res.recv_count, handle, EventOverlap(event, extra), hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None, combine_wait_recv_cost_stats=None):
        """Returns (combined_x [T, H] bf16, EventOverlap, hook | None): a weighted reduce."""
        if use_logfmt:
            _not_supported("use_logfmt=True", "NCCL-MoE's low-latency combine sends bf16 partials")
        if combine_wait_recv_cost_stats is not None:
            _not_supported("combine_wait_recv_cost_stats", "NCCL-MoE's kernels do not time their waits per rank")
        h = handle._moe
        comm = h._comm
        res = comm.ll_combine(None if zero_copy else x, h, topk_idx=topk_idx, topk_weights=topk_weights,
                              zero_copy=zero_copy, out=out, return_recv_hook=return_recv_hook,
                              async_finish=async_finish)
        extra = (x, topk_idx, topk_weights, res.combined_x) if async_finish else None
        return res.combined_x, EventOverlap(res.event, extra), res.hook

    def get_next_low_latency_combine_buffer(self, handle):
        h = handle._moe
        return h._comm.ll_combine_buffer(h)


def _layout_with_torch(topk_idx, num_experts, num_ranks):
    """ncclMoeGetDispatchLayout's counts with torch ops (no host synchronisation)."""
    E_l = num_experts // num_ranks
    valid = topk_idx >= 0
    idx = topk_idx.clamp(min=0).long()
    T = topk_idx.shape[0]
    ones = valid.to(torch.int32)
    per_expert = torch.zeros((T, num_experts), dtype=torch.int32, device=topk_idx.device)
    per_expert.scatter_add_(1, idx, ones)
    in_rank = torch.zeros((T, num_ranks), dtype=torch.int32, device=topk_idx.device)
    in_rank.scatter_add_(1, idx // E_l, ones)
    in_rank = in_rank > 0
    return in_rank.sum(0, dtype=torch.int32), per_expert.sum(0, dtype=torch.int32), in_rank
