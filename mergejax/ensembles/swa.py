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
:func:`equal_budget_plans` lays out the single-model, snapshot, Single-Cycle, SWA and FGE runs of
one budget (Huang et al. 2017, Table 1, plus SWA and FGE).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mergejax.core import data as data_lib
from mergejax.core import optim as schedules
from mergejax.core import trees
from mergejax.core.train import create_state

Params = Any


def running_mean(avg: Params, new: Params, n) -> Params:
    """``avg + (new - avg) / (n + 1)`` leafwise: the mean of ``n`` trees in ``avg`` and ``new``.

    ``n`` (int or int scalar array, traceable) is how many trees ``avg`` already averages;
    with ``n = 0`` the result is ``new``. Leaves keep ``avg``'s dtype.
    """
    if (msg := trees.first_mismatch(avg, new, ("the average", "the new tree"), dtypes=False)) is not None:
        raise ValueError(f"running_mean: {msg}")
    w = 1.0 / (jnp.asarray(n, jnp.float32) + 1.0)
    return jax.tree.map(lambda a, x: (a + (x - a) * w.astype(a.dtype)).astype(a.dtype), avg, new)


class SWAState(NamedTuple):
    """``count``: steps seen; ``n``: models in ``mean``; ``mean``: running mean of the params."""

    count: jax.Array
    n: jax.Array
    mean: Params


@schedules.value_equal
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
    found = trees.find_states(opt_state, SWAState)
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
    # jitted here; JAX keys the compiles on the function, apply_fn (static, value-equal) and
    # shapes, so every seed and every averaged model reuses them
    fold_in = jax.jit(jax.random.fold_in)
    momentum_fn = jax.jit(_bn_momentum, static_argnums=0)
    statistics_fn = jax.jit(_batch_statistics, static_argnums=0)
    avg, momentum = trees.RunningMean(), None
    for i, batch in enumerate(data_lib.batches(split, batch_size, seed=seed, remainder="drop", epochs=1)):
        if num_batches is not None and i >= num_batches:
            break
        rng_i = fold_in(rng, i)
        if momentum is None:
            momentum = momentum_fn(apply_fn, params, batch_stats, batch["image"], rng_i)
            bad = [path for path, m in trees.leaves_with_paths(momentum) if not bool(jnp.all(m < 0.999999))]
            if bad:
                raise ValueError(f"BatchNorm statistics {bad[:3]} do not change in train mode (momentum 1?); cannot re-estimate them")
        avg.add(statistics_fn(apply_fn, params, batch_stats, batch["image"], rng_i, momentum))
    if avg.mean is None:
        raise ValueError(f"no full batch of {batch_size} in {len(split)} examples")
    return jax.tree.map(lambda a, ref: a.astype(ref.dtype), avg.mean, batch_stats)


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
    return fge_schedule(pretrain, start_step, alpha1, alpha2, cycle_steps), schedules.fge_boundaries(start_step, cycle_steps, total_steps)


@schedules.value_equal
def fge_schedule(pretrain: optax.Schedule, start_step: int, alpha1: float, alpha2: float, cycle_steps: int) -> optax.Schedule:
    """The learning rate of :func:`fge_plan` (compares by value when ``pretrain`` does)."""
    return optax.join_schedules([pretrain, schedules.fge_triangle(alpha1, alpha2, cycle_steps)], [start_step])


@schedules.value_equal
def with_swa_average(tx: optax.GradientTransformation, start_step: int, every: int = 1) -> optax.GradientTransformation:
    """``optax.chain(tx, swa_average(start_step, every))``, comparing by value (one compiled step per recipe)."""
    return optax.chain(tx, swa_average(start_step, every))


class RunPlan(NamedTuple):
    """One training run of an equal-budget comparison: its schedule, the steps it marks
    (snapshots, or SWA averages when ``swa_every``), its length, and the SWA period (0: none)."""

    lr_fn: optax.Schedule
    marks: tuple[int, ...]
    num_steps: int
    swa_every: int = 0


def budget_step(fraction: float, total_steps: int) -> int:
    """The step at ``fraction`` of a budget of ``total_steps`` (at least 1)."""
    return max(1, int(round(fraction * total_steps)))


