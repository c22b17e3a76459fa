"""LocalWorld: R ranks in one process over ncclMoeCommInitAll, each rank driven from its own Python thread.

Devices may repeat: on a one-GPU machine every rank lives on GPU 0 and the ranks split its SMs. Such a world runs
every multi-rank semantic of the library on one GPU (it says nothing about NVLink timings). The rules of
ncclMoeCommInitAll apply:
  - every rank's calls come from its own thread, on its own stream (LocalWorld.run sets both up): the ranks' kernels
    wait for each other on the device, so one thread or one stream cannot serve two ranks;
  - CUDA_DEVICE_MAX_CONNECTIONS=32 must be in the environment before the process first uses CUDA (set here when
    CUDA is not initialised yet);
  - a rank thread should not allocate new device memory (cudaMalloc) while a peer's kernel already waits for it:
    warm the caching allocator on the rank's stream first (Comm(group) ends with a barrier of the ranks, after its
    own allocations);
  - CUDA graphs: capture each rank on a stream of its own (torch.cuda.graph(g, stream=torch.cuda.Stream(),
    capture_error_mode="thread_local")); torch's default capture stream is shared by all threads. Capture one rank at
    a time (`with world.capture_lock, torch.cuda.graph(...)`): entering torch.cuda.graph() synchronises the device
    and empties the caching allocator, which torch refuses (an internal assert) while another thread is capturing.
    Drain every rank's stream and barrier the ranks first (the synchronisation waits for every rank's kernels).

LocalGroup is what stands for a ProcessGroup in such a world: `rank()`, `size()`; nccl_moe.torch.Comm(group) and
nccl_moe.deep_ep.Buffer(group) accept it. Creating the communicators is collective over the rank threads (the first
Comm(group) of each rank meets the others and one of them calls ncclMoeCommInitAll for all).
"""
import os
import threading
import warnings

import torch


class LocalGroup:
    """One rank of a LocalWorld, in the shape of a ProcessGroup (rank(), size())."""

    __slots__ = ("world", "_rank")

    def __init__(self, world, rank):
        self.world = world
        self._rank = rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self.world.num_ranks

    def barrier(self):
        self.world.barrier()

    def all_gather_object(self, obj):
        return self.world.all_gather_object(self._rank, obj)

    def __repr__(self):
        return f"LocalGroup(rank={self._rank}, size={self.world.num_ranks})"


class LocalWorld:
    """num_ranks ranks in this process; rank r on devices[r] (default: r modulo the visible GPUs)."""

    def __init__(self, num_ranks: int, devices=None, *, timeout_s: float = 600.0, lib=None):
        from ._comm import _Backend

        self.lib = lib if lib is not None else _Backend.lib
        self.num_ranks = int(num_ranks)
        self._cuda = not hasattr(self.lib, "make_runtime")
        if devices is None:
            n = max(1, self.lib.device_count()) if self._cuda else 1
            devices = [r % n for r in range(self.num_ranks)]
        if len(devices) != self.num_ranks:
            raise ValueError(f"devices: {len(devices)} entries, expected {self.num_ranks}")
        self.devices = [int(d) for d in devices]
        self._barrier = threading.Barrier(self.num_ranks, timeout=timeout_s)
        # The rank a thread drives inside run() (unset elsewhere): Comm.destroy meets the other ranks only there.
        self._rank_thread = threading.local()
        # Held by a rank thread around torch.cuda.graph(): one capture at a time (see the module docstring).
        self.capture_lock = threading.Lock()
        self._gather = [None] * self.num_ranks
        self._shared = None
        self.groups = [LocalGroup(self, r) for r in range(self.num_ranks)]
        if self._cuda:
            self._check_connections()

    def _check_connections(self):
        per_device = max(self.devices.count(d) for d in set(self.devices))
        if per_device < 2:
            return
        wanted = min(32, 4 * per_device)
        current = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
        if current is not None and current.isdigit() and int(current) >= wanted:
            return
        if not torch.cuda.is_initialized():
            os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "32"
        else:
            warnings.warn(f"LocalWorld: {per_device} ranks share a GPU and CUDA_DEVICE_MAX_CONNECTIONS is "
                          f"{current or 'unset (8)'}; set it to 32 before the process first uses CUDA, or kernels "
                          "that wait for a peer may queue behind that peer's and time out", RuntimeWarning)

    def group(self, rank: int) -> LocalGroup:
        return self.groups[rank]

    def driving(self, rank: int) -> bool:
        """True on the thread run() drives `rank` from."""
        return getattr(self._rank_thread, "rank", None) == rank

    # -- host collectives among the rank threads -------------------------------------------------------------------
    def barrier(self):
        self._barrier.wait()

    def all_gather_object(self, rank: int, obj):
        self._gather[rank] = obj
        self._barrier.wait()
        out = list(self._gather)
        self._barrier.wait()
        return out

    def _init_rank(self, rank, config):
        """Collective over the rank threads: returns rank's native communicator (rank 0 makes them all)."""
        configs = self.all_gather_object(rank, config)
        if any(c != configs[0] for c in configs):
            raise ValueError(f"LocalWorld: the ranks passed different configs: {configs}")
        if rank == 0:
            try:
                self._shared = (None, self.lib.Comm.init_all(self.devices, *config._args()))
            except BaseException as e:  # every rank raises it
                self._shared = (e, None)
        self._barrier.wait()
        error, natives = self._shared
        self._barrier.wait()
        if error is not None:
            raise error
        return natives[rank]

    def comms(self, config=None, **config_fields):
        """All ranks' Comms at once, from one thread (not collective); drive each from its own thread."""
        from . import _group
        from ._comm import Comm

        config = _group.make_config(config, config_fields)
        natives = self.lib.Comm.init_all(self.devices, *config._args())
        return [Comm._from_native(n, self.lib, config, group=self.groups[r]) for r, n in enumerate(natives)]

    # -- running the ranks -------------------------------------------------------------------------------------------
    def run(self, fn, *args, **kwargs):
        """Runs fn(rank, *args, **kwargs) on one thread per rank, with the rank's device current and a stream of its
        own as the current stream; returns the results by rank. The first exception (by rank) is raised after every
        thread ended; the others' host waits are broken so they end too (device waits end by NCCL_MOE_TIMEOUT_S)."""
        results = [None] * self.num_ranks
        errors = [None] * self.num_ranks

        def body(rank):
            self._rank_thread.rank = rank
            try:
                if self._cuda:
                    device = self.devices[rank]
                    torch.cuda.set_device(device)
                    with torch.cuda.stream(torch.cuda.Stream(device)):
                        results[rank] = fn(rank, *args, **kwargs)
                        torch.cuda.current_stream().synchronize()
                else:
                    results[rank] = fn(rank, *args, **kwargs)
            except BaseException as e:  # noqa: B036 - reported below with the rank
                errors[rank] = e
                self._barrier.abort()
            finally:
                self._rank_thread.rank = None

        # Daemon threads: a rank stuck in a device wait (until NCCL_MOE_TIMEOUT_S) does not keep an interrupted
        # process alive.
        threads = [threading.Thread(target=body, args=(r,), name=f"nccl_moe-rank{r}", daemon=True)
                   for r in range(self.num_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._barrier.reset()
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            # A rank's own error, not the broken barrier it caused elsewhere.
            own = [(r, e) for r, e in failed if not isinstance(e, threading.BrokenBarrierError)] or failed
            rank, error = own[0]
            raise RuntimeError(f"LocalWorld rank {rank} failed: {type(error).__name__}: {error}") from error
        return results
