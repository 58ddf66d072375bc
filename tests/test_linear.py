"""Triton masked linear against the float64 reference: both regimes, tails, every task, epilogue, layouts, NaN/Inf
isolation, determinism, empty inputs, errors and torch.compile. On CPU the kernels run under TRITON_INTERPRET=1
(conftest switches it on); on a CUDA machine the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES

from packnet_kernels import compact_task_ids, masked_linear, masked_linear_ref

linear = pytest.importorskip("packnet_kernels.linear")

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): batch rows, out features, in features. The interpreter tiles are BLOCK_M=16, BLOCK_N=32, BLOCK_K=32 and
# its split-K chunks are multiples of 32 and at least 64 long, so these hit 1, primes, block +- 1, several tiles in
# every dimension, grouped tile order, and split-K with a ragged last split.
SMALL_SHAPES = [(1, 1, 1), (1, 31, 200), (7, 33, 129), (16, 32, 33), (15, 65, 64)]
LARGE_SHAPES = [(17, 31, 31), (33, 97, 47), (40, 64, 130), (23, 29, 257)]


def _tolerance(dtype):
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def _make(m, n, k, dtype, device, num_tasks=3, seed=0, lead=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=generator).to(dtype=dtype, device=device)
    weight = torch.randn(n, k, generator=generator).to(dtype=dtype, device=device)
    task_ids = torch.randint(0, num_tasks + 1, (n, k), generator=generator, dtype=torch.uint8).to(device)
    weight = torch.where(task_ids == 0, torch.zeros((), dtype=dtype, device=device), weight)  # free weights are 0
    bias = torch.randn(n, generator=generator).to(dtype=dtype, device=device)
    return x, weight, task_ids, bias


def _vector(n, dtype, device, seed, low=0.5, high=1.5):
    generator = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(n, generator=generator)).to(dtype=dtype, device=device)


def _reference(x, weight, task_ids, task, bias=None, scale=None, shift=None, relu=False):
    def double(t):
        return None if t is None else t.double()

    return masked_linear_ref(
        x.double(), weight.double(), task_ids, task, double(bias), scale=double(scale), shift=double(shift), relu=relu
    )


def _check(y, x, weight, task_ids, task, bias=None, **epilogue):
    expected = _reference(x, weight, task_ids, task, bias, **epilogue)
    assert y.dtype == x.dtype and y.shape == expected.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), expected.cpu(), **_tolerance(x.dtype), check_device=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES + LARGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, kernel_device):
    m, n, k = shape
    x, weight, task_ids, bias = _make(m, n, k, dtype, kernel_device)
    assert linear.choose_regime(m) == ("small" if shape in SMALL_SHAPES else "large")
    _check(masked_linear(x, weight, task_ids, 2, bias, backend="triton"), x, weight, task_ids, 2, bias)


def test_shapes_exercise_split_k_in_both_regimes():
    """The interpreter's split plan really splits some shapes above in each regime (else split-K goes untested)."""
    cpu = torch.device("cpu")
    splits = {(m, n, k): linear._split_plan(m, n, k, True, cpu)[0] for m, n, k in SMALL_SHAPES + LARGE_SHAPES}
    assert splits[(1, 31, 200)] == 3 and splits[(7, 33, 129)] == 2 and splits[(16, 32, 33)] == 1
    assert splits[(23, 29, 257)] == 2 and splits[(33, 97, 47)] == 1
    k_per_split = linear._split_plan(1, 31, 200, True, cpu)[1]
    assert k_per_split % 32 == 0 and 2 * k_per_split < 200 < 3 * k_per_split  # the last split is ragged
    assert linear._split_plan(23, 29, 257, True, cpu)[1] % 32 == 0


