"""CIFAR ResNets (He et al. 2016, Sec. 4.2) and Wide-ResNets (Zagoruyko & Komodakis 2016)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mergejax.core.models.core import Head, batch_norm, conv_init, run_layers, scaled, to_compute
from mergejax.core.models.mlp import ConvBNReLU


def _conv(features, kernel, strides, name, dtype=None):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides, padding=pad, use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-[dropout]-conv3x3-BN + shortcut, then ReLU. The shortcut is the identity,
    or, when the stride or channel count changes, a 1x1 conv + BN projection (``shortcut="B"``)
    or, parameter-free, ``x[:, ::s, ::s]`` zero-padded along channels to ``features`` (``"A"``).
    Dropout sits between the two convs, where Wide-ResNets put it."""

    features: int
    strides: int = 1
    bn_axis_name: str | None = None
    dropout: float = 0.0
    dtype: Any = None
    shortcut: str = "B"

    @nn.compact
    def __call__(self, x, train: bool = False):
        ax, dt = self.bn_axis_name, self.dtype
        _check_shortcut(self.shortcut)
        y = nn.relu(batch_norm(train, name="bn1", axis_name=ax, dtype=dt)(_conv(self.features, 3, self.strides, "conv1", dt)(x)))
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = batch_norm(train, name="bn2", axis_name=ax, dtype=dt)(_conv(self.features, 3, 1, "conv2", dt)(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = _shortcut(x, self.features, self.strides, self.shortcut, ax, dt, train)
        return nn.relu(x + y)


def _check_shortcut(kind: str) -> str:
    if kind not in ("A", "B"):
        raise ValueError(f"unknown ResNet shortcut {kind!r}; use 'A' (subsample + zero-pad) or 'B' (1x1 conv + BN)")
    return kind


def _shortcut(x, features, strides, kind, ax, dt, train):
    """The projection of a block whose shape changes (called inside BasicBlock's compact scope)."""
    if kind == "B":
        return batch_norm(train, name="proj_bn", axis_name=ax, dtype=dt)(_conv(features, 1, strides, "proj_conv", dt)(x))
    if features < x.shape[-1]:
        raise ValueError(f"shortcut 'A' zero-pads channels, so it cannot map {x.shape[-1]} to {features} channels")
    # fb.resnet.torch option A: 1x1 average pooling with stride s, then Identity ++ MulConstant(0) channels
    x = x[:, ::strides, ::strides]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


def residual_table(stem_features: int, plan, *, pre_act: bool) -> tuple:
    """Unit table of a CIFAR (Wide-)ResNet: ``stem``, blocks ``plan = [(name, features,
    strides)]``, ``head``. Units tied by identity shortcuts share a group (the stage's
    residual stream, named after the first layer that writes it); each block's inner
    units (``<block>/hidden``) are their own group. ``pre_act``: Wide-ResNet ordering
    (BN before conv, a head BatchNorm, no stem BatchNorm, unnormalised projections)."""
    first_projects = plan[0][2] != 1 or plan[0][1] != stem_features
    stream = "stem" if first_projects else "stage1"
    rows = [("conv", ("stem", "conv"), None, stream)] + ([] if pre_act else [("norm", ("stem", "bn"), stream, stream)])
    features = stem_features
    for name, f, strides in plan:
        projects = strides != 1 or f != features
        out = name.split("_")[0] if projects else stream  # an identity shortcut ties out to in
        hidden = f"{name}/hidden"
        if pre_act:
            rows += [("norm", (name, "bn1"), stream, stream), ("norm", (name, "bn2"), hidden, hidden)]
        else:
            rows += [("norm", (name, "bn1"), hidden, hidden), ("norm", (name, "bn2"), out, out)]
        rows += [("conv", (name, "conv1"), stream, hidden), ("conv", (name, "conv2"), hidden, out)]
        if projects:
            rows.append(("conv", (name, "proj_conv"), stream, out))
            if not pre_act:
                rows.append(("norm", (name, "proj_bn"), out, out))
        stream, features = out, f
    if pre_act:
        rows.append(("norm", ("head", "bn"), stream, stream))
    return (*rows, ("dense", ("head", "dense"), stream, None))


def _stage_plan(n: int, widths):
    """[(name, features, strides)] for 3 stages of n blocks; stage s>0 starts with stride 2."""
    return [(f"stage{s + 1}_block{b}", w, 2 if (s > 0 and b == 0) else 1) for s, w in enumerate(widths) for b in range(n)]


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2): ``stem`` (conv 16), 3 stages of n BasicBlocks with 16/32/64
    channels (x ``widen`` x ``width``), ``head`` (global average pool + Dense).

    depth 20/32/44/56/110 -> n = 3/5/7/9/18. Input (B, 32, 32, 3) -> (B, num_classes).
    ``widen=4``, depth 32: the snapshot-ensembles paper's "Wide-ResNet-32" (every conv, the
    stem included, 4x wider; post-activation blocks as in fb.resnet.torch). ``dropout`` > 0
    needs a ``'dropout'`` rng in training. ``bn_axis_name``: synchronised BatchNorm over that
    named axis (None: per-device). ``dtype``: compute dtype (see :class:`~mergejax.core.models.MLP`).
    ``shortcut``: "B" (default; 1x1 conv + BN projections) or "A" (parameter-free: subsample and
    zero-pad channels; He et al. 2016 Sec. 4.2, fb.resnet.torch's CIFAR default). "A" has no unit
    table: it cannot be aligned, merged or gated.
    """

    num_classes: int
    depth: int = 20
    width: float = 1.0
    bn_axis_name: str | None = None
    widen: int = 1
    dropout: float = 0.0
    dtype: Any = None
    shortcut: str = "B"

    def _plan(self):
        _check_shortcut(self.shortcut)
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {self.depth}")
        return _stage_plan((self.depth - 2) // 6, [scaled(c * self.widen, self.width) for c in (16, 32, 64)])

    def layer_names(self) -> tuple[str, ...]:
        return ("stem",) + tuple(name for name, _, _ in self._plan()) + ("head",)

    def unit_table(self) -> tuple:
        """See :func:`residual_table`. ``shortcut="A"``: NotImplementedError."""
        plan = self._plan()
        if self.shortcut == "A":  # a zero-padded shortcut ties only the first C_in units of the next stream to the last
            raise NotImplementedError("ResNet shortcut='A' has no unit table: its zero-padded shortcuts tie part of a stage's "
                                      "units to the previous stage, which a unit group cannot express; merging, re-basin "
                                      "and gates support shortcut='B' only")
        return residual_table(scaled(16 * self.widen, self.width), plan, pre_act=False)

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        ax, dt = self.bn_axis_name, self.dtype
        layers = [ConvBNReLU(scaled(16 * self.widen, self.width), bn_axis_name=ax, dtype=dt, name="stem")]
        layers += [BasicBlock(f, s, bn_axis_name=ax, dropout=self.dropout, dtype=dt, shortcut=self.shortcut, name=name)
                   for name, f, s in self._plan()]
        return run_layers(layers + [Head(self.num_classes, bn_axis_name=ax, dtype=dt, name="head")], to_compute(x, dt), train, frozen)


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus the
    identity or a 1x1 conv of the activated input when the shape changes."""

    features: int
    strides: int = 1
    dropout: float = 0.0
    bn_axis_name: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        ax, dt = self.bn_axis_name, self.dtype
        a = nn.relu(batch_norm(train, name="bn1", axis_name=ax, dtype=dt)(x))
        y = _conv(self.features, 3, self.strides, "conv1", dt)(a)
        y = nn.relu(batch_norm(train, name="bn2", axis_name=ax, dtype=dt)(y))
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = _conv(self.features, 3, 1, "conv2", dt)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.strides, "proj_conv", dt)(a)
        return x + y


