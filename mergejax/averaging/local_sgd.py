"""Local SGD / FedAvg / DiLoCo rounds: K local steps per worker, then average the weights.

One round, per worker ``i`` (run under a named axis: ``shard_map`` over real devices, or
``vmap`` to simulate the workers on one device; same code)::

    worker_i <- K x step_fn(worker_i, batch_{i,k})          # local steps, own optimizer state
    delta    <- pmean_i(global - worker_i.params)           # outer pseudo-gradient
    global   <- global + outer_tx.update(delta)             # optax: sgd(1.0) == plain averaging
    worker_i <- (global, pmean(batch_stats), policy(opt_state_i))

``outer_tx = optax.sgd(1.0)`` gives FedAvg / local SGD (the new global is the mean of the
workers' weights); DiLoCo (Douillard et al. 2023) is ``optax.sgd(0.7, momentum=0.9,
nesterov=True)`` with AdamW inside. The optimizer-state ``policy`` at each sync is explicit:
``'keep'`` (each worker keeps its own state), ``'reset'`` (``tx.init`` of the new global) or
``'average'`` (``pmean`` of the floating leaves of the workers' states).

With K = 1, plain SGD, one shared start and equal shards, a round equals one step of
synchronous gradient averaging (``theta - lr * mean_i g_i = mean_i(theta - lr g_i)``); it
stops being equal for K > 1, Adam, per-worker clipping or different starting points.
The local step is the library's one step, :func:`mergejax.core.train.train_step` (per worker,
no axis: workers only meet at the sync). :func:`train_rounds` runs local SGD on the batch
stream ``fit`` would see (sharded by :func:`shard_steps`) and :func:`divergence` measures
its distance to ``fit``'s run.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mergejax.core import data as data_lib
from mergejax.core import trees
from mergejax.core.loop import evaluate
from mergejax.core.optim import value_equal
from mergejax.core.train import TrainState, train_step

Params = Any
AXIS = "data"
POLICIES = ("keep", "reset", "average")


@value_equal
def fedavg() -> optax.GradientTransformation:
    """The default outer optimizer, ``sgd(1.0)``: the new global weights are the workers' mean.
    Value-equal, so every state made by :func:`init` shares one compiled round."""
    return optax.sgd(1.0)


@flax.struct.dataclass
class LocalSGDState:
    """``params``: synchronised global weights; ``outer_opt_state``: ``outer_tx`` state;
    ``workers``: :class:`TrainState` of every worker stacked on a leading axis ``(W, ...)``;
    ``rounds``: int32 rounds done."""

    params: Params
    outer_opt_state: Any
    workers: TrainState
    rounds: jax.Array
    outer_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def init(worker: TrainState | list[TrainState], num_workers: int, outer_tx: optax.GradientTransformation | None = None) -> LocalSGDState:
    """Start ``num_workers`` workers from ``worker`` (one state, copied) or from a list of
    states (e.g. different initialisations; the global weights are then their mean)."""
    outer_tx = fedavg() if outer_tx is None else outer_tx
    if isinstance(worker, (list, tuple)):
        if len(worker) != num_workers:
            raise ValueError(f"got {len(worker)} worker states for {num_workers} workers")
        arrays = trees.stack([w.arrays() for w in worker])  # static fields (apply_fn, tx) from the first
        workers = worker[0].replace_arrays(arrays)
        params = jax.tree.map(lambda x: x.mean(0).astype(x.dtype), workers.params)
    else:
        workers = trees.stack([worker] * num_workers)
        params = worker.params
    return LocalSGDState(params, outer_tx.init(params), workers, jnp.zeros((), jnp.int32), outer_tx)


def _pmean_float(tree, axis):
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def worker_round(params, outer_opt_state, worker: TrainState, batches: dict, rng: jax.Array, *, outer_tx, policy: str = "keep",
                 axis: str = AXIS, step_fn: Callable = train_step):
    """One round for one worker, under the named ``axis``. ``batches``: this worker's ``K``
    batches stacked ``{'image': (K, b, ...), 'label': (K, b)}``. ``rng`` is shared; it is
    folded with the worker index and the local step. Returns ``(params, outer_opt_state,
    worker, metrics)`` with ``params``/``outer_opt_state`` equal on every worker."""
    if policy not in POLICIES:
        raise ValueError(f"unknown optimizer-state policy {policy!r}; choose from {POLICIES}")
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
    num_local = jax.tree.leaves(batches)[0].shape[0]

    def body(w, xs):
        batch, k = xs
        return step_fn(w, batch, jax.random.fold_in(rng, k))

    worker, metrics = jax.lax.scan(body, worker, (batches, jnp.arange(num_local)))
    delta = jax.lax.pmean(jax.tree.map(lambda g, p: g - p, params, worker.params), axis)
    updates, outer_opt_state = outer_tx.update(delta, outer_opt_state, params)
    params = optax.apply_updates(params, updates)
    if policy == "reset":
        opt_state = worker.tx.init(params)
    elif policy == "average":
        opt_state = _pmean_float(worker.opt_state, axis)
    else:
        opt_state = worker.opt_state
    worker = worker.replace(params=params, batch_stats=_pmean_float(worker.batch_stats, axis), opt_state=opt_state)
    metrics = {"loss": jax.lax.pmean(metrics["loss"].mean(), axis), "accuracy": jax.lax.pmean(metrics["accuracy"].mean(), axis),
               "delta_norm": optax.global_norm(delta)}
    return params, outer_opt_state, worker, metrics


def local_round(state: LocalSGDState, batches: dict, rng: jax.Array, *, num_workers: int, mesh: Mesh | None = None,
                policy: str = "keep", axis: str = AXIS, step_fn: Callable = train_step) -> tuple[LocalSGDState, dict]:
    """One round of every worker: ``(state, metrics)``. ``batches``: ``(W, K, b, ...)`` per
    entry. With ``mesh`` (axis size ``W``) each worker runs on its own device via
    ``shard_map``; without, the ``W`` workers are simulated with ``vmap`` on one device.
    jit with ``static_argnames=ROUND_STATIC`` (or use :func:`make_round`)."""
    fn = functools.partial(worker_round, outer_tx=state.outer_tx, policy=policy, axis=axis, step_fn=step_fn)
    if mesh is None:
        out = jax.vmap(fn, in_axes=(None, None, 0, 0, None), out_axes=(0, 0, 0, 0), axis_name=axis)(
            state.params, state.outer_opt_state, state.workers, batches, rng)
        params, outer, workers, metrics = out
        params, outer, metrics = jax.tree.map(lambda x: x[0], (params, outer, metrics))
    else:
        if mesh.shape[axis] != num_workers:
            raise ValueError(f"mesh axis {axis!r} has {mesh.shape[axis]} devices, need one per worker ({num_workers})")

        def per_device(params, outer, workers, batches, rng):
            sq = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
            p, o, w, m = fn(params, outer, sq(workers), sq(batches), rng)
            return p, o, jax.tree.map(lambda x: x[None], w), m

        params, outer, workers, metrics = jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis), P()), out_specs=(P(), P(), P(axis), P()),
            check_vma=True)(state.params, state.outer_opt_state, state.workers, batches, rng)
    new = state.replace(params=params, outer_opt_state=outer, workers=workers, rounds=state.rounds + 1)
    return new, metrics


#: :func:`local_round`'s static keyword arguments.
ROUND_STATIC = ("num_workers", "mesh", "policy", "axis", "step_fn")


def make_round(num_workers: int, *, mesh: Mesh | None = None, policy: str = "keep", axis: str = AXIS,
               step_fn: Callable = train_step) -> Callable:
    """``round(state, batches, rng) -> (state, metrics)``: :func:`local_round` jitted with these
    settings. JAX keys its cache on ``local_round`` and the settings (``step_fn`` and ``mesh``
    compare by value), so rounds made again with equal settings reuse the compilation."""
    if policy not in POLICIES:
        raise ValueError(f"unknown optimizer-state policy {policy!r}; choose from {POLICIES}")
    return functools.partial(jax.jit(local_round, static_argnames=ROUND_STATIC), num_workers=num_workers, mesh=mesh,
                             policy=policy, axis=axis, step_fn=step_fn)


def shard_steps(stream, num_workers: int, num_local: int) -> dict:
    """Take ``num_local`` global batches of ``W * b`` examples from ``stream`` and split each
    into ``W`` consecutive shards, arranged ``(W, K, b, ...)``: worker ``i``'s ``k``-th local
    batch is rows ``i*b .. (i+1)*b - 1`` of global batch ``k``, the shard synchronous data
    parallelism would give it, so K = 1 rounds see exactly the batches of synchronous steps."""
    got = [next(stream) for _ in range(num_local)]
    out = {}
    for key in got[0]:
        x = np.stack([g[key] for g in got])  # (K, W*b, ...)
        if x.shape[1] % num_workers:
            raise ValueError(f"global batch of {x.shape[1]} examples does not split into {num_workers} workers")
        out[key] = x.reshape(num_local, num_workers, -1, *x.shape[2:]).swapaxes(0, 1)
    return out


def train_rounds(state: LocalSGDState, split, *, num_steps: int, batch_size: int, num_local: int, seed: int = 0,
                 round_fn: Callable | None = None) -> tuple[LocalSGDState, list[dict]]:
    """``num_steps / num_local`` rounds of local SGD on ``split``; returns ``(state, metrics per round)``.

    ``batch_size`` is global (``W * b``): the data stream is ``data.batches(split, batch_size,
    seed=seed)``, the one ``train.fit(state, split, batch_size=batch_size, seed=seed)`` trains
    on, sharded by :func:`shard_steps`, so with ``num_local = 1`` and plain SGD the result is
    ``fit``'s synchronous gradient averaging up to float rounding. Round ``r`` gets the rng
    ``fold_in(key(seed), r)``. ``round_fn``: a :func:`make_round` (default ``policy='keep'``).
    """
    num_workers = state.workers.step.shape[0]
    if num_steps % num_local:
        raise ValueError(f"num_steps={num_steps} is not a multiple of num_local={num_local}")
    round_fn = make_round(num_workers) if round_fn is None else round_fn
    stream = data_lib.batches(split, batch_size, seed=seed)
    base, history = jax.random.key(seed), []
    step_rng = jax.jit(jax.random.fold_in)  # the same bits as fit's per-step key, without eager dispatch
    for r in range(num_steps // num_local):
        state, metrics = round_fn(state, shard_steps(stream, num_workers, num_local), step_rng(base, r))
        history.append(metrics)
    return state, [jax.tree.map(float, m) for m in jax.device_get(history)]


def divergence(start: TrainState, sync: TrainState, split, eval_split, *, num_workers: int, ks, num_steps: int, batch_size: int,
               seed: int = 0, rounds: dict | None = None) -> list[dict]:
    """How far local SGD drifts from synchronous gradient averaging on the same batches.

    ``sync``: ``start`` trained by ``fit(start, split, num_steps=..., batch_size=..., seed=...)``
    (global batches of ``batch_size = W * b``). For each ``K`` in ``ks``, :func:`train_rounds`
    from ``start`` with ``num_workers`` workers sharding that stream. Returns one row per ``K``:
    ``param_dist`` (L2 over all params to ``sync``), ``rel_dist`` (``/`` the distance ``sync``
    moved from ``start``), ``local_acc``/``sync_acc`` (accuracy on ``eval_split``), ``time_s``.
    ``rounds``: ``{K: round_fn}`` to use other :func:`make_round` settings than the default.
    """
    dist = lambda a, b: float(optax.global_norm(jax.tree.map(lambda x, y: x - y, a, b)))  # noqa: E731
    sync_acc, moved, rows = evaluate(sync, eval_split)["accuracy"], dist(sync.params, start.params), []
    for k in ks:
        t0 = time.perf_counter()
        st, _ = train_rounds(init(start, num_workers), split, num_steps=num_steps, batch_size=batch_size, num_local=k, seed=seed,
                             round_fn=(rounds or {}).get(k))
        d, acc = dist(st.params, sync.params), evaluate(start.replace(params=st.params), eval_split)["accuracy"]
        rows.append({"K": k, "param_dist": d, "rel_dist": d / moved, "local_acc": acc, "sync_acc": sync_acc,
                     "time_s": time.perf_counter() - t0})
    return rows
