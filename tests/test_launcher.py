"""Direct kernel launches (packnet_kernels._launcher) against Triton's own launch path, without a GPU.

A fake driver stands in for CUDA (the target is sm_90) and a fake compiled kernel records what its launcher is given;
everything else is the installed Triton's own code: ``JITFunction.run`` binds and specialises the arguments and
computes the cache key, ``Autotuner.run`` picks a config. So the tests check that a direct launch hands the compiled
kernel exactly what Triton's launch hands it, and only where Triton would have picked that very compiled kernel.
The same file runs against another Triton with ``PYTHONPATH=/path/to/triton-3.6 pytest tests/test_launcher.py``.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.compiler import CompiledKernel  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from packnet_kernels import _launcher  # noqa: E402
from packnet_kernels import linear as linear_module  # noqa: E402
from packnet_kernels._launcher import KernelLaunch, stub_launches  # noqa: E402

STREAM = 0x5EED


class _FakeDriver:
    """What ``JITFunction.run`` asks of the active driver: a Hopper target, device 0 and a stream."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return STREAM


class _Recorder:
    """A compiled kernel's launcher: keeps every call's arguments."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, *args):
        self.calls.append(args)


def _fake_compiled(name: str) -> CompiledKernel:
    """A ``CompiledKernel`` (for the isinstance check of a direct launch) that loads nothing and records launches."""
    compiled = CompiledKernel.__new__(CompiledKernel)
    compiled.module = f"module-{name}"  # "loaded": Triton's launch asks for its handles first
    compiled._module_pid = None  # nothing to unload
    compiled.name, compiled.src = name, None
    compiled.function = f"function-{name}"
    compiled.packed_metadata = f"metadata-{name}"
    compiled._run = _Recorder()
    return compiled


@pytest.fixture
def fake_gpu(monkeypatch):
    """The fake driver active; yields a factory of real ``JITFunction`` kernels whose compilation is faked (each new
    specialisation yields a new fake compiled kernel, listed in ``compiled``)."""
    from triton.runtime import driver

    previous = driver._active
    driver.set_active(_FakeDriver())
    compiled: list[CompiledKernel] = []

    def make(function):
        # Under TRITON_INTERPRET=1 the module's kernels are interpreted: a JITFunction of the same Python function.
        jit = JITFunction(getattr(function, "fn", function), do_not_specialize=["active_task", "m_bucket", "max_task"])

        def do_compile(key, signature, device, constexprs, options, attrs, warmup):
            kernel = _fake_compiled(str(len(compiled)))
            compiled.append(kernel)
            jit.device_caches[device][0][key] = kernel
            return kernel

        jit._do_compile = do_compile
        return jit

    monkeypatch.setattr(_launcher, "DIRECT_LAUNCH", True)
    try:
        yield make, compiled
    finally:
        driver._active = previous


def _linear_call(rows: int = 3, offset: int = 0, seed: int = 0):
    """The arguments of a masked linear launch (fp16, a bias, split-K) as ``linear_plan`` lays them out, and the
    plan. ``offset`` shifts the input's storage by that many elements (its pointer's alignment)."""
    generator = torch.Generator().manual_seed(seed)
    storage = torch.randn(rows * 96 + 8, generator=generator).half()
    x = storage[offset : offset + rows * 96].view(rows, 96)
    weight = torch.randn(40, 96, generator=generator).half()
    task_ids = torch.randint(0, 3, (40, 96), dtype=torch.uint8, generator=generator)
    bias = torch.randn(40, generator=generator).half()
    plan = linear_module.linear_plan(x, weight, task_ids, bias, None, None, True, True, None, False, None, 8)
    y = torch.empty(plan.out_shape, dtype=x.dtype)
    partials, counters = torch.empty(4096), torch.zeros(64, dtype=torch.int32)
    pointers = (x, weight, task_ids, bias, None, None, y, partials, counters, None, None, None)
    return (*pointers, *plan.sizes, 2, *plan.ints), plan


def _same(first: tuple, second: tuple) -> bool:
    """Element by element: the same tensor objects, equal other values."""
    return len(first) == len(second) and all(
        a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b
        for a, b in zip(first, second, strict=True)
    )


def test_a_direct_launch_passes_what_tritons_launch_passes(fake_gpu):
    make, compiled = fake_gpu
    jit = make(linear_module._masked_linear_kernel)
    args, plan = _linear_call()
    constants = {**plan.flags, **linear_module._INTERPRETER_CONFIG}
    launch = KernelLaunch(jit, plan.grid, constants)
    launch(args, stream=STREAM)  # through JITFunction.run: binds, specialises, "compiles"
    assert len(compiled) == 1 and launch.direct
    launch(args, stream=STREAM)  # straight to the compiled kernel's launcher
    through_triton, direct = compiled[0]._run.calls
    # grid, stream, function, metadata, then every kernel argument in signature order, as Triton passed them
    assert _same(direct[:6], through_triton[:6]) and _same(direct[9:], through_triton[9:])
    assert direct[:6] == (*plan.grid(constants), 1, STREAM, "function-0", "metadata-0")
    assert len(direct) == 9 + len(jit.arg_names) and _same(direct[9 : 9 + len(args)], args)
    # Triton passes its (empty) hook chains and their metadata; a direct launch passes no hooks at all.
    assert direct[6:9] == (None, None, None) and not through_triton[7].calls and not through_triton[8].calls


def test_a_direct_launch_runs_only_where_triton_would_pick_the_same_compiled_kernel(fake_gpu):
    """New tensors of the plan's shapes (aligned as before) launch directly, and Triton's launch given them finds
    the same compiled kernel (no new specialisation). A misaligned input goes through Triton, which specialises it
    anew; the aligned ones then launch directly again."""
    make, compiled = fake_gpu
    jit = make(linear_module._masked_linear_kernel)
    args, plan = _linear_call()
    constants = {**plan.flags, **linear_module._INTERPRETER_CONFIG}
    launch = KernelLaunch(jit, plan.grid, constants)
    launch(args, stream=STREAM)
    other, _ = _linear_call(seed=1)
    launch(other, stream=STREAM)
    recorder = compiled[0]._run
    assert len(compiled) == 1 and _same(recorder.calls[-1][9 : 9 + len(other)], other)
    jit[plan.grid](*other, **constants)  # what Triton itself does with them
    assert len(compiled) == 1 and _same(recorder.calls[-1][9:], recorder.calls[-2][9:])

    misaligned, _ = _linear_call(offset=1)
    assert misaligned[0].data_ptr() % 16
    launch(misaligned, stream=STREAM)
    assert len(compiled) == 2 and len(compiled[1]._run.calls) == 1  # Triton's launch, a new specialisation
    assert _same(compiled[1]._run.calls[0][9 : 9 + len(misaligned)], misaligned)
    launch(other, stream=STREAM)
    assert len(compiled[0]._run.calls) == 4 and len(compiled) == 2


def test_an_autotuned_plan_launches_the_chosen_configs_kernel(fake_gpu):
    """The first call goes through the autotuner (which times every config); later calls launch the chosen config's
    compiled kernel with its grid and its constexprs."""
    make, compiled = fake_gpu
    jit = make(linear_module._masked_linear_kernel)
    configs = [
        triton.Config({"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 64, "GROUP_N": 1}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_K": 32, "GROUP_N": 2}, num_warps=4, num_stages=3),
    ]
    timed = []

    def do_bench(kernel_call, quantiles):
        kernel_call()
        timed.append(len(compiled))
        return [float(len(timed) == 1) + 1.0] * len(quantiles)  # the second config is faster

    tuned = triton.autotune(configs=configs, key=["m_bucket", "N", "K"], do_bench=do_bench)(jit)
    args, plan = _linear_call()
    launch = KernelLaunch(tuned, plan.grid, plan.flags)
    launch(args, stream=STREAM)
    assert len(timed) == 2 and launch.direct
    chosen = compiled[-1]
    launch(args, stream=STREAM)
    final, direct = chosen._run.calls[-2:]
    assert _same(direct[:6], final[:6]) and _same(direct[9:], final[9:])
    assert direct[:3] == (*plan.grid(configs[1].kwargs), 1)
    named = dict(zip(jit.arg_names, direct[9:], strict=True))
    assert {name: named[name] for name in configs[1].kwargs} == configs[1].kwargs


@pytest.mark.parametrize("reason", ["switched_off", "unsupported_triton", "launch_hook", "interpreted"])
def test_plain_launches_where_a_direct_one_cannot_run(reason, fake_gpu, monkeypatch):
    """``PACKNET_DIRECT_LAUNCH=0``, a Triton outside the versions read, a profiler's launch hook, or an interpreted
    kernel (which returns no compiled kernel): every call is Triton's own launch."""
    make, compiled = fake_gpu
    jit = make(linear_module._masked_linear_kernel)
    if reason == "switched_off":
        monkeypatch.setattr(_launcher, "DIRECT_LAUNCH", False)
    elif reason == "unsupported_triton":
        monkeypatch.setattr(_launcher, "direct_launch_supported", lambda: False)
    args, plan = _linear_call()
    constants = {**plan.flags, **linear_module._INTERPRETER_CONFIG}
    calls = []
    if reason == "interpreted":
        kernel = _Interpreted(jit.arg_names, calls)
    else:
        kernel = jit
        original_run = jit.run
        monkeypatch.setattr(jit, "run", lambda *a, **k: calls.append(1) or original_run(*a, **k))
    launch = KernelLaunch(kernel, plan.grid, constants)
    launch(args, stream=STREAM)
    if reason == "launch_hook":
        assert launch.direct
        from triton import knobs

        # What a profiler does: add a hook to Triton's (otherwise empty) chain.
        monkeypatch.setattr(knobs.runtime.launch_enter_hook, "calls", [lambda metadata: None])
    else:
        assert not launch.direct
    launch(args, stream=STREAM)
    launch(args, stream=STREAM)
    assert len(calls) == 3