class WideResNet(nn.Module):
    """WRN-depth-k: ``stem`` conv 16, 3 stages of (depth-4)/6 pre-activation blocks with
    16k/32k/64k channels, ``head`` (BN-ReLU, pool, Dense). WRN-28-10 has ~36.5M params.

    ``dropout`` > 0 needs a ``'dropout'`` rng in training. ``bn_axis_name``: synchronised
    BatchNorm over that named axis (None: per-device). ``dtype``: compute dtype (see
    :class:`~mergejax.core.models.MLP`).
    """

    num_classes: int
    depth: int = 28
    widen: int = 10
    dropout: float = 0.0
    width: float = 1.0
    bn_axis_name: str | None = None
    dtype: Any = None

    def _plan(self):
        if (self.depth - 4) % 6:
            raise ValueError(f"Wide-ResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {self.depth}")
        widths = [scaled(c * self.widen, self.width) for c in (16, 32, 64)]
        return _stage_plan((self.depth - 4) // 6, widths)

    def layer_names(self) -> tuple[str, ...]:
        return ("stem",) + tuple(name for name, _, _ in self._plan()) + ("head",)

    def unit_table(self) -> tuple:
        """See :func:`residual_table`."""
        return residual_table(scaled(16, self.width), self._plan(), pre_act=True)

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        ax, dt = self.bn_axis_name, self.dtype
        layers = [_Stem(scaled(16, self.width), dt, name="stem")]
        layers += [WideBlock(f, s, self.dropout, bn_axis_name=ax, dtype=dt, name=name) for name, f, s in self._plan()]
        head = Head(self.num_classes, pre_norm=True, bn_axis_name=ax, dtype=dt, name="head")
        return run_layers(layers + [head], to_compute(x, dt), train, frozen)


class _Stem(nn.Module):
    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        return _conv(self.features, 3, 1, "conv", self.dtype)(x)
