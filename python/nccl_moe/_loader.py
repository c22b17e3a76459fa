"""Loading the native extension so that exactly one libnccl is in the process.

Order matters: torch's libtorch_cuda.so needs libnccl.so.2 and libcudart.so.13, and so do libnccl_moe.so and our
extension. The dynamic loader binds a soname that is already loaded to the loaded copy, so importing torch FIRST makes
our DT_NEEDED entries bind to torch's libraries (the pip nvidia-nccl-cu13 copy on a typical install). Loaded the
other way round, torch would bind to whatever we found. Two different libnccl files in one process mean two NCCL
instances: a communicator borrowed from torch would be handed to the wrong one. We check /proc/self/maps after
loading and refuse to go on.

Environment:
    NCCL_MOE_IMPORT_TORCH=0          do not import torch first (the check below still runs)
    NCCL_MOE_ALLOW_MULTIPLE_NCCL=1   turn the two-copies error into a warning
"""
import importlib
import importlib.util
import os
import re
import warnings

# A libnccl main library (libnccl.so, libnccl.so.2, libnccl.so.2.28.9), not libnccl_moe or libnccl-net/tuner plugins.
_LIBNCCL_RE = re.compile(r"/libnccl\.so(\.\d+)*$")


def libnccl_paths(maps_text: str):
    """Paths of the libnccl files mapped in a /proc/<pid>/maps text, in first-seen order, one entry per file.

    Two paths that name the same file (same device and inode, e.g. through a symlink) count once.
    """
    seen = {}
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].strip()
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        if not _LIBNCCL_RE.search(path):
            continue
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
        except OSError:
            key = ("path", path)
        seen.setdefault(key, path)
    return list(seen.values())


def check_single_libnccl(maps_text: str = None):
    """Raises ImportError if two different libnccl files are mapped into this process; returns the one loaded."""
    if maps_text is None:
        try:
            with open("/proc/self/maps") as f:
                maps_text = f.read()
        except OSError:
            return None
    paths = libnccl_paths(maps_text)
    if len(paths) > 1:
        message = (
            "nccl_moe: two different libnccl copies are loaded in this process: "
            + ", ".join(paths)
            + ". NCCL state (communicators) of one copy is invalid in the other. Import torch before nccl_moe (the "
            "package does so by itself unless NCCL_MOE_IMPORT_TORCH=0), and do not preload another libnccl "
            "(LD_PRELOAD, LD_LIBRARY_PATH pointing at a second NCCL). NCCL_MOE_ALLOW_MULTIPLE_NCCL=1 turns this "
            "error into a warning."
        )
        if os.environ.get("NCCL_MOE_ALLOW_MULTIPLE_NCCL", "0") not in ("", "0"):
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        else:
            raise ImportError(message)
    return paths[0] if paths else None


def import_torch_first():
    """Imports torch if it is installed (and NCCL_MOE_IMPORT_TORCH is not 0); returns the module or None."""
    if os.environ.get("NCCL_MOE_IMPORT_TORCH", "1") == "0":
        return None
    try:
        if importlib.util.find_spec("torch") is None:
            return None
        return importlib.import_module("torch")
    except (ImportError, ValueError):  # absent, or blocked (sys.modules["torch"] = None)
        return None


def load():
    """Imports torch (when installed), then the extension, then checks the libnccl copies; returns _C."""
    import_torch_first()
    from . import _C  # noqa: E402  (after torch, on purpose)

    check_single_libnccl()
    return _C