class _Interpreted:
    """An interpreted kernel's launch interface: ``kernel[grid](...)`` runs it and returns nothing."""

    def __init__(self, arg_names, calls):
        self.arg_names = arg_names
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(1)


@pytest.mark.parametrize(
    ("version", "supported"),
    [("3.6.0", True), ("3.9.0", True), ("3.7.1", True), ("3.10.0", False), ("3.5.1", False), ("4.0.0", False)]
    + [("nightly", False), ("3", False)],
)
def test_direct_launches_are_limited_to_the_triton_versions_read(version, supported):
    assert _launcher.version_supported(version) is supported


def test_stubbed_launches_bind_like_triton_and_run_nothing():
    """Under ``stub_launches`` a plan's first call binds the arguments as Triton does and later ones reach the stub's
    launcher with them (nothing runs); a plan made outside starts over inside, and again after."""
    args, plan = _linear_call()
    constants = {**plan.flags, **linear_module._INTERPRETER_CONFIG}
    kernel = _Interpreted(linear_module._masked_linear_kernel.arg_names, [])
    outside = KernelLaunch(kernel, plan.grid, constants)
    outside(args)
    assert kernel.calls == [1] and not outside.direct
    with stub_launches() as stub:
        stub.record = True
        outside(args)
        assert (stub.plain_launches, stub.direct_launches) == (1, 0) and outside.direct
        outside(args)
        outside(args)
        assert (stub.plain_launches, stub.direct_launches) == (1, 2)
        names = kernel.arg_names
        bound = dict(zip(names, stub.last_args[9:], strict=True))
        assert all(bound[name] is value for name, value in zip(names, args, strict=False)) and bound["BLOCK_N"] == 32
        assert stub.last_args[:3] == (*plan.grid(constants), 1)
    assert kernel.calls == [1]  # nothing ran inside
    outside(args)
    assert kernel.calls == [1, 1] and not outside.direct


