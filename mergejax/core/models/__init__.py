"""Flax Linen models. Build one by name with :func:`make_model`."""

from __future__ import annotations

import functools

import flax.linen as nn

from mergejax.core.models.core import apply_model, count_params, init_variables, run_layers, scaled
from mergejax.core.models.mlp import MLP, SmallCNN
from mergejax.core.models.resnet import ResNet, WideResNet
from mergejax.core.models.vgg import VGG

MODELS = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet": ResNet,
    **{f"resnet{d}": functools.partial(ResNet, depth=d) for d in (20, 32, 44, 56, 110)},
    "wrn": WideResNet,
    "vgg": VGG,
    **{f"vgg{d}": functools.partial(VGG, depth=d) for d in (11, 13, 16, 19)},
}


def make_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a model by name, e.g. ``make_model('resnet20', 10, width=2.0)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = [
    "MLP", "SmallCNN", "ResNet", "WideResNet", "VGG", "MODELS", "make_model",
    "init_variables", "apply_model", "count_params", "run_layers", "scaled",
]
