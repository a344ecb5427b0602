"""DenseNets for CIFAR (Huang, Liu, van der Maaten & Weinberger 2017): basic and BC.

A dense layer reads the concatenation of its block's input and every earlier layer's
``growth`` new channels. Each of those segments is its own unit group, so the unit table
keeps one group per parameter axis: a BatchNorm over a concatenation is per channel, and a
conv over a concatenation is the sum of one conv per segment. Every consumer of a
concatenation therefore holds an ``in{j}_bn`` and an ``in{j}_conv`` (``in{j}_dense`` in the
head) per segment ``j``: its slices of the BatchNorm and of the kernel, the same parameters
(and count) as one BatchNorm and one conv over the concatenated input. Alignment,
concatenation, gating and compression read the table like any other model's.

``fused`` (default on GPU/TPU): one BatchNorm and one conv read the concatenated segments,
with the segments' variables concatenated (kernel slices along the input axis): the same
parameters and FLOPs, the conv's sum in another order. A DenseNet-40 training step then compiles
to 116 convolutions instead of 782 (DenseNet-100: ~100 convs per forward instead of ~1,700),
fewer and larger kernels for an accelerator. Per segment (default on CPU, where the fused step
measured 0.9x as fast and compiled 1.8x slower: ``benchmarks/densenet.py``) each (consumer,
segment) pair runs its own ``nn.BatchNorm`` and ``nn.Conv``, summed; :func:`mergejax.merging.gates.gated_apply`
always uses that path, so that each group's gate reaches its own kernel.

Activations between layers are a tuple of segments ``(block input, new_0, new_1, ...)``;
a transition returns a 1-tuple.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax.core.models.core import batch_norm, conv_init, run_layers, scaled, to_compute, to_logits


def _conv(features, kernel, name, dtype=None):
    return nn.Conv(features, (kernel, kernel), padding=kernel // 2, use_bias=False, kernel_init=conv_init, dtype=dtype, name=name)


class _KernelSlice(nn.Module):
    """The ``kernel`` (k, k, in_features, features) of an ``nn.Conv`` of the same name, shape and
    initialiser, without applying it (the fused forward concatenates the slices)."""

    features: int
    kernel: int

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        return self.param("kernel", conv_init, (self.kernel, self.kernel, in_features, self.features), jnp.float32)


class _NormSlice(nn.Module):
    """The variables of a :func:`batch_norm` of the same name over ``channels``: params ``scale``,
    ``bias`` (C,) and the ``batch_stats`` variables ``mean``, ``var`` (C,), without applying it."""

    @nn.compact
    def __call__(self, channels: int):
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (channels,))
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (channels,))
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        return scale, self.param("bias", nn.initializers.zeros, (channels,), jnp.float32), mean, var


def _fused_norm(mod, x, slices, train):
    """:func:`batch_norm` (momentum 0.9, eps 1e-5, fast variance, float32 moments; synchronised
    over ``mod.bn_axis_name``) on (B, H, W, C) with the per-channel variables of ``slices``
    concatenated; each slice's running statistics get their channels' update."""
    scale, bias = (jnp.concatenate(v) for v in list(zip(*slices))[:2])
    if train:
        xf = x.astype(jnp.promote_types(mod.dtype or x.dtype, jnp.float32))
        mean, mean2 = jnp.mean(xf, (0, 1, 2)), jnp.mean(jnp.square(xf), (0, 1, 2))
        if mod.bn_axis_name is not None and not mod.is_initializing():
            mean, mean2 = jax.lax.pmean(jnp.stack([mean, mean2]), mod.bn_axis_name)
        var = jnp.maximum(0.0, mean2 - jnp.square(mean))
        if not mod.is_initializing():
            start = 0
            for _, _, ra_mean, ra_var in slices:
                stop = start + ra_mean.value.shape[0]
                ra_mean.value = 0.9 * ra_mean.value + 0.1 * mean[start:stop]
                ra_var.value = 0.9 * ra_var.value + 0.1 * var[start:stop]
                start = stop
    else:
        mean, var = (jnp.concatenate([sl[i].value for sl in slices]) for i in (2, 3))
    y = (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
    return jnp.asarray(y, nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=mod.dtype))


def _read(mod, segments, features, kernel, train):
    """conv(relu(bn(concat(segments)))) over (B, H, W, c_j) segments -> (B, H, W, features), with
    sub-layers ``in{j}_bn`` and ``in{j}_conv`` of ``mod`` (a dense layer or transition) for segment
    j. ``mod.fused``: one BatchNorm and one conv over the concatenation, with the slices' variables
    concatenated; else the sum over segments of conv(relu(bn(segment)))."""
    ax, dt = mod.bn_axis_name, mod.dtype
    if not mod.fused:
        return sum(_conv(features, kernel, f"in{j}_conv", dt)(nn.relu(batch_norm(train, f"in{j}_bn", ax, dt)(s)))
                   for j, s in enumerate(segments))
    norms = [_NormSlice(name=f"in{j}_bn")(s.shape[-1]) for j, s in enumerate(segments)]
    a = nn.relu(_fused_norm(mod, jnp.concatenate(segments, -1), norms, train))
    k = jnp.concatenate([_KernelSlice(features, kernel, name=f"in{j}_conv")(s.shape[-1]) for j, s in enumerate(segments)], 2)
    a, k = nn.dtypes.promote_dtype(a, k, dtype=dt)
    pad = [(kernel // 2, kernel // 2)] * 2
    return jax.lax.conv_general_dilated(a, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class DenseLayer(nn.Module):
    """Basic: BN-ReLU-conv3x3(growth)-[dropout]. Bottleneck (BC): BN-ReLU-conv1x1(4 growth)-
    [dropout]-BN-ReLU-conv3x3(growth)-[dropout]. Appends its ``growth`` channels to the segments."""

    growth: int
    bottleneck: bool = False
    dropout: float = 0.0
    bn_axis_name: str | None = None
    dtype: Any = None
    fused: bool = True

    @nn.compact
    def __call__(self, segments, train: bool = False):
        ax, dt = self.bn_axis_name, self.dtype
        if self.bottleneck:
            y = nn.Dropout(self.dropout, deterministic=not train)(_read(self, segments, 4 * self.growth, 1, train))
            y = _conv(self.growth, 3, "conv", dt)(nn.relu(batch_norm(train, name="bn", axis_name=ax, dtype=dt)(y)))
        else:
            y = _read(self, segments, self.growth, 3, train)
        return (*segments, nn.Dropout(self.dropout, deterministic=not train)(y))


class Transition(nn.Module):
    """BN-ReLU-conv1x1(features)-[dropout]-avgpool 2x2 over the concatenated segments; (B, H, W, .)
    segments -> 1-tuple (B, H/2, W/2, features)."""

    features: int
    dropout: float = 0.0
    bn_axis_name: str | None = None
    dtype: Any = None
    fused: bool = True

    @nn.compact
    def __call__(self, segments, train: bool = False):
        y = nn.Dropout(self.dropout, deterministic=not train)(_read(self, segments, self.features, 1, train))
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
    ``fused``: one conv per dense layer / transition over its concatenated input, or one per
    (layer, segment); None (default): fused unless the default backend is the CPU (see the module
    docstring; the same parameters either way).
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
    fused: bool | None = None

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
        fused = self.fused if self.fused is not None else jax.default_backend() != "cpu"
        layers = [_Stem(stem, dt, name="stem")]
        for name in self.layer_names()[1:-1]:
            if name.startswith("trans"):
                layers.append(Transition(trans[int(name[-1]) - 1], self.dropout, ax, dt, fused, name=name))
            else:
                layers.append(DenseLayer(growth, self.bottleneck, self.dropout, ax, dt, fused, name=name))
        return run_layers(layers + [_Head(self.num_classes, ax, dt, name="head")], to_compute(x, dt), train, frozen)