def test_a_conv_launch_passes_each_calls_task_and_task_tensor_where_triton_binds_them(fake_gpu):
    """The conv launcher gives the task, a mixed batch's image order and pixel tiles and the tile map as keyword
    arguments anew on every call: a direct launch puts them in the slots Triton binds them to, as Triton's launch of
    the same call."""
    from packnet_kernels import conv2d

    make, compiled = fake_gpu
    jit = make(conv2d._masked_conv2d_gemm_kernel)
    x = torch.randn(2, 32, 6, 6).half().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 32, 3, 3).half().contiguous(memory_format=torch.channels_last)
    task_ids = torch.randint(0, 3, weight.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(3, 32).half()
    tile_map = torch.zeros(2, 1, 9, dtype=torch.uint8)
    plan_args = (x, weight, task_ids, bias, None, None, (1, 1), [1, 1, 1, 1], (1, 1), 1, False, True, tile_map)
    tasks = torch.tensor([2, 1])
    out_shape, memory_format, kernel_name, constants, grid = conv2d._plan(*plan_args, False, tasks)
    assert kernel_name == "gemm" and constants["TILE_MAP"] and constants["MIXED"]
    out = torch.empty(out_shape, dtype=x.dtype, memory_format=memory_format)
    pointers = (x, weight, task_ids, bias, x, x, out)
    keywords = {**constants, **conv2d._INTERPRETER_CONFIGS["gemm"]}
    launch = KernelLaunch(jit, grid, keywords, conv2d._VARYING["gemm"])
    launch(pointers, (0, *conv2d._mixed_tiles(tasks, constants, reuse=False), tile_map), stream=STREAM)
    order, tiles = conv2d._mixed_tiles(torch.tensor([1, 3]), constants, reuse=False)
    launch(pointers, (0, order, tiles, tile_map), stream=STREAM)
    assert len(compiled) == 1 and launch.direct
    jit[grid](*pointers, **keywords, active_task=0, image_order_ptr=order, pixel_tiles_ptr=tiles, tile_map_ptr=tile_map)
    recorder = compiled[0]._run
    direct, through_triton = recorder.calls[1:]
    assert _same(direct[:6], through_triton[:6]) and _same(direct[9:], through_triton[9:])
    named = dict(zip(jit.arg_names, direct[9:], strict=True))
    assert named["image_order_ptr"] is order and named["pixel_tiles_ptr"] is tiles and named["tile_map_ptr"] is tile_map
