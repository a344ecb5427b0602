"""Small models for the offline default (digits) and toy problems: an MLP and a small CNN."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from mergejax.models.core import Head, batch_norm, conv_init, run_layers, scaled


class DenseReLU(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.relu(nn.Dense(self.features)(x))


class MLP(nn.Module):
    """Flatten, ``len(hidden)`` Dense-ReLU layers (``dense0``..), then ``head`` (Dense).

    Input (B, ...) -> logits (B, num_classes). ``width`` multiplies every hidden size.
    """

    num_classes: int
    hidden: Sequence[int] = (128, 128)
    width: float = 1.0

    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"dense{i}" for i in range(len(self.hidden))) + ("head",)

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        x = x.reshape(x.shape[0], -1)
        layers = [DenseReLU(scaled(h, self.width), name=f"dense{i}") for i, h in enumerate(self.hidden)]
        return run_layers(layers + [Head(self.num_classes, name="head")], x, train, frozen)


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> ReLU, optionally followed by a 2x2 max-pool."""

    features: int
    strides: int = 1
    pool: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False, kernel_init=conv_init, name="conv")(x)
        x = nn.relu(batch_norm(train, name="bn")(x))
        return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class SmallCNN(nn.Module):
    """CNN for 8x8 digits or 28x28 MNIST: conv0 (32), conv1 (64, then 2x2 max-pool),
    conv2 (128), head (global average pool + Dense). Input (B, H, W, C)."""

    num_classes: int
    channels: Sequence[int] = (32, 64, 128)
    width: float = 1.0

    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"conv{i}" for i in range(len(self.channels))) + ("head",)

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        layers = [
            ConvBNReLU(scaled(c, self.width), pool=(i == 1), name=f"conv{i}") for i, c in enumerate(self.channels)
        ]
        return run_layers(layers + [Head(self.num_classes, name="head")], x, train, frozen)
