"""N independent models in one compiled program: ``jax.vmap`` of the one ``train_step`` over a
leading model axis of the state, the batch and the rng.

Each model keeps its own parameters, optimizer state, BatchNorm statistics, rng stream and
data order (``data.batches`` with its own seed), so model i ends where its solo ``fit`` with
``seed=seeds[i]`` ends, up to float rounding of the batched kernels. On an accelerator this
turns N small launch-bound steps into one step N times wider.

:func:`fit_many` is :func:`~mergejax.core.loop.fit` for the stack: the same workdir
(manifest, lock, checkpoints of the stacked state, ``metrics.jsonl`` whose lines carry a
``model`` index and its ``seed``) and the same exact resume; :func:`fit_members` also saves
each final model under a name. :func:`models_per_program` decides how many seeds share one
program, :func:`spread_devices` over how many devices.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax.core import checkpoint as ckpt_lib
from mergejax.core import data as data_lib
from mergejax.core import trees
from mergejax.core.errors import Diverged
from mergejax.core.loop import (fetch_metrics, prefetch_to_device, read_metrics, resumable_workdir, save_checked, workdir_manifest,
                                write_record)
from mergejax.core.train import STEP_STATIC, TrainState, model_eval_sums, placed_step, softmax_loss, train_step

MODEL_AXIS = "models"


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


def _vmapped_step(state, batch, rng, *, loss_fn, frozen):
    return jax.vmap(lambda s, b, r: train_step(s, b, r, loss_fn=loss_fn, frozen=frozen))(state, batch, rng)


def _vmapped_jit() -> Callable:
    """The jitted vmapped step (state donated). Built per call, not at import (library rule); jit
    wrappers of one function share their compiled executables."""
    return jax.jit(_vmapped_step, donate_argnums=0, static_argnames=("loss_fn", "frozen"))


def multi_step(loss_fn: Callable = softmax_loss, frozen: int = 0) -> Callable:
    """``step(stacked_state, batches (N, B, ...), rngs (N,)) -> (stacked_state, metrics (N,))``,
    jitted here with the state donated. ``loss_fn`` is static: a value-equal object reuses
    the compiled step across calls."""
    step = _vmapped_jit()
    return lambda state, batch, rng: step(state, batch, rng, loss_fn=loss_fn, frozen=frozen)


def spread_step(devices: Sequence, loss_fn: Callable = softmax_loss, frozen: int = 0) -> Callable:
    """:func:`multi_step` with the model axis split over ``devices`` (a 1-D ``models`` mesh):
    places the stacked state (when it is not there yet: a fresh or restored one), the batches
    ``(N, B, ...)`` and the rngs ``(N,)`` with ``PartitionSpec('models')``; jit keeps every
    model's computation on its device (models do not interact, so nothing is communicated)."""
    split = NamedSharding(Mesh(np.asarray(devices).reshape(-1), (MODEL_AXIS,)), P(MODEL_AXIS))
    return placed_step(multi_step(loss_fn, frozen), split, split)


def spread_devices(num_models: int, devices: Sequence) -> list:
    """The first ``k`` of ``devices``, ``k`` the largest count ``<= len(devices)`` that divides
    ``num_models`` (so the models spread evenly; 1 when ``num_models`` is prime and larger)."""
    k = max(d for d in range(1, len(devices) + 1) if num_models % d == 0)
    return list(devices)[:k]


