"""A CPU stand-in for the extension nccl_moe._C, so the torch layer (Comm, LocalWorld, autograd, deep_ep.Buffer) runs
end to end on a machine without a GPU.

It has the extension's functions with the same integer arguments: pointers are data_ptr()s of CPU tensors, read and
written here through ctypes views, exactly as the C library reads device memory. Ranks are Python threads of one
LocalWorld (or a world of one, for a gloo group of size 1); collective calls meet in host memory. The semantics are
computed the simplest way (scan every source for every destination), independently of tests/reference.py, which the
tests compare them with; what only the GPU can show (streams, events, graphs, timeouts, kernel numerics) it does not
pretend to test: streams are 0, events do nothing, nothing is ever "capturing".
"""
import contextlib
import ctypes
import itertools
import math
import threading

import torch

import nccl_moe
from nccl_moe import _C as _REAL

from reference import cast_to_fp8 as _ref_cast  # noqa: E402  (the cast is a pure function of a row)

from nccl_moe._C import (BFLOAT16, FP8_E4M3, INDEX_INT32, INDEX_INT64, MAX_EXPERTS, MAX_NVL_PEERS,  # noqa: E402,F401
                         MAX_RANKS, MAX_TOPK, PHASE_BOTH, PHASE_RECV, PHASE_SEND, SCALE_FLOAT, SCALE_FLOAT_POW2,
                         SCALE_UE8M0)

_DTYPES = {0: torch.int64, 1: torch.int32}
_ELEM = {torch.int64: 8, torch.int32: 4, torch.float32: 4, torch.bfloat16: 2, torch.uint8: 1,
         torch.float8_e4m3fn: 1, torch.bool: 1}


def _view(address, shape, dtype):
    """A tensor over the memory at `address` (a CPU data_ptr), without copying."""
    n = math.prod(shape)
    if n == 0 or address == 0:
        return torch.empty(shape, dtype=dtype)
    buf = (ctypes.c_uint8 * (n * _ELEM[dtype])).from_address(address)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def _strided(address, shape, strides, dtype):
    """A copy of the [rows, cols] elements at address + (i*s0 + j*s1)*elem."""
    rows, cols = shape
    if rows == 0:
        return torch.empty(shape, dtype=dtype)
    s0, s1 = strides
    s1 = s1 or 1
    s0 = s0 or cols
    span = (rows - 1) * s0 + (cols - 1) * s1 + 1
    flat = _view(address, (span,), dtype)
    return torch.as_strided(flat, (rows, cols), (s0, s1)).clone()


def _fail(code, message):
    raise nccl_moe.NcclMoeArgumentError(code, message) if code == 4 else nccl_moe.NcclMoeError(code, message)


# ------------------------------------------------------------------------------------------------------------------
# Runtime: streams and events on the host
# ------------------------------------------------------------------------------------------------------------------


class _Event:
    def __init__(self, device=0):
        self.device = device
        self.address = id(self)

    def record(self, stream):
        pass

    def wait(self, stream):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


Event = _Event


class HostRuntime:
    def __init__(self, index=0):
        self.index = index
        self.device = torch.device("cpu")

    def current_stream(self):
        return 0

    def current_torch_stream(self):
        return None

    def new_stream(self):
        return object()

    def synchronize_streams(self, *streams):
        pass

    def as_stream_handle(self, stream):
        return stream if isinstance(stream, int) else 0

    def stream_context(self, stream):
        return contextlib.nullcontext()

    def is_capturing(self, stream_handle):
        return False

    def new_native_event(self):
        return _Event()

    def wait_event(self, event, stream_handle):
        pass

    def record_stream(self, tensor, stream):
        pass

    def tensor_at(self, address, shape, dtype, owner):
        t = _view(address, shape, dtype)
        t._nccl_moe_owner = owner
        return t

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)


def make_runtime(device):
    return HostRuntime(device)


def device_count():
    return 0


def stream_is_capturing(stream):
    return False


def version():
    return _REAL.version()


def buffer_size(*args):
    return _REAL.buffer_size(*args)


