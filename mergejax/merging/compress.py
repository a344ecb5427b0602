"""Compress a gated big student back to the teachers' architecture (step 2c).

Per unit group keep the units with the largest learned gates (ranked by log_alpha, which
orders the deterministic gate the same way but also breaks ties among gates clipped at 1),
fold the deterministic gate values into the input axis of every kernel that consumes the
group, then slice every leaf axis of the group with :func:`mergejax.core.units.take_units`
(kernels, biases, BatchNorm parameters and running statistics; a residual stream's group
covers the stem, every block output, the projection shortcuts and the classifier input).
The compressed network computes exactly what the big student computes with deterministic
gates that are zero on the dropped units.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core.trees import path_tuple
from mergejax.core.units import UnitSpec, check_spec, take_units
from mergejax.merging.gates import deterministic

__all__ = ["keep_index", "fold_gates", "compress"]


def keep_index(log_alphas: Mapping[str, jax.Array], spec: UnitSpec, fraction: float = 0.5) -> dict[str, np.ndarray]:
    """``{group: sorted int indices}`` of the ``round(fraction * units)`` units with the largest
    log_alpha (stable ranking: the lower index wins a tie)."""
    missing = set(spec.groups) - set(log_alphas)
    if missing:
        raise ValueError(f"no gate for groups {sorted(missing)}")
    out = {}
    for g, n in spec.groups.items():
        la = np.asarray(log_alphas[g], np.float64)
        if la.shape != (n,):
            raise ValueError(f"gate of group {g!r} has shape {la.shape}, the group has {n} units")
        k = max(1, int(round(fraction * n)))
        out[g] = np.sort(np.argsort(-la, kind="stable")[:k])
    return out


def fold_gates(variables: Any, gates: Mapping[str, jax.Array], spec: UnitSpec) -> Any:
    """Multiply the input-unit axis (the one before the last) of every kernel consuming group
    g by ``gates[g]`` (units,). Same tree and shapes as ``variables``."""
    scale = {}
    for g, z in gates.items():
        for path in spec.consumers(g):
            scale[path] = jnp.asarray(z)

    def one(path, leaf):
        z = scale.get(path_tuple(path))
        if z is not None:
            return leaf * z.reshape(z.shape + (1,)).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(one, variables)


def compress(big_vars: Any, log_alphas: Mapping[str, jax.Array], spec: UnitSpec, fraction: float = 0.5,
             fold: bool = True) -> tuple[Any, dict]:
    """Student variables from the big student's ``{'params', 'batch_stats'}`` and its gate
    parameters ``{group: log_alpha (2n,)}``. Returns ``(student_vars, keep)`` where every
    group has ``round(fraction * 2n)`` units (n for the default half: the teachers' shapes)
    and ``keep[g]`` are the kept unit indices of the big student. ``fold=False`` slices the
    weights without the gate values (the authors' notebook: not the gated network's function)."""
    check_spec(spec, big_vars)
    keep = keep_index(log_alphas, spec, fraction)
    if fold:
        big_vars = fold_gates(big_vars, {g: deterministic(la) for g, la in log_alphas.items()}, spec)
    return take_units(big_vars, spec, keep), keep
