"""Conv-BN(-ReLU) and Linear-BN folding found in the torch.fx graph, anywhere in the model, with the nn.Sequential
rule as the fallback for models that cannot be traced."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import packnet
from packnet.pruning import magnitude_task_ids

NUM_TASKS = 2


class BasicBlock(nn.Module):
    """ResNet's basic block as torchvision writes it: BatchNorms reached through ``forward`` code, one ReLU module
    called twice, an optional ``downsample`` Sequential and a residual sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18's module tree (20 BatchNorms) at a small width, with its own stem ReLU module."""

    def __init__(self, width: int = 4, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], width
        for stage, out_channels in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if stage == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels))
            )
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvUsedTwice(nn.Module):
    """The conv's output feeds the BatchNorm and the sum: folding would change what the sum sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z))


class NormReadDirectly(nn.Module):
    """forward reads the BatchNorm's weight itself: the BatchNorm must stay a module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.weight.view(1, -1, 1, 1)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


def _randomize_norms_(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return model.eval()


def _loaded(make, tmp_path, fuse: bool = True) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(packed unfused model, the same pack loaded with ``fuse``, a probe): every Conv2d/Linear packed."""
    torch.manual_seed(0)
    model = _randomize_norms_(make())
    ids = {
        name: magnitude_task_ids(module.weight, NUM_TASKS, 0.5)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    packed = packnet.swap_packed_(model, ids, NUM_TASKS, backend="reference")
    probe = torch.randn(2, 3, 8, 8)
    packnet.save_pack(packed, tmp_path / "model.pack", probe=probe)
    torch.manual_seed(1)
    return packed, packnet.load_pack(tmp_path / "model.pack", model=make(), fuse=fuse, backend="reference"), probe


def _assert_same_outputs(unfused, fused, probe):
    with torch.no_grad():
        for task in range(1, NUM_TASKS + 1):
            with packnet.set_task(unfused, task), packnet.set_task(fused, task):
                torch.testing.assert_close(fused(probe), unfused(probe), rtol=1e-4, atol=1e-4)


def test_every_batchnorm_of_a_resnet18_is_folded(tmp_path):
    unfused, fused, probe = _loaded(ResNet18, tmp_path)
    assert fused.packnet_folding == {"norms": 20, "folded": 20, "method": "fx"}
    assert not any(isinstance(module, nn.BatchNorm2d) for module in fused.modules())
    assert fused.conv1.relu and isinstance(fused.relu, nn.Identity)  # the stem's own ReLU is fused
    block = fused.layer2[0]
    # The block's ReLU module runs twice (after bn1 and after the sum), so it stays and is fused nowhere.
    assert not block.conv1.relu and type(block.relu) is nn.ReLU and block.downsample[0].scale is not None
    _assert_same_outputs(unfused, fused, probe)


def test_the_sequential_rule_alone_finds_3_of_20(tmp_path, monkeypatch):
    def cannot_trace(self, root, concrete_args=None):
        raise RuntimeError("tracing switched off for this test")

    monkeypatch.setattr("packnet.pack._PackedTracer.trace", cannot_trace)
    unfused, fused, probe = _loaded(ResNet18, tmp_path)
    assert fused.packnet_folding["folded"] == 3 and fused.packnet_folding["method"] == "sequential"
    _assert_same_outputs(unfused, fused, probe)


def test_conv_output_used_elsewhere_is_not_folded(tmp_path):
    unfused, fused, probe = _loaded(ConvUsedTwice, tmp_path)
    assert fused.packnet_folding == {"norms": 2, "folded": 1, "method": "fx"}
    assert fused.conv.scale is None and type(fused.bn) is nn.BatchNorm2d
    assert fused.conv2.scale is not None and isinstance(fused.bn2, nn.Identity)
    _assert_same_outputs(unfused, fused, probe)


def test_batchnorm_whose_parameters_forward_reads_is_not_folded(tmp_path):
    unfused, fused, probe = _loaded(NormReadDirectly, tmp_path)
    assert fused.packnet_folding == {"norms": 1, "folded": 0, "method": "fx"}
    assert type(fused.bn) is nn.BatchNorm2d
    _assert_same_outputs(unfused, fused, probe)


def test_untraceable_model_falls_back_to_sequential_folding_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="packnet.pack"):
        unfused, fused, probe = _loaded(Untraceable, tmp_path)
    folding = fused.packnet_folding
    assert folding["norms"] == 2 and folding["folded"] == 1 and folding["method"] == "sequential"
    assert "symbolically traced variables cannot be used as inputs to control flow" in folding["reason"]
    assert "cannot trace Untraceable with torch.fx" in caplog.text and folding["reason"] in caplog.text
    assert fused.body[0].scale is not None and fused.body[0].relu and type(fused.bn) is nn.BatchNorm2d
    _assert_same_outputs(unfused, fused, probe)


def test_per_task_batchnorms_fold_in_a_residual_block_from_the_trainer():
    torch.manual_seed(0)
    net = nn.Sequential(BasicBlock(3, 4, stride=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    trainer = packnet.PackNet(net, head="2")
    generator = torch.Generator().manual_seed(1)
    for _ in range(NUM_TASKS):
        data = [(torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 2, (8,), generator=generator))]
        trainer.learn_task(data, lambda params: torch.optim.SGD(params, lr=0.1), 2, show_progress=False)
    fused = packnet.compile_pack(trainer, backend="reference")
    assert fused.packnet_folding == {"norms": 3, "folded": 3, "method": "fx"}
    x = torch.randn(3, 3, 8, 8)
    for task in range(1, NUM_TASKS + 1):
        with torch.no_grad(), packnet.set_task(fused, task):
            torch.testing.assert_close(fused(x), trainer.predict(x, task), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fuse", [False, True])
def test_unfused_load_reports_no_folding(tmp_path, fuse):
    _, loaded, _ = _loaded(ConvUsedTwice, tmp_path, fuse=fuse)
    assert loaded.packnet_folding["folded"] == (1 if fuse else 0) and loaded.packnet_folding["norms"] == 2
