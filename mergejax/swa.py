"""Stochastic Weight Averaging (Izmailov et al. 2018) and the generic pieces it is made of.

* :func:`running_mean` — ``avg + (new - avg) / (n + 1)`` over plain pytrees (any averaging).
* :func:`swa_average` — an optax transform, chained LAST, that keeps the running mean of the
  post-update parameters from ``start_step`` every ``every`` steps in the optimizer state
  (so ``fit`` checkpoints and resumes it). Read it with :func:`swa_params`.
* :func:`recompute_batch_stats` — one pass over training data in train mode to re-estimate
  BatchNorm statistics for averaged weights, for any model and any BN momentum.

    tx = optax.chain(make_optimizer("sgd", schedules.swa_schedule(0.1, 0.02, start), ...),
                     swa_average(start_step=start, every=steps_per_epoch))
    state, _ = fit(create_state(model, rng, shape, tx, lr_fn=...), train, ...)
    params = swa_params(state.opt_state)
    batch_stats = recompute_batch_stats(state.apply_fn, params, state.batch_stats, train, 128)
    # or both at once: swa_model(state, train, 128) -> {'params', 'batch_stats'}

Fast Geometric Ensembling is :func:`schedules.fge_triangle` + :class:`snapshot.SnapshotCollector`
at :func:`schedules.fge_boundaries` + :func:`snapshot.evaluate_ensemble`; :func:`fge_plan`
wires the schedule and the snapshot steps together, :func:`fge_cycle_steps` sizes the cycle.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mergejax import data as data_lib
from mergejax import schedules
from mergejax.train import step_rng

Params = Any


def _check_same_structure(a: Params, b: Params, what: str = "tree") -> None:
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    if ta != tb:
        pa = {jax.tree_util.keystr(p) for p, _ in fa}
        pb = {jax.tree_util.keystr(p) for p, _ in fb}
        raise ValueError(f"{what}: structures differ; only in the average: {sorted(pa - pb)[:5]}, only in the new: {sorted(pb - pa)[:5]}")
    for (path, x), (_, y) in zip(fa, fb):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(y)} in the new tree, {jnp.shape(x)} in the average")


def running_mean(avg: Params, new: Params, n) -> Params:
    """``avg + (new - avg) / (n + 1)`` leafwise: the mean of ``n`` trees in ``avg`` and ``new``.

    ``n`` (int or int scalar array, traceable) is how many trees ``avg`` already averages;
    with ``n = 0`` the result is ``new``. Leaves keep ``avg``'s dtype.
    """
    _check_same_structure(avg, new, "running_mean")
    w = 1.0 / (jnp.asarray(n, jnp.float32) + 1.0)
    return jax.tree.map(lambda a, x: (a + (x - a) * w.astype(a.dtype)).astype(a.dtype), avg, new)


class SWAState(NamedTuple):
    """``count``: steps seen; ``n``: models in ``mean``; ``mean``: running mean of the params."""

    count: jax.Array
    n: jax.Array
    mean: Params


def swa_average(start_step: int, every: int = 1) -> optax.GradientTransformation:
    """Running mean of the parameters after each step ``s`` (steps taken) with
    ``s >= start_step`` and ``(s - start_step) % every == 0``. Leaves updates unchanged; chain
    it last so ``params + updates`` are the new parameters. Needs ``params`` in ``update``."""
    if start_step < 1 or every < 1:
        raise ValueError(f"swa_average needs start_step >= 1 and every >= 1, got {start_step}, {every}")

    def init(params):
        return SWAState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("swa_average needs params: call tx.update(grads, opt_state, params)")
        new_params = optax.apply_updates(params, updates)
        steps = state.count + 1
        take = (steps >= start_step) & ((steps - start_step) % every == 0)
        averaged = running_mean(state.mean, new_params, state.n)
        mean = jax.tree.map(lambda a, b: jnp.where(take, a, b), averaged, state.mean)
        return updates, SWAState(steps, state.n + take.astype(jnp.int32), mean)

    return optax.GradientTransformation(init, update)


def swa_state(opt_state) -> SWAState:
    """The :class:`SWAState` inside a (chained) optimizer state."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SWAState)) if isinstance(s, SWAState)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one SWAState in the optimizer state, found {len(found)} (chain swa_average(...) into tx)")
    return found[0]


def swa_params(opt_state) -> Params:
    """The averaged parameters held by :func:`swa_average` (raises if nothing was averaged yet)."""
    s = swa_state(opt_state)
    if int(s.n) == 0:
        raise ValueError(f"SWA has averaged no model yet (after {int(s.count)} steps)")
    return s.mean


def _bn_momentum(apply_fn: Callable, params: Params, batch_stats: Params, images, rng) -> Params:
    """Per-element momentum of every BatchNorm statistic: a train-mode call returns
    ``mom * old + (1 - mom) * batch_stat``, so feeding old = 0 and old = 1 gives ``mom``."""
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    ones = jax.tree.map(jnp.ones_like, batch_stats)
    _, s0 = apply_fn(params, zeros, images, train=True, rng=rng)
    _, s1 = apply_fn(params, ones, images, train=True, rng=rng)
    return jax.tree.map(lambda a, b: b - a, s0, s1)


