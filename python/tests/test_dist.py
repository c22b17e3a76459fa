"""World size 1 over torch.distributed: a communicator of our own over a gloo group (what vLLM passes), torch's own
NCCL communicator borrowed from an NCCL group (eagerly initialised here; lazily in a subprocess), and DeepEP-written
code on Buffer(group) for both."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import deep_ep_style as style
import reference as ref
from conftest import HAVE_GPU
from harness import Problem, assert_same_bits

pytestmark = pytest.mark.torch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def groups():
    """(WORLD, a gloo group): WORLD has NCCL for CUDA tensors (eager, device_id=cuda:0) when a GPU is present."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    port = _free_port()
    if HAVE_GPU:
        dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    gloo = dist.new_group(backend="gloo")
    yield dist.group.WORLD, gloo
    dist.destroy_process_group()


def _single_rank_round(backend, comm):
    """HT and LL round trips on one rank, exact against the reference."""
    p = Problem(1, 4, 256, 2, [10], seed=71)
    x, idx, w = backend.to(p.x[0]), backend.to(p.topk_idx[0]), backend.to(p.weights[0])
    res = comm.ht_dispatch(x, idx, w)
    want = ref.ht_dispatch(p.topk_idx, 4, x=p.x, weights=p.weights)[0]
    assert_same_bits(res.recv_x, want["recv_x"], "recv_x")
    assert_same_bits(res.recv_topk_idx, want["recv_topk_idx"], "recv_topk_idx")
    comb = comm.ht_combine(res.recv_x, res.routing, topk_weights=res.recv_topk_weights)
    outs, wouts = ref.ht_combine([want], [want["recv_x"]], num_tokens=p.tokens, weights=[want["recv_topk_weights"]])
    assert_same_bits(comb.combined_x, outs[0], "combined_x")
    assert_same_bits(comb.combined_topk_weights, wouts[0], "combined weights")
    ll = comm.ll_dispatch(x, idx, topk_weights=w)
    wl = ref.ll_dispatch(p.topk_idx, 4, 16, x=p.x)
    assert_same_bits(ll.recv_count, wl[0]["recv_count"], "LL recv_count")
    y = ll.recv_x.clone()
    out = comm.ll_combine(y, ll.handle).combined_x
    ys = [y.cpu()]
    for j in range(4):
        ys[0][j, int(ll.recv_count[j]):] = 0
    assert_same_bits(out, ref.ll_combine(p.topk_idx, p.weights, wl, ys, 4)[0], "LL combined_x")


def test_own_comm_over_gloo(backend, groups):
    from nccl_moe.torch import Comm

    _, gloo = groups
    comm = Comm(gloo, num_experts=4, hidden=256, max_topk=2, max_tokens_per_rank=16, ll_max_tokens_per_rank=16,
                device=0)
    try:
        assert comm._owned_nccl != 0, "a gloo group gets an NCCL communicator of our own"
        assert (comm.rank, comm.num_ranks) == (0, 1)
        _single_rank_round(backend, comm)
    finally:
        comm.destroy()


@pytest.mark.gpu
def test_borrowed_torch_comm(groups):
    from nccl_moe.torch import Comm

    world, _ = groups
    comm = Comm(world, num_experts=4, hidden=256, max_topk=2, max_tokens_per_rank=16, ll_max_tokens_per_rank=16)
    try:
        assert comm._owned_nccl == 0, "an NCCL group lends torch's communicator"
        _single_rank_round(_CudaBackend(), comm)
        comm.check_async_error()
    finally:
        comm.destroy()
    # Still usable by torch afterwards (we never destroy its communicator).
    t = torch.ones(4, device="cuda")
    import torch.distributed as dist

    dist.all_reduce(t)
    assert t.sum().item() == 4


class _CudaBackend:
    name = "cuda"
    device = torch.device("cuda", 0)

    def to(self, t):
        return t.to(self.device, copy=True)


