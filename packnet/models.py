"""Model builders, the project's and the user's. A pack records ``{"builder": name, "kwargs": {...}}`` so that
:func:`packnet.load_pack` can rebuild the architecture without a user-supplied skeleton.

Builders are looked up by name in this process's registry only: a pack names a builder, it never names code to
import or run. A user registers their own with :func:`register_builder` before loading such a pack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "ARCH_ATTR",
    "BUILDERS",
    "INPUT_SHAPE_ATTR",
    "INPUT_SPEC_ATTR",
    "arch_spec",
    "build_model",
    "mlp",
    "module_fingerprint",
    "register_builder",
    "small_cnn",
    "small_vit",
]

ARCH_ATTR = "packnet_arch"
# Per-sample input shape (no batch dimension) a model takes, e.g. (1, 8, 8); save_pack draws its probe input from it.
INPUT_SHAPE_ATTR = "packnet_input_shape"
# What a model's inputs look like (packnet.training.input_spec: shape, dtype and value range of a tensor or of each
# keyword input); save_pack draws its default probe from it, so token models get integer probes.
INPUT_SPEC_ATTR = "packnet_input_spec"
BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_builder(name: str, fn: Callable[..., nn.Module] | None = None):
    """Register ``fn`` as the builder called ``name``; packs of its models then load without a skeleton.

    ``fn(**kwargs)`` must return an ``nn.Module``; call the returned wrapper (``register_builder(name, fn)(**kwargs)``
    or ``packnet.build_model({"builder": name, "kwargs": kwargs})``) so that the model records its spec. Keyword
    values must be JSON-serialisable (they are written into the pack). Setting ``model.packnet_input_shape`` (the
    per-sample input shape, e.g. ``(3, 32, 32)``) lets :func:`packnet.save_pack` check packs without a ``probe``.
    Without ``fn``, returns a decorator. Registering a name again replaces the earlier builder.

    Raises:
        TypeError: ``name`` is not a non-empty string or ``fn`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_builder: name must be a non-empty str, got {name!r}")

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(builder):
            raise TypeError(f"register_builder: the builder for {name!r} must be callable, got {builder!r}")

        def build(**kwargs: Any) -> nn.Module:
            model = builder(**kwargs)
            if not isinstance(model, nn.Module):
                raise TypeError(f"builder {name!r} returned a {type(model).__name__}, not an nn.Module")
            setattr(model, ARCH_ATTR, {"builder": name, "kwargs": dict(kwargs)})
            return model

        build.__name__, build.__doc__ = getattr(builder, "__name__", name), builder.__doc__
        BUILDERS[name] = build
        return build

    return register if fn is None else register(fn)


def module_fingerprint(model: nn.Module) -> list[list]:
    """The module tree of ``model`` as JSON-ready data: per module (``named_modules`` order) its qualified name, its
    class name and the shape of each parameter and persistent buffer it holds itself.

    Returns ``[[name, class_name, [[state_name, [dim, ...]], ...]], ...]``; ``""`` names the root. No values, so two
    models of one architecture have one fingerprint whatever their weights, dtype or device.
    """
    fingerprint = []
    for name, module in model.named_modules():
        state = [[key, list(param.shape)] for key, param in module._parameters.items() if param is not None]
        state += [
            [key, list(buffer.shape)]
            for key, buffer in module._buffers.items()
            if buffer is not None and key not in module._non_persistent_buffers_set
        ]
        fingerprint.append([name, type(module).__name__, state])
    return fingerprint


def arch_spec(model: nn.Module) -> dict[str, Any] | None:
    """The architecture spec a registered builder attached to ``model``, or None for a user's own model."""
    spec = getattr(model, ARCH_ATTR, None)
    return None if spec is None else {"builder": spec["builder"], "kwargs": dict(spec["kwargs"])}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its spec ``{"builder": name, "kwargs": {...}}`` by looking ``name`` up in the registry.

    Raises:
        KeyError: no builder of that name is registered in this process.
        TypeError: the kwargs do not fit the builder.
    """
    if spec["builder"] not in BUILDERS:
        raise KeyError(
            f"no model builder {spec['builder']!r} is registered in this process (known: {sorted(BUILDERS)}); call"
            f" packnet.register_builder({spec['builder']!r}, fn) first, or pass the model skeleton (model=...)"
        )
    return BUILDERS[spec["builder"]](**spec["kwargs"])


class Classifier(nn.Module):
    """``head(features(x))``: a shared trunk and a per-task classifier head named ``head``."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x):
        return self.head(self.features(x))


@register_builder("small_cnn")
def small_cnn(in_channels: int = 1, num_classes: int = 2, width: int = 16, image_size: int = 8) -> nn.Module:
    """Conv-BN-ReLU x3 (the last two with stride 2), Linear-BN-ReLU, then a ``head`` Linear.

    Input ``[N, in_channels, image_size, image_size]``; output ``[N, num_classes]``.
    """
    side = (image_size + 1) // 2
    side = (side + 1) // 2
    features = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 4 * width),
        nn.BatchNorm1d(4 * width),
        nn.ReLU(),
    )
    model = Classifier(features, nn.Linear(4 * width, num_classes))
    setattr(model, INPUT_SHAPE_ATTR, (in_channels, image_size, image_size))
    return model


@register_builder("mlp")
def mlp(in_features: int = 64, hidden: int = 64, depth: int = 2, num_classes: int = 2) -> nn.Module:
    """``depth`` x (Linear-ReLU) then a ``head`` Linear. Input ``[N, in_features]``."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    model = Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes))
    setattr(model, INPUT_SHAPE_ATTR, (in_features,))
    return model


class TokenEmbedding(nn.Module):
    """Images ``[N, C, H, W]`` as ``H`` tokens of ``C * W`` pixels each (the rows), projected to ``dim``, after a
    class token, plus learned positions: ``[N, H + 1, dim]``. The class token and positions are parameters of this
    module beside its packed projection: a pack keeps them per task."""

    def __init__(self, pixels: int, tokens: int, dim: int):
        super().__init__()
        self.project = nn.Linear(pixels, dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = images.permute(0, 2, 1, 3).flatten(2)  # [N, H, C * W]
        tokens = self.project(rows)
        return torch.cat([self.class_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.positions


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``; ``[N, S, dim]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """``head(norm(blocks(embed(x)))[:, 0])``: a ViT-style classifier whose head is named ``head``."""

    def __init__(self, embed: nn.Module, blocks: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.embed = embed
        self.blocks = blocks
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x)))[:, 0])


@register_builder("small_vit")
def small_vit(
    in_channels: int = 1, image_size: int = 8, dim: int = 32, depth: int = 2, heads: int = 4, num_classes: int = 2
) -> nn.Module:
    """A small ViT on ``[N, in_channels, image_size, image_size]`` images: each image row is one token of
    ``in_channels * image_size`` pixels (an 8x8 digit is 8 tokens of 8 pixels), a class token, learned positions,
    ``depth`` pre-norm blocks of ``nn.MultiheadAttention`` and an MLP, then a ``head`` Linear. Output
    ``[N, num_classes]``."""
    embed = TokenEmbedding(in_channels * image_size, image_size, dim)
    blocks = nn.Sequential(*(EncoderBlock(dim, heads) for _ in range(depth)))
    model = SmallViT(embed, blocks, dim, num_classes)
    setattr(model, INPUT_SHAPE_ATTR, (in_channels, image_size, image_size))
    return model
