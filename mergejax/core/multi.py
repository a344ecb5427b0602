"""N independent models in one compiled program: ``jax.vmap`` of the one ``train_step`` over a
leading model axis of the state, the batch and the rng.

Each model keeps its own parameters, optimizer state, BatchNorm statistics, rng stream and
data order (``data.batches`` with its own seed), so model i ends where its solo ``fit`` with
``seed=seeds[i]`` ends, up to float rounding of the batched kernels. On an accelerator this
turns N small launch-bound steps into one step N times wider.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core import data as data_lib
from mergejax.core import trees
from mergejax.core.loop import fetch_metrics
from mergejax.core.train import TrainState, softmax_loss, train_step


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """One :class:`TrainState` whose arrays have a leading model axis ``(N, ...)``.

    The states must share their static fields (model, optimizer, schedule, augmentation:
    compared by value) and their array shapes; a mismatch names the state and the leaf."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        for field in ("apply_fn", "tx", "lr_fn", "augment_fn"):
            if getattr(s, field) != getattr(first, field):
                raise ValueError(f"state {i} has a different {field} than state 0: vmapped models share one step")
    arrays = trees.stack([s.arrays() for s in states], names=[f"state {i}" for i in range(len(states))])
    return first.replace_arrays(arrays)


def unstack_states(stacked: TrainState) -> list[TrainState]:
    """Inverse of :func:`stack_states`."""
    return [stacked.replace_arrays(a) for a in trees.unstack(stacked.arrays())]


def multi_step(loss_fn: Callable = softmax_loss, frozen: int = 0) -> Callable:
    """``step(stacked_state, batches (N, B, ...), rngs (N,)) -> (stacked_state, metrics (N,))``,
    jitted here with the state donated (an explicit object made by the caller)."""
    def one(state, batch, rng):
        return train_step(state, batch, rng, loss_fn=loss_fn, frozen=frozen)

    return jax.jit(jax.vmap(one), donate_argnums=0)


def fit_many(
    states: Sequence[TrainState],
    train_split: data_lib.Split,
    *,
    num_steps: int,
    batch_size: int,
    seeds: Sequence[int],
    log_every: int = 50,
    remainder: str = "drop",
    loss_fn: Callable = softmax_loss,
    progress: bool = True,
) -> tuple[list[TrainState], list[list[dict]]]:
    """Train ``len(states)`` models together for ``num_steps`` steps; model i draws its batches
    from ``data.batches(train_split, batch_size, seed=seeds[i])`` and its step rngs from
    ``fold_in(key(seeds[i]), step)``, exactly as ``fit(states[i], ..., seed=seeds[i])`` does.

    Returns the trained states and, per model, its train records ``{step, split, loss,
    accuracy, grad_norm, param_norm, lr, time_s}`` every ``log_every`` steps (means over the
    steps since the last record, as ``fit`` logs them)."""
    if len(seeds) != len(states):
        raise ValueError(f"got {len(seeds)} seeds for {len(states)} states")
    stacked = stack_states(states)
    step = multi_step(loss_fn)
    fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    streams = [data_lib.batches(train_split, batch_size, seed=int(s), remainder=remainder) for s in seeds]
    from tqdm.auto import tqdm

    histories: list[list[dict]] = [[] for _ in states]
    pending: list = []
    t0 = time.perf_counter()
    with tqdm(total=num_steps, disable=not progress, desc=f"train x{len(states)}", unit="step") as bar:
        for i in range(num_steps):
            parts = [next(s) for s in streams]
            batch = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
            stacked, metrics = step(stacked, batch, fold(keys, i))
            pending.append(metrics)
            done = i + 1
            if done % log_every == 0 or done == num_steps:
                values = fetch_metrics(pending)
                pending = []
                for m in range(len(states)):
                    record = {k: float(np.mean([v[k][m] for v in values])) for k in values[0]}
                    histories[m].append({"step": done, "split": "train", **record, "time_s": time.perf_counter() - t0})
            bar.update(1)
    return unstack_states(stacked), histories