def _batch_statistics(apply_fn: Callable, params: Params, batch_stats: Params, images, rng, momentum: Params) -> Params:
    """The statistics of one batch (mean, biased variance per BN layer) that a train-mode
    call would blend into the running averages."""
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    _, s0 = apply_fn(params, zeros, images, train=True, rng=rng)
    return jax.tree.map(lambda s, m: s / (1.0 - m), s0, momentum)


# Module-level jits: keyed on ``apply_fn`` (static) and shapes, so repeated calls (every seed,
# every averaged model) reuse one compile.
_jitted_bn_momentum = jax.jit(_bn_momentum, static_argnums=0)
_jitted_batch_statistics = jax.jit(_batch_statistics, static_argnums=0)


def recompute_batch_stats(
    apply_fn: Callable,
    params: Params,
    batch_stats: Params,
    split: data_lib.Split,
    batch_size: int = 128,
    *,
    seed: int = 0,
    num_batches: int | None = None,
    rng: jax.Array | None = None,
) -> Params:
    """BatchNorm statistics for ``params`` re-estimated over one epoch of ``split``.

    Each full batch (``remainder='drop'``; BN in train mode cannot mask padding) is run in
    train mode; its batch mean and variance per BN layer are averaged with equal weights
    over the batches — PyTorch's ``bn_update`` with ``momentum=None``, as used by SWA.
    Works for any model whose train-mode update is ``mom * old + (1 - mom) * batch`` (Linen
    BatchNorm, whatever ``mom``). ``batch_stats`` gives the structure; its values are
    ignored. Returns a tree like ``batch_stats`` (``{}`` stays ``{}``).
    ``apply_fn(params, batch_stats, x, *, train, rng) -> (logits, batch_stats)``.
    """
    if not jax.tree.leaves(batch_stats):
        return batch_stats
    rng = jax.random.key(seed) if rng is None else rng
    avg, n, momentum = None, 0, None
    for i, batch in enumerate(data_lib.batches(split, batch_size, seed=seed, remainder="drop", epochs=1)):
        if num_batches is not None and i >= num_batches:
            break
        rng_i = step_rng(rng, i)
        if momentum is None:
            momentum = _jitted_bn_momentum(apply_fn, params, batch_stats, batch["image"], rng_i)
            bad = [jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(momentum)[0] if not bool(jnp.all(m < 0.999999))]
            if bad:
                raise ValueError(f"BatchNorm statistics {bad[:3]} do not change in train mode (momentum 1?); cannot re-estimate them")
        b = _jitted_batch_statistics(apply_fn, params, batch_stats, batch["image"], rng_i, momentum)
        avg = b if avg is None else running_mean(avg, b, n)
        n += 1
    if avg is None:
        raise ValueError(f"no full batch of {batch_size} in {len(split)} examples")
    return jax.tree.map(lambda a, ref: a.astype(ref.dtype), avg, batch_stats)


def swa_model(state, split: data_lib.Split, batch_size: int = 128, *, seed: int = 0) -> dict:
    """The SWA model of a ``TrainState`` trained with :func:`swa_average` chained into its
    ``tx``: ``{'params': the running mean, 'batch_stats': re-estimated on split}``
    (:func:`recompute_batch_stats`)."""
    params = swa_params(state.opt_state)
    return {"params": params,
            "batch_stats": recompute_batch_stats(state.apply_fn, params, state.batch_stats, split, batch_size, seed=seed)}


def fge_cycle_steps(start_step: int, total_steps: int, num_snapshots: int) -> int:
    """The longest even FGE cycle (at least 2 steps) such that ``num_snapshots`` cycles fit
    between ``start_step`` and ``total_steps``: the budget left after pre-training is split
    evenly among the members (Garipov et al. 2018 use a fixed cycle; equal cost needs this)."""
    if num_snapshots < 1:
        raise ValueError(f"num_snapshots must be >= 1, got {num_snapshots}")
    return max(2, ((total_steps - start_step) // num_snapshots) // 2 * 2)


def fge_plan(
    pretrain: optax.Schedule,
    start_step: int,
    alpha1: float,
    alpha2: float,
    cycle_steps: int,
    total_steps: int,
) -> tuple[optax.Schedule, tuple[int, ...]]:
    """FGE: ``pretrain`` for counts < ``start_step``, then the triangle alpha1 -> alpha2 ->
    alpha1 every ``cycle_steps``. Returns ``(lr_fn, snapshot steps)`` (one per LR minimum)."""
    lr_fn = optax.join_schedules([pretrain, schedules.fge_triangle(alpha1, alpha2, cycle_steps)], [start_step])
    return lr_fn, schedules.fge_boundaries(start_step, cycle_steps, total_steps)