@pytest.mark.gpu
def test_borrowed_lazy_comm_in_subprocess():
    """torch without device_id creates its communicator at the first collective: Comm does a barrier first."""
    code = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        import nccl_moe
        from nccl_moe.torch import Comm
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        backend = dist.group.WORLD._get_backend(torch.device("cuda"))
        lazy = backend._comm_ptr() == 0  # torch's default without device_id; Comm must work either way
        comm = Comm(dist.group.WORLD, num_experts=2, hidden=128, max_tokens_per_rank=8)
        assert comm._owned_nccl == 0 and backend._comm_ptr() != 0
        x = torch.ones((4, 128), dtype=torch.bfloat16, device="cuda")
        idx = torch.tensor([[0], [1], [0], [-1]], device="cuda")
        res = comm.ht_dispatch(x, idx)
        out = comm.ht_combine(res.recv_x, res.routing).combined_x
        assert out.float().sum().item() == 3 * 128, out
        comm.destroy()
        dist.destroy_process_group()
        print("lazy" if lazy else "eager (torch created its communicator before the first collective)")
        print("ok")
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["CUDA_MODULE_LOADING"] = "LAZY"  # one rank, no peer to wait for: skip the seconds of eager loading
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def _deep_ep_single_rank(backend, group):
    import nccl_moe.deep_ep

    nccl_moe.deep_ep.install_alias()
    H, E, M = 512, 4, 16
    p = Problem(1, E, H, 2, [12], seed=81, kind="wide")
    x, idx, w = backend.to(p.x[0]), backend.to(p.topk_idx[0]), backend.to(p.weights[0])
    buffer = style.make_buffer(group, hidden=H, num_experts=E, ll_tokens=M, low_latency_mode=True)
    try:
        got = style.intranode_round(buffer, x, idx, w, E, async_mode=backend.name == "cuda", x2=x)
        want = ref.ht_dispatch(p.topk_idx, E, x=p.x, weights=p.weights)[0]
        assert_same_bits(got["recv_x"], want["recv_x"], "recv_x")
        assert got["per_expert"] == want["num_recv_per_expert"]
        buffer.clean_low_latency_buffer(M, H, E)

        def expert(out, recv_x):
            return recv_x.float().to(torch.bfloat16) if recv_x.dtype != torch.bfloat16 else recv_x.clone()

        ll = style.low_latency_round(buffer, x, idx, w, M, E, use_fp8=True, hook_mode=True, zero_copy=True,
                                     expert=expert)
        wl = ref.ll_dispatch(p.topk_idx, E, M, x=p.x, use_fp8=True)
        assert_same_bits(ll["recv_count"], wl[0]["recv_count"], "LL recv_count")
    finally:
        buffer.destroy()


def test_deep_ep_over_gloo_group(backend, groups):
    _deep_ep_single_rank(backend, groups[1])


@pytest.mark.gpu
def test_deep_ep_over_nccl_group(groups):
    _deep_ep_single_rank(_CudaBackend(), groups[0])


class _FakeMpiComm:
    """The part of an mpi4py communicator that TensorRT-LLM's Buffer(None, ..., comm=) path uses, for one rank."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def bcast(self, obj, root=0):
        return obj


def test_mpi_comm_argument(backend, groups):
    """Buffer(None, 0, rdma, low_latency_mode=True, num_qps_per_rank=E_l, comm=mpi_comm): TRT-LLM's construction."""
    import nccl_moe.deep_ep as deep_ep

    H, E, M = 256, 4, 8
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(M, H, 1, E)
    buffer = deep_ep.Buffer(None, 0, rdma, low_latency_mode=True, num_qps_per_rank=E, comm=_FakeMpiComm())
    try:
        assert buffer.runtime is not None and buffer.runtime._owned_nccl != 0  # eager, from the size hint
        p = Problem(1, E, H, 2, [6], seed=91)
        x, idx, w = backend.to(p.x[0]), backend.to(p.topk_idx[0]), backend.to(p.weights[0])
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(x, idx, M, E, use_fp8=False)
        assert event.event is None and hook is None
        out, event, hook = buffer.low_latency_combine(recv_x, idx, w, handle)
        wl = ref.ll_dispatch(p.topk_idx, E, M, x=p.x)
        ys = [recv_x.cpu().clone()]
        for j in range(E):
            ys[0][j, int(recv_count[j]):] = 0
        assert_same_bits(out, ref.ll_combine(p.topk_idx, p.weights, wl, ys, E)[0], "combined_x")
        with pytest.raises(RuntimeError, match="no high-throughput capacity"):
            buffer.dispatch(x, topk_idx=idx, num_tokens_per_rank=idx, is_token_in_rank=idx, num_tokens_per_expert=
                            torch.zeros(E, dtype=torch.int32))
    finally:
        buffer.explicitly_destroy = True
        buffer.destroy()


def test_from_nccl_comm(backend, groups):
    """Comm.from_nccl_comm over an ncclComm_t the caller owns (here one made like the own-communicator path)."""
    import nccl_moe
    from nccl_moe.torch import Comm
    from nccl_moe.torch._comm import _Backend

    lib = _Backend.lib
    ptr = lib.nccl_comm_init_rank(1, lib.nccl_unique_id(), 0, 0)
    try:
        comm = Comm.from_nccl_comm(ptr, nccl_moe.Config(num_experts=4, hidden=256, max_topk=2, max_tokens_per_rank=16,
                                                        ll_max_tokens_per_rank=16))
        try:
            assert comm._owned_nccl == 0
            _single_rank_round(backend, comm)
        finally:
            comm.destroy()
    finally:
        lib.nccl_comm_destroy(ptr)
