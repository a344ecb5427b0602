"""VGG for CIFAR (Simonyan & Zisserman 2015, configurations A/B/D/E), with or without BatchNorm."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from mergejax.core.models.core import Head, conv_init, run_layers, scaled, to_compute
from mergejax.core.models.mlp import ConvBNReLU, conv_stack_table

# Channels per conv; "M" = 2x2 max-pool after the previous conv.
CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class ConvReLU(nn.Module):
    """3x3 conv (bias optional) -> ReLU, optionally followed by a 2x2 max-pool."""

    features: int
    pool: bool = False
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = nn.Conv(self.features, (3, 3), padding=1, use_bias=self.use_bias, kernel_init=conv_init, dtype=self.dtype, name="conv")
        x = nn.relu(conv(x))
        return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class VGG(nn.Module):
    """Layers ``conv0``..``conv{k-1}`` (conv3x3-BN-ReLU, max-pool where the config says),
    then ``head`` (global average pool + Dense). On 32x32 input the last pool leaves 1x1,
    so the head is the usual CIFAR ``Linear(512, num_classes)``. VGG-16: ~14.7M params.
    ``bn_axis_name``: synchronised BatchNorm over that named axis (None: per-device).

    ``norm=False``: conv3x3-ReLU layers without BatchNorm (the merging paper's CIFAR-10
    VGG-11). ``bias``: biases where no BatchNorm follows (the classifier; with ``norm=False``
    also every conv). The merging authors' VGG-11 has no biases at all
    (fmfi-compbio/neural-network-merging, cifar10_vgg11/teacher.py: ``bias=False``).
    ``dtype``: compute dtype (see :class:`~mergejax.core.models.MLP`).
    """

    num_classes: int
    depth: int = 16
    width: float = 1.0
    bn_axis_name: str | None = None
    norm: bool = True
    bias: bool = True
    dtype: Any = None

    def _plan(self):
        if self.depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {self.depth}")
        cfg = CONFIGS[self.depth]
        return [(c, i + 1 < len(cfg) and cfg[i + 1] == "M") for i, c in enumerate(cfg) if c != "M"]

    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"conv{i}" for i in range(len(self._plan()))) + ("head",)

    def unit_table(self) -> tuple:
        """See :func:`~mergejax.core.models.mlp.conv_stack_table`; without BatchNorm the same
        table less its norm rows (a conv's bias follows its kernel's output group)."""
        rows = conv_stack_table(self.layer_names()[:-1])
        return rows if self.norm else tuple(r for r in rows if r[0] != "norm")

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: int = 0):
        ax, dt = self.bn_axis_name, self.dtype
        if self.norm:
            layers = [ConvBNReLU(scaled(c, self.width), pool=p, bn_axis_name=ax, dtype=dt, name=f"conv{i}")
                      for i, (c, p) in enumerate(self._plan())]
        else:
            layers = [ConvReLU(scaled(c, self.width), pool=p, use_bias=self.bias, dtype=dt, name=f"conv{i}")
                      for i, (c, p) in enumerate(self._plan())]
        head = Head(self.num_classes, bn_axis_name=ax, use_bias=self.bias, dtype=dt, name="head")
        return run_layers(layers + [head], to_compute(x, dt), train, frozen)
