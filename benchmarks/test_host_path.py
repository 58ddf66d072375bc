"""Host time of one kernel call with no GPU: argument checks and launch preparation, the kernel launch a no-op.

The whole packed module's call is ``benchmarks/host.py`` (``packnet bench --stage host``).

What a packed layer costs the host before Triton and the driver take over (the target for a whole call on a GPU is
15 us). ``extra_info["host_us"]`` is the median microseconds per call over 2000 calls; under
``--benchmark-disable`` (CI) the path still runs and its launches are counted.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from packnet_kernels._checks import KERNEL_DTYPES, check_conv2d, check_linear

linear = pytest.importorskip("packnet_kernels.linear")
conv2d = pytest.importorskip("packnet_kernels.conv2d")

CALLS = 2000


class _NoLaunch:
    """Stands in for ``wrap_triton``: ``wrap(kernel)[grid](*args)`` counts the launch and does nothing."""

    def __init__(self):
        self.launches = 0

    def __call__(self, kernel):
        return self

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


def _median_us(fn, calls: int = CALLS) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        samples.append((time.perf_counter() - start) / (calls // 5) * 1e6)
    return statistics.median(samples)


@pytest.mark.parametrize("batch", [1, 256], ids=lambda b: f"b{b}")
def test_linear_host_path(benchmark, batch):
    """The checks and the direct launch of a cached plan, the launch stubbed at the launcher's boundary."""
    from packnet_kernels._checks import as_is
    from packnet_kernels._launcher import stub_launches

    x = torch.randn(batch, 4096, dtype=torch.float16)
    weight = torch.randn(4096, 4096, dtype=torch.float16)
    task_ids = torch.randint(0, 4, weight.shape, dtype=torch.uint8)

    def call():
        task = check_linear(x, weight, task_ids, 2, None, None, None, dtypes=KERNEL_DTYPES)
        return linear._launch(
            x, weight, task_ids, task, None, None, None, False, True, wrap=as_is, reuse_workspace=True
        )

    with stub_launches() as stub:
        call()
        call()
        assert (stub.plain_launches, stub.direct_launches) == (1, 1), "one kernel launch per call, split-K or not"
        out = benchmark(call)
        assert out.shape == (batch, 4096)
        benchmark.extra_info["host_us"] = _median_us(call)


@pytest.mark.parametrize("groups", [1, 192], ids=["conv3x3", "depthwise3x3"])
def test_conv2d_host_path(benchmark, groups):
    x = torch.randn(1, 192, 14, 14, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(192, 192 // groups, 3, 3, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    task_ids = torch.randint(0, 4, weight.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    no_launch = _NoLaunch()

    def call():
        task, stride, padding, dilation = check_conv2d(
            x, weight, task_ids, 2, None, 1, 1, 1, groups, None, None, dtypes=KERNEL_DTYPES
        )
        pads = conv2d._resolve_padding(padding, weight.shape[2:], dilation)
        return conv2d._launch(
            x,
            weight,
            task_ids,
            task,
            None,
            None,
            None,
            stride,
            pads,
            dilation,
            groups,
            False,
            True,
            wrap=no_launch,
            cache_plan=True,
        )

    call()
    assert no_launch.launches == 1
    out = benchmark(call)
    assert out.shape == (1, 192, 14, 14)
    benchmark.extra_info["host_us"] = _median_us(call)
