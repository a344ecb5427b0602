"""Permutation alignment by weight matching (Git Re-Basin, Ainsworth et al. 2022, Alg. 1).

Driven by the shared unit description :mod:`mergejax.core.units`: for each unit group ``g`` the
cost matrix is ``C[i, j] = sum over every params leaf axis indexed by g of <A_i, B'_j>``,
where ``B'`` is ``b`` with every other group's current permutation applied and ``A_i`` the
slice of unit ``i``. ``scipy.optimize.linear_sum_assignment`` maximises it; groups are
visited in random order until a full sweep changes nothing.

    spec = unit_spec(model, variables_of(pa, sa))
    perm = weight_matching(spec, va, vb, rng=np.random.default_rng(0))
    vb_aligned = take_units(vb, spec, perm)      # same function as vb, units in a's order
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from scipy.optimize import linear_sum_assignment

from mergejax.core import trees
from mergejax.core.trees import Path
from mergejax.core.units import UnitSpec, identity_index, take_units


def _permuted(leaf: np.ndarray, axes, perm: Mapping[str, np.ndarray], skip: str | None) -> np.ndarray:
    for a, g in enumerate(axes):
        if g is not None and g != skip:
            leaf = np.take(leaf, perm[g], axis=a)
    return leaf


def matching_cost(spec: UnitSpec, a: Mapping[Path, np.ndarray], b: Mapping[Path, np.ndarray], group: str,
                  perm: Mapping[str, np.ndarray]) -> np.ndarray:
    """``(n, n)`` similarity between unit ``i`` of ``a`` and unit ``j`` of ``b`` for ``group``
    (float64), with ``perm`` applied to ``b``'s other groups. ``a``/``b``: flat ``{path: array}``."""
    n = spec.groups[group]
    cost = np.zeros((n, n))
    for path, axis in spec.leaves_of(group):
        if path not in a or path[0] != "params":
            continue
        wa = np.moveaxis(np.asarray(a[path], np.float64), axis, 0).reshape(n, -1)
        wb = _permuted(np.asarray(b[path], np.float64), spec.axes[path], perm, skip=group)
        wb = np.moveaxis(wb, axis, 0).reshape(n, -1)
        cost += wa @ wb.T
    return cost


def weight_matching(spec: UnitSpec, va: Any, vb: Any, *, max_iter: int = 100, rng: np.random.Generator | None = None,
                    init: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Permutations ``{group: (n,) int}`` such that ``take_units(vb, spec, perm)`` is ``vb``
    with its hidden units reordered to best match ``va`` (maximising the summed inner product
    of all parameters; BatchNorm running statistics are moved along but not matched).

    ``va``, ``vb``: variables ``{'params', 'batch_stats'}`` as in :func:`units.variables_of`.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    fa, fb = ({k: np.asarray(x) for k, x in trees.flatten_paths(jax.device_get(v)).items()} for v in (va, vb))
    for p in fa:
        if p not in fb or fa[p].shape != fb[p].shape:
            raise ValueError(f"cannot match: leaf {'/'.join(p)} has shape {fa[p].shape} in a, "
                             f"{fb[p].shape if p in fb else 'missing'} in b")
    perm = {g: np.asarray(v) for g, v in (init or identity_index(spec)).items()}
    groups = list(spec.groups)
    for _ in range(max_iter):
        changed = False
        for gi in rng.permutation(len(groups)):
            g = groups[gi]
            cost = matching_cost(spec, fa, fb, g, perm)
            _, cols = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(len(cols)), perm[g]].sum()
            new = cost[np.arange(len(cols)), cols].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perm[g] = cols
                changed = True
        if not changed:
            break
    return perm


def align(spec: UnitSpec, va: Any, vb: Any, **kw) -> Any:
    """``vb`` with its units permuted to match ``va`` (a function-preserving reordering)."""
    return take_units(vb, spec, weight_matching(spec, va, vb, **kw))