@pytest.mark.parametrize("m", [3, 20], ids=["small", "large"])
def test_every_task_and_id_255(m, kernel_device):
    num_tasks = 6
    x, weight, task_ids, bias = _make(m, 37, 70, torch.float32, kernel_device, num_tasks=num_tasks, seed=1)
    task_ids[::5, ::3] = 255
    for task in [*range(1, num_tasks + 1), 254, 255]:
        _check(masked_linear(x, weight, task_ids, task, bias, backend="triton"), x, weight, task_ids, task, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [5, 21], ids=["small", "large"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_epilogue(with_bias, m, dtype, kernel_device):
    x, weight, task_ids, bias = _make(m, 45, 100, dtype, kernel_device, seed=2)
    bias = bias if with_bias else None
    scale = _vector(45, dtype, kernel_device, seed=3)
    shift = _vector(45, dtype, kernel_device, seed=4, low=-1.0, high=1.0)
    for epilogue in ({}, {"scale": scale}, {"shift": shift}, {"scale": scale, "shift": shift, "relu": True}):
        y = masked_linear(x, weight, task_ids, 3, bias, backend="triton", **epilogue)
        _check(y, x, weight, task_ids, 3, bias, **epilogue)
    relu_y = masked_linear(x, weight, task_ids, 3, bias, scale=scale, shift=shift, relu=True, backend="triton")
    assert (relu_y >= 0).all() and (relu_y == 0).any()


@pytest.mark.parametrize("m", [4, 24], ids=["small", "large"])
def test_non_contiguous_and_batched_inputs(m, kernel_device):
    dtype = torch.float16
    x, weight, task_ids, bias = _make(m, 35, 66, dtype, kernel_device, seed=5)
    # Transposed storage for x, weight and ids; a strided bias/scale/shift.
    x_t = x.t().contiguous().t()
    weight_t = weight.t().contiguous().t()
    ids_t = task_ids.t().contiguous().t()
    bias_s = torch.stack([bias, -bias], dim=1)[:, 0]
    scale_s = _vector(70, dtype, kernel_device, seed=6)[::2]
    assert not (x_t.is_contiguous() or weight_t.is_contiguous() or ids_t.is_contiguous() or bias_s.is_contiguous())
    y = masked_linear(x_t, weight_t, ids_t, 2, bias_s, scale=scale_s, backend="triton")
    _check(y, x, weight, task_ids, 2, bias, scale=scale_s.contiguous())
    # Row-sliced x (row stride > K) and 3-D inputs: viewable and not viewable as 2-D.
    wide = torch.randn(m, 80).to(dtype=dtype, device=kernel_device)[:, 7:73]
    _check(masked_linear(wide, weight, task_ids, 2, bias, backend="triton"), wide, weight, task_ids, 2, bias)
    x3 = torch.randn(2, (m + 1) // 2, 66).to(dtype=dtype, device=kernel_device)
    y3 = masked_linear(x3, weight, task_ids, 2, bias, backend="triton")
    assert y3.shape == (2, (m + 1) // 2, 35)
    _check(y3, x3, weight, task_ids, 2, bias)
    x3_permuted = torch.randn((m + 1) // 2, 2, 66).to(dtype=dtype, device=kernel_device).transpose(0, 1)
    _check(
        masked_linear(x3_permuted, weight, task_ids, 2, bias, backend="triton"), x3_permuted, weight, task_ids, 2, bias
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the task + 1 run
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [2, 19], ids=["small", "large"])
def test_nan_and_inf_in_unowned_weights_do_not_leak(m, dtype, kernel_device):
    task = 2
    x, weight, task_ids, bias = _make(m, 40, 90, dtype, kernel_device, seed=7)
    clean = masked_linear(x, weight, task_ids, task, bias, backend="triton")
    poisoned = weight.clone()
    later = task_ids == task + 1
    free = task_ids == 0
    assert later.any() and free.any()
    poisoned[later] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype, device=kernel_device)[
        torch.arange(int(later.sum()), device=kernel_device) % 3
    ]
    poisoned[free] = float("nan")
    y = masked_linear(x, poisoned, task_ids, task, bias, backend="triton")
    assert torch.isfinite(y).all()
    assert torch.equal(y, clean)
    _check(y, x, poisoned, task_ids, task, bias)
    # The later task does own them: its output is poisoned, proving they were really read where owned.
    assert not torch.isfinite(masked_linear(x, poisoned, task_ids, task + 1, bias, backend="triton")).all()


@pytest.mark.parametrize("m", [1, 9, 30], ids=["gemv", "small", "large"])
def test_two_runs_are_bitwise_equal(m, kernel_device):
    x, weight, task_ids, bias = _make(m, 50, 230, torch.float32, kernel_device, seed=8)
    first = masked_linear(x, weight, task_ids, 3, bias, backend="triton")
    second = masked_linear(x, weight, task_ids, 3, bias, backend="triton")
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_is_one_launch_that_leaves_its_counters_zero(dtype, kernel_device):
    """Split-K reduces inside its single launch (the last split of each tile sums the partials). The stream's kept
    workspace serves the next call: its tile counters are zero again after every call, and it grows for a larger one
    (the second shape needs more partials and more counters than the first)."""
    linear.release_workspaces()
    launched = []

    def counting(kernel):
        launched.append(kernel)
        return kernel

    # A GPU splits K only into chunks of 512 or more (the interpreter from 64): deeper layers there, ragged splits.
    first, second = ((1, 31, 2000), (23, 29, 2057)) if kernel_device == "cuda" else ((1, 31, 200), (23, 29, 257))
    for seed, (m, n, k) in enumerate([first, second, first]):
        assert linear._split_plan(m, n, k, kernel_device == "cpu", torch.device(kernel_device))[0] > 1
        x, weight, task_ids, bias = _make(m, n, k, dtype, kernel_device, seed=seed)
        launched.clear()
        y = linear._launch(x, weight, task_ids, 2, bias, None, None, True, True, wrap=counting, reuse_workspace=True)
        assert launched == [linear._masked_linear_kernel]
        _check(y, x, weight, task_ids, 2, bias, relu=True)
        ((partials, counters),) = linear._WORKSPACES.values()
        assert counters.count_nonzero().item() == 0
    assert partials.numel() >= 2 * 23 * 29 and counters.numel() >= 2  # grown for the second shape, kept for the third
    linear.release_workspaces()
    assert not linear._WORKSPACES


def test_split_workspace_holds_every_config():
    """The split-K workspace is sized from tile bounds, before the autotuner picks a config: every config's (and the
    interpreter's) whole tiles and counters must fit it, or splits would write past its end."""
    configs = [linear._configs(regime, major) for regime in ("small", "large") for major in (8, 9)]
    tiles = [
        dict(config.kwargs, regime="small" if i < 2 else "large") for i, group in enumerate(configs) for config in group
    ]
    tiles.append(dict(linear._INTERPRETER_CONFIG, regime="small"))
    tiles.append(dict(linear._INTERPRETER_CONFIG, regime="large"))
    for m, n in [(1, 1), (1, 4096), (16, 4095), (17, 1000), (256, 4096), (300, 257)]:
        for tile in tiles:
            tiles_n, tiles_m = linear.ceil_div(n, tile["BLOCK_N"]), linear.ceil_div(m, tile["BLOCK_M"])
            assert tiles_n * tiles_m <= linear.ceil_div(n, linear._MIN_BLOCK_N) * linear.ceil_div(
                m, linear._MIN_BLOCK_M
            )
            assert tiles_n * tile["BLOCK_N"] <= n + linear._MAX_BLOCK_N, (n, tile)
            assert tiles_m * tile["BLOCK_M"] <= m + linear._MAX_BLOCK_M[tile["regime"]], (m, tile)


def test_empty_inputs(kernel_device):
    x, weight, task_ids, bias = _make(3, 12, 20, torch.float16, kernel_device)
    for empty in (x[:0], x[:0].reshape(0, 4, 20), x.reshape(3, 1, 20)[:, :0]):
        y = masked_linear(empty, weight, task_ids, 1, bias, backend="triton")
        assert y.shape == (*empty.shape[:-1], 12) and y.numel() == 0 and y.dtype == x.dtype
    no_out = masked_linear(x, weight[:0], task_ids[:0], 1, backend="triton")
    assert no_out.shape == (3, 0)
    # No input features: the sum is empty, only the epilogue remains; also on compact ids (the fields loop and, for a
    # mixed batch, the slots run one chunk, whose columns they check: linear.whole_chunks(0) is False).
    no_in = masked_linear(x[:, :0], weight[:, :0], task_ids[:, :0], 1, bias, relu=True, backend="triton")
    assert torch.equal(no_in, torch.relu(bias).expand(3, 12))
    compact = compact_task_ids(task_ids[:, :0], 3)
    assert not linear.whole_chunks(0)
    no_in = masked_linear(x[:, :0], weight[:, :0], compact, 1, bias, relu=True, backend="triton")
    assert torch.equal(no_in, torch.relu(bias).expand(3, 12))
    tasks = torch.tensor([1, 2, 3], device=kernel_device)
    no_in = masked_linear(x[:, :0], weight[:, :0], compact, tasks, bias.expand(3, 12), relu=True, backend="triton")
    assert torch.equal(no_in, torch.relu(bias).expand(3, 12))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [3, 18], ids=["small", "large"])
def test_use_mask_false_is_plain_linear(m, dtype, kernel_device):
    x, weight, task_ids, bias = _make(m, 33, 75, dtype, kernel_device, seed=9)
    weight = torch.randn(33, 75).to(dtype=dtype, device=kernel_device)  # free weights non-zero: the mask would show
    ids_all_free = torch.zeros_like(task_ids)
    y = linear.masked_linear_triton(x, weight, ids_all_free, 1, bias, use_mask=False)
    expected = F.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(y.double(), expected, **_tolerance(dtype))
    assert not torch.equal(y, linear.masked_linear_triton(x, weight, ids_all_free, 1, bias))


@pytest.mark.parametrize("m", [1, 40], ids=["large-path-at-m1", "small-path-at-m40"])
def test_forced_regime(m, kernel_device, monkeypatch):
    """Either path is correct at any batch size: the regime is only a speed choice."""
    monkeypatch.setattr(linear, "SMALL_M_MAX", 0 if m == 1 else 64)
    assert linear.choose_regime(m) == ("large" if m == 1 else "small")
    x, weight, task_ids, bias = _make(m, 41, 150, torch.float32, kernel_device, seed=10)
    _check(
        masked_linear(x, weight, task_ids, 3, bias, relu=True, backend="triton"),
        x,
        weight,
        task_ids,
        3,
        bias,
        relu=True,
    )


def test_bad_inputs_raise_clear_errors(kernel_device):
    x, weight, task_ids, bias = _make(2, 8, 16, torch.float32, kernel_device)

    def call(*args, **kwargs):
        return masked_linear(*args, backend="triton", **kwargs)

    with pytest.raises(ValueError, match="task must be in 1..255"):
        call(x, weight, task_ids, 0)
    with pytest.raises(ValueError, match="task must be in 1..255"):
        call(x, weight, task_ids, 256)
    with pytest.raises(TypeError, match="task must be"):
        call(x, weight, task_ids, 1.0)
    with pytest.raises(TypeError, match="task must be"):
        call(x, weight, task_ids, torch.tensor(1))
    with pytest.raises(TypeError, match="task_ids must be torch.uint8"):
        call(x, weight, task_ids.to(torch.int32), 1)
    with pytest.raises(ValueError, match="task_ids must have the weight's shape"):
        call(x, weight, task_ids[:, :8], 1)
    with pytest.raises(ValueError, match="in_features=16"):
        call(x[:, :8], weight, task_ids, 1)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        call(x, weight[None], task_ids[None], 1)
    with pytest.raises(TypeError, match="does not match weight dtype"):
        call(x.half(), weight, task_ids, 1)
    with pytest.raises(TypeError, match="not supported"):
        call(x.double(), weight.double(), task_ids, 1)
    with pytest.raises(ValueError, match="bias must have shape"):
        call(x, weight, task_ids, 1, bias[:4])
    with pytest.raises(TypeError, match="scale dtype"):
        call(x, weight, task_ids, 1, scale=bias.half())
    with pytest.raises(ValueError, match="weight is on meta"):
        call(x, weight.to("meta"), task_ids, 1)
    with pytest.raises(TypeError, match="use_mask must be a bool"):
        linear.masked_linear_triton(x, weight, task_ids, 1, use_mask=1)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    x, weight, task_ids, _ = _make(2, 8, 16, torch.float32, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        masked_linear(x, weight, task_ids, 1, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear.masked_linear_triton(x, weight, task_ids, 1)


def test_compiles_to_one_graph(kernel_device):
    from torch._dynamo.testing import CompileCounterWithBackend

    x, weight, task_ids, bias = _make(6, 24, 40, torch.float32, kernel_device, seed=11)
    scale = _vector(24, torch.float32, kernel_device, seed=12)

    class Block(torch.nn.Module):
        def forward(self, inputs):
            hidden = masked_linear(inputs, weight, task_ids, 2, bias, scale=scale, relu=True, backend="triton")
            return hidden * 2 + 1

    block = Block()
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    result = compiled(x)
    assert counter.frame_count == 1
    assert torch.equal(result, block(x))


@pytest.mark.parametrize("m", [3, 20], ids=["split_k_reduce", "tiled"])
def test_relu_keeps_nan_like_torch(m, kernel_device):
    """A NaN input row stays NaN through the fused ReLU in both epilogues (PTX max.f32 alone would make it 0; the
    interpreter cannot tell, so this matters on the GPU)."""
    x, weight, task_ids, bias = _make(m, 40, 300, torch.float32, kernel_device, seed=5)
    x[1, 7] = float("nan")
    got = masked_linear(x, weight, task_ids, 2, bias, relu=True, backend="triton")
    expected = torch.relu(masked_linear_ref(x, weight, task_ids, 2, bias))
    assert got[1].isnan().all() and torch.equal(got.isnan(), expected.isnan())


def test_registered_op_schema():
    schema = str(torch.ops.packnet.masked_linear.default._schema)
    # Python ints in triton_op schemas become SymInt: one compiled graph can serve every task.
    assert "Tensor? bias" in schema and "SymInt task" in schema and "bool use_mask" in schema


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64, 300], ids=lambda m: f"m{m}")
def test_autotuned(m, monkeypatch):
    """The autotuned GPU paths (both regimes, fp16 and fp32) and their determinism."""
    monkeypatch.setattr(linear, "AUTOTUNE", True)
    for dtype in (torch.float16, torch.float32):
        x, weight, task_ids, bias = _make(m, 1000, 1536, dtype, "cuda", seed=13)
        y = masked_linear(x, weight, task_ids, 2, bias, backend="triton")
        _check(y, x, weight, task_ids, 2, bias)
        assert torch.equal(y, masked_linear(x, weight, task_ids, 2, bias, backend="triton"))


def test_autotuner_times_each_config_briefly(monkeypatch):
    """A cold cache must autotune within a device session: the autotuners get the short timer, not Triton's default
    (25 ms warm-up and 100 ms per config), and the timer passes those short times on."""
    import triton
    import triton.testing

    from packnet_kernels import _checks

    conv2d = pytest.importorskip("packnet_kernels.conv2d")
    built = []
    monkeypatch.setattr(triton, "autotune", lambda **kwargs: built.append(kwargs) or (lambda kernel: kernel))
    monkeypatch.setattr(conv2d, "_autotuned_kernels", {})
    linear._tuned_kernel.cache_clear()
    try:
        linear._tuned_kernel("small", 9)
        conv2d._gpu_kernel("gemm")
    finally:
        linear._tuned_kernel.cache_clear()
    assert [kwargs["do_bench"] for kwargs in built] == [_checks.autotune_bench] * 2
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: timed.append(kwargs) or [1.0])
    _checks.autotune_bench(lambda: None, quantiles=(0.5,))
    assert timed == [{"warmup": 5, "rep": 20, "quantiles": (0.5,)}]


@pytest.mark.parametrize("allowed", [True, False], ids=["direct", "via_op"])
def test_direct_launches_never_go_through_wrap_triton(allowed, monkeypatch, kernel_device):
    """Eager launches bypass the registered op and launch the kernels as they are: ``wrap_triton`` outside the op
    takes its tracing path (a millisecond per call on an H200, and no CUDA-graph capture)."""
    from packnet_kernels._checks import as_is

    calls = []
    monkeypatch.setattr(linear, "direct_launch_allowed", lambda *tensors: allowed)
    monkeypatch.setattr(linear, "_launch", lambda *args, **kwargs: calls.append(kwargs.get("wrap")) or args[0])
    monkeypatch.setattr(linear, "_masked_linear_op", lambda *args: calls.append("op") or args[0])
    x, weight, task_ids, _ = _make(2, 8, 16, torch.float32, kernel_device)
    linear.masked_linear_triton(x, weight, task_ids, 1)
    assert calls == ([as_is] if allowed else ["op"])


@pytest.mark.gpu
def test_direct_launches_can_be_captured_in_a_cuda_graph():
    x, weight, task_ids, bias = _make(256, 512, 4096, torch.float16, "cuda", seed=4)
    expected = masked_linear(x, weight, task_ids, 2, bias)  # compiles and autotunes outside the capture
    assert linear._split_plan(256, 512, 4096, False, x.device)[0] > 1  # the graph holds a split-K reduction
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = masked_linear(x, weight, task_ids, 2, bias)
    for _ in range(3):  # the graph's own counters must be zero again after each replay
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)
    assert torch.equal(masked_linear(x, weight, task_ids, 2, bias), expected)  # the eager workspace is untouched


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 256], ids=lambda m: f"m{m}")
def test_eager_direct_launch_equals_the_registered_op(m):
    """Eager CUDA calls launch directly (no op dispatch); the registered op, which torch.compile sees, must agree."""
    x, weight, task_ids, bias = _make(m, 96, 4096, torch.float16, "cuda", seed=3)
    direct = linear.masked_linear_triton(x, weight, task_ids, 2, bias, relu=True)
    via_op = torch.ops.packnet.masked_linear(x, weight, task_ids, 2, bias, None, None, True, True, None, False, None)
    _check(direct, x, weight, task_ids, 2, bias, relu=True)
    assert torch.equal(direct, via_op)


@pytest.mark.gpu
def test_int64_offsets():
    """A weight of more than 2^31 elements (4 GiB fp16 + 2 GiB ids): rows past the 2^31 boundary are right."""
    n, k = 131_075, 16_384
    assert n * k > 2**31
    weight = torch.empty(n, k, dtype=torch.float16, device="cuda").normal_()
    task_ids = torch.randint(0, 3, (n, k), dtype=torch.uint8, device="cuda")
    x = torch.randn(2, k, dtype=torch.float16, device="cuda")
    y = masked_linear(x, weight, task_ids, 1, backend="triton")
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    expected = _reference(x, weight[rows], task_ids[rows], 1)
    torch.testing.assert_close(y[:, rows].double(), expected, **_tolerance(torch.float16))
