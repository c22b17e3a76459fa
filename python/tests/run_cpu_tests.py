#!/usr/bin/env python3
"""nccl_moe's CPU tests for ctest and CI: pytest -m "not gpu" over python/tests.

Exit codes: pytest's; 77 (ctest: skipped) only when pytest itself is not installed; 1 when no test ran (pytest's
5), so a broken collection never passes. The package comes from PYTHONPATH (ctest: <build>/python, the extension
built in the tree) or from an installed nccl_moe. Tests that need torch are skipped without it (CI does not install it: ~3 GB).
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    if importlib.util.find_spec("pytest") is None:
        print("pytest is not installed: the Python tests are skipped (pip install pytest)")
        return 77
    import pytest

    rc = int(pytest.main(["-q", "-rs", "-m", "not gpu", "-p", "no:cacheprovider", HERE] + sys.argv[1:]))
    if rc == 5:
        print("run_cpu_tests: pytest collected no test")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
