"""DenseNets for CIFAR (Huang, Liu, van der Maaten & Weinberger 2017): basic and BC.

A dense layer reads the concatenation of its block's input and every earlier layer's
``growth`` new channels. Each of those segments is its own unit group, so the unit table
keeps one group per parameter axis: a BatchNorm over a concatenation is per channel, and a
conv over a concatenation is the sum of one conv per segment. Every consumer of a
concatenation therefore holds an ``in{j}_bn`` and an ``in{j}_conv`` (``in{j}_dense`` in the
head) per segment ``j``: its slices of the BatchNorm and of the kernel, the same parameters
(and count) as one BatchNorm and one conv over the concatenated input. Alignment,
concatenation, gating and compression read the table like any other model's. The price: one
conv per (consumer, segment) pair, so more (smaller) kernels and a longer trace than one conv
per layer (DenseNet-100: ~1,700 convs per forward; same FLOPs).

Activations between layers are a tuple of segments ``(block input, new_0, new_1, ...)``;
a transition returns a 1-tuple.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mergejax.core.models.core import batch_norm, conv_init, run_layers, scaled, to_compute, to_logits


def _conv(features, kernel, name, dtype=None):
    return nn.Conv(features, (kernel, kernel), padding=kernel // 2, use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


def _read(segments, features, kernel, train, axis_name, dtype=None):
    """conv(relu(bn(concat(segments)))) as a sum over segments: sub-layers ``in{j}_bn`` and
    ``in{j}_conv`` of the calling module for segment j (B, H, W, c_j) -> (B, H, W, features)."""
    out = 0.0
    for j, s in enumerate(segments):
        a = nn.relu(batch_norm(train, name=f"in{j}_bn", axis_name=axis_name, dtype=dtype)(s))
        out = out + _conv(features, kernel, f"in{j}_conv", dtype)(a)
    return out


class DenseLayer(nn.Module):
    """Basic: BN-ReLU-conv3x3(growth)-[dropout]. Bottleneck (BC): BN-ReLU-conv1x1(4 growth)-
    [dropout]-BN-ReLU-conv3x3(growth)-[dropout]. Appends its ``growth`` channels to the segments."""

    growth: int
    bottleneck: bool = False
    dropout: float = 0.0
    bn_axis_name: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, segments, train: bool = False):
        ax, dt = self.bn_axis_name, self.dtype
        if self.bottleneck:
            y = nn.Dropout(self.dropout, deterministic=not train)(_read(segments, 4 * self.growth, 1, train, ax, dt))
            y = _conv(self.growth, 3, "conv", dt)(nn.relu(batch_norm(train, name="bn", axis_name=ax, dtype=dt)(y)))
        else:
            y = _read(segments, self.growth, 3, train, ax, dt)
        return (*segments, nn.Dropout(self.dropout, deterministic=not train)(y))


class Transition(nn.Module):
    """BN-ReLU-conv1x1(features)-[dropout]-avgpool 2x2 over the concatenated segments; (B, H, W, .)
    segments -> 1-tuple (B, H/2, W/2, features)."""

    features: int
    dropout: float = 0.0
    bn_axis_name: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, segments, train: bool = False):
        y = nn.Dropout(self.dropout, deterministic=not train)(_read(segments, self.features, 1, train, self.bn_axis_name, self.dtype))
        return (nn.avg_pool(y, (2, 2), (2, 2)),)


class _Stem(nn.Module):
    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        return (_conv(self.features, 3, "conv", self.dtype)(x),)


class _Head(nn.Module):
    """BN-ReLU, global average pool and Dense over the concatenated segments, as ``in{j}_bn`` and
    ``in{j}_dense`` per segment j; only ``in0_dense`` has the bias. Each slice's kernel is drawn with
    the variance of one lecun-normal Dense over all N inputs (1/N). Segments -> (B, K), at least float32."""

    num_classes: int
    bn_axis_name: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, segments, train: bool = False):
        total = sum(s.shape[-1] for s in segments)
        logits = 0.0
        for j, s in enumerate(segments):
            a = jnp.mean(nn.relu(batch_norm(train, name=f"in{j}_bn", axis_name=self.bn_axis_name, dtype=self.dtype)(s)), axis=(1, 2))
            init = nn.initializers.variance_scaling(s.shape[-1] / total, "fan_in", "truncated_normal")
            logits = logits + nn.Dense(self.num_classes, use_bias=j == 0, kernel_init=init, dtype=self.dtype, name=f"in{j}_dense")(a)
        return to_logits(logits)


class DenseNet(nn.Module):
    """DenseNet-L for 32x32 input: ``stem`` (conv3x3: 16 channels, 2 x growth for BC), three
    dense blocks of n layers (``block{b}_layer{i}``) with ``trans1``, ``trans2`` between them,
    ``head`` (BN-ReLU, global average pool, Dense). Basic: n = (L - 4) / 3; bottleneck: n =
    (L - 4) / 6. A transition keeps floor(compression x m) of its m input channels.

    ``width`` scales the stem, the growth rate and the transitions' outputs (computed at full
    width, then scaled, so width 2 doubles every unit group). ``dropout`` > 0 (after every conv
    but the stem, as in the DenseNet paper) needs a ``'dropout'`` rng in training.
    ``bn_axis_name``: synchronised BatchNorm over that named axis (None: per-device).
    ``dtype``: compute dtype (see :class:`~mergejax.core.models.MLP`).
    Input (B, H, W, C) -> (B, num_classes); H, W divisible by 4.
    """

    num_classes: int
    depth: int = 40
    growth: int = 12
    bottleneck: bool = False
    compression: float = 1.0
    dropout: float = 0.0
    width: float = 1.0
    bn_axis_name: str | None = None
    dtype: Any = None

    def _plan(self):
        """(stem channels, growth, layers per block, (trans1, trans2) channels), all scaled."""
        per = 6 if self.bottleneck else 3
        if (self.depth - 4) % per or self.depth <= 4:
            kind = "DenseNet-BC" if self.bottleneck else "DenseNet"
            raise ValueError(f"{kind} depth must be {per}n+4 (e.g. {per * 12 + 4}), got {self.depth}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        n = (self.depth - 4) // per
        stem = 2 * self.growth if self.bottleneck else 16
        full, trans = stem, []
        for _ in range(2):
            full = int(math.floor(self.compression * (full + n * self.growth)))
            trans.append(scaled(full, self.width))
        return scaled(stem, self.width), scaled(self.growth, self.width), n, tuple(trans)

    def layer_names(self) -> tuple[str, ...]:
        """FreezeOut's layers: the stem conv, every dense layer and transition, the head."""
        _, _, n, _ = self._plan()
        names = ["stem"]
        for b in (1, 2, 3):
            names += [f"block{b}_layer{i}" for i in range(n)] + ([f"trans{b}"] if b < 3 else [])
        return (*names, "head")

    def unit_table(self) -> tuple:
        """Rows (see :mod:`mergejax.core.units`): groups ``stem``, ``trans1``, ``trans2`` and one
        per dense layer (its ``growth`` new channels; ``<layer>/hidden`` for a bottleneck's
        4 x growth). A consumer's ``in{j}_bn``/``in{j}_conv`` rows read the j-th segment's group."""
        rows = [("conv", ("stem", "conv"), None, "stem")]
        segments = ["stem"]

        def read(layer, out):
            for j, g in enumerate(segments):
                rows.extend([("norm", (layer, f"in{j}_bn"), g, g), ("conv", (layer, f"in{j}_conv"), g, out)])

        for name in self.layer_names()[1:-1]:
            if name.startswith("trans"):
                read(name, name)
                segments[:] = [name]
                continue
            if self.bottleneck:
                hidden = f"{name}/hidden"
                read(name, hidden)
                rows.extend([("norm", (name, "bn"), hidden, hidden), ("conv", (name, "conv"), hidden, name)])
            else:
                read(name, name)
            segments.append(name)
        for j, g in enumerate(segments):
            rows.extend([("norm", ("head", f"in{j}_bn"), g, g), ("dense", ("head", f"in{j}_dense"), g, None)])
        return tuple(rows)

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        stem, growth, _, trans = self._plan()
        ax, dt = self.bn_axis_name, self.dtype
        layers = [_Stem(stem, dt, name="stem")]
        for name in self.layer_names()[1:-1]:
            if name.startswith("trans"):
                layers.append(Transition(trans[int(name[-1]) - 1], self.dropout, ax, dt, name=name))
            else:
                layers.append(DenseLayer(growth, self.bottleneck, self.dropout, ax, dt, name=name))
        return run_layers(layers + [_Head(self.num_classes, ax, dt, name="head")], to_compute(x, dt), train, frozen)
