"""The project's own model builders. A pack records ``{"builder": name, "kwargs": {...}}`` so that
:func:`packnet.load_pack` can rebuild the architecture without a user-supplied skeleton."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

__all__ = ["ARCH_ATTR", "BUILDERS", "arch_spec", "build_model", "mlp", "register_builder", "small_cnn"]

ARCH_ATTR = "packnet_arch"
BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_builder(name: str):
    """Decorator: register a builder whose model is rebuilt from ``{"builder": name, "kwargs": kwargs}``."""

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(**kwargs: Any) -> nn.Module:
            model = builder(**kwargs)
            setattr(model, ARCH_ATTR, {"builder": name, "kwargs": dict(kwargs)})
            return model

        build.__name__, build.__doc__ = builder.__name__, builder.__doc__
        BUILDERS[name] = build
        return build

    return register


def arch_spec(model: nn.Module) -> dict[str, Any] | None:
    """The architecture spec a registered builder attached to ``model``, or None for a user's own model."""
    spec = getattr(model, ARCH_ATTR, None)
    return None if spec is None else {"builder": spec["builder"], "kwargs": dict(spec["kwargs"])}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its spec. Raises ``KeyError`` for an unknown builder, ``TypeError`` for bad kwargs."""
    if spec["builder"] not in BUILDERS:
        raise KeyError(f"unknown model builder {spec['builder']!r}; known: {sorted(BUILDERS)}")
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
    return Classifier(features, nn.Linear(4 * width, num_classes))


@register_builder("mlp")
def mlp(in_features: int = 64, hidden: int = 64, depth: int = 2, num_classes: int = 2) -> nn.Module:
    """``depth`` x (Linear-ReLU) then a ``head`` Linear. Input ``[N, in_features]``."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes))
