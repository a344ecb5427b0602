"""Weight averaging over plain pytrees: weighted means, a streaming mean, EMA, interpolation.

* :func:`check_compatible` — same structure, shapes and dtypes, or a ``ValueError`` naming
  the first differing leaf path.
* :func:`average` — ``sum_i w_i tree_i / sum_i w_i`` leafwise (uniform when ``weights`` is None).
* :func:`stream_init` / :func:`stream_add` / :func:`stream_average` — the
  same weighted mean over any iterable while holding at most two trees (the mean and the
  newest one), e.g. checkpoints read one at a time.
* :func:`ema` — exponential moving average of the parameters as an optax transform chained
  last (so ``fit`` checkpoints it); :func:`ema_update` is the one-line rule.
* :func:`interpolate` — ``(1 - t) a + t b`` (loss-barrier paths).

Averaging applies to parameters and BatchNorm statistics alike; after averaging weights the
running statistics no longer match them, re-estimate with :func:`swa.recompute_batch_stats`.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.core import trees

Params = Any


def check_compatible(a: Any, b: Any, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise ``ValueError`` naming the first leaf path at which ``a`` and ``b`` differ in
    presence, shape or dtype (:func:`mergejax.core.trees.first_mismatch`)."""
    trees.check_same_structure([a, b], names)


def _weights(n: int, weights: Sequence[float] | None) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"got {w.size} weights for {n} trees")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / w.sum()


def average(trees: Sequence[Params], weights: Sequence[float] | None = None) -> Params:
    """Weighted mean of ``N`` pytrees of identical structure, shapes and dtypes.

    ``weights`` (N,) >= 0 are normalised to sum 1 (uniform if None). Floating leaves are
    accumulated in their own dtype and keep it; integer leaves (e.g. step counters) are
    taken from the first tree.
    """
    trees = list(trees)
    if not trees:
        raise ValueError("average needs at least one tree")
    for i, t in enumerate(trees[1:], 1):
        check_compatible(trees[0], t, ("tree 0", f"tree {i}"))
    w = _weights(len(trees), weights)

    def mean(*xs):
        if not jnp.issubdtype(jnp.result_type(xs[0]), jnp.inexact):
            return xs[0]
        dt = jnp.result_type(xs[0])
        return sum(jnp.asarray(x) * jnp.asarray(wi, dt) for wi, x in zip(w, xs)).astype(dt)

    return jax.tree.map(mean, *trees)


class StreamState(NamedTuple):
    """``mean``: weighted mean so far; ``total``: sum of the weights seen (python float)."""

    mean: Params
    total: float


def stream_init(tree: Params, weight: float = 1.0) -> StreamState:
    if weight <= 0:
        raise ValueError(f"the first weight must be positive, got {weight}")
    return StreamState(tree, float(weight))


def stream_add(state: StreamState, tree: Params, weight: float = 1.0) -> StreamState:
    """``mean + (tree - mean) * weight / (total + weight)``: exact running weighted mean."""
    check_compatible(state.mean, tree, ("the running mean", "the new tree"))
    if weight < 0:
        raise ValueError(f"weights must be >= 0, got {weight}")
    total = state.total + float(weight)
    f = float(weight) / total

    def upd(m, x):
        if not jnp.issubdtype(jnp.result_type(m), jnp.inexact):
            return m
        dt = jnp.result_type(m)
        return (m + (jnp.asarray(x) - m) * jnp.asarray(f, dt)).astype(dt)

    return StreamState(jax.tree.map(upd, state.mean, tree), total)


def stream_average(trees: Iterable[Params], weights: Iterable[float] | None = None) -> Params:
    """:func:`average` over an iterable (e.g. a generator loading checkpoints), holding at
    most the running mean and one new tree."""
    state = None
    weights = iter(weights) if weights is not None else None
    for tree in trees:
        w = 1.0 if weights is None else float(next(weights))
        state = stream_init(tree, w) if state is None else stream_add(state, tree, w)
    if state is None:
        raise ValueError("stream_average got no trees")
    return state.mean


def interpolate(a: Params, b: Params, t: float) -> Params:
    """``(1 - t) * a + t * b`` leafwise (floating leaves; others from ``a``)."""
    check_compatible(a, b)

    def lerp(x, y):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return x
        return (x + (y - x) * jnp.asarray(t, jnp.result_type(x))).astype(jnp.result_type(x))

    return jax.tree.map(lerp, a, b)


def ema_update(ema_params: Params, params: Params, decay) -> Params:
    """``decay * ema + (1 - decay) * params`` leafwise, in ``ema``'s dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema_params, params)


class EMAState(NamedTuple):
    count: jax.Array
    ema: Params


def ema(decay: float, debias: bool = False) -> optax.GradientTransformation:
    """EMA of the post-update parameters in the optimizer state; chain it LAST so
    ``params + updates`` are the new parameters. Leaves updates unchanged. With
    ``debias`` :func:`ema_params` divides by ``1 - decay**count`` (EMA started from 0);
    otherwise the EMA starts from the initial parameters. Read it with :func:`ema_params`."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema decay must be in [0, 1), got {decay}")

    def init(params):
        start = jax.tree.map(jnp.zeros_like, params) if debias else params
        return EMAState(jnp.zeros((), jnp.int32), start)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema needs params: call tx.update(grads, opt_state, params)")
        new_params = optax.apply_updates(params, updates)
        return updates, EMAState(state.count + 1, ema_update(state.ema, new_params, decay))

    return optax.GradientTransformation(init, update)


def ema_params(opt_state, decay: float | None = None, debias: bool = False) -> Params:
    """The EMA held by :func:`ema` inside a (chained) optimizer state (debiased when asked)."""
    found = trees.find_states(opt_state, EMAState)
    if len(found) != 1:
        raise ValueError(f"expected exactly one EMAState in the optimizer state, found {len(found)} (chain ema(...) into tx)")
    s = found[0]
    if not debias:
        return s.ema
    if decay is None:
        raise ValueError("debias=True needs the decay")
    c = 1.0 - decay ** s.count.astype(jnp.float32)
    return jax.tree.map(lambda e: (e / c).astype(e.dtype), s.ema)
