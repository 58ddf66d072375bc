"""Layer shape tables: every distinct conv/linear shape of VGG-16 and ResNet-50 at 224x224, a transformer MLP, the
tiny CPU shapes, and the subset of them that the GPU matrix runs per dtype.

A shape is named after the first module of its model that has it (``vgg16.features.2``); ``count`` says how many
modules of that model share it. ``test_layers.test_shape_tables_match_models`` traces the models of ``models.py`` on
the meta device and checks these tables against them, so a typo here fails CI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

NUM_TASKS = 3
PRUNE_RATIO = 0.5  # task 1 keeps 50 % of the weights, task 2 half of the rest, task 3 half of what is left
TASKS = (1, 2, 3)  # the first, a middle and the last task
BATCHES = (1, 8, 64, 256)


@dataclass(frozen=True)
class LayerShape:
    """One conv2d or linear layer shape. For a linear layer ``in_ch``/``out_ch`` are the features and the batch is
    the number of rows (tokens); for a conv the input is ``[batch, in_ch, hw, hw]`` (square images)."""

    name: str
    op: str  # "linear" or "conv2d"
    in_ch: int
    out_ch: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    hw: int = 0
    count: int = 1
    groups: int = 1

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.op == "linear":
            return (self.out_ch, self.in_ch)
        return (self.out_ch, self.in_ch // self.groups, self.kernel, self.kernel)

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.in_ch) if self.op == "linear" else (batch, self.in_ch, self.hw, self.hw)

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.out_ch) if self.op == "linear" else (batch, self.out_ch, self.out_hw, self.out_hw)

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the dense op (a masked weight does the same work on the tensor cores)."""
        if self.op == "linear":
            return 2 * batch * self.out_ch * self.in_ch
        return 2 * batch * self.out_hw**2 * self.out_ch * (self.in_ch // self.groups) * self.kernel**2

    def conv_args(self) -> tuple[int, int, int, int]:
        """``(stride, padding, dilation, groups)`` for ``masked_conv2d``/``F.conv2d``."""
        return self.stride, self.padding, 1, self.groups

    def describe(self) -> str:
        if self.op == "linear":
            return f"{self.in_ch}->{self.out_ch}"
        stride = f" s{self.stride}" if self.stride != 1 else ""
        return f"{self.in_ch}->{self.out_ch} {self.kernel}x{self.kernel}{stride} @{self.hw}"


def conv_shape(name, in_ch, out_ch, kernel, hw, stride=1, padding=None, count=1, groups=1) -> LayerShape:
    """A conv layer shape; ``padding`` defaults to ``kernel // 2`` (same size at stride 1)."""
    padding = kernel // 2 if padding is None else padding
    return LayerShape(name, "conv2d", in_ch, out_ch, kernel, stride, padding, hw, count, groups)


def linear_shape(name, in_features, out_features, count=1) -> LayerShape:
    return LayerShape(name, "linear", in_features, out_features, count=count)


VGG16 = (
    conv_shape("vgg16.features.0", 3, 64, 3, 224),
    conv_shape("vgg16.features.2", 64, 64, 3, 224),
    conv_shape("vgg16.features.5", 64, 128, 3, 112),
    conv_shape("vgg16.features.7", 128, 128, 3, 112),
    conv_shape("vgg16.features.10", 128, 256, 3, 56),
    conv_shape("vgg16.features.12", 256, 256, 3, 56, count=2),
    conv_shape("vgg16.features.17", 256, 512, 3, 28),
    conv_shape("vgg16.features.19", 512, 512, 3, 28, count=2),
    conv_shape("vgg16.features.24", 512, 512, 3, 14, count=3),
    linear_shape("vgg16.classifier.0", 512 * 7 * 7, 4096),
    linear_shape("vgg16.classifier.3", 4096, 4096),
    linear_shape("vgg16.classifier.6", 4096, 1000),
)

# ResNet-50 v1.5 (the stride sits on the 3x3 conv of each stage's first bottleneck).
RESNET50 = (
    conv_shape("resnet50.conv1", 3, 64, 7, 224, stride=2),
    conv_shape("resnet50.layer1.0.conv1", 64, 64, 1, 56),
    conv_shape("resnet50.layer1.0.conv2", 64, 64, 3, 56, count=3),
    conv_shape("resnet50.layer1.0.conv3", 64, 256, 1, 56, count=4),  # the three conv3 and the first downsample
    conv_shape("resnet50.layer1.1.conv1", 256, 64, 1, 56, count=2),
    conv_shape("resnet50.layer2.0.conv1", 256, 128, 1, 56),
    conv_shape("resnet50.layer2.0.conv2", 128, 128, 3, 56, stride=2),
    conv_shape("resnet50.layer2.0.conv3", 128, 512, 1, 28, count=4),
    conv_shape("resnet50.layer2.0.downsample.0", 256, 512, 1, 56, stride=2),
    conv_shape("resnet50.layer2.1.conv1", 512, 128, 1, 28, count=3),
    conv_shape("resnet50.layer2.1.conv2", 128, 128, 3, 28, count=3),
    conv_shape("resnet50.layer3.0.conv1", 512, 256, 1, 28),
    conv_shape("resnet50.layer3.0.conv2", 256, 256, 3, 28, stride=2),
    conv_shape("resnet50.layer3.0.conv3", 256, 1024, 1, 14, count=6),
    conv_shape("resnet50.layer3.0.downsample.0", 512, 1024, 1, 28, stride=2),
    conv_shape("resnet50.layer3.1.conv1", 1024, 256, 1, 14, count=5),
    conv_shape("resnet50.layer3.1.conv2", 256, 256, 3, 14, count=5),
    conv_shape("resnet50.layer4.0.conv1", 1024, 512, 1, 14),
    conv_shape("resnet50.layer4.0.conv2", 512, 512, 3, 14, stride=2),
    conv_shape("resnet50.layer4.0.conv3", 512, 2048, 1, 7, count=3),
    conv_shape("resnet50.layer4.0.downsample.0", 1024, 2048, 1, 14, stride=2),
    conv_shape("resnet50.layer4.1.conv1", 2048, 512, 1, 7, count=2),
    conv_shape("resnet50.layer4.1.conv2", 512, 512, 3, 7, count=2),
    linear_shape("resnet50.fc", 2048, 1000),
)

# The up projection of a LLaMA-7B-sized MLP; the batch is the number of tokens.
TRANSFORMER = (linear_shape("transformer.mlp.up", 4096, 11008),)

# Small enough for the reference path on a 2-core CPU, large enough to have several tiles and every task id.
TINY = (
    linear_shape("tiny.linear", 40, 72),
    conv_shape("tiny.conv", 6, 10, 3, 9),
)

ALL_SHAPES = {shape.name: shape for shape in (*VGG16, *RESNET50, *TRANSFORMER, *TINY)}

# The GPU matrix. fp16 covers every kind of layer: a large-image conv, a deep conv, the 7x7 stride-2 stem, a 1x1,
# a 3x3 at 56x56, the 100M-weight fc6 and the transformer MLP. bf16 and fp32 rerun a representative linear and conv
# only, so that the whole matrix (with the Triton autotuning it triggers) stays within about 8 minutes of H100 time.
GPU_MATRIX = {
    torch.float16: (
        "vgg16.features.2",
        "vgg16.features.24",
        "vgg16.classifier.0",
        "resnet50.conv1",
        "resnet50.layer1.0.conv2",
        "resnet50.layer3.1.conv1",
        "transformer.mlp.up",
    ),
    torch.bfloat16: ("resnet50.layer3.1.conv2", "transformer.mlp.up"),
    torch.float32: ("resnet50.layer3.1.conv2", "transformer.mlp.up"),
}

# torch.compile(max-autotune) compiles and autotunes once per shape (tens of seconds each), so only a few cases
# run it: what matters is whether Inductor fuses the mask, and its latency at a small and a large batch.
COMPILE_CASES = {
    ("transformer.mlp.up", torch.float16, 1),
    ("transformer.mlp.up", torch.float16, 64),
    ("resnet50.layer1.0.conv2", torch.float16, 64),
}

# The CPU subset: run by CI with --benchmark-disable and by `packnet bench --quick`.
CPU_SHAPES = ("tiny.linear", "tiny.conv")
CPU_DTYPES = (torch.float32,)
CPU_BATCHES = (1, 8)
CPU_COMPILE_CASES = {("tiny.linear", torch.float32, 8)}

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def quick_mode() -> bool:
    """True when the suite runs the CPU subset: always without CUDA, on a GPU when ``PACKNET_BENCH_QUICK=1``."""
    return os.environ.get("PACKNET_BENCH_QUICK", "0") == "1" or not torch.cuda.is_available()