def _fold_all(keys: jax.Array, step: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


def _eval_sums_many(apply_fn: Callable, params: Any, batch_stats: Any, batch: dict) -> dict:
    return jax.vmap(lambda p, s: model_eval_sums(apply_fn, p, s, batch))(params, batch_stats)


def evaluate_many(stacked: TrainState, split: data_lib.Split, batch_size: int = 500) -> list[dict]:
    """:func:`~mergejax.core.loop.evaluate` of each model of a stacked state in one vmapped
    program: per model ``{'loss' (nats), 'accuracy'}`` over every example of ``split`` once."""
    sums_fn = jax.jit(_eval_sums_many, static_argnums=0)
    totals = None
    for batch in data_lib.batches(split, min(batch_size, len(split)), seed=0, shuffle=False, remainder="pad", epochs=1):
        sums = sums_fn(stacked.apply_fn, stacked.params, stacked.batch_stats, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return [{"loss": float(totals["loss_sum"][m] / totals["count"][m]),
             "accuracy": float(totals["correct"][m] / totals["count"][m])} for m in range(len(totals["count"]))]


def fit_many(
    states: Sequence[TrainState],
    train_split: data_lib.Split,
    *,
    num_steps: int,
    batch_size: int,
    seeds: Sequence[int],
    eval_split: data_lib.Split | None = None,
    eval_every: int = 0,
    eval_batch_size: int = 500,
    log_every: int = 50,
    workdir: str | None = None,
    checkpoint_every: int = 0,
    remainder: str = "drop",
    callbacks: Sequence[Callable[[int, TrainState], None]] = (),
    loss_fn: Callable = softmax_loss,
    progress: bool = True,
    manifest: Mapping | None = None,
    overwrite: bool = False,
    devices: Sequence | None = None,
) -> tuple[list[TrainState], list[list[dict]]]:
    """Train ``len(states)`` models together for ``num_steps`` steps; model i draws its batches
    from ``data.batches(train_split, batch_size, seed=seeds[i])`` and its step rngs from
    ``fold_in(key(seeds[i]), step)``, exactly as ``fit(states[i], ..., seed=seeds[i])`` does.

    Returns the trained states and, per model, the records of this call as ``fit`` makes
    them: train ``{step, split, loss, accuracy, grad_norm, param_norm, lr, time_s}`` every
    ``log_every`` steps (means since the last record; ``time_s`` is the group's wall time) and,
    with ``eval_split``, test ``{step, split, loss, accuracy}`` every ``eval_every`` steps
    (default once per epoch) and at the end.

    With ``workdir`` it behaves as ``fit`` with one: the stacked state is checkpointed to
    ``workdir/checkpoints`` every ``checkpoint_every`` steps (default once per epoch) and at
    the end, records go to ``workdir/metrics.jsonl`` with ``model`` (index) and ``seed`` keys
    (:func:`read_many_metrics` splits them), a restart resumes from the newest intact
    checkpoint and ends where an uninterrupted run ends, and a workdir of another run
    (other seeds, data, initial states or caller ``manifest``) is refused unless ``overwrite``.
    A non-finite loss raises :class:`~mergejax.core.errors.Diverged` naming the model.
    ``callbacks(step, stacked_state)`` run on the host after every step.

    ``devices`` (several local devices; ``len(states)`` must be a multiple of their number)
    spreads the models over them: the stacked state, batches and rngs are split along the
    model axis (a ``models`` mesh), so each device trains ``N / len(devices)`` whole models
    and no model's arithmetic changes (tests/test_devices.py: equal to one device). The
    returned states are on one device. Default: the default device.
    """
    if len(seeds) != len(states):
        raise ValueError(f"got {len(seeds)} seeds for {len(states)} states")
    seeds = [int(s) for s in seeds]
    devices = list(devices) if devices is not None and len(devices) > 1 else None
    if devices is not None and len(states) % len(devices):
        raise ValueError(f"{len(states)} models do not spread evenly over {len(devices)} devices; "
                         f"use a number of devices that divides {len(states)} (spread_devices picks one)")
    stacked = stack_states(states)
    per_epoch = data_lib.steps_per_epoch(len(train_split), batch_size, remainder)
    loop = dict(num_steps=num_steps, batch_size=batch_size, seeds=seeds, eval_split=eval_split,
                eval_every=eval_every or per_epoch, eval_batch_size=eval_batch_size, log_every=log_every,
                checkpoint_every=checkpoint_every or per_epoch, remainder=remainder, callbacks=callbacks, loss_fn=loss_fn,
                progress=progress, devices=devices)
    if workdir is None:
        return _many_loop(stacked, train_split, None, None, 0, **loop)
    settings = {"num_steps": num_steps, "batch_size": batch_size, "seeds": seeds, "remainder": remainder}
    run_manifest = workdir_manifest("fit_many", settings, manifest, train_split, eval_split, stacked.arrays())
    with resumable_workdir(workdir, run_manifest, stacked.arrays(), overwrite=overwrite) as run:
        stacked = stacked.replace_arrays(run.arrays)
        return _many_loop(stacked, train_split, run.manager, run.log_file, run.start, elapsed=run.elapsed, **loop)


def fit_members(states: Sequence[TrainState], train_split: data_lib.Split, workdir: str, names: Sequence[str], *,
                num_steps: int, seeds: Sequence[int], devices: Sequence | None = None,
                **fit_kwargs) -> tuple[dict[str, Any], float]:
    """Train ``states`` (one schedule, different seeds) as one vmapped program:
    :func:`~mergejax.core.multi.fit_many` in ``workdir/fit`` (checkpointed, resumed), then
    each final ``{'params', 'batch_stats'}`` saved to ``workdir/<names[i]>`` (read it back with
    ``checkpoint.load``). Member i ends where ``fit(states[i], ..., seed=seeds[i])`` ends, up
    to float rounding. Returns ``({name: final variables}, training wall time in s)``
    (the group's, across resumes). ``devices`` (e.g. :func:`~mergejax.averaging.parallel.resolve_devices`):
    the members spread over as many of them as divide their number. ``fit_kwargs`` go to ``fit_many``."""
    if len(names) != len(states) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per state, got {list(names)} for {len(states)} states")
    fit_dir = os.path.join(workdir, "fit")
    devs = spread_devices(len(states), devices) if devices else None
    states, _ = fit_many(states, train_split, num_steps=num_steps, seeds=seeds, workdir=fit_dir, devices=devs, **fit_kwargs)
    finals = {n: {"params": s.params, "batch_stats": s.batch_stats} for n, s in zip(names, states)}
    for n, v in finals.items():
        ckpt_lib.save(os.path.join(workdir, n), v, overwrite=True)
    times = [r["time_s"] for r in read_metrics(fit_dir) if r.get("time_s") is not None]
    return finals, (times[-1] if times else 0.0)


def _many_loop(stacked, train_split, manager, log_file, start, *, num_steps, batch_size, seeds, eval_split,
               eval_every, eval_batch_size, log_every, checkpoint_every, remainder, callbacks, loss_fn, progress, devices,
               elapsed=0.0):
    """The host loop of :func:`fit_many` from step ``start``; ``manager``/``log_file`` None without a workdir."""
    n = len(seeds)
    step = multi_step(loss_fn) if devices is None else spread_step(devices, loss_fn)
    fold = jax.jit(_fold_all)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    streams = [data_lib.batches(train_split, batch_size, seed=s, start_step=start, remainder=remainder) for s in seeds]
    stacked_batches = ({k: np.stack([p[k] for p in parts]) for k in parts[0]} for parts in zip(*streams))  # (N, B, ...)
    if jax.default_backend() != "cpu":  # as in fit: stack and copy the next batches while the device computes
        stacked_batches = prefetch_to_device(stacked_batches, sharding=getattr(step, "batch_sharding", None))
    histories: list[list[dict]] = [[] for _ in seeds]

    def log(records):
        for m, record in enumerate(records):
            histories[m].append(record)
            write_record(log_file, {**record, "model": m, "seed": seeds[m]})

    from tqdm.auto import tqdm

    pending: list = []
    t0 = time.perf_counter() - elapsed  # time_s continues across resumes
    with tqdm(total=num_steps, initial=start, disable=not progress, desc=f"train x{n}", unit="step") as bar:
        for i in range(start, num_steps):
            stacked, metrics = step(stacked, next(stacked_batches), fold(keys, i))
            pending.append(metrics)
            done = i + 1
            for cb in callbacks:
                cb(done, stacked)
            if done % log_every == 0 or done == num_steps:
                values = fetch_metrics(pending)
                pending = []
                records = [{k: float(np.mean([v[k][m] for v in values])) for k in values[0]} for m in range(n)]
                for m, r in enumerate(records):
                    if not np.isfinite(r["loss"]):
                        raise Diverged(f"non-finite loss of model {m} (seed {seeds[m]}) in the steps up to {done}")
                log([{"step": done, "split": "train", **r, "time_s": time.perf_counter() - t0} for r in records])
                bar.set_postfix(loss=f"{np.mean([r['loss'] for r in records]):.4f}")
            if eval_split is not None and (done % eval_every == 0 or done == num_steps):
                log([{"step": done, "split": "test", **r} for r in evaluate_many(stacked, eval_split, eval_batch_size)])
            if manager is not None and (done % checkpoint_every == 0 or done == num_steps):
                save_checked(manager, done, stacked.arrays())
            bar.update(1)
    if devices is not None:  # back on one device (as a solo run's state)
        stacked = jax.device_put(stacked, devices[0])
    return unstack_states(stacked), histories


def read_many_metrics(workdir: str, num_models: int) -> list[list[dict]]:
    """Per model, the records :func:`fit_many` wrote to ``workdir/metrics.jsonl`` (the whole
    run, across resumes), without the ``model``/``seed`` keys: shaped as ``fit``'s."""
    out: list[list[dict]] = [[] for _ in range(num_models)]
    for record in read_metrics(workdir):
        m = record.get("model")
        if m is None or not 0 <= m < num_models:
            raise ValueError(f"{workdir}/metrics.jsonl has a record without a model index in [0, {num_models}): {record}")
        out[m].append({k: v for k, v in record.items() if k not in ("model", "seed")})
    return out


def step_memory_bytes(state: TrainState, image_shape: Sequence[int], batch_size: int, image_dtype=jnp.float32) -> int | None:
    """Device bytes one model's training step needs, from XLA's analysis of the compiled solo
    step: its arguments and outputs (state, batch, metrics; donated buffers counted once) plus
    temporaries (activations, gradients). None when the backend does not report it."""
    step = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, *image_shape), image_dtype),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
             "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
    return _compiled_bytes(lambda: step.lower(state, batch, jax.random.key(0)).compile())


