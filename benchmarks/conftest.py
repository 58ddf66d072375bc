"""Benchmark-suite configuration: the device, the ``gpu`` marker, and the session's device facts and measured limits.

Without CUDA the suite runs the tiny CPU subset on the reference path (``shapes.quick_mode``); CI runs it with
``pytest -q benchmarks --benchmark-disable``, which still executes every method once and checks its output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import shapes
import timing
import torch

_TESTS_CONFTEST = Path(__file__).resolve().parent.parent / "tests" / "conftest.py"


def _load_tolerances() -> dict:
    # The one tolerance table lives in tests/conftest.py; this directory has its own conftest module, so load that
    # file under another name rather than through `from conftest import ...`.
    spec = importlib.util.spec_from_file_location("packnet_tests_conftest", _TESTS_CONFTEST)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the tolerance table from {_TESTS_CONFTEST}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TOLERANCES


TOLERANCES = _load_tolerances()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (Triton kernel or GPU-only method)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bench_device() -> str:
    """Where the benchmarks run. On CUDA, fp32 matmuls and convs may use TF32 (as the Triton kernels' fp32 dots do),
    so that every method computes at the same precision."""
    if not torch.cuda.is_available():
        return "cpu"
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return "cuda"


@pytest.fixture(scope="session")
def device_facts(bench_device) -> dict:
    return timing.device_info(bench_device)


@pytest.fixture(scope="session")
def limits(request, bench_device) -> dict:
    """Copy bandwidth and matmul rates, measured once per session before they are needed."""
    dtypes = tuple(shapes.GPU_MATRIX) if bench_device == "cuda" else shapes.CPU_DTYPES
    smoke = bool(request.config.getoption("benchmark_disable", default=False))
    return timing.measure_limits(bench_device, dtypes, smoke=smoke)


@pytest.fixture
def tolerances() -> dict:
    """``{dtype: (atol, rtol)}`` from tests/conftest.py; the benchmarks bound the normwise error by ``rtol``."""
    return TOLERANCES
