"""pytest setup of nccl_moe's tests.

Markers (pyproject.toml): `gpu` needs a CUDA GPU and torch, `torch` needs torch (CPU is enough). Tests without
either need only the extension. Missing requirements skip, they never pass silently.

Backends: scenario tests take the `backend` fixture and run twice, on "sim" (tests/sim_backend.py: the extension's
functions on CPU tensors, ranks as threads; runs in CI) and on "cuda" (the real library on GPU 0; several ranks of a
LocalWorld share it through ncclMoeCommInitAll).
"""
import importlib.util
import os
import sys

# Before anything initialises CUDA (include/nccl_moe.h, ncclMoeCommInitAll): ranks sharing one GPU need hardware
# queues of their own; every kernel is loaded when the context is made (a lazily loaded kernel's first launch waits
# for the whole device, where a peer's kernel may be waiting for this rank's next call); and a failing device wait
# should end a test run in a minute, not in NCCL_MOE_TIMEOUT_S's default 100 s.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
os.environ.setdefault("NCCL_MOE_TIMEOUT_S", "60")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _have_gpu():
    if not HAVE_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


HAVE_GPU = _have_gpu()


def pytest_collection_modifyitems(config, items):
    skip_torch = pytest.mark.skip(reason="torch is not installed")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (and torch)")
    for item in items:
        if "gpu" in item.keywords and not HAVE_GPU:
            item.add_marker(skip_gpu)
        elif "torch" in item.keywords and not HAVE_TORCH:
            item.add_marker(skip_torch)


class Backend:
    """Where a scenario runs: `lib` is what nccl_moe.torch calls, `device` where tensors live."""

    def __init__(self, name):
        import torch

        self.name = name
        if name == "sim":
            import sim_backend

            self.lib = sim_backend
            self.device = torch.device("cpu")
        else:
            from nccl_moe import _C

            self.lib = _C
            self.device = torch.device("cuda", 0)

    def world(self, num_ranks):
        from nccl_moe.torch import LocalWorld

        return LocalWorld(num_ranks, devices=None if self.name == "cuda" else [0] * num_ranks, lib=self.lib)

    def to(self, t):
        return t.to(self.device, copy=True)

    def sync(self):
        if self.name == "cuda":
            import torch

            torch.cuda.current_stream().synchronize()


@pytest.fixture(params=["sim", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, monkeypatch):
    if not HAVE_TORCH:
        pytest.skip("torch is not installed")
    if request.param == "cuda" and not HAVE_GPU:
        pytest.skip("needs a CUDA GPU")
    b = Backend(request.param)
    from nccl_moe.torch import _comm

    monkeypatch.setattr(_comm._Backend, "lib", b.lib)
    return b
