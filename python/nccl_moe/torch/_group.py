"""Where a Comm's NCCL communicator comes from (python.md section 3).

  - An NCCL ProcessGroup: borrow torch's communicator, `group._get_backend(cuda)._comm_ptr()` with the rank's device
    current. torch creates it lazily unless the process group was initialised with `device_id=` (eager): a 0 pointer
    is followed by `dist.barrier(group, device_ids=[device])` and a second look. The pointer must name a communicator
    of the libnccl this process loaded (nccl_moe's loader makes sure there is only one) with the group's size and
    rank on our device (checked with ncclCommCount/UserRank/CuDevice). torch owns it: destroy our Comm before
    torch.distributed.destroy_process_group(). Non-blocking communicators (TORCH_NCCL_USE_COMM_NONBLOCKING) are not
    borrowed: NCCL-MoE's init/destroy do not handle ncclInProgress yet; we make our own instead.
  - Any other ProcessGroup (gloo: vLLM passes its CPU group): rank 0 of the group makes an ncclUniqueId, it is
    broadcast over the group (broadcast_object_list), every rank calls ncclCommInitRank on its device. Ours to destroy.
  - An mpi4py communicator: the same, broadcast with comm.bcast.
  - A LocalGroup of a LocalWorld: the one-process world (ncclMoeCommInitAll), no NCCL communicator.

Environment: NCCL_MOE_REUSE_TORCH_COMM=0 never borrows (like DeepEP V2's EP_REUSE_NCCL_COMM=0).
"""
import contextlib
import os

import torch
import torch.distributed as dist

from .. import Config


def make_config(config, fields) -> Config:
    if config is not None:
        if fields:
            raise ValueError(f"pass either config= or its fields ({', '.join(sorted(fields))}), not both")
        if not isinstance(config, Config):
            raise TypeError(f"config: expected nccl_moe.Config, got {type(config).__name__}")
        return config
    try:
        return Config(**fields)
    except TypeError as e:
        raise TypeError(f"Comm: {e} (num_experts and hidden are required)") from None


def _device_index(device):
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def _truthy(value):
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def _nonblocking(backend) -> bool:
    if _truthy(os.environ.get("TORCH_NCCL_USE_COMM_NONBLOCKING")):
        return True
    try:
        blocking = backend.options.config.blocking
    except AttributeError:
        return False
    # ncclConfig_t.blocking: 0 = non-blocking; NCCL_CONFIG_UNDEF_INT (INT_MIN) = unset.
    return blocking == 0


def _nccl_backend(group):
    """The ProcessGroupNCCL behind `group`, or None."""
    try:
        if dist.get_backend(group) != "nccl" and "nccl" not in str(dist.get_backend(group)):
            return None
        backend = group._get_backend(torch.device("cuda"))
    except (RuntimeError, AttributeError, ValueError):
        return None
    return backend if hasattr(backend, "_comm_ptr") else None


def borrow_torch_comm(group, device_index, lib) -> int:
    """torch's ncclComm_t of `group` on `device_index` (after initialising it if torch is lazy), checked."""
    backend = _nccl_backend(group)
    if backend is None:
        raise RuntimeError("comm_source='borrow': the group is not an NCCL ProcessGroup with _comm_ptr() "
                           "(torch >= 2.8 is needed)")
    if _nonblocking(backend):
        raise RuntimeError("comm_source='borrow': torch's communicator is non-blocking "
                           "(TORCH_NCCL_USE_COMM_NONBLOCKING or the group's config); NCCL-MoE does not handle "
                           "ncclInProgress yet: use comm_source='own'")
    with torch.cuda.device(device_index):
        ptr = backend._comm_ptr()
        if not ptr:
            # Lazy init: the first collective on this group creates the communicator.
            dist.barrier(group=group, device_ids=[device_index])
            ptr = backend._comm_ptr()
    if not ptr:
        raise RuntimeError("comm_source='borrow': torch has no NCCL communicator for this group on "
                           f"cuda:{device_index} even after a barrier")
    count, rank, device = lib.nccl_comm_info(ptr)
    if count != group.size() or rank != group.rank() or device != device_index:
        raise RuntimeError(f"the communicator torch returned has {count} ranks, rank {rank}, device {device}; "
                           f"expected the group's {group.size()} ranks, rank {group.rank()}, device {device_index}")
    return ptr


def own_nccl_comm(group, device_index, lib, mpi_comm=None) -> int:
    """A new ncclComm_t over the ranks of `group` (any backend) or `mpi_comm`: unique id from rank 0, broadcast."""
    if mpi_comm is not None:
        rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        uid = mpi_comm.bcast(lib.nccl_unique_id() if rank == 0 else None, root=0)
    else:
        rank, size = group.rank(), group.size()
        box = [lib.nccl_unique_id() if rank == 0 else None]
        src = dist.get_global_rank(group, 0)
        # An NCCL-only group moves the object through the current CUDA device.
        context = torch.cuda.device(device_index) if _nccl_backend(group) is not None else contextlib.nullcontext()
        with context:
            dist.broadcast_object_list(box, src=src, group=group)
        uid = box[0]
    return lib.nccl_comm_init_rank(size, uid, rank, device_index)


def create_native(group, config, device, comm_source, mpi_comm, lib):
    """(native Comm, owned ncclComm_t or 0, lib) for Comm.__init__."""
    from ._world import LocalGroup

    if comm_source not in ("auto", "borrow", "own"):
        raise ValueError(f"comm_source: {comm_source!r}, expected 'auto', 'borrow' or 'own'")
    if isinstance(group, LocalGroup):
        native = group.world._init_rank(group.rank(), config)
        return native, 0, group.world.lib
    if group is None and mpi_comm is None:
        if not dist.is_initialized():
            raise RuntimeError("Comm: pass a ProcessGroup (or mpi_comm=, or a LocalWorld group); "
                               "torch.distributed is not initialised")
        group = dist.group.WORLD
    device_index = 0 if device is None and hasattr(lib, "make_runtime") else _device_index(device)
    owned = 0
    if mpi_comm is not None:
        ptr = owned = own_nccl_comm(None, device_index, lib, mpi_comm)
    else:
        use_own = comm_source == "own" or os.environ.get("NCCL_MOE_REUSE_TORCH_COMM", "1") == "0"
        if not use_own and comm_source == "auto":
            backend = _nccl_backend(group)
            use_own = backend is None or _nonblocking(backend)
        if use_own:
            ptr = owned = own_nccl_comm(group, device_index, lib)
        else:
            ptr = borrow_torch_comm(group, device_index, lib)
    try:
        native = lib.Comm.init(ptr, device_index, *config._args())
    except BaseException:
        if owned:
            lib.nccl_comm_destroy(owned)
        raise
    return native, owned, lib
