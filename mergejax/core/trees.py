"""Pytree helpers shared by every pillar: one of each.

``first_mismatch`` / ``check_same_structure`` name the first leaf at which trees differ,
``path_tuple`` turns a JAX key path into ``('params', 'conv1', 'kernel')``, ``stack`` /
``unstack`` add or remove a leading model axis, ``find_state`` finds a transform's state
inside a chained optax state, ``RunningMean`` averages a stream of trees.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]


def path_tuple(keypath: Sequence[Any]) -> Path:
    """A JAX key path (``DictKey``/``GetAttrKey``/``SequenceKey`` entries) as a tuple of strings."""
    out = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def flatten_paths(tree: Any) -> dict[Path, Any]:
    """``{path_tuple: leaf}`` in flattening order."""
    return {path_tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(keystr(path), leaf)]`` in flattening order."""
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def first_mismatch(a: Any, b: Any, names: tuple[str, str] = ("a", "b"), *, dtypes: bool = True) -> str | None:
    """A sentence naming the first leaf path at which ``a`` and ``b`` differ in presence,
    shape or (with ``dtypes``) dtype, in flattening order; None when they match."""
    na, nb = names
    fa, fb = leaves_with_paths(a), leaves_with_paths(b)
    for (pa, xa), (pb, xb) in zip(fa, fb):
        if pa != pb:
            return f"structures differ at leaf {min(pa, pb)}: {na} has {pa}, {nb} has {pb}"
        if np.shape(xa) != np.shape(xb):
            return f"{nb} has leaf {pb} of shape {np.shape(xb)}, {na} has {np.shape(xa)}"
        if dtypes and jnp.result_type(xa) != jnp.result_type(xb):
            return f"{nb} has leaf {pb} of dtype {jnp.result_type(xb)}, {na} has {jnp.result_type(xa)}"
    if len(fa) != len(fb):
        longer, name = (fa, na) if len(fa) > len(fb) else (fb, nb)
        return f"structures differ: only {name} has leaf {longer[min(len(fa), len(fb))][0]}"
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    if ta != tb:
        return f"tree structures differ (same leaf paths, different containers): {ta} vs {tb}"
    return None


def check_same_structure(trees: Sequence[Any], names: Sequence[str] | None = None, *, dtypes: bool = True) -> None:
    """Raise ``ValueError`` (see :func:`first_mismatch`) unless every tree matches the first."""
    if not trees:
        raise ValueError("need at least one tree")
    names = list(names) if names is not None else [f"tree {i}" for i in range(len(trees))]
    for i in range(1, len(trees)):
        if (msg := first_mismatch(trees[0], trees[i], (names[0], names[i]), dtypes=dtypes)) is not None:
            raise ValueError(msg)


def stack(trees: Sequence[Any], names: Sequence[str] | None = None) -> Any:
    """Stack equal-structure trees along a new leading axis (leaves ``(M, ...)``); a mismatch
    names the tree and the leaf (``names`` default ``tree 0, tree 1, ...``)."""
    check_same_structure(trees, names, dtypes=False)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(stacked: Any) -> list[Any]:
    """Inverse of :func:`stack`: the ``M`` trees along the leading axis."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def find_states(opt_state: Any, kind: type) -> list:
    """Every state of type ``kind`` inside a (nested, chained, partitioned) optax state."""
    is_kind = lambda x: isinstance(x, kind)  # noqa: E731
    return [s for s in jax.tree.leaves(opt_state, is_leaf=is_kind) if is_kind(s)]


def find_state(opt_state: Any, kind: type) -> Any | None:
    """The first state of type ``kind`` inside an optax state (:func:`find_states`), or None."""
    found = find_states(opt_state, kind)
    return found[0] if found else None


def running_mean(mean: Any, new: Any, n: Any) -> Any:
    """``mean + (new - mean) / (n + 1)`` leafwise: the mean of ``n`` trees in ``mean`` and ``new``."""
    return jax.tree.map(lambda m, x: m + (x - m) / (n + 1), mean, new)


class RunningMean:
    """The mean of a stream of equal-structure trees, one tree in memory.

    ``add(tree)`` folds a tree in (:func:`running_mean`; a mismatch names the leaf);
    ``mean`` is the current mean (None before the first tree), ``count`` the trees seen.
    """

    def __init__(self, mean: Any = None, count: int = 0):
        self.mean, self.count = mean, int(count)

    def add(self, tree: Any) -> "RunningMean":
        if self.mean is None:
            self.mean = jax.tree.map(jnp.asarray, tree)
        else:
            if (msg := first_mismatch(self.mean, tree, ("the mean", "the new tree"), dtypes=False)) is not None:
                raise ValueError(msg)
            self.mean = running_mean(self.mean, tree, self.count)
        self.count += 1
        return self
