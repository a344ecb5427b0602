"""Small models for the offline default (digits) and toy problems: an MLP and a small CNN."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn

from mergejax.core.models.core import Head, batch_norm, conv_init, run_layers, scaled, to_compute


class DenseReLU(nn.Module):
    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.relu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x))


class MLP(nn.Module):
    """Flatten, ``len(hidden)`` Dense-ReLU layers (``dense0``..), then ``head`` (Dense).

    Input (B, ...) -> logits (B, num_classes). ``width`` multiplies every hidden size.

    ``dtype`` (every model has it): the compute dtype, e.g. ``jnp.bfloat16``; the input is cast
    to it, parameters and BatchNorm statistics stay float32 and logits come back float32.
    ``None``: the inputs' and parameters' dtype (float32; float64 in x64 golden tests).
    """

    num_classes: int
    hidden: Sequence[int] = (128, 128)
    width: float = 1.0
    bn_axis_name: str | None = None  # no BatchNorm here; accepted so every model has the same fields
    dtype: Any = None

    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"dense{i}" for i in range(len(self.hidden))) + ("head",)

    def unit_table(self) -> tuple:
        """Rows ``(kind, layer path, input group, output group)`` (see :mod:`mergejax.core.units`):
        each hidden layer is its own group of units; classes are no group."""
        names = self.layer_names()[:-1]
        rows = [("dense", (n, "dense"), prev, n) for prev, n in zip((None, *names), names)]
        return (*rows, ("dense", ("head", "dense"), names[-1] if names else None, None))

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        x = to_compute(x.reshape(x.shape[0], -1), self.dtype)
        layers = [DenseReLU(scaled(h, self.width), self.dtype, name=f"dense{i}") for i, h in enumerate(self.hidden)]
        head = Head(self.num_classes, bn_axis_name=self.bn_axis_name, dtype=self.dtype, name="head")
        return run_layers(layers + [head], x, train, frozen)


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> ReLU, optionally followed by a 2x2 max-pool."""

    features: int
    strides: int = 1
    pool: bool = False
    bn_axis_name: str | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                    name="conv")(x)
        x = nn.relu(batch_norm(train, name="bn", axis_name=self.bn_axis_name, dtype=self.dtype)(x))
        return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class SmallCNN(nn.Module):
    """CNN for 8x8 digits or 28x28 MNIST: conv0 (32), conv1 (64, then 2x2 max-pool),
    conv2 (128), head (global average pool + Dense). Input (B, H, W, C).

    ``bn_axis_name``: synchronised BatchNorm over that named axis (e.g. the ``data`` mesh
    axis of :func:`mergejax.averaging.parallel.make_dp_step`); ``None``: per-device batch statistics.
    ``dtype``: compute dtype (see :class:`MLP`)."""

    num_classes: int
    channels: Sequence[int] = (32, 64, 128)
    width: float = 1.0
    bn_axis_name: str | None = None
    dtype: Any = None

    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"conv{i}" for i in range(len(self.channels))) + ("head",)

    def unit_table(self) -> tuple:
        """See :func:`conv_stack_table`."""
        return conv_stack_table(self.layer_names()[:-1])

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        ax, dt = self.bn_axis_name, self.dtype
        layers = [
            ConvBNReLU(scaled(c, self.width), pool=(i == 1), bn_axis_name=ax, dtype=dt, name=f"conv{i}")
            for i, c in enumerate(self.channels)
        ]
        return run_layers(layers + [Head(self.num_classes, bn_axis_name=ax, dtype=dt, name="head")], to_compute(x, dt), train, frozen)


def conv_stack_table(names) -> tuple:
    """Unit table of a plain stack of :class:`ConvBNReLU` layers ``names`` and a Dense head:
    each layer's conv output, its BatchNorm and the next layer's conv input are one group."""
    rows = []
    for prev, n in zip((None, *names), names):
        rows += [("conv", (n, "conv"), prev, n), ("norm", (n, "bn"), n, n)]
    return (*rows, ("dense", ("head", "dense"), names[-1] if names else None, None))
