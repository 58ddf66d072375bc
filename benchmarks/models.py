"""VGG-16, ResNet-50 and a BERT-base encoder written with torch.nn (torchvision and transformers are not
dependencies), and the three ways of serving a 3-task PackNet version of them that the model benchmarks compare.

Module names follow the usual layout (``features.2``, ``layer3.1.conv2``, ``fc``) so that ``shapes.py`` can name
layers the way people know them. ``width`` scales every channel count, which gives the tiny CPU variants.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from packnet_kernels import effective_weight

VGG16_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class VGG16(nn.Module):
    """VGG-16 (configuration D, no BatchNorm): 13 3x3 convs in 5 stages, adaptive 7x7 pool, 3 fully connected."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in VGG16_CHANNELS:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_channels = _scaled(entry, width)
                layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = _scaled(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in ResNet v1.5), 1x1 expand by 4, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50: 7x7/2 stem, max pool, bottleneck stages of 3, 4, 6, 3 blocks, global average pool, fc."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        stem = _scaled(64, width)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem
        stages = []
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            planes = _scaled(planes, width)
            stage = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(Bottleneck(in_channels, planes, stride))
                in_channels = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_weights(model: nn.Module) -> None:
    # He initialisation keeps activations O(1) through the ReLUs, so fp16 neither overflows nor underflows.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.01)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.normal_(module.bias, std=0.01)


class BertLayer(nn.Module):
    """One BERT encoder layer (post-norm): self-attention through ``query``/``key``/``value``/``output`` projections
    and ``F.scaled_dot_product_attention``, then the GELU feed-forward ``intermediate`` -> ``out``."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, ffn)
        self.out = nn.Linear(ffn, hidden)
        self.output_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape

        def heads(projection: nn.Module) -> torch.Tensor:
            return projection(x).view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value))
        x = self.attention_norm(x + self.output(attended.transpose(1, 2).reshape(batch, length, hidden)))
        return self.output_norm(x + self.out(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """The encoder of BERT-base (12 layers, hidden 768, 12 heads, feed-forward 3072) on hidden states ``[B, S, H]``
    (no embeddings or pooler: every linear layer of the model, none of its lookups). ``width`` scales the hidden and
    feed-forward sizes (heads of 64 features), ``layers`` the depth."""

    def __init__(self, layers: int = 12, width: float = 1.0):
        super().__init__()
        hidden = max(64, _scaled(768, width) // 64 * 64)
        self.hidden = hidden
        self.layers = nn.ModuleList(BertLayer(hidden, hidden // 64, 4 * hidden) for _ in range(layers))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# The image models the layer and model benchmarks build by name (BertEncoder takes hidden states, not images).
BUILDERS = {"vgg16": VGG16, "resnet50": ResNet50}


def build(name: str, width: float = 1.0, num_classes: int = 1000, **factory) -> nn.Module:
    """``BUILDERS[name]`` in eval mode, moved to ``factory`` (``device``/``dtype``)."""
    return BUILDERS[name](num_classes=num_classes, width=width).to(**factory).eval()


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}


def traced_layers(model: nn.Module, image_size: int = 224) -> dict[str, tuple]:
    """``{name: (op, in, out, kernel, stride, padding, input_hw)}`` for every prunable layer, from one forward pass
    on the meta device (no memory, no arithmetic). ``input_hw`` is 0 for linear layers."""
    model = copy.deepcopy(model).to("meta")
    found: dict[str, tuple] = {}
    hooks = []
    for name, module in prunable_layers(model).items():

        def record(module, inputs, name=name):
            if isinstance(module, nn.Linear):
                found[name] = ("linear", module.in_features, module.out_features, 1, 1, 0, 0)
            else:
                found[name] = (
                    "conv2d",
                    module.in_channels,
                    module.out_channels,
                    module.kernel_size[0],
                    module.stride[0],
                    module.padding[0],
                    inputs[0].shape[-1],
                )

        hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    return found


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of the batch ``x`` (one cumulative pass), so that the random
    network's activations stay normalised in eval mode instead of growing block after block."""
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    if not norms:
        return model
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    model(x)
    model.eval()
    for norm in norms:
        norm.momentum = 0.1
    return model


def magnitude_ids(model: nn.Module, num_tasks: int, prune_ratio: float) -> dict[str, torch.Tensor]:
    """Task ids of every prunable layer from nested magnitude pruning of its (random) weight."""
    from packnet.pruning import magnitude_task_ids

    return {
        name: magnitude_task_ids(module.weight.detach(), num_tasks, prune_ratio)
        for name, module in prunable_layers(model).items()
    }


def packed_copy(model: nn.Module, task_ids: dict[str, torch.Tensor], num_tasks: int, backend: str) -> nn.Module:
    """A copy of ``model`` with every prunable layer swapped for its packed twin running on ``backend``.

    ``backend="reference"`` is the dense-masking yardstick: every forward builds ``where(mask_t, W, 0)`` in memory
    and calls cuBLAS/cuDNN on it, from exactly the same stored weight and ids as the packed kernels.
    """
    import packnet

    return packnet.swap_packed_(copy.deepcopy(model), task_ids, num_tasks, backend=backend).eval()


def dense_copies(model: nn.Module, task_ids: dict[str, torch.Tensor], num_tasks: int) -> list[nn.Module]:
    """One plain copy of ``model`` per task whose prunable weights are pre-masked for that task (T x the memory)."""
    copies = []
    for task in range(1, num_tasks + 1):
        task_model = copy.deepcopy(model)
        with torch.no_grad():
            for name, module in prunable_layers(task_model).items():
                module.weight.copy_(effective_weight(module.weight, task_ids[name], task))
        copies.append(task_model.eval())
    return copies


def state_bytes(*models: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of ``models`` (what serving them keeps in memory)."""
    seen: dict[tuple, int] = {}
    for model in models:
        for tensor in (*model.parameters(), *model.buffers()):
            seen[(tensor.device, tensor.data_ptr())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
