"""Where the host time of one packed call goes: each layer of the call path timed alone, then a cProfile listing.

    python benchmarks/host_profile.py [--out DIR]

For a batch-1 and a batch-256 linear, a 3x3 conv and a depthwise conv (one launch each), each stage of the call path
is timed on its own: the packed module (``PackedLinear``/``PackedConv2d`` with ``task=2``: what a model pays per
layer; its launch plans and direct launches), the same module with direct launches off (``PACKNET_DIRECT_LAUNCH=0``:
every launch through Triton's own launcher), the public dispatcher, the registered op, the launcher alone (a direct
launch of a cached plan, as the dispatcher makes on CUDA), and ``F.linear``/``F.conv2d`` for scale; the last column
is the module's time over the torch op's (issue 26's target on a GPU: at most 1.5). A time is the host time to issue
``CALLS`` calls back to back (the GPU queue does not fill), divided by ``CALLS``. Then cProfile lists the functions
where a module call spends its time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import packnet_kernels as pk  # noqa: E402

CUDA = torch.cuda.is_available()
# Without CUDA (a smoke run under TRITON_INTERPRET=1) the shapes and call counts are tiny.
CALLS = 100 if CUDA else 2
FEATURES = 4096 if CUDA else 64


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def host_us(fn) -> float:
    for _ in range(5 if CUDA else 1):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    elapsed = time.perf_counter() - start
    synchronize()
    return elapsed / CALLS * 1e6


def _forget_launches(modules) -> None:
    """Drop every launch plan (kernel modules' and packed layers'), so that the next calls plan anew."""
    from packnet import PackedConv2d, PackedLinear
    from packnet_kernels import conv2d, linear

    linear._PLANS.clear()
    conv2d._PLANS.clear()
    conv2d._KERNEL_LAUNCHES.clear()
    for module in modules:
        if isinstance(module, (PackedLinear, PackedConv2d)):
            module.launch_plans.clear()


_MODULES: list = []


def _with_plain_launches(fn) -> float:
    """``host_us(fn)`` with direct launches off (plans made anew, every launch through Triton's launcher)."""
    from packnet_kernels import _launcher

    _forget_launches(_MODULES)
    _launcher.DIRECT_LAUNCH = False
    try:
        return host_us(fn)
    finally:
        _launcher.DIRECT_LAUNCH = True
        _forget_launches(_MODULES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write host_profile.txt here")
    args = parser.parse_args(argv)
    from packnet import PackedConv2d, PackedLinear
    from packnet_kernels import conv2d as conv_module
    from packnet_kernels import linear as linear_module
    from packnet_kernels._checks import as_is

    device, dtype = ("cuda" if CUDA else "cpu"), torch.float16
    lines = []
    cases = []
    for batch in (1, 256 if CUDA else 20):
        x = torch.randn(batch, FEATURES, device=device, dtype=dtype)
        w = torch.randn(FEATURES, FEATURES, device=device, dtype=dtype)
        ids = torch.randint(0, 4, w.shape, device=device, dtype=torch.uint8)
        w = torch.where(ids == 0, 0.0, w)
        dense = torch.nn.Linear(FEATURES, FEATURES, bias=False, device=device, dtype=dtype)
        dense.weight.data.copy_(w)
        module = PackedLinear.from_dense(dense, ids, 3, backend="triton")
        _MODULES.append(module)
        cases.append(
            (
                f"linear {FEATURES}x{FEATURES} b{batch}",
                lambda x=x, module=module: module(x, task=2),
                lambda x=x, w=w, ids=ids: pk.masked_linear(x, w, ids, 2, backend="triton"),
                lambda x=x, w=w, ids=ids: torch.ops.packnet.masked_linear(
                    x, w, ids, 2, None, None, None, False, True, None, False, None, 8
                ),
                lambda x=x, w=w, ids=ids: linear_module._launch(
                    x, w, ids, 2, None, None, None, False, True, wrap=as_is, reuse_workspace=True
                ),
                lambda x=x, w=w: F.linear(x, w),
            )
        )
    for name, channels, groups in (
        ("conv3x3 256@14", 256 if CUDA else 8, 1),
        ("dw3x3 192@28", 192 if CUDA else 8, 192 if CUDA else 8),
    ):
        hw = (14 if groups == 1 else 28) if CUDA else 5
        x = torch.randn(1, channels, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        # The packed layer's layout on CUDA: K-contiguous weight and ids.
        w = torch.randn(channels, channels // groups, 3, 3, device=device, dtype=dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        ids = torch.randint(0, 4, w.shape, device=device, dtype=torch.uint8).contiguous(
            memory_format=torch.channels_last
        )
        w = torch.where(ids == 0, 0.0, w)
        dense = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False, device=device, dtype=dtype)
        dense.weight.data.copy_(w)
        module = PackedConv2d.from_dense(dense, ids, 3, backend="triton")
        _MODULES.append(module)
        launch_args = (
            x,
            w,
            ids,
            2,
            None,
            None,
            None,
            [1, 1],
            [1, 1, 1, 1],
            [1, 1],
            groups,
            False,
            True,
            None,
            False,
            None,
        )
        cases.append(
            (
                f"{name} b1",
                lambda x=x, module=module: module(x, task=2),
                lambda x=x, w=w, ids=ids, g=groups: pk.masked_conv2d(x, w, ids, 2, None, 1, 1, 1, g, backend="triton"),
                lambda a=launch_args: torch.ops.packnet.masked_conv2d(*a),
                lambda a=launch_args: conv_module._launch(*a, wrap=as_is, cache_plan=True),
                lambda x=x, w=w, g=groups: F.conv2d(x, w, None, 1, 1, 1, g),
            )
        )
    header = (
        f"{'case':22s} {'module':>9s} {'plain':>9s} {'dispatcher':>11s} {'op':>9s} {'launcher':>9s} {'torch op':>9s}"
        f" {'ratio':>6s}   (host us per call; plain: the module with direct launches off; ratio: module / torch op)"
    )
    lines.append(header)
    with torch.no_grad():
        for name, module_call, *fns in cases:
            module_us = host_us(module_call)
            plain_us = _with_plain_launches(module_call)
            times = [host_us(fn) for fn in fns]
            cells = " ".join(f"{t:9.1f}" for t in (module_us, plain_us, times[0])) + " "
            cells += " ".join(f"{t:9.1f}" for t in times[1:])
            lines.append(f"{name:22s} {cells} {module_us / times[-1]:6.2f}")
    for name, module_call, *_ in cases:
        profiler = cProfile.Profile()
        profiler.enable()
        with torch.no_grad():
            for _ in range(CALLS):
                module_call()
        profiler.disable()
        synchronize()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(22)
        lines.append(f"\n=== cProfile, {CALLS} module calls: {name} ===")
        lines.append("\n".join(stream.getvalue().splitlines()[4:]))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "host_profile.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
