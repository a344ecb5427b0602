"""Concatenate two teachers into one double-width "big student" (Pašen & Boža 2022, step 2a).

Driven only by the shared unit description (:mod:`mergejax.core.units`): every axis that belongs
to a unit group doubles, teacher A's units first (indices ``[0, n)``), teacher B's after
(``[n, 2n)``). A leaf whose last axis is a unit group (kernels, biases, BatchNorm scale,
shift, mean and var) holds A's block and B's block; the blocks that connect one teacher's
units to the other's (cross-connections) are zero. A leaf whose last axis is not a unit group
(the classifier) is the average: head kernel ``[W_A; W_B] / 2``, bias ``(b_A + b_B) / 2``.
So before any training the big student's logits are the mean of the teachers' logits, in
eval and in train mode (BatchNorm normalises each channel on its own).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core.trees import path_tuple
from mergejax.core.units import UnitSpec, check_spec

__all__ = ["concat", "concat_spec", "embed"]


def concat_spec(spec: UnitSpec) -> UnitSpec:
    """The spec of the big student: same leaves and axes, every group twice as large."""
    return UnitSpec({g: 2 * n for g, n in spec.groups.items()}, dict(spec.axes))


def embed(leaf: jax.Array, axes: tuple, block: int) -> jax.Array:
    """Place ``leaf`` as block ``block`` (0 or 1) along every grouped axis of a zero array
    twice as large on those axes. leaf (..., n, ...) -> (..., 2n, ...)."""
    leaf = jnp.asarray(leaf)
    pad = [(block * d, (1 - block) * d) if g is not None else (0, 0) for d, g in zip(leaf.shape, axes)]
    return jnp.pad(leaf, pad)


def concat(vars_a: Any, vars_b: Any, spec_a: UnitSpec, spec_b: UnitSpec | None = None) -> Any:
    """Big-student variables from two teachers of the same architecture.

    vars_a, vars_b: ``{'params', 'batch_stats'}`` trees with identical structure and shapes
    (:func:`mergejax.core.units.variables_of`). spec_a (and optionally spec_b, which must agree):
    their :class:`~mergejax.core.units.UnitSpec`. Returns a tree of the same structure where every
    grouped axis of size n has size 2n: the variables of the same model class at
    ``width=2`` (for the mergejax models, whose width multiplies every hidden group).
    """
    check_spec(spec_a, vars_a)
    spec_b = spec_a if spec_b is None else spec_b
    if dict(spec_b.groups) != dict(spec_a.groups) or dict(spec_b.axes) != dict(spec_a.axes):
        raise ValueError("teachers have different unit specs; concat needs two networks of one architecture")
    check_spec(spec_a, vars_b)
    sa = jax.tree_util.tree_structure(vars_a)
    sb = jax.tree_util.tree_structure(vars_b)
    if sa != sb:
        raise ValueError(f"teachers' variable trees differ:\n a: {sa}\n b: {sb}")

    def one(path, a, b):
        key = path_tuple(path)
        axes = spec_a.axes[key]
        if np.shape(a) != np.shape(b):
            raise ValueError(f"leaf {'/'.join(key)}: teacher a has shape {np.shape(a)}, b has {np.shape(b)}")
        ea, eb = embed(a, axes, 0), embed(b, axes, 1)
        if axes and axes[-1] is not None:
            return ea + eb  # output units concatenated; cross blocks stay zero
        # No grouped output axis (the classifier): average the two teachers' contributions.
        return (ea + eb) / 2

    return jax.tree_util.tree_map_with_path(one, vars_a, vars_b)
