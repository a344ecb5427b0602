"""Which parameter axes belong to which group of hidden units: one table per architecture.

A :class:`UnitSpec` says, for every leaf of a model's variables
``{'params': ..., 'batch_stats': ...}``, which unit group (if any) indexes each axis.
Permuting units (weight matching), concatenating two networks, gating and compressing
all read this one table (git-re-basin calls it a permutation spec).

Conventions (true of every mergejax model): a kernel's last axis is its output units,
the axis before it (Dense ``(in, out)``; Conv ``(h, w, in, out)``) its input units;
biases and BatchNorm vectors have one axis, their layer's output units. Units tied by a
residual connection share one group (``stage1`` is the stem's output and every block
output of stage 1). Axes with no group (image channels, classes) are ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core import trees

Path = trees.Path


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """``groups``: group name -> number of units. ``axes``: leaf path (e.g.
    ``('params', 'stem', 'conv', 'kernel')``) -> per-axis group name or None."""

    groups: Mapping[str, int]
    axes: Mapping[Path, tuple[str | None, ...]]

    def leaves_of(self, group: str) -> list[tuple[Path, int]]:
        """``[(path, axis)]`` of every leaf axis indexed by ``group``."""
        return [(p, a) for p, ax in self.axes.items() for a, g in enumerate(ax) if g == group]

    def consumers(self, group: str) -> list[Path]:
        """Kernels that read ``group`` as input units (the axis before the last)."""
        return [p for p, ax in self.axes.items() if len(ax) >= 2 and ax[-2] == group]


def variables_of(params: Any, batch_stats: Any) -> dict:
    """The tree a spec describes: ``{'params': params, 'batch_stats': batch_stats}``."""
    return {"params": params, "batch_stats": batch_stats}


def check_spec(spec: UnitSpec, variables: Any) -> None:
    """Raise ``ValueError`` naming the first leaf the spec misses, gets the rank of, or
    whose size disagrees with its group."""
    flat = trees.flatten_paths(variables)
    for path, leaf in flat.items():
        if path not in spec.axes:
            raise ValueError(f"unit spec has no entry for leaf {'/'.join(path)} of shape {np.shape(leaf)}")
        axes = spec.axes[path]
        if len(axes) != np.ndim(leaf):
            raise ValueError(f"unit spec gives {len(axes)} axes for leaf {'/'.join(path)} of shape {np.shape(leaf)}")
        for a, g in enumerate(axes):
            if g is not None and np.shape(leaf)[a] != spec.groups[g]:
                raise ValueError(
                    f"leaf {'/'.join(path)} axis {a} has {np.shape(leaf)[a]} units, group {g!r} has {spec.groups[g]}"
                )
    extra = set(spec.axes) - set(flat)
    if extra:
        raise ValueError(f"unit spec names leaves the variables do not have: {sorted('/'.join(p) for p in extra)[:5]}")


def take_units(variables: Any, spec: UnitSpec, index: Mapping[str, Any]) -> Any:
    """Index every axis of group ``g`` with ``index[g]`` (an int array).

    A permutation reorders units (weight matching); a shorter index keeps a subset
    (compression). Groups not in ``index`` are untouched.
    """

    def one(path, leaf):
        for a, g in enumerate(spec.axes[trees.path_tuple(path)]):
            if g is not None and g in index:
                leaf = jnp.take(leaf, jnp.asarray(index[g]), axis=a)
        return leaf

    return jax.tree_util.tree_map_with_path(one, variables)


def identity_index(spec: UnitSpec) -> dict[str, np.ndarray]:
    return {g: np.arange(n) for g, n in spec.groups.items()}


# --- per-architecture tables -------------------------------------------------------------


class _Builder:
    def __init__(self, variables):
        self.shapes = {p: np.shape(v) for p, v in trees.flatten_paths(variables).items()}
        self.groups: dict[str, int] = {}
        self.axes: dict[Path, tuple] = {}

    def _group(self, name, size):
        if self.groups.setdefault(name, size) != size:
            raise ValueError(f"group {name!r} has size {self.groups[name]} and {size}")

    def kernel(self, path: Path, group_in: str | None, group_out: str | None):
        shape = self.shapes[("params", *path, "kernel")]
        if group_out is not None:
            self._group(group_out, shape[-1])
        if group_in is not None:
            self._group(group_in, shape[-2])
        self.axes[("params", *path, "kernel")] = (None,) * (len(shape) - 2) + (group_in, group_out)
        if ("params", *path, "bias") in self.shapes:
            self.axes[("params", *path, "bias")] = (group_out,)

    def norm(self, path: Path, group: str):
        for coll, names in (("params", ("scale", "bias")), ("batch_stats", ("mean", "var"))):
            for n in names:
                if (coll, *path, n) in self.shapes:
                    self.axes[(coll, *path, n)] = (group,)

    def spec(self, variables) -> UnitSpec:
        s = UnitSpec(dict(self.groups), dict(self.axes))
        check_spec(s, variables)
        return s


def unit_spec(model: nn.Module, variables: Any) -> UnitSpec:
    """The :class:`UnitSpec` of ``model`` for ``variables`` (``{'params', 'batch_stats'}``
    as from :func:`variables_of`), read from the model's own table ``model.unit_table()``:
    rows ``('dense' | 'conv', layer path, input group, output group)`` for a kernel (and its
    bias) and ``('norm', layer path, group, group)`` for a BatchNorm. A new architecture is a
    new table next to its model, not new code here."""
    if not hasattr(model, "unit_table"):
        raise TypeError(f"{type(model).__name__} has no unit_table(); every model that is aligned, merged, gated or "
                        "compressed describes its units there")
    try:
        table = model.unit_table()
    except NotImplementedError as e:  # a configuration without a table (ResNet shortcut="A"): a usage error, one line
        raise TypeError(str(e)) from None
    b = _Builder(variables)
    for kind, path, group_in, group_out in table:
        if kind == "norm":
            b.norm(tuple(path), group_out)
        else:
            b.kernel(tuple(path), group_in, group_out)
    return b.spec(variables)


def group_order(spec: UnitSpec) -> Sequence[str]:
    """Group names in forward order (order of first appearance as an output axis)."""
    seen: list[str] = []
    for axes in spec.axes.values():
        g = axes[-1]
        if g is not None and g not in seen:
            seen.append(g)
    return seen