def vmapped_step_memory_bytes(stacked: TrainState, batch: dict, rngs: jax.Array, loss_fn: Callable = softmax_loss) -> int | None:
    """:func:`step_memory_bytes` of the vmapped step of :func:`multi_step` on a stacked state,
    batches ``(N, B, ...)`` and rngs ``(N,)`` (for checking that memory grows about linearly in N)."""
    return _compiled_bytes(lambda: _vmapped_jit().lower(stacked, batch, rngs, loss_fn=loss_fn, frozen=0).compile())


def _compiled_bytes(compile_fn: Callable) -> int | None:
    try:
        stats = compile_fn().memory_analysis()
    except Exception:  # noqa: BLE001 - an analysis some backends lack is not an error
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)


def models_per_program(requested: int, num_seeds: int, *, device: Any = None,
                       bytes_per_model: Callable[[], int | None] | None = None, headroom: float = 0.8) -> int:
    """How many of ``num_seeds`` models to train in one vmapped program.

    ``requested > 0`` is taken as asked (at most ``num_seeds``). ``0`` means auto: 1 on CPU,
    where vmapped CNNs measured slower than one model at a time (benchmarks/multi.py); on an
    accelerator (``device``, default ``jax.local_devices()[0]``) as many as fit in
    ``headroom`` of its free memory (``bytes_limit - bytes_in_use`` of ``memory_stats()``)
    at ``bytes_per_model()`` bytes each (e.g. :func:`step_memory_bytes`; called only here),
    clipped to ``[1, num_seeds]``; all of them when the device reports no memory statistics.
    A vmapped step needs about N times one model's bytes, so this is an estimate: lower
    ``models_per_program`` if a program runs out of memory.
    """
    if requested < 0 or num_seeds < 1:
        raise ValueError(f"models_per_program must be >= 0 (0 = auto) and seeds non-empty, got {requested}, {num_seeds}")
    if requested:
        return min(requested, num_seeds)
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        return 1
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    need = bytes_per_model() if bytes_per_model is not None else None
    if not stats or "bytes_limit" not in stats or not need:
        return num_seeds
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(min(num_seeds, max(1, headroom * free // need)))
