"""What `import nccl_moe` gives without torch and without a GPU: versions, sizes, argument errors, the loader."""
import os
import subprocess
import sys
import textwrap

import pytest

import nccl_moe
from nccl_moe import _C, _loader


def test_import_without_torch():
    """The package imports (and computes sizes and errors) in a process where `import torch` fails."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # `import torch` raises ImportError, as if it were not installed
        import nccl_moe
        assert sys.modules["torch"] is None
        print(nccl_moe.__version__, nccl_moe.library_version(),
              nccl_moe.Config(num_experts=8, hidden=256, max_tokens_per_rank=16).buffer_size(2))
        try:
            nccl_moe.Config(num_experts=8, hidden=136, ll_max_tokens_per_rank=8).buffer_size(2)
        except nccl_moe.NcclMoeArgumentError as e:
            print("error:", e)
        try:
            nccl_moe.Comm
        except ImportError as e:
            print("torch layer:", "torch" in str(e))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(nccl_moe.__version__)
    assert "config->hidden is 136" in lines[1] and "hidden % 128 == 0" in lines[1]
    assert lines[2] == "torch layer: True"


def test_versions():
    major, minor, patch = nccl_moe.library_version()
    assert _C.version() == major * 10000 + minor * 100 + patch == _C.HEADER_VERSION_CODE
    assert nccl_moe.__version__ == f"{major}.{minor}.{patch}"
    assert nccl_moe.nccl_version() >= (2, 28, 0)


def test_limits():
    assert (nccl_moe.MAX_RANKS, nccl_moe.MAX_NVL_PEERS, nccl_moe.MAX_TOPK, nccl_moe.MAX_EXPERTS) == (256, 8, 16, 4096)


def test_buffer_size_grows_with_capacity():
    base = dict(num_experts=64, hidden=1024, max_topk=8)
    ht = [nccl_moe.Config(**base, max_tokens_per_rank=t).buffer_size(4) for t in (1, 128, 4096)]
    assert ht[0] < ht[1] < ht[2]
    ll = [nccl_moe.Config(**base, ll_max_tokens_per_rank=t).buffer_size(4) for t in (1, 64, 128)]
    assert ll[0] < ll[1] < ll[2]
    both = nccl_moe.Config(**base, max_tokens_per_rank=128, ll_max_tokens_per_rank=64).buffer_size(4)
    assert both >= max(ht[1], ll[1])
    # Per rank: more ranks of one node, more staging slots.
    assert nccl_moe.Config(**base, max_tokens_per_rank=128).buffer_size(8) > ht[1]
    assert nccl_moe.get_buffer_size(nccl_moe.Config(**base, max_tokens_per_rank=128), 4) == ht[1]


@pytest.mark.parametrize(
    "fields,num_ranks,expected",
    [
        (dict(num_experts=0, hidden=128, max_tokens_per_rank=8), 1, "config->num_experts is 0"),
        (dict(num_experts=8, hidden=100, max_tokens_per_rank=8), 1, "config->hidden is 100"),
        (dict(num_experts=8, hidden=128, max_topk=17, max_tokens_per_rank=8), 1, "config->max_topk is 17"),
        (dict(num_experts=8, hidden=128), 1, "are both 0"),
        (dict(num_experts=8, hidden=136, ll_max_tokens_per_rank=8), 1, "hidden % 128 == 0"),
        (dict(num_experts=8, hidden=128, ll_max_tokens_per_rank=5000), 1, "config->ll_max_tokens_per_rank is 5000"),
        (dict(num_experts=8, hidden=128, max_tokens_per_rank=8), 3, "not a multiple of num_ranks = 3"),
        (dict(num_experts=16, hidden=128, max_tokens_per_rank=8), 9, "num_ranks is 9"),
        (dict(num_experts=8, hidden=128, max_tokens_per_rank=8, num_sms=-1), 1, "config->num_sms is -1"),
        (dict(num_experts=8, hidden=128, ll_max_tokens_per_rank=8, ll_num_sms=-2), 1, "config->ll_num_sms is -2"),
    ],
)
def test_config_errors_name_the_argument(fields, num_ranks, expected):
    with pytest.raises(nccl_moe.NcclMoeArgumentError) as info:
        nccl_moe.Config(**fields).buffer_size(num_ranks)
    e = info.value
    assert isinstance(e, ValueError) and isinstance(e, nccl_moe.NcclMoeError)
    assert e.result == 4 and e.result_name == "ncclInvalidArgument"
    assert expected in e.message and "ncclMoeGetBufferSize" in e.message
    assert str(e).endswith("[ncclInvalidArgument]")


def test_config_ll_num_sms_round_trip():
    """ll_num_sms: a field of Config (default 0 = all of the rank's SMs) passed through to ncclMoeConfig_t; an SM
    budget, not a size, so the buffer does not depend on it."""
    base = dict(num_experts=8, hidden=256, max_tokens_per_rank=16, ll_max_tokens_per_rank=8)
    assert nccl_moe.Config(**base).ll_num_sms == 0
    c = nccl_moe.Config(**base, ll_num_sms=12)
    assert c.ll_num_sms == 12 and c._args()[6] == 12 and c != nccl_moe.Config(**base)
    assert c.buffer_size(2) == nccl_moe.Config(**base).buffer_size(2)
    assert c.validate(2) is c
    assert "ll_num_sms" in (_C.buffer_size.__doc__ or "") and "ll_num_sms" in (_C.Comm.init_all.__doc__ or "")


def test_config_enable_rank_masks_round_trip():
    """enable_rank_masks: a Config field (default False) that reaches ncclMoeConfig_t as 0/1, last of the extension's
    config arguments; it changes no buffer size (the mask lives in the control region either way)."""
    base = dict(num_experts=8, hidden=256, ll_max_tokens_per_rank=8)
    assert nccl_moe.Config(**base).enable_rank_masks is False and nccl_moe.Config(**base)._args()[-1] == 0
    c = nccl_moe.Config(**base, enable_rank_masks=True)
    assert c._args()[-1] == 1 and len(c._args()) == 8 and c != nccl_moe.Config(**base)
    assert c.validate(4) is c
    for fn in (_C.buffer_size, _C.Comm.init, _C.Comm.init_all):
        assert "enable_rank_masks" in (fn.__doc__ or ""), fn
    # The extension takes it by keyword too, in the position the C struct has it (after ll_num_sms).
    assert _C.buffer_size(8, 256, 8, 0, 8, 0, 0, enable_rank_masks=1, num_ranks=4) == c.buffer_size(4)


def test_rank_mask_natives_take_integers():
    """The four rank-mask entry points exist with integer streams and a host list for set_rank_mask (no C++ type
    leaks into the signatures: test_every_native_signature_has_python_types covers that)."""
    for name, args in (("query_rank_mask", "comm, mask, stream"), ("query_rank_mask_host", "comm, stream"),
                       ("set_rank_mask", "comm, mask, stream"), ("clear_rank_mask", "comm, stream")):
        doc = getattr(_C, name).__doc__ or ""
        assert doc.startswith(f"{name}("), doc
        for a in args.split(", "):
            assert f"{a}:" in doc.splitlines()[0], (name, a, doc)
    assert "list[int]" in _C.query_rank_mask_host.__doc__.splitlines()[0]
    assert "collections.abc.Sequence[int]" in _C.set_rank_mask.__doc__.splitlines()[0] or \
        "list[int]" in _C.set_rank_mask.__doc__.splitlines()[0]


def test_config_validate_returns_itself():
    c = nccl_moe.Config(num_experts=8, hidden=256, max_tokens_per_rank=8)
    assert c.validate(2) is c
    with pytest.raises(nccl_moe.NcclMoeArgumentError):
        c.validate(3)


def test_extension_surface():
    for name in ("layout", "ht_notify", "ht_dispatch", "ht_combine", "ll_dispatch", "ll_combine", "ll_combine_buffer",
                 "ll_recv_src_info", "ll_reset", "cast_to_fp8", "buffer_size", "nccl_unique_id", "nccl_comm_init_rank",
                 "nccl_comm_destroy", "nccl_comm_info", "Comm", "Handle", "Event", "device_count",
                 "stream_is_capturing", "last_error", "error_string", "query_rank_mask", "query_rank_mask_host",
                 "set_rank_mask", "clear_rank_mask"):
        assert hasattr(_C, name), name
    assert _C.error_string(4).startswith("invalid argument")


def test_cast_argument_errors_without_gpu():
    with pytest.raises(nccl_moe.NcclMoeArgumentError, match="hidden is 100"):
        _C.cast_to_fp8(0, 4, 100, 0, 0, 0, 0)
    with pytest.raises(nccl_moe.NcclMoeArgumentError, match="scale_format is 7"):
        _C.cast_to_fp8(0, 4, 128, 7, 0, 0, 0)


@pytest.mark.skipif(nccl_moe.device_count() > 0, reason="checks the error path of a machine without a GPU")
def test_world_init_without_gpu_raises():
    with pytest.raises(nccl_moe.NcclMoeError) as info:
        _C.Comm.init_all([0, 0], 8, 256, 8, 16, 0, 0, 0, 0)
    assert "ncclMoeCommInitAll" in info.value.message or "cuda" in info.value.message.lower()


def test_single_libnccl_loaded():
    path = nccl_moe.libnccl_path()
    assert path is not None and "libnccl.so" in os.path.basename(path)
    assert _loader.check_single_libnccl() == path


def _maps(*paths):
    return "\n".join(f"7f00{i:04x}000-7f00{i:04x}fff r-xp 00000000 08:01 {100 + i} {p}" for i, p in enumerate(paths))


def test_loader_finds_two_copies(tmp_path):
    a = tmp_path / "a" / "libnccl.so.2"
    b = tmp_path / "b" / "libnccl.so.2.28.9"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"\x7fELF")
    link = tmp_path / "libnccl.so"
    link.symlink_to(a)
    other = [str(tmp_path / "libnccl_moe.so.0"), str(tmp_path / "libnccl-net.so"), "[heap]"]
    # The same file through a symlink is one copy; libnccl_moe and plugins are not libnccl.
    assert _loader.libnccl_paths(_maps(str(a), str(link), *other)) == [str(a)]
    assert _loader.check_single_libnccl(_maps(str(a), str(link))) == str(a)
    with pytest.raises(ImportError, match="two different libnccl copies"):
        _loader.check_single_libnccl(_maps(str(a), str(b)))
    os.environ["NCCL_MOE_ALLOW_MULTIPLE_NCCL"] = "1"
    try:
        with pytest.warns(RuntimeWarning, match="two different libnccl copies"):
            _loader.check_single_libnccl(_maps(str(a), str(b) + " (deleted)"))
    finally:
        del os.environ["NCCL_MOE_ALLOW_MULTIPLE_NCCL"]


def test_alias_folder_ships_with_the_package():
    root = os.path.dirname(nccl_moe.__file__)
    for f in ("_alias/deep_ep/__init__.py", "_alias/deep_ep/utils.py"):
        assert os.path.isfile(os.path.join(root, f)), f


def _native_callables():
    """Every function of the extension and every method of its classes, with the name it is reached by."""
    for name in dir(_C):
        obj = getattr(_C, name)
        if name.startswith("__"):
            continue
        if isinstance(obj, type):
            for attr in dir(obj):
                if not attr.startswith("__") and callable(getattr(obj, attr, None)):
                    yield f"{name}.{attr}", getattr(obj, attr)
        elif callable(obj):
            yield name, obj


def test_every_native_signature_has_python_types():
    """A C++ type without a nanobind type caster in scope (a missing nanobind/stl/*.h include) shows as `std::...` in
    the signature, and the call then fails only when it returns (as ht_notify's std::pair did on the first GPU run).
    The signatures are known without calling anything, so this catches it on a CPU."""
    bad = [f"{name}: {(fn.__doc__ or '').splitlines()[0]}" for name, fn in _native_callables()
           if "std::" in (fn.__doc__ or "")]
    assert not bad, "signatures with C++ types Python cannot receive:\n" + "\n".join(bad)
