"""The Triton masked conv2d (``packnet_kernels/conv2d.py``) against the float64 reference and ``F.conv2d``.

On the CPU every kernel runs under ``TRITON_INTERPRET=1`` (set by conftest), so shapes are tiny; they still cross
the interpreter's tile borders (32 rows, 16 channels, 16 reduction steps) and take both kernels (implicit GEMM and
the small-group direct kernel). On a CUDA machine the same tests run the compiled, autotuned kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TF32_TOLERANCE, TOLERANCES

import packnet_kernels as pk
import packnet_kernels.conv2d as conv2d_module
from packnet_kernels.conv2d import _uses_direct_kernel, masked_conv2d_triton
from packnet_kernels.reference import effective_weight, masked_conv2d_ref

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Scaled-down ResNet/VGG layers: (name, x shape, out channels, kernel, stride, padding, dilation, groups).
CONFIGS = [
    ("vgg_3x3", (2, 5, 9, 7), 20, 3, 1, 1, 1, 1),
    ("resnet_stem_7x7_s2_p3", (1, 3, 11, 11), 17, 7, 2, 3, 1, 1),
    ("pointwise_1x1", (2, 20, 5, 6), 9, 1, 1, 0, 1, 1),
    ("downsample_1x1_s2", (2, 6, 7, 7), 10, 1, 2, 0, 1, 1),
    ("resnet_3x3_s2", (2, 7, 9, 8), 12, 3, 2, 1, 1, 1),
    ("dilation_2", (1, 4, 10, 9), 6, 3, 1, 2, 2, 1),
    ("rect_kernel_pairs", (1, 5, 9, 11), 7, (3, 5), (2, 1), (1, 2), (1, 2), 1),
    ("same_3x3", (1, 5, 7, 6), 7, 3, 1, "same", 1, 1),
    ("same_even_kernel", (1, 3, 8, 9), 5, (4, 2), 1, "same", (1, 3), 1),
    ("valid_3x3", (2, 5, 8, 7), 7, 3, 1, "valid", 1, 1),
    ("groups_2_small", (2, 8, 7, 7), 6, 3, 1, 1, 1, 2),
    ("groups_2_gemm", (1, 32, 5, 5), 34, 3, 1, 1, 1, 2),
    ("taps_outer_3x3_c37", (2, 37, 7, 6), 19, 3, 1, 1, 1, 1),
    ("taps_outer_s2_dil2_c17", (1, 17, 9, 9), 12, 3, 2, 2, 2, 1),
    ("depthwise_3x3", (2, 12, 7, 7), 12, 3, 1, 1, 1, 12),
    ("depthwise_x2_s2", (1, 6, 9, 9), 12, 3, 2, 1, 1, 6),
]
CONFIG_IDS = [config[0] for config in CONFIGS]
CONFIG_BY_NAME = {config[0]: config for config in CONFIGS}
LAYOUT_CONFIGS = ["vgg_3x3", "resnet_stem_7x7_s2_p3", "groups_2_gemm", "taps_outer_3x3_c37", "depthwise_3x3"]
AUTOTUNED_CONFIGS = ["vgg_3x3", "pointwise_1x1", "taps_outer_3x3_c37", "depthwise_3x3"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _problem(x_shape, out_channels, kernel, groups, dtype, device, *, high=4, seed=0):
    """Random ``x, weight, task_ids, bias`` (ids uniform in ``0..high-1``)."""
    generator = _generator(seed)
    kh, kw = _pair(kernel)
    w_shape = (out_channels, x_shape[1] // groups, kh, kw)
    x = torch.randn(x_shape, generator=generator).to(device=device, dtype=dtype)
    weight = torch.randn(w_shape, generator=generator).to(device=device, dtype=dtype)
    task_ids = torch.randint(0, high, w_shape, generator=generator, dtype=torch.uint8).to(device)
    bias = torch.randn(out_channels, generator=generator).to(device=device, dtype=dtype)
    return x, weight, task_ids, bias


def _reference(x, weight, task_ids, task, bias=None, stride=1, padding=0, dilation=1, groups=1, **epilogue):
    """The float64 reference, on the CPU."""
    vectors = {name: value.double().cpu() for name, value in epilogue.items() if isinstance(value, torch.Tensor)}
    flags = {name: value for name, value in epilogue.items() if not isinstance(value, torch.Tensor)}
    return masked_conv2d_ref(
        x.double().cpu(),
        weight.double().cpu(),
        task_ids.cpu(),
        task,
        None if bias is None else bias.double().cpu(),
        stride,
        padding,
        dilation,
        groups,
        **vectors,
        **flags,
    )


def _assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), expected, atol=atol, rtol=rtol)


def test_configs_cover_both_kernels_and_both_gemm_loops():
    paths = {_uses_direct_kernel(groups, shape[1] // groups, out // groups) for _, shape, out, *_, groups in CONFIGS}
    assert paths == {True, False}
    taps_outer = {
        shape[1] // groups >= conv2d_module._TAPS_OUTER_MIN_CHANNELS
        for _, shape, out, *_, groups in CONFIGS
        if not _uses_direct_kernel(groups, shape[1] // groups, out // groups)
    }
    assert taps_outer == {True, False}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference(config, dtype, kernel_device):
    _, x_shape, out_channels, kernel, stride, padding, dilation, groups = config
    x, weight, task_ids, bias = _problem(x_shape, out_channels, kernel, groups, dtype, kernel_device)
    got = masked_conv2d_triton(x, weight, task_ids, 2, bias, stride, padding, dilation, groups)
    expected = _reference(x, weight, task_ids, 2, bias, stride, padding, dilation, groups)
    assert got.shape == expected.shape
    assert got.device.type == kernel_device
    _assert_close(got, expected, dtype)


@pytest.mark.parametrize("layout", ["x_nhwc", "w_nhwc", "both_nhwc"])
@pytest.mark.parametrize("config", [CONFIG_BY_NAME[name] for name in LAYOUT_CONFIGS], ids=LAYOUT_CONFIGS)
def test_channels_last_values_and_output_format_follow_f_conv2d(config, layout, kernel_device):
    """Output layout as cuDNN's and CPU fp32 ``F.conv2d``: channels_last when the input or the weight is (CPU fp16
    ``F.conv2d`` looks at the input alone, so the layout is compared in fp32)."""
    _, x_shape, out_channels, kernel, stride, padding, dilation, groups = config
    dtype = torch.float32
    x, weight, task_ids, bias = _problem(x_shape, out_channels, kernel, groups, dtype, kernel_device, seed=1)
    if layout != "w_nhwc":
        x = x.to(memory_format=torch.channels_last)
    if layout != "x_nhwc":
        weight = weight.to(memory_format=torch.channels_last)
    got = masked_conv2d_triton(x, weight, task_ids, 3, bias, stride, padding, dilation, groups)
    dense = F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # raw weight: where() drops its layout
    assert got.stride() == dense.stride()
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_close(got, _reference(x, weight, task_ids, 3, bias, stride, padding, dilation, groups), dtype)


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "direct"])
def test_strided_input_view(groups, kernel_device):
    x, weight, task_ids, bias = _problem((2, 8, 13, 12), 8, 3, groups, torch.float32, kernel_device, seed=2)
    view = x[:, :, 1::2, ::3]  # neither NCHW- nor NHWC-contiguous
    got = masked_conv2d_triton(view, weight, task_ids, 2, bias, padding=1, groups=groups)
    assert got.is_contiguous()
    _assert_close(got, _reference(view, weight, task_ids, 2, bias, 1, 1, 1, groups), torch.float32)


@pytest.mark.parametrize("groups", [1, 3], ids=["gemm", "direct"])
def test_every_task_including_ids_255(groups, kernel_device):
    x, weight, task_ids, bias = _problem((1, 6, 6, 7), 18, 3, groups, torch.float32, kernel_device, high=7, seed=3)
    task_ids[task_ids == 6] = 255
    outputs = []
    for task in [1, 2, 3, 4, 5, 254, 255]:
        got = masked_conv2d_triton(x, weight, task_ids, task, bias, padding=1, groups=groups)
        _assert_close(got, _reference(x, weight, task_ids, task, bias, 1, 1, 1, groups), torch.float32)
        outputs.append(got)
    # Each listed task owns weights the previous one does not (254 adds none, so it repeats task 5).
    for previous, current in zip(outputs[:4], outputs[1:5], strict=True):
        assert not torch.allclose(previous, current)
    assert torch.equal(outputs[4], outputs[5])
    assert not torch.allclose(outputs[5], outputs[6])


@pytest.mark.parametrize("groups", [1, 2], ids=["gemm", "direct"])
def test_all_free_or_all_255(groups, kernel_device):
    x, weight, _, bias = _problem((2, 4, 5, 5), 6, 3, groups, torch.float32, kernel_device, seed=4)
    free = torch.zeros(weight.shape, dtype=torch.uint8, device=kernel_device)
    got = masked_conv2d_triton(x, weight, free, 255, bias, groups=groups)
    assert torch.equal(got, bias.reshape(1, -1, 1, 1).expand_as(got))
    last = torch.full(weight.shape, 255, dtype=torch.uint8, device=kernel_device)
    got = masked_conv2d_triton(x, weight, last, 254, bias, groups=groups)
    assert torch.equal(got, bias.reshape(1, -1, 1, 1).expand_as(got))
    got = masked_conv2d_triton(x, weight, last, 255, bias, groups=groups)
    _assert_close(got, F.conv2d(x.double(), weight.double(), bias.double(), groups=groups).cpu(), torch.float32)


@pytest.mark.parametrize("batch", [0, 1])
@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "direct"])
def test_batch_one_and_empty_batch(batch, groups, kernel_device):
    x, weight, task_ids, bias = _problem((batch, 8, 7, 5), 12, 3, groups, torch.float16, kernel_device, seed=5)
    got = masked_conv2d_triton(x, weight, task_ids, 1, bias, 2, 1, groups=groups)
    expected = _reference(x, weight, task_ids, 1, bias, 2, 1, 1, groups)
    assert got.shape == expected.shape == (batch, 12, 4, 3)
    _assert_close(got, expected, torch.float16)


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("groups", [1, 5], ids=["gemm", "direct"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_weights_of_later_tasks_and_free_weights_never_leak(dtype, groups, poison, kernel_device):
    task = 2
    x, weight, task_ids, bias = _problem((1, 10, 6, 6), 20, 3, groups, dtype, kernel_device, seed=6)
    planted = torch.rand(weight.shape, generator=_generator(7)).to(kernel_device) < 0.3
    weight[planted & ((task_ids == task + 1) | (task_ids == 0))] = poison
    assert (~torch.isfinite(weight[task_ids == task + 1])).any() and (~torch.isfinite(weight[task_ids == 0])).any()
    got = masked_conv2d_triton(x, weight, task_ids, task, bias, padding=1, groups=groups)
    assert torch.isfinite(got).all()
    _assert_close(got, _reference(x, weight, task_ids, task, bias, 1, 1, 1, groups), dtype)


@pytest.mark.parametrize("groups", [1, 6], ids=["gemm", "direct"])
def test_two_runs_are_bitwise_equal(groups, kernel_device):
    x, weight, task_ids, bias = _problem((2, 6, 9, 8), 18, 3, groups, torch.bfloat16, kernel_device, seed=8)
    first = masked_conv2d_triton(x, weight, task_ids, 2, bias, 1, 1, groups=groups, relu=True)
    second = masked_conv2d_triton(x, weight, task_ids, 2, bias, 1, 1, groups=groups, relu=True)
    assert torch.equal(first, second)


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "direct"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_use_mask_false_is_f_conv2d_on_the_raw_weight(dtype, groups, kernel_device):
    x, weight, task_ids, bias = _problem((2, 8, 7, 6), 20, 3, groups, dtype, kernel_device, seed=9)
    got = masked_conv2d_triton(x, weight, task_ids, 1, bias, 2, 1, groups=groups, use_mask=False)
    dense = F.conv2d(x.double(), weight.double(), bias.double(), 2, 1, 1, groups).cpu()
    _assert_close(got, dense, dtype)
    # The ids (half of them beyond task 1 here) really are ignored: the masked result differs.
    masked = masked_conv2d_triton(x, weight, task_ids, 1, bias, 2, 1, groups=groups)
    assert not torch.allclose(masked, got)


@pytest.mark.parametrize("groups", [1, 9], ids=["gemm", "direct"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_batchnorm_relu_epilogue_matches_conv_bn_relu(dtype, groups, kernel_device):
    """``Conv2d -> BatchNorm2d(eval) -> ReLU`` in float64 PyTorch (masked weights) vs one fused kernel call."""
    generator = _generator(10)
    x, weight, task_ids, bias = _problem((2, 9, 7, 7), 18, 3, groups, dtype, kernel_device, seed=10)
    conv = torch.nn.Conv2d(9, 18, 3, stride=1, padding=1, groups=groups, dtype=torch.float64)
    batchnorm = torch.nn.BatchNorm2d(18, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(effective_weight(weight.double().cpu(), task_ids.cpu(), 2))
        conv.bias.copy_(bias.double().cpu())
        batchnorm.weight.copy_(torch.rand(18, generator=generator, dtype=torch.float64) + 0.5)
        batchnorm.bias.copy_(torch.randn(18, generator=generator, dtype=torch.float64))
        batchnorm.running_mean.copy_(torch.randn(18, generator=generator, dtype=torch.float64))
        batchnorm.running_var.copy_(torch.rand(18, generator=generator, dtype=torch.float64) + 0.1)
    chain = torch.nn.Sequential(conv, batchnorm, torch.nn.ReLU()).eval()
    with torch.no_grad():
        expected = chain(x.double().cpu())
    scale = batchnorm.weight / torch.sqrt(batchnorm.running_var + batchnorm.eps)
    shift = batchnorm.bias - batchnorm.running_mean * scale
    scale, shift = (v.detach().to(device=kernel_device, dtype=dtype) for v in (scale, shift))
    got = masked_conv2d_triton(x, weight, task_ids, 2, bias, 1, 1, groups=groups, scale=scale, shift=shift, relu=True)
    assert (got == 0).any() and (got > 0).any()
    _assert_close(got, expected, dtype)


def test_epilogue_pieces_alone(kernel_device):
    x, weight, task_ids, bias = _problem((1, 4, 6, 5), 7, 3, 1, torch.float32, kernel_device, seed=11)
    scale = torch.rand(7, generator=_generator(12)).to(kernel_device)
    for epilogue in ({"scale": scale}, {"shift": bias}, {"relu": True}):
        got = masked_conv2d_triton(x, weight, task_ids, 3, None, padding="same", **epilogue)
        _assert_close(got, _reference(x, weight, task_ids, 3, None, 1, "same", 1, 1, **epilogue), torch.float32)


def test_relu_keeps_nan_like_torch(kernel_device):
    x, weight, _, _ = _problem((1, 2, 4, 4), 3, 1, 1, torch.float32, kernel_device, seed=13)
    x[0, 0, 1, 2] = float("nan")
    owned = torch.ones(weight.shape, dtype=torch.uint8, device=kernel_device)
    got = masked_conv2d_triton(x, weight, owned, 1, relu=True)
    assert torch.equal(got.isnan(), torch.relu(F.conv2d(x, weight)).isnan())


def _bad_calls(device):
    """(description, call through the dispatcher with backend='triton', expected error, message fragment)."""
    x, weight, task_ids, bias = _problem((1, 4, 6, 6), 6, 3, 2, torch.float32, device)

    def conv(**changes):
        args = {"x": x, "weight": weight, "task_ids": task_ids, "task": 1, "bias": bias, "groups": 2}
        args.update(changes)
        return lambda: pk.masked_conv2d(**args, backend="triton")

    return [
        ("task 0", conv(task=0), ValueError, "task must be in 1..255"),
        ("task 256", conv(task=256), ValueError, "task must be in 1..255"),
        ("task tensor", conv(task=torch.tensor(1)), TypeError, "task must be a Python int"),
        ("float ids", conv(task_ids=task_ids.float()), TypeError, "task_ids must be torch.uint8"),
        ("ids shape", conv(task_ids=task_ids[:3]), ValueError, "task_ids must have the weight's shape"),
        ("float64", conv(x=x.double(), weight=weight.double(), bias=bias.double()), TypeError, "not supported"),
        ("mixed dtypes", conv(x=x.half()), TypeError, "does not match weight dtype"),
        ("bias dtype", conv(bias=bias.half()), TypeError, "bias dtype"),
        ("bias shape", conv(bias=bias[:5]), ValueError, "bias must have shape (6,)"),
        ("scale shape", conv(scale=bias[:2]), ValueError, "scale must have shape (6,)"),
        ("3-D input", conv(x=x[0]), ValueError, "input must be 4-D"),
        ("channels", conv(x=x[:, :3]), ValueError, "input has 3 channels"),
        ("groups", conv(groups=4), ValueError, "not divisible by groups"),
        ("stride 0", conv(stride=0), ValueError, "stride must be >= 1"),
        ("padding str", conv(padding="full"), ValueError, "'same' or 'valid'"),
        ("same stride 2", conv(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
        ("kernel too big", conv(x=x[:, :, :2]), ValueError, "smaller than the dilated kernel"),
        ("device", conv(weight=weight.to("meta")), ValueError, "weight is on meta"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_inputs_raise_clear_errors(case, kernel_device):
    calls = _bad_calls(kernel_device)
    assert len(calls) == 18
    _, call, error, fragment = calls[case]
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_dispatcher_triton_backend_runs_this_kernel(kernel_device):
    x, weight, task_ids, bias = _problem((1, 4, 6, 6), 6, 3, 2, torch.float16, kernel_device, seed=14)
    got = pk.masked_conv2d(x, weight, task_ids, 2, bias, 1, 1, 1, 2, relu=True, backend="triton")
    assert torch.equal(got, masked_conv2d_triton(x, weight, task_ids, 2, bias, 1, 1, 1, 2, relu=True))


def test_registered_as_a_torch_op(kernel_device):
    x, weight, task_ids, bias = _problem((1, 4, 5, 5), 6, 3, 1, torch.float32, kernel_device, seed=15)
    pads = [1, 1, 1, 1]  # top, bottom, left, right
    got = torch.ops.packnet.masked_conv2d(
        x, weight, task_ids, 1, bias, None, None, [1, 1], pads, [1, 1], 1, False, True, None, False, None
    )
    assert torch.equal(got, masked_conv2d_triton(x, weight, task_ids, 1, bias, padding=1))


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "direct"])
def test_opcheck_schema_fake_kernel_and_aot_dispatch(groups, kernel_device):
    x, weight, task_ids, bias = _problem((2, 8, 5, 4), 8, 3, groups, torch.float16, kernel_device, seed=19)
    x = x.to(memory_format=torch.channels_last)
    args = (
        x,
        weight,
        task_ids,
        2,
        bias,
        None,
        bias,
        [2, 1],
        [1, 1, 0, 2],
        [1, 2],
        groups,
        True,
        True,
        None,
        False,
        None,
        8,
    )
    results = torch.library.opcheck(torch.ops.packnet.masked_conv2d.default, args)
    assert set(results.values()) == {"SUCCESS"}


@pytest.mark.parametrize("kernel", ["gemm", "direct"])
def test_autotune_configs_and_keys_name_kernel_arguments(kernel):
    """Only a GPU runs the autotuner; this catches a misspelt key or block name without one."""
    autotuned = conv2d_module._gpu_kernel(kernel)
    arguments = set(conv2d_module._KERNELS[kernel].arg_names)
    assert set(autotuned.keys) <= arguments and "m_bucket" in autotuned.keys
    assert all(set(config.kwargs) <= arguments for config in autotuned.configs)
    assert set(conv2d_module._INTERPRETER_CONFIGS[kernel]) == set(autotuned.configs[0].kwargs)


def test_row_bucket_is_the_next_power_of_two():
    assert [conv2d_module._row_bucket(rows) for rows in (1, 2, 3, 64, 65, 1000)] == [1, 2, 4, 64, 128, 1024]


def test_compiles_to_one_graph_with_aot_eager(kernel_device):
    from torch._dynamo.testing import CompileCounterWithBackend

    x, weight, task_ids, bias = _problem((2, 6, 7, 7), 8, 3, 1, torch.float32, kernel_device, seed=16)
    _, depthwise, depthwise_ids, _ = _problem((2, 8, 7, 7), 8, 3, 8, torch.float32, kernel_device, seed=17)
    scale = torch.rand(8, generator=_generator(18)).to(kernel_device)

    def block(x):
        y = pk.masked_conv2d(x, weight, task_ids, 2, bias, padding="same", scale=scale, relu=True, backend="triton")
        return masked_conv2d_triton(y, depthwise, depthwise_ids, 1, None, 2, 1, groups=8) + 1

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    got = compiled(x)
    assert counter.frame_count == 1
    assert torch.equal(got, block(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("config", [CONFIG_BY_NAME[name] for name in AUTOTUNED_CONFIGS], ids=AUTOTUNED_CONFIGS)
def test_autotuned(config, dtype, monkeypatch):
    """The autotuned GPU paths (both GEMM loops, 1x1, direct depthwise) on larger shapes, and their determinism."""
    monkeypatch.setattr(conv2d_module, "AUTOTUNE", True)
    _, x_shape, out_channels, kernel, stride, padding, dilation, groups = config
    x_shape = (8, x_shape[1] * 4, 28, 28)
    out_channels *= 4
    groups = groups * 4 if groups > 1 else 1
    x, weight, task_ids, bias = _problem(x_shape, out_channels, kernel, groups, dtype, "cuda", seed=21)
    # The packed layer's layout on CUDA: channels_last activations, K-contiguous weight and ids.
    x, weight, task_ids = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight, task_ids))
    got = masked_conv2d_triton(x, weight, task_ids, 2, bias, stride, padding, dilation, groups)
    _assert_close(got, _reference(x, weight, task_ids, 2, bias, stride, padding, dilation, groups), dtype)
    assert torch.equal(got, masked_conv2d_triton(x, weight, task_ids, 2, bias, stride, padding, dilation, groups))


@pytest.mark.parametrize("target", ["one input image", "one output image", "weight", "task_ids"])
def test_offsets_past_int32_are_refused_by_name(target):
    """The kernel indexes one image, the weight and the ids with int32: larger ones are refused, naming which (meta
    tensors: strides without memory)."""
    huge = (2**29, 1, 1, 1)
    x = torch.empty(1, 4, 5, 5, device="meta")
    weight = torch.empty(6, 4, 3, 3, device="meta")
    task_ids = torch.empty(6, 4, 3, 3, dtype=torch.uint8, device="meta")
    if target == "one input image":
        x = torch.empty(1, 4, 2**15, 2**15, device="meta")
    elif target == "one output image":  # 2**27 output channels of 7 x 7 pixels, from a small input
        weight = torch.empty(2**27, 4, 1, 1, device="meta")
        task_ids = torch.empty(2**27, 4, 1, 1, dtype=torch.uint8, device="meta")
    elif target == "weight":
        weight = weight.as_strided(weight.shape, huge)
    else:
        task_ids = task_ids.as_strided(task_ids.shape, huge)
    with pytest.raises(ValueError, match=f"masked_conv2d: {target} spans 2\\*\\*31 elements or more"):
        conv2d_module._launch(x, weight, task_ids, 1, None, None, None, (1, 1), [1, 1, 1, 1], (1, 1), 1, False, True)


@pytest.mark.parametrize("allowed", [True, False], ids=["direct", "via_op"])
def test_direct_launches_never_go_through_wrap_triton(allowed, monkeypatch, kernel_device):
    """As for linear: eager launches skip the registered op and launch the kernel as it is."""
    from packnet_kernels._checks import as_is

    calls = []
    monkeypatch.setattr(conv2d_module, "direct_launch_allowed", lambda *tensors: allowed)
    monkeypatch.setattr(conv2d_module, "_launch", lambda *args, **kwargs: calls.append(kwargs.get("wrap")) or args[0])
    x, weight, task_ids, _ = _problem((1, 4, 5, 5), 6, 3, 1, torch.float32, kernel_device)
    if not allowed:
        monkeypatch.setattr(torch.ops.packnet, "masked_conv2d", lambda *args: calls.append("op") or args[0])
    masked_conv2d_triton(x, weight, task_ids, 1)
    assert calls == ([as_is] if allowed else ["op"])


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_follows_pytorchs_tf32_setting_for_convs(allow_tf32, monkeypatch):
    """fp32 convs use TF32 dots exactly when ``torch.backends.cudnn.allow_tf32`` says F.conv2d may."""
    x, weight, task_ids, bias = _problem((4, 64, 12, 12), 48, 3, 1, torch.float32, "cuda", seed=31)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    exact = masked_conv2d_triton(x, weight, task_ids, 2, bias, 1, 1)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    got = masked_conv2d_triton(x, weight, task_ids, 2, bias, 1, 1)
    atol, rtol = TF32_TOLERANCE if allow_tf32 else TOLERANCES[torch.float32]
    torch.testing.assert_close(got.double().cpu(), _reference(x, weight, task_ids, 2, bias, 1, 1), atol=atol, rtol=rtol)
    assert torch.equal(got, exact) is not allow_tf32  # TF32 rounds the operands: the results must differ


@pytest.mark.gpu
@pytest.mark.slow
def test_batch_offsets_past_2_to_the_31_elements():
    """An input and output of more than 2**31 elements: the batch offset must not wrap around in int32."""
    batch = 2**31 // (4 * 64 * 64) + 2
    x = torch.zeros((batch, 4, 64, 64), dtype=torch.float16, device="cuda")
    x[-1].normal_()
    weight = torch.randn(4, 4, 1, 1, dtype=torch.float16, device="cuda")
    task_ids = torch.ones(weight.shape, dtype=torch.uint8, device="cuda")
    got = masked_conv2d_triton(x, weight, task_ids, 1)
    assert x.numel() > 2**31
    _assert_close(got[-1:], F.conv2d(x[-1:].double(), weight.double()).cpu(), torch.float16)
    assert torch.equal(got[0], torch.zeros_like(got[0]))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    x, weight = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    task_ids = torch.ones(weight.shape, dtype=torch.uint8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="masked_conv2d_triton needs CUDA tensors.*TRITON_INTERPRET=1"):
        masked_conv2d_triton(x, weight, task_ids, 1)


def test_launch_plans_follow_every_property_of_a_call(kernel_device, monkeypatch):
    """A launch plan is kept per shape, strides, geometry and flags: calls that differ in any one of them (input
    layout, padding, stride, dilation, epilogue, ReLU, mask) on one input shape each get their own plan and the
    reference's result, a repeated call reuses its plan, and the cache stays within its bound."""
    monkeypatch.setattr(conv2d_module, "_PLANS", {})
    x, weight, task_ids, bias = _problem((2, 32, 6, 5), 24, 3, 1, torch.float32, kernel_device, seed=7)
    scale = torch.rand(24, device=kernel_device) + 0.5
    last = x.contiguous(memory_format=torch.channels_last)
    calls = [
        (x, {}),
        (last, {}),  # same shape, other strides
        (x, {"padding": 1}),
        (x, {"stride": 2, "padding": 1}),
        (x, {"dilation": 2, "padding": 2}),
        (x, {"bias": bias}),
        (x, {"bias": bias, "scale": scale, "relu": True}),
        (x, {"use_mask": False}),
    ]
    for count, (inputs, options) in enumerate(calls, 1):
        options = dict(options)
        bias_arg = options.pop("bias", None)
        geometry = {key: options.pop(key) for key in ("stride", "padding", "dilation") if key in options}
        got = masked_conv2d_triton(inputs, weight, task_ids, 2, bias_arg, **geometry, **options)
        if options.get("use_mask", True):
            expected = _reference(inputs, weight, task_ids, 2, bias_arg, **geometry, **options)
        else:
            expected = F.conv2d(inputs.double().cpu(), weight.double().cpu(), None, **geometry)
        _assert_close(got, expected, torch.float32)
        assert len(conv2d_module._PLANS) == count
    plans = dict(conv2d_module._PLANS)
    masked_conv2d_triton(x, weight, task_ids, 3)  # the first call's shapes and flags, another task: no new plan
    assert conv2d_module._PLANS == plans
    monkeypatch.setattr(conv2d_module, "_PLANS", {})
    monkeypatch.setattr(conv2d_module, "_MAX_PLANS", 3)
    for padding in range(5):
        masked_conv2d_triton(x, weight, task_ids, 2, None, padding=padding)
        assert len(conv2d_module._PLANS) <= 3


def test_mixed_batches_with_task_tensors_of_other_dtypes_share_a_plan(kernel_device, monkeypatch):
    """A mixed batch's kernel reads the sorted images and their pixel tiles (int64 whatever the task tensor's
    dtype): a uint8 and an int64 task tensor of the same batch share one plan (besides the int task's), with the same
    result."""
    monkeypatch.setattr(conv2d_module, "_PLANS", {})
    x, weight, task_ids, bias = _problem((2, 32, 6, 5), 24, 3, 1, torch.float32, kernel_device, seed=9)
    results = []
    for dtype in (torch.uint8, torch.int64, torch.uint8):
        tasks = torch.tensor([2, 1], dtype=dtype, device=kernel_device)
        results.append(masked_conv2d_triton(x, weight, task_ids, tasks, bias))
    assert len(conv2d_module._PLANS) == 1
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