# ------------------------------------------------------------------------------------------------------------------
# Worlds and communicators
# ------------------------------------------------------------------------------------------------------------------


class _World:
    def __init__(self, num_ranks):
        self.num_ranks = num_ranks
        self.barrier = threading.Barrier(num_ranks, timeout=30)
        self.slots = [None] * num_ranks
        self.ll_posts = [[None] * num_ranks, [None] * num_ranks]
        self.combine_posts = [[None] * num_ranks, [None] * num_ranks]
        self._group_barriers = {}
        self._lock = threading.Lock()

    def group_barrier(self, ranks):
        """A barrier of the ranks in `ranks` only (the active ranks of a rank mask); the full set is `barrier`."""
        key = tuple(ranks)
        if len(key) == self.num_ranks:
            return self.barrier
        with self._lock:
            b = self._group_barriers.get(key)
            if b is None:
                b = self._group_barriers[key] = threading.Barrier(len(key), timeout=30)
        return b

    def all_gather(self, rank, obj):
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class Comm:
    def __init__(self, world, rank, config_args):
        self.world = world
        self.rank = rank
        self.num_ranks = world.num_ranks
        self.device = 0
        self.world_comm = True
        (self.num_experts, self.hidden, self.max_topk, self.max_tokens_per_rank, self.ll_max_tokens_per_rank,
         self.num_sms, self.ll_num_sms, self.enable_rank_masks) = config_args
        # This rank's view of the rank masks (1 = masked), as the library keeps it in device memory.
        self.rank_mask = [0] * self.num_ranks
        _REAL.buffer_size(*config_args, min(self.num_ranks, MAX_NVL_PEERS))  # the library's config checks
        self.destroyed = False
        self.next_half = 0
        self.error = None
        rows = self.num_ranks * self.ll_max_tokens_per_rank
        self.zero_copy = [torch.zeros(self.num_experts // self.num_ranks * rows * self.hidden, dtype=torch.bfloat16)
                          for _ in range(2)] if self.ll_max_tokens_per_rank else None

    @staticmethod
    def init_all(devices, *config_args):
        world = _World(len(devices))
        return [Comm(world, r, config_args) for r in range(len(devices))]

    @staticmethod
    def init(nccl_comm, device, *config_args):
        world, rank = _NCCL_COMMS[nccl_comm]
        return Comm(world, rank, config_args)

    def destroy(self):
        self.destroyed = True

    def async_error(self):
        return (0, "") if self.error is None else self.error

    def check(self, api):
        if self.destroyed:
            _fail(5, f"{api}: the communicator was destroyed")
        if self.error is not None:
            _fail(self.error[0], self.error[1])

    @property
    def address(self):
        return id(self)

    def active(self):
        return [r for r in range(self.num_ranks) if not self.rank_mask[r]]


_NCCL_COMMS = {}
_NCCL_IDS = {}
_ids = itertools.count(1)


def nccl_unique_id():
    return next(_ids).to_bytes(128, "little")


def nccl_comm_init_rank(num_ranks, unique_id, rank, device):
    world = _NCCL_IDS.setdefault(bytes(unique_id), _World(num_ranks))
    address = 0x1000 + 16 * next(_ids)
    _NCCL_COMMS[address] = (world, rank)
    return address


def nccl_comm_destroy(comm):
    _NCCL_COMMS.pop(comm, None)


def nccl_comm_info(comm):
    world, rank = _NCCL_COMMS[comm]
    return world.num_ranks, rank, 0


def nccl_version():
    return _REAL.nccl_version()


class Handle:
    def __init__(self, comm):
        self.comm = comm
        R, C = comm.num_ranks, comm.max_tokens_per_rank
        self.recv_count = torch.zeros(1, dtype=torch.int32)
        self.recv_count_per_expert = torch.zeros(comm.num_experts // R, dtype=torch.int32)
        self.recv_src_info = torch.zeros(max(1, R * C), dtype=torch.int32)
        # ncclMoeLowLatencyRecvSrcInfo's array: [E_l, R * ll_max_tokens_per_rank] (rank << 24 | token) per row.
        self.ll_src_info = torch.zeros(max(1, comm.num_experts // R * R * comm.ll_max_tokens_per_rank),
                                       dtype=torch.int32)
        self.ht = None
        self.ll = None

    def destroy(self):
        pass

    def ht_device_pointers(self):
        return (self.recv_count.data_ptr(), self.recv_count_per_expert.data_ptr(), self.recv_src_info.data_ptr())


# ------------------------------------------------------------------------------------------------------------------
# Operations
# ------------------------------------------------------------------------------------------------------------------


def layout(comm, topk_idx, idx_type, T, K, per_rank, per_expert, in_rank, stream):
    comm.check("ncclMoeGetDispatchLayout")
    R, E = comm.num_ranks, comm.num_experts
    E_l = E // R
    ids = _view(topk_idx, (T, K), _DTYPES[idx_type]).tolist()
    pr, pe = [0] * R, [0] * E
    rows = []
    for t in range(T):
        ranks = set()
        for e in ids[t]:
            if e >= 0:
                pe[e] += 1
                ranks.add(e // E_l)
        for d in ranks:
            pr[d] += 1
        rows.append([d in ranks for d in range(R)])
    _view(per_rank, (R,), torch.int32).copy_(torch.tensor(pr, dtype=torch.int32))
    if per_expert:
        _view(per_expert, (E,), torch.int32).copy_(torch.tensor(pe, dtype=torch.int32))
    if in_rank and T:
        _view(in_rank, (T, R), torch.bool).copy_(torch.tensor(rows, dtype=torch.bool))


def ht_notify(comm, handle, topk_idx, idx_type, T, K, expert_alignment, recv_capacity, stream):
    comm.check("ncclMoeDispatchNotify")
    if T > comm.max_tokens_per_rank:
        _fail(4, f"ncclMoeDispatchNotify: args->num_tokens is {T}, expected 0..{comm.max_tokens_per_rank}")
    ids = _view(topk_idx, (T, K), _DTYPES[idx_type]).tolist()
    everyone = comm.world.all_gather(comm.rank, ids)
    R, E_l, d = comm.num_ranks, comm.num_experts // comm.num_ranks, comm.rank
    src = []
    counts = [0] * E_l
    for s in range(R):
        for t, row in enumerate(everyone[s]):
            mine = [e for e in row if e >= 0 and e // E_l == d]
            if mine:
                src.append((s, t))
                for e in mine:
                    counts[e % E_l] += 1
    aligned = [-(-c // expert_alignment) * expert_alignment for c in counts]
    handle.ht = {"T": T, "K": K, "ids": everyone, "src": src, "idx_dtype": _DTYPES[idx_type],
                 "capacity": recv_capacity}
    n = len(src)
    handle.recv_count[0] = n
    handle.recv_count_per_expert.copy_(torch.tensor(aligned, dtype=torch.int32))
    for i, (s, t) in enumerate(src[: handle.recv_src_info.numel()]):
        handle.recv_src_info[i] = (s << 24) | t
    if recv_capacity > 0:
        if n > recv_capacity:
            comm.error = (5, f"ht-notify: rank {d} receives {n} rows, more than recv_capacity {recv_capacity}")
        return -1, []
    return n, aligned


def ht_dispatch(comm, handle, x, dtype, H, x_scales, scale_format, s_tok, s_ch, topk_weights, recv_x, recv_x_scales,
                recv_topk_idx, recv_topk_weights, num_sms, stream):
    comm.check("ncclMoeDispatch")
    ht = handle.ht
    if ht is None:
        _fail(5, "ncclMoeDispatch: handle holds no routing; call ncclMoeDispatchNotify with it first")
    T, K = ht["T"], ht["K"]
    xdt = torch.bfloat16 if dtype == BFLOAT16 else torch.uint8
    rows_x = _view(x, (T, H), xdt).clone()
    scales = None
    if dtype == FP8_E4M3:
        cols = -(-H // 128) if scale_format == SCALE_FLOAT else -(-H // 512)
        sdt = torch.float32 if scale_format == SCALE_FLOAT else torch.int32
        scales = _strided(x_scales, (T, cols), (s_tok, s_ch), sdt)
    w = _view(topk_weights, (T, K), torch.float32).clone() if topk_weights else None
    everyone = comm.world.all_gather(comm.rank, (rows_x, scales, w))
    E_l, d = comm.num_experts // comm.num_ranks, comm.rank
    n_rows = ht["capacity"] if ht["capacity"] > 0 else len(ht["src"])
    out_x = _view(recv_x, (n_rows, H), xdt)
    out_s = _view(recv_x_scales, (n_rows, scales.shape[1]), scales.dtype) if scales is not None else None
    out_i = _view(recv_topk_idx, (n_rows, K), ht["idx_dtype"]) if recv_topk_idx else None
    out_w = _view(recv_topk_weights, (n_rows, K), torch.float32) if recv_topk_weights else None
    if out_i is not None:
        out_i.fill_(-1)
    for i, (s, t) in enumerate(ht["src"][:n_rows]):
        out_x[i].copy_(everyone[s][0][t])
        if out_s is not None:
            out_s[i].copy_(everyone[s][1][t])
        for k, e in enumerate(ht["ids"][s][t]):
            local = e >= 0 and e // E_l == d
            if out_i is not None:
                out_i[i, k] = e % E_l if local else -1
            if out_w is not None:
                out_w[i, k] = everyone[s][2][t, k] if local else 0.0


def ht_combine(comm, handle, x, H, topk_weights, bias_0, bias_1, combined_x, combined_topk_weights, num_sms, stream):
    comm.check("ncclMoeCombine")
    ht = handle.ht
    n_rows = ht["capacity"] if ht["capacity"] > 0 else len(ht["src"])
    T, K = ht["T"], ht["K"]
    mine = _view(x, (n_rows, H), torch.bfloat16).clone()
    w = _view(topk_weights, (n_rows, K), torch.float32).clone() if topk_weights else None
    everyone = comm.world.all_gather(comm.rank, (mine, w, ht["src"]))
    out = _view(combined_x, (T, H), torch.bfloat16)
    out_w = _view(combined_topk_weights, (T, K), torch.float32) if combined_topk_weights else None
    b0 = _view(bias_0, (T, H), torch.bfloat16) if bias_0 else None
    b1 = _view(bias_1, (T, H), torch.bfloat16) if bias_1 else None
    s = comm.rank
    for t in range(T):
        acc = torch.zeros(H, dtype=torch.float32)
        wacc = torch.zeros(K, dtype=torch.float32)
        for d, (rows_d, w_d, src_d) in enumerate(everyone):
            if (s, t) in src_d:
                i = src_d.index((s, t))
                acc = acc + rows_d[i].float()
                if w_d is not None:
                    wacc = wacc + w_d[i]
        if b0 is not None:
            acc = acc + b0[t].float()
        if b1 is not None:
            acc = acc + b1[t].float()
        out[t].copy_(acc.to(torch.bfloat16))
        if out_w is not None:
            out_w[t].copy_(wacc)


def _fp8_cast(rows, scale_format):
    return _ref_cast(rows, {SCALE_FLOAT: "float", SCALE_FLOAT_POW2: "pow2", SCALE_UE8M0: "ue8m0"}[scale_format])


def ll_dispatch(comm, handle, x, topk_idx, idx_type, T, H, K, use_fp8, scale_format, recv_x, recv_x_scales, recv_count,
                cumulative_recv_stats, phase, topk_weights, stream):
    comm.check("ncclMoeLowLatencyDispatch")
    R, E_l, M, d = comm.num_ranks, comm.num_experts // comm.num_ranks, comm.ll_max_tokens_per_rank, comm.rank
    if phase & PHASE_SEND:
        if T > M:
            _fail(4, f"ncclMoeLowLatencyDispatch: args->num_tokens is {T}, expected 0..{M}")
        rows = _view(x, (T, H), torch.bfloat16).clone()
        ids = _view(topk_idx, (T, K), _DTYPES[idx_type]).tolist()
        w = _view(topk_weights, (T, K), torch.float32).clone() if topk_weights else None
        half = comm.next_half
        comm.next_half ^= 1
        handle.ll = {"half": half, "T": T, "H": H, "K": K, "ids": ids, "w": w, "recv_pending": True,
                     "idx_dtype": _DTYPES[idx_type]}
        comm.world.ll_posts[half][d] = (rows, ids, w)
    if phase & PHASE_RECV:
        ll = handle.ll
        barrier = comm.world.group_barrier(comm.active())
        barrier.wait()
        posts = list(comm.world.ll_posts[ll["half"]])
        barrier.wait()
        slabs = [[] for _ in range(E_l)]
        for s in comm.active():  # a masked source sends nothing (include/nccl_moe.h "Rank masks")
            rows_s, ids_s, _ = posts[s]
            for t, row in enumerate(ids_s):
                for k, e in enumerate(row):
                    if e >= 0 and e // E_l == d:
                        slabs[e % E_l].append((s, t, k))
        xdt = torch.uint8 if use_fp8 else torch.bfloat16
        out = _view(recv_x, (E_l, R * M, H), xdt)
        if use_fp8:
            cols = -(-H // 512) if scale_format == SCALE_UE8M0 else H // 128
            sdt = torch.int32 if scale_format == SCALE_UE8M0 else torch.float32
            out_s = _view(recv_x_scales, (E_l, R * M, cols), sdt)
            casts = {s: _fp8_cast(posts[s][0], scale_format) for s in comm.active()}
        counts = _view(recv_count, (E_l,), torch.int32)
        # Rows past recv_count are unspecified in the library: fill them with a source no rank has, so that readers
        # which look past the count fail the tests.
        src_info = handle.ll_src_info[: E_l * R * M].view(E_l, R * M)
        src_info.fill_(((R + 5) << 24) | 0x7ABCDE)
        for j, slab in enumerate(slabs):
            for i, (s, t, k) in enumerate(slab):
                src_info[j, i] = (s << 24) | t
            for i, (s, t, k) in enumerate(slab):
                if use_fp8:
                    out[j, i].copy_(casts[s][0][t].view(torch.uint8))
                    out_s[j, i].copy_(casts[s][1][t])
                else:
                    out[j, i].copy_(posts[s][0][t])
            counts[j] = len(slab)
        if cumulative_recv_stats:
            _view(cumulative_recv_stats, (E_l,), torch.int32).add_(counts)
        ll["slabs"] = slabs
        ll["dispatch_w"] = [None if p is None else p[2] for p in posts]
        ll["recv_pending"] = False
    return stream_is_capturing(stream)  # the extension's result: was the stream being captured (never, here)


def ll_combine(comm, handle, x, zero_copy, topk_idx, topk_weights, T, H, K, out, phase, stream):
    comm.check("ncclMoeLowLatencyCombine")
    ll = handle.ll
    R, E_l, M, d = comm.num_ranks, comm.num_experts // comm.num_ranks, comm.ll_max_tokens_per_rank, comm.rank
    half = ll["half"]
    if phase & PHASE_SEND:
        if zero_copy:
            y = comm.zero_copy[half][: E_l * R * M * H].view(E_l, R * M, H).clone()
        else:
            y = _view(x, (E_l, R * M, H), torch.bfloat16).clone()
        w = _view(topk_weights, (T, K), torch.float32).clone() if topk_weights else None
        if w is None and ll["w"] is None:
            _fail(4, "ncclMoeLowLatencyCombine: args->topk_weights is NULL and the dispatch carried no weights")
        comm.world.combine_posts[half][d] = (y, ll["slabs"])
        ll["combine_w"] = w if w is not None else ll["w"]
    if phase & PHASE_RECV:
        barrier = comm.world.group_barrier(comm.active())
        barrier.wait()
        posts = list(comm.world.combine_posts[half])
        barrier.wait()
        ids = _view(topk_idx, (T, K), ll["idx_dtype"]).tolist()
        w = ll["combine_w"]
        result = _view(out, (T, H), torch.bfloat16)
        s = comm.rank
        for t in range(T):
            total = torch.zeros(H, dtype=torch.float32)
            for dd in comm.active():  # a masked expert rank's partial is absent
                ks = [k for k, e in enumerate(ids[t]) if e >= 0 and e // E_l == dd]
                if not ks:
                    continue
                y_d, slabs_d = posts[dd]
                acc = torch.zeros(H, dtype=torch.float32)
                for k in ks:
                    j = ids[t][k] % E_l
                    i = slabs_d[j].index((s, t, k))
                    acc = acc + w[t, k] * y_d[j, i].float()
                total = total + acc.to(torch.bfloat16).float()
            result[t].copy_(total.to(torch.bfloat16))


def ll_combine_buffer(comm, handle):
    comm.check("ncclMoeLowLatencyCombineBuffer")
    return comm.zero_copy[handle.ll["half"]].data_ptr()


def ll_recv_src_info(comm, handle):
    comm.check("ncclMoeLowLatencyRecvSrcInfo")
    if not comm.ll_max_tokens_per_rank:
        _fail(5, "ncclMoeLowLatencyRecvSrcInfo: the communicator has no low-latency capacity")
    if handle.ll is None:
        _fail(5, "ncclMoeLowLatencyRecvSrcInfo: handle holds no low-latency dispatch; issue "
                 "ncclMoeLowLatencyDispatch first")
    return handle.ll_src_info.data_ptr()


def ll_reset(comm, stream):
    comm.check("ncclMoeLowLatencyReset")
    comm.world.group_barrier(comm.active()).wait()
    comm.next_half = 0


def _check_masks(comm, api):
    comm.check(api)
    if not comm.enable_rank_masks:
        _fail(5, f"{api}: the communicator was created without config.enable_rank_masks")


def query_rank_mask(comm, mask, stream):
    _check_masks(comm, "ncclMoeQueryRankMask")
    if not mask:
        _fail(4, "ncclMoeQueryRankMask: mask is NULL")
    _view(mask, (comm.num_ranks,), torch.int32).copy_(torch.tensor(comm.rank_mask, dtype=torch.int32))


def query_rank_mask_host(comm, stream):
    _check_masks(comm, "ncclMoeQueryRankMask")
    return list(comm.rank_mask)


def set_rank_mask(comm, mask, stream):
    _check_masks(comm, "ncclMoeSetRankMask")
    if not comm.ll_max_tokens_per_rank:
        _fail(5, "ncclMoeSetRankMask: the communicator has no low-latency capacity")
    mask = list(mask)
    if len(mask) != comm.num_ranks:
        _fail(4, f"set_rank_mask: mask has {len(mask)} entries, expected {comm.num_ranks}")
    for r, v in enumerate(mask):
        if v not in (0, 1):
            _fail(4, f"ncclMoeSetRankMask: mask[{r}] is {v}, expected 0 or 1")
    if mask[comm.rank]:
        _fail(4, f"ncclMoeSetRankMask: mask[{comm.rank}] (this rank) is 1, expected 0")
    active = [r for r in range(comm.num_ranks) if not mask[r]]
    barrier = comm.world.group_barrier(active)
    barrier.wait()
    comm.rank_mask = mask
    comm.next_half = 0
    barrier.wait()


def clear_rank_mask(comm, stream):
    _check_masks(comm, "ncclMoeClearRankMask")
    if not comm.ll_max_tokens_per_rank:
        _fail(5, "ncclMoeClearRankMask: the communicator has no low-latency capacity")
    comm.world.barrier.wait()
    comm.rank_mask = [0] * comm.num_ranks
    comm.next_half = 0
    comm.world.barrier.wait()


def cast_to_fp8(x, T, H, scale_format, out_fp8, out_scales, stream):
    q, s = _fp8_cast(_view(x, (T, H), torch.bfloat16), scale_format)
    _view(out_fp8, (T, H), torch.uint8).copy_(q.view(torch.uint8))
    _view(out_scales, tuple(s.shape), s.dtype).copy_(s)
