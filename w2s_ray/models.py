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
import importlib.metadata
import importlib.util
import sys

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
    """Strided 1-D convolutions; width=25, depth=3 is the MNIST-1D reference CNN.

    The parameters are `nn.Conv1d`'s (same shapes, initialisation and state dict), but each layer
    is computed as one GEMM over its windows (`strided_conv`), not by `nn.Conv1d`. The pinned
    numerics turn oneDNN off (`w2s_ray.numerics`), which leaves torch's convolution to NNPACK
    forward and a backward that loops over the batch (about 380 small ops a step at batch 128).
    Measured on one core, width 32, depth 3, batch 128, a training step: 3.9 ms with
    `nn.Conv1d`, 2.3 ms with `unfold` windows (its backward is slow), 1.66 ms as here (2.3x).
    The outputs agree with `nn.Conv1d` to float rounding (`tests/test_models.py`), not in bits."""

    def __init__(self, in_dim: int, n_classes: int, width: int = 25, depth: int = 3):
        super().__init__()
        convs: list[nn.Module] = []
        length, ch = in_dim, 1
        for i in range(depth):
            k = 5 if i == 0 else 3
            if length < 2 or (length + 2 - k) // 2 + 1 < 1:
                # a strided layer over one position (or none) only sees padding around it
                raise ValueError(
                    f"depth {depth} leaves no positions of {in_dim} input features for conv layer {i + 1} "
                    f"(each layer halves them; at most {max_cnn_depth(in_dim)} layers fit)"
                )
            convs += [nn.Conv1d(ch, width, k, stride=2, padding=1), nn.ReLU()]
            length = (length + 2 - k) // 2 + 1
            ch = width
        self.convs = nn.Sequential(*convs)
        self.head = nn.Linear(ch * length, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(-1)  # [batch, positions, channels]: channels last, as the GEMMs want
        for layer in self.convs:
            h = strided_conv(h, layer) if isinstance(layer, nn.Conv1d) else layer(h)
        return self.head(h.transpose(-1, -2).flatten(-2))  # channel-major, as nn.Conv1d's output flattens


def strided_conv(h: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """`conv` (stride and padding as set, dilation 1, one group) on channels-last `h`
    `[..., positions, channels]`: the k shifted, strided views of the padded input side by side,
    times the kernel as one `[out, k * in]` matrix."""
    (k,), (stride,), (pad,) = conv.kernel_size, conv.stride, conv.padding
    h = nn.functional.pad(h, (0, 0, pad, pad))
    length = (h.shape[-2] - k) // stride + 1
    span = stride * (length - 1) + 1
    windows = torch.cat([h[..., j : j + span : stride, :] for j in range(k)], -1)  # [..., length, k * in]
    return nn.functional.linear(windows, conv.weight.transpose(1, 2).reshape(conv.out_channels, -1), conv.bias)


def max_cnn_depth(in_dim: int) -> int:
    """How many strided layers `CNN1d` can stack on `in_dim` positions before one sees only padding."""
    depth, length = 0, in_dim
    while length >= 2 and (length + 2 - (5 if depth == 0 else 3)) // 2 + 1 >= 1:
        length = (length + 2 - (5 if depth == 0 else 3)) // 2 + 1
        depth += 1
    return depth


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


def check_installed(name: str) -> None:
    """Refuse an import path whose top-level package is not an installed distribution (found
    *without* importing it: importing is what runs a module's code). A config's model path is code
    the driver and every worker import; a module that merely sits in the working directory or on
    PYTHONPATH (`evil:Net` beside the config) is refused unless the user allows local code."""
    if name in REGISTRY or ":" not in name:
        return
    top = name.split(":", 1)[0].split(".")[0]
    if top in importlib.metadata.packages_distributions() or top in sys.stdlib_module_names:
        return
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    where = f" from {spec.origin or list(spec.submodule_search_locations or [])[0]}" if spec else ""
    raise ConfigError(
        f"{name!r} would import {top!r}{where}, which is not an installed package; a model path "
        f"runs that module's code on the driver and every worker: install it (pip install -e), or "
        f"pass --allow-local-code to trust it"
    )


def build_model(cfg, in_dim: int, n_classes: int) -> nn.Module:
    """`cfg`: a `config.ModelConfig` (name, width, depth, kwargs)."""
    return resolve(cfg.name)(in_dim, n_classes, width=cfg.width, depth=cfg.depth, **cfg.kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CHECK_ON_CPU_PARAMS = 4_000_000
"""Models up to this many parameters are checked on the CPU (at most 16 MB of weights, built
under `torch.random.fork_rng`, so the process's random state is untouched); larger ones on the
meta device, which holds no memory but runs its forward through torch's decompositions, and
those import `torch._dynamo` (0.7 s in every `w2s-ray` process that checks a model, measured)."""


def check_model(cfg, in_dim: int, n_classes: int) -> int:
    """Build the model (on the meta device: no memory, no CUDA) and run a batch of 2 through it
    (on the CPU when it has at most `CHECK_ON_CPU_PARAMS` parameters, else on the meta device);
    return its parameter count. Any failure is a `ConfigError` saying what went wrong, so a
    model that cannot be built stops before Ray starts instead of inside an actor."""
    try:
        with torch.device("meta"):
            model = build_model(cfg, in_dim, n_classes)
        if count_params(model) <= CHECK_ON_CPU_PARAMS:
            with torch.random.fork_rng(devices=[]), torch.device("cpu"), torch.no_grad():
                out = build_model(cfg, in_dim, n_classes)(torch.zeros(2, in_dim))
        else:
            with torch.device("meta"):
                out = model(torch.empty(2, in_dim))
    except ConfigError:
        raise
    except Exception as err:  # a user model may raise anything from __init__ or forward
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{cfg.name!r} (width {cfg.width}, depth {cfg.depth}, kwargs {cfg.kwargs}) cannot be built for "
            f"{in_dim} features and {n_classes} classes: {type(err).__name__}: {msg}"
        ) from None
    if tuple(out.shape) != (2, n_classes):
        raise ConfigError(f"{cfg.name!r} maps a batch of 2 to shape {tuple(out.shape)}, not (2, {n_classes}) logits")
    return count_params(model)
