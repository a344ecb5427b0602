"""Flax Linen models. Build one by name with :func:`make_model`."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from mergejax.core.models.core import apply_model, count_params, init_variables, run_layers, scaled
from mergejax.core.models.densenet import DenseNet
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
    # The papers' networks (docs in each class):
    # snapshot ensembles (Huang et al. 2017) Table 1: "Wide-ResNet-32" = ResNet-32 with every conv 4x wider.
    "wrn32_4": functools.partial(ResNet, depth=32, widen=4),
    # DenseNet-40 (k=12) and DenseNet-100 (k=24), basic layers, no compression; their single-model errors in
    # the snapshot paper (5.24 / 24.42, 3.74 / 19.25) are the DenseNet paper's rows for these basic networks.
    "densenet40": functools.partial(DenseNet, depth=40, growth=12),
    "densenet100": functools.partial(DenseNet, depth=100, growth=24),
    # FreezeOut's default: DenseNet-BC L=76, k=12 (bottleneck, compression 0.5; ajbrock/FreezeOut densenet.py).
    "densenet_bc76": functools.partial(DenseNet, depth=76, growth=12, bottleneck=True, compression=0.5),
    # The merging paper's CIFAR-10 VGG-11: conv-ReLU, no BatchNorm, no biases (authors' cifar10_vgg11/teacher.py).
    "vgg11_nobn": functools.partial(VGG, depth=11, norm=False, bias=False),
}


def make_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a model by name, e.g. ``make_model('resnet20', 10, width=2.0)``. List arguments
    (``--set model_kwargs.hidden=[16,8]``) become tuples, so the model is hashable and equal
    configs share compiled steps. ``dtype`` (compute dtype) may be a name (``"bfloat16"``,
    ``"float32"``) or a dtype; ``None`` (default) computes in the parameters' dtype."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if kwargs.get("dtype") is not None:
        kwargs["dtype"] = compute_dtype(kwargs["dtype"])
    return MODELS[name](num_classes=num_classes, **kwargs)


#: Training precisions (``train_config().precision``) -> model compute dtype (None: the parameters',
#: float32, i.e. the model exactly as without a precision). Parameters, optimizer state, BatchNorm
#: statistics and the loss stay float32 in both.
PRECISIONS = {"fp32": None, "bf16": "bfloat16"}


def compute_dtype(dtype) -> jnp.dtype:
    """``dtype`` (a name such as ``"bfloat16"``, or a dtype) as a floating ``jnp.dtype``; one
    canonical value, so models built from a config string and from ``jnp.bfloat16`` compare equal."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown model dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"model dtype must be floating point, got {dt.name}")
    return dt


def precision_dtype(precision: str) -> jnp.dtype | None:
    """The model ``dtype`` of a training ``precision``: ``"fp32"`` -> None (the default: float32
    parameters, float32 compute), ``"bf16"`` -> bfloat16."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    return None if PRECISIONS[precision] is None else compute_dtype(PRECISIONS[precision])


__all__ = [
    "MLP", "SmallCNN", "ResNet", "WideResNet", "VGG", "DenseNet", "MODELS", "make_model",
    "PRECISIONS", "compute_dtype", "precision_dtype",
    "init_variables", "apply_model", "count_params", "run_layers", "scaled",
]
