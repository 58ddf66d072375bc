"""Property tests of the Triton kernels: hypothesis draws shapes, strides, dtypes, tasks and task-id patterns.

Each case runs ``packnet_kernels.masked_linear`` / ``masked_conv2d`` with ``backend="triton"`` (under
TRITON_INTERPRET=1 on the CPU, compiled on a GPU) and checks, against the float64 reference:

- the values, within ``TOLERANCES[dtype]``; the output's shape, dtype and (conv) memory format as ``F.conv2d``'s;
- exactly (``torch.equal``): weights the task does not own never matter. Poisoning them (NaN, Inf, huge values in
  free weights and in weights of later tasks) gives the same bits as zeroing them.

A case is a plain dict of parameters (readable when hypothesis reports one); its tensors come from a seeded
generator. Examples are bounded and derandomized so CI sees the same cases each run and stays fast under the
interpreter; ``PACKNET_PROPERTY_SCALE=10`` runs ten times as many random cases.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import packnet_kernels
from packnet.pruning import magnitude_task_ids

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(f"packnet_kernels.{name}") is None for name in ("linear", "conv2d")),
        reason="the Triton kernels are not written yet",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE = max(1, int(os.environ.get("PACKNET_PROPERTY_SCALE", "1")))
ID_PATTERNS = ["random", "nested", "all_free", "all_active", "all_later", "max_ids"]


def properties(examples: int):
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@pytest.fixture(scope="module", autouse=True)
def _untuned_kernels_on_gpu():
    """On a GPU, one config per kernel variant instead of autotuning every drawn shape (as the kernel tests do)."""
    if not torch.cuda.is_available():
        yield
        return
    modules = [importlib.import_module(f"packnet_kernels.{name}") for name in ("linear", "conv2d")]
    saved = [module.AUTOTUNE for module in modules]
    for module in modules:
        module.AUTOTUNE = False
    yield
    for module, value in zip(modules, saved, strict=True):
        module.AUTOTUNE = value


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ shared pieces
def _task_ids(pattern: str, shape, num_tasks: int, task: int, weight: torch.Tensor, generator) -> torch.Tensor:
    if pattern == "random":
        return torch.randint(0, num_tasks + 1, shape, generator=generator, dtype=torch.uint8)
    if pattern == "nested":  # what PackNet's pruning produces
        return magnitude_task_ids(weight, num_tasks, 0.5)
    if pattern == "all_free":
        return torch.zeros(shape, dtype=torch.uint8)
    if pattern == "all_active":
        return torch.full(shape, task, dtype=torch.uint8)
    if pattern == "all_later":  # nothing owned yet by tasks 1..task: the product is all zeros
        return torch.full(shape, min(task + 1, 255), dtype=torch.uint8)
    if pattern == "max_ids":  # ids at the top of the uint8 range, around the active task
        return torch.randint(max(task - 1, 0), 256, shape, generator=generator, dtype=torch.uint8)
    raise ValueError(pattern)


def _epilogue(spec, out_features, dtype, generator):
    def vector(low, high):
        return (low + (high - low) * torch.rand(out_features, generator=generator)).to(dtype)

    bias = torch.randn(out_features, generator=generator).to(dtype) if spec["bias"] else None
    scale = vector(0.5, 1.5) if spec["scale"] else None
    shift = vector(-0.5, 0.5) if spec["shift"] else None
    return bias, scale, shift


def _poisoned(weight: torch.Tensor, task_ids: torch.Tensor, task: int, generator) -> torch.Tensor:
    """``weight`` with every element the task does not use replaced by NaN, +-Inf or a huge value."""
    unused = ~packnet_kernels.task_mask(task_ids, task)
    choices = torch.tensor([float("nan"), float("inf"), float("-inf"), 6e4, -6e4])
    poison = choices[torch.randint(0, len(choices), weight.shape, generator=generator)].to(weight.dtype)
    return torch.where(unused, poison, weight)


def _cleaned(weight: torch.Tensor, task_ids: torch.Tensor, task: int) -> torch.Tensor:
    return packnet_kernels.effective_weight(weight, task_ids, task)


def _double(tensor):
    return None if tensor is None else tensor.double()


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: a transposed copy viewed back, or a strided slice of a larger one."""
    if layout == "transposed":
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        wide = torch.zeros(*tensor.shape[:-1], tensor.shape[-1] * 2, dtype=tensor.dtype, device=tensor.device)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    return tensor


