"""Test setup: run Triton kernels in the interpreter when there is no GPU (set before any
Triton kernel is defined), give every test its own seed, and stop starting tests at a
deadline (FUSEFORMER_TEST_DEADLINE)."""

import os
import sys
import time
import zlib

# `python -m pytest` from the checkout puts its root on sys.path, where kernels/ (the Triton
# sources, installed as fuseformer.kernels) shadows Hugging Face's `kernels` package, which
# transformers imports when it is installed (a dependency of recent transformers). The tests
# run the installed fuseformer, so the root leaves the path before anything imports it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Fixed Triton tiles: autotuning every constexpr combination the tests reach would take
# longer than the tests (kernels/attention.py).
os.environ.setdefault("FUSEFORMER_TRITON_AUTOTUNE", "0")

# Hypothesis draws new examples on every local run (and keeps failing ones in .hypothesis/);
# CI (FUSEFORMER_TEST_PROFILE=ci, set by .ci/run) draws the same ones every time, so whether
# a change lands is not decided by which examples a run happened to draw.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("FUSEFORMER_TEST_PROFILE") == "ci":
    settings.load_profile("ci")


# A time-boxed run (the GPU lease: benchmarks/gpu_suite.sh sets it, in seconds since the
# epoch) skips the tests it has no time left to start, so the session still ends with its
# summary and every failure's traceback, which a kill from outside would lose.
_DEADLINE = float(os.environ.get("FUSEFORMER_TEST_DEADLINE") or "inf")


def pytest_runtest_setup(item):
    if time.time() > _DEADLINE:
        pytest.skip("no time left to start it (FUSEFORMER_TEST_DEADLINE)")


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, reproducible from the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison_outputs():
    """Uninitialized memory (torch.empty / at::empty, Python and C++) is filled with NaN, so
    an output element a kernel forgot to write fails the comparison."""
    import torch.utils.deterministic as det

    previous = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    det.fill_uninitialized_memory = previous[1]