def equal_budget_plans(total_steps: int, steps_per_epoch: int, num_snapshots: int, lr: float, *, alpha0s: tuple = (0.1, 0.2),
                       single_cycle_alpha0: float = 0.1, swa_lr: float = 0.05, swa_start: float = 0.5, fge_start: float = 0.5,
                       fge_alpha1: float = 0.05, fge_alpha2: float = 0.0005) -> dict[str, RunPlan]:
    """Huang et al. 2017's comparison at one budget ``B = total_steps`` with ``M = num_snapshots``:

    ``single`` (lr, /10 at 50% and 75%; marks its M cycle ends: NoCycle), ``snapshot_<a0>`` (M cosine cycles
    restarting at a0), ``single_cycle-<j>`` (M runs of one cosine cycle each, lengths summing to B), ``long_teacher``
    (the single-model schedule stretched over M budgets: the FLOPs of a true ensemble), ``swa``
    (:func:`schedules.swa_schedule`, a running mean every epoch from ``swa_start`` of B), ``fge`` (pre-train to
    ``fge_start`` of B, then :func:`fge_plan` cycles sized by :func:`fge_cycle_steps`). Starts are fractions of B.
    """
    T, M = total_steps, num_snapshots
    bounds, s_swa, s_fge = schedules.snapshot_boundaries(T, M), budget_step(swa_start, T), budget_step(fge_start, T)
    plans = {"single": RunPlan(schedules.step_decay(lr, T), bounds, T)}
    plans.update({f"snapshot_{a0}": RunPlan(schedules.snapshot_cosine(a0, T, M), bounds, T) for a0 in alpha0s})
    plans["swa"] = RunPlan(schedules.swa_schedule(lr, swa_lr, s_swa), tuple(range(s_swa, T + 1, steps_per_epoch)), T,
                           steps_per_epoch)
    plans["fge"] = RunPlan(*fge_plan(schedules.swa_schedule(lr, fge_alpha1, s_fge), s_fge, fge_alpha1, fge_alpha2,
                                     fge_cycle_steps(s_fge, T, M), T), T)
    starts = schedules.cycle_starts(T, M)
    for j, n in enumerate(b - a for a, b in zip(starts, starts[1:])):
        plans[f"single_cycle-{j}"] = RunPlan(schedules.snapshot_cosine(single_cycle_alpha0, n, 1), (n,), n)
    plans["long_teacher"] = RunPlan(schedules.step_decay(lr, M * T), (M * T,), M * T)
    return plans


def plan_state(plan: RunPlan, model, key: int, image_shape, train_cfg) -> Any:
    """A fresh :class:`~mergejax.core.train.TrainState` of ``model`` for the run ``plan``: init key
    ``key``, ``train_cfg``'s optimizer (``optimizer``, ``momentum``, ``nesterov``, ``weight_decay``,
    ``grad_clip``) on ``plan.lr_fn``, SWA averaging when ``plan.swa_every``, CIFAR augmentation when
    ``train_cfg.augment``. ``image_shape``: one example's (H, W, C)."""
    tx = schedules.make_optimizer(train_cfg.optimizer, plan.lr_fn, **{k: train_cfg[k] for k in (
        "momentum", "nesterov", "weight_decay", "grad_clip")})
    tx = with_swa_average(tx, plan.marks[0], plan.swa_every) if plan.swa_every else tx  # SWA marks: its averages
    return create_state(model, jax.random.key(key), (1, *image_shape), tx, lr_fn=plan.lr_fn,
                        augment_fn=data_lib.augment_cifar if train_cfg.augment else None)


def training_runs(methods, total_steps: int, num_snapshots: int, alpha0s: tuple = ()) -> dict[str, int]:
    """The training runs (name -> optimizer steps) that the rows ``methods`` of an equal-budget
    comparison need, in the order they are trained; names as :func:`equal_budget_plans` plus
    ``single-<j>`` (members of the true ensemble), ``dropout`` and ``long_teacher``.

    ``single`` and ``nocycle`` share the run ``single-0``; ``true_ensemble`` needs ``single-0`` ..
    ``single-<M-1>`` (M budgets); ``single_cycle`` M one-cycle runs whose lengths sum to B;
    ``snapshot_<a0>`` (and ``weight_average``, read from the same snapshots) one run per ``a0``;
    ``long_teacher`` one single-model run of M budgets (the FLOPs of the true ensemble).
    """
    T, M, want, runs = total_steps, num_snapshots, set(methods), {}
    if want & {"single", "nocycle", "true_ensemble"}:
        runs["single-0"] = T
    if "true_ensemble" in want:
        runs.update({f"single-{j}": T for j in range(1, M)})
    if "single_cycle" in want:
        starts = schedules.cycle_starts(T, M)
        runs.update({f"single_cycle-{j}": b - a for j, (a, b) in enumerate(zip(starts, starts[1:]))})
    if "dropout" in want:
        runs["dropout"] = T
    runs.update({f"snapshot_{a}": T for a in alpha0s})
    runs.update({k: T for k in ("swa", "fge") if k in want})
    if "long_teacher" in want:
        runs["long_teacher"] = M * T
    return runs


def weight_average_model(state, snapshots, split: data_lib.Split, batch_size: int = 128, *, seed: int = 0) -> dict:
    """The uniform average of the snapshots' parameters with BatchNorm statistics re-estimated on
    ``split`` (:func:`recompute_batch_stats`): the weight average Huang et al. 2017 report to be
    much worse than the ensemble of the same snapshots' predictions."""
    params = trees.RunningMean()
    for s in snapshots:
        params.add(s["params"])
    return {"params": params.mean,
            "batch_stats": recompute_batch_stats(state.apply_fn, params.mean, state.batch_stats, split, batch_size, seed=seed)}