def _check_close(output: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(output.double().cpu(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ masked_linear
SIZES = st.one_of(st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 129]), st.integers(1, 140))


@st.composite
def linear_specs(draw):
    num_tasks = draw(st.one_of(st.integers(1, 4), st.sampled_from([254, 255])))
    return {
        "dtype": draw(st.sampled_from(DTYPES)),
        # () is a 1-D input; <= 16 rows take the split-K regime, more the tiled one; 0 rows an empty batch
        "lead": draw(st.sampled_from([(), (0,), (1,), (5,), (16,), (17,), (40,), (2, 3), (3, 7)])),
        "in_features": draw(SIZES),
        "out_features": draw(st.one_of(st.sampled_from([1, 31, 32, 33, 65]), st.integers(1, 70))),
        "num_tasks": num_tasks,
        "task": draw(st.integers(1, num_tasks)),
        "ids": draw(st.sampled_from(ID_PATTERNS)),
        "x_layout": draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        "weight_layout": draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        "ids_layout": draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        "bias": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "shift": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "poison": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _linear_case(**overrides):
    spec = {
        "dtype": torch.float32,
        "lead": (5,),
        "in_features": 129,
        "out_features": 33,
        "num_tasks": 3,
        "task": 2,
        "ids": "nested",
        "x_layout": "contiguous",
        "weight_layout": "contiguous",
        "ids_layout": "contiguous",
        "bias": True,
        "scale": True,
        "shift": True,
        "relu": True,
        "poison": True,
        "seed": 0,
    }
    return {**spec, **overrides}


@properties(50)
@given(spec=linear_specs())
@example(spec=_linear_case())  # split-K with a ragged last split, full epilogue, poisoned weights
@example(spec=_linear_case(lead=(40,), dtype=torch.bfloat16, in_features=65, x_layout="transposed"))  # tiled regime
@example(spec=_linear_case(lead=(0,), ids="all_free"))  # empty batch
@example(spec=_linear_case(dtype=torch.float16, num_tasks=255, task=255, ids="max_ids", lead=(2, 3)))
def test_masked_linear_matches_the_reference(spec):
    generator = torch.Generator().manual_seed(spec["seed"])
    dtype, device, task = spec["dtype"], _device(), spec["task"]
    shape = (spec["out_features"], spec["in_features"])
    x = torch.randn(*spec["lead"], spec["in_features"], generator=generator).to(dtype)
    weight = torch.randn(shape, generator=generator).to(dtype)
    task_ids = _task_ids(spec["ids"], shape, spec["num_tasks"], task, weight, generator)
    weight = torch.where(task_ids == 0, torch.zeros((), dtype=dtype), weight)  # free weights are stored as zeros
    bias, scale, shift = _epilogue(spec, spec["out_features"], dtype, generator)
    expected = packnet_kernels.masked_linear_ref(
        x.double(), weight.double(), task_ids, task, _double(bias), scale=_double(scale), shift=_double(shift),
        relu=spec["relu"],
    )  # fmt: skip

    def run(w):
        on = [None if t is None else t.to(device) for t in (x, w, task_ids, bias, scale, shift)]
        on[0] = _layout(on[0], spec["x_layout"]) if on[0].dim() >= 2 else on[0]
        on[1], on[2] = _layout(on[1], spec["weight_layout"]), _layout(on[2], spec["ids_layout"])
        return packnet_kernels.masked_linear(
            on[0], on[1], on[2], task, on[3], scale=on[4], shift=on[5], relu=spec["relu"], backend="triton"
        )

    output = run(weight)
    assert output.shape == (*spec["lead"], spec["out_features"]) and output.dtype == dtype
    _check_close(output, expected, dtype, f"masked_linear {spec}")
    if spec["poison"]:
        poisoned = run(_poisoned(weight, task_ids, task, generator))
        assert torch.equal(poisoned, run(_cleaned(weight, task_ids, task))), "unused weights changed the output"
        assert torch.equal(poisoned, output), "poisoned and clean outputs differ"


# ------------------------------------------------------------------------------------------------ masked_conv2d
@st.composite
def conv_specs(draw):
    num_tasks = draw(st.one_of(st.integers(1, 4), st.just(255)))
    groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
    cin_per_group = 1 if groups == "depthwise" else draw(st.integers(1, 6))
    cout_per_group = draw(st.integers(1, 3)) if groups == "depthwise" else draw(st.integers(1, 9))
    groups = draw(st.integers(2, 6)) if groups == "depthwise" else groups
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from(["int", "pair", "valid", "same"]))
    if padding == "same":
        stride = (1, 1)  # as F.conv2d: 'same' needs stride 1
    padding = {
        "int": draw(st.integers(0, 2)),
        "pair": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        "valid": "valid",
        "same": "same",
    }[padding]
    pads = (0, 0) if isinstance(padding, str) else ((padding, padding) if isinstance(padding, int) else padding)
    # The padded input must hold the dilated kernel: grow the image to fit.
    height = max(draw(st.integers(1, 9)), dilation[0] * (kernel[0] - 1) + 1 - 2 * pads[0])
    width = max(draw(st.integers(1, 9)), dilation[1] * (kernel[1] - 1) + 1 - 2 * pads[1])
    return {
        "dtype": draw(st.sampled_from(DTYPES)),
        "batch": draw(st.sampled_from([0, 1, 2, 3])),
        "groups": groups,
        "in_channels": cin_per_group * groups,
        "out_channels": cout_per_group * groups,
        "size": (height, width),
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "x_layout": draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
        "weight_channels_last": draw(st.booleans()),
        "num_tasks": num_tasks,
        "task": draw(st.integers(1, num_tasks)),
        "ids": draw(st.sampled_from(ID_PATTERNS)),
        "bias": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "shift": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "poison": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _conv_case(**overrides):
    spec = {
        "dtype": torch.float32,
        "batch": 2,
        "groups": 1,
        "in_channels": 3,
        "out_channels": 17,
        "size": (7, 6),
        "kernel": (3, 3),
        "stride": (1, 2),
        "padding": 1,
        "dilation": (1, 1),
        "x_layout": "contiguous",
        "weight_channels_last": False,
        "num_tasks": 3,
        "task": 2,
        "ids": "nested",
        "bias": True,
        "scale": True,
        "shift": True,
        "relu": True,
        "poison": True,
        "seed": 0,
    }
    return {**spec, **overrides}


@properties(40)
@given(spec=conv_specs())
@example(spec=_conv_case())  # implicit GEMM, tails in rows and channels
@example(spec=_conv_case(groups=2, in_channels=32, out_channels=32, size=(4, 4), x_layout="channels_last"))  # GEMM/g
@example(spec=_conv_case(groups=4, in_channels=4, out_channels=8, dtype=torch.bfloat16, padding="same", stride=1))
@example(spec=_conv_case(batch=0, ids="all_free"))  # empty batch
@example(spec=_conv_case(dtype=torch.float16, num_tasks=255, task=255, ids="max_ids", weight_channels_last=True))
def test_masked_conv2d_matches_the_reference(spec):
    generator = torch.Generator().manual_seed(spec["seed"])
    dtype, device, task = spec["dtype"], _device(), spec["task"]
    shape = (spec["out_channels"], spec["in_channels"] // spec["groups"], *spec["kernel"])
    x = torch.randn(spec["batch"], spec["in_channels"], *spec["size"], generator=generator).to(dtype)
    weight = torch.randn(shape, generator=generator).to(dtype)
    task_ids = _task_ids(spec["ids"], shape, spec["num_tasks"], task, weight, generator)
    weight = torch.where(task_ids == 0, torch.zeros((), dtype=dtype), weight)
    bias, scale, shift = _epilogue(spec, spec["out_channels"], dtype, generator)
    geometry = (spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
    expected = packnet_kernels.masked_conv2d_ref(
        x.double(), weight.double(), task_ids, task, _double(bias), *geometry, scale=_double(scale),
        shift=_double(shift), relu=spec["relu"],
    )  # fmt: skip

    def run(w):
        on_x = x.to(device)
        if spec["x_layout"] == "channels_last":
            on_x = on_x.to(memory_format=torch.channels_last)
        elif spec["x_layout"] == "sliced":  # every other image row of a taller image
            tall = torch.zeros(*x.shape[:2], x.shape[2] * 2, x.shape[3], dtype=dtype, device=device)
            tall[:, :, ::2] = on_x
            on_x = tall[:, :, ::2]
        on_w = w.to(device)
        if spec["weight_channels_last"]:
            on_w = on_w.to(memory_format=torch.channels_last)
        vectors = [None if t is None else t.to(device) for t in (bias, scale, shift)]
        return packnet_kernels.masked_conv2d(
            on_x, on_w, task_ids.to(device), task, vectors[0], *geometry, scale=vectors[1], shift=vectors[2],
            relu=spec["relu"], backend="triton",
        ), (on_x, on_w)  # fmt: skip

    output, (on_x, on_w) = run(weight)
    # Shape and memory format to match: F.conv2d in the input's dtype on CUDA (for float64 PyTorch picks the layout
    # by other rules there: a contiguous output from a channels_last weight), in float64 on the CPU.
    like_dtype = dtype if on_x.is_cuda else torch.float64
    like = F.conv2d(on_x.to(like_dtype), on_w.to(like_dtype), None, *geometry)
    assert output.shape == like.shape and output.dtype == dtype
    if output.numel() and like.dim() == 4:
        channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
        assert output.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _check_close(output, expected, dtype, f"masked_conv2d {spec}")
    if spec["poison"]:
        poisoned, _ = run(_poisoned(weight, task_ids, task, generator))
        assert torch.equal(poisoned, run(_cleaned(weight, task_ids, task))[0]), "unused weights changed the output"
        assert torch.equal(poisoned, output), "poisoned and clean outputs differ"
