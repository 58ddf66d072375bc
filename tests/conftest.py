"""Test configuration: markers, the device/interpreter switch and the one tolerance table.

On a machine without CUDA the Triton kernels run under the interpreter, which must be switched on before Triton is
imported; on a CUDA machine the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torchvision's CUDA wheel beside a CPU torch cannot load its C ops, and transformers imports torchvision whenever it
# is installed: make torchvision importable (its model classes) before any test imports transformers.
if importlib.util.find_spec("torchvision") is not None:
    from packnet.compat import import_torchvision

    import_torchvision()

# (atol, rtol) of a kernel against the float64 reference, per input dtype; fp32 allows TF32 tensor-core dots on GPU.
TOLERANCES = {
    torch.float32: (2e-3, 2e-3),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 4e-2),
}


# fp32 inputs with TF32 tensor-core dots (10-bit mantissas), which PyTorch allows for convs by default
# (torch.backends.cudnn.allow_tf32) and the kernels then use too; the autouse fixture below turns TF32 off so that
# every other fp32 test checks true fp32 arithmetic.
TF32_TOLERANCE = (2e-2, 1e-2)


@pytest.fixture(autouse=True)
def _exact_fp32_on_cuda():
    """On CUDA, fp32 means fp32 in every test (PyTorch defaults to TF32 for convs): restore the settings after."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


@pytest.fixture(autouse=True)
def _untuned_kernels(monkeypatch):
    """On CUDA every test compiles one config per kernel variant (the first that fits) instead of autotuning each
    shape: a GPU session's test stage then fits its time, and two paths a test compares bit for bit (the tile map on
    and off, a mixed batch and its per-task runs) run the same tiles. The autotuning tests switch it back on."""
    try:
        from packnet_kernels import conv2d, linear
    except ImportError:  # no triton: nothing is tuned
        return
    monkeypatch.setattr(linear, "AUTOTUNE", False)
    monkeypatch.setattr(conv2d, "AUTOTUNE", False)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels under TRITON_INTERPRET=1 on the CPU")
    config.addinivalue_line("markers", "slow: longer end-to-end runs")
    config.addinivalue_line(
        "markers", "codegen: compiles kernels for sm_90/sm_80 on the CPU and reads the machine code"
    )


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import triton  # noqa: F401

        has_triton = True
    except ImportError:
        has_triton = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="needs the triton package")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if ("interpreter" in item.keywords or "gpu" in item.keywords) and not has_triton:
            item.add_marker(skip_triton)


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernel tests run: the GPU when there is one, else the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
