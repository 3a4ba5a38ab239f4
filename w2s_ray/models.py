"""Model families with one explicit capacity knob each, and a registry.

Every model maps float features `[batch, in_dim]` to logits `[batch, n_classes]`, so teachers,
students and user models are interchangeable. A user model is named by import path
`package.module:Class` in the config and imported only then: `config.ModelConfig` resolves every
name while a config is validated, so a bad one stops before Ray starts. This module does not
import the config (the config imports it); `build_model` takes any object with `name`, `width`,
`depth` and `kwargs`.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from w2s_ray.errors import ConfigError


class MLP(nn.Module):
    """`depth` hidden layers of `width` units with ReLU."""

    def __init__(self, in_dim: int, n_classes: int, width: int = 32, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """Strided 1-D convolutions; width=25, depth=3 is the MNIST-1D reference CNN."""

    def __init__(self, in_dim: int, n_classes: int, width: int = 25, depth: int = 3):
        super().__init__()
        convs: list[nn.Module] = []
        length, ch = in_dim, 1
        for i in range(depth):
            k = 5 if i == 0 else 3
            convs += [nn.Conv1d(ch, width, k, stride=2, padding=1), nn.ReLU()]
            length = (length + 2 - k) // 2 + 1
            ch = width
        self.convs = nn.Sequential(*convs)
        self.head = nn.Linear(ch * length, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x.unsqueeze(-2))
        return self.head(h.flatten(-2))


class Logistic(nn.Module):
    """Multinomial logistic regression; width and depth are ignored."""

    def __init__(self, in_dim: int, n_classes: int, width: int = 0, depth: int = 0):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


REGISTRY: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn1d": CNN1d, "logistic": Logistic}


def resolve(name: str) -> type[nn.Module]:
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise ConfigError(
            f"{name!r} is not one of {sorted(REGISTRY)} nor an import path 'package.module:Class'"
        )
    mod_name, cls_name = name.split(":", 1)
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{name!r} could not be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{name!r} is not a torch.nn.Module subclass")
    return cls


def build_model(cfg, in_dim: int, n_classes: int) -> nn.Module:
    """`cfg`: a `config.ModelConfig` (name, width, depth, kwargs)."""
    return resolve(cfg.name)(in_dim, n_classes, width=cfg.width, depth=cfg.depth, **cfg.kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
