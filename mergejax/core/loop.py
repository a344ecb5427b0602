"""The host loop: ``fit`` (progress bar, JSON-lines metrics, periodic evaluation, checkpoints,
exact resume) and ``evaluate``. Every step it runs is :func:`mergejax.core.train.train_step`
(or a ``step_fn`` of the same signature), jitted here at the call."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core import checkpoint as ckpt_lib
from mergejax.core import data as data_lib
from mergejax.core import rundir
from mergejax.core.errors import Diverged
from mergejax.core.train import STEP_STATIC, TrainState, model_eval_sums, softmax_loss, train_step


def _default_step(loss_fn: Callable) -> Callable:
    step = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)
    return lambda state, batch, rng: step(state, batch, rng, loss_fn=loss_fn)


def evaluate(state: TrainState, split: data_lib.Split, batch_size: int = 500, step_fn: Callable | None = None) -> dict:
    """Test loss (nats) and accuracy over every example of ``split`` exactly once.
    ``step_fn(state, batch) -> sums`` defaults to jitted :func:`~mergejax.core.train.model_eval_sums`."""
    if step_fn is None:
        sums_fn = jax.jit(model_eval_sums, static_argnums=0)
        step_fn = lambda s, b: sums_fn(s.apply_fn, s.params, s.batch_stats, b)  # noqa: E731
    totals = None
    for batch in data_lib.batches(split, min(batch_size, len(split)), seed=0, shuffle=False, remainder="pad", epochs=1):
        sums = step_fn(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss_sum"] / totals["count"]), "accuracy": float(totals["correct"] / totals["count"])}


def prefetch_to_device(iterator: Iterable, size: int = 2, sharding=None) -> Iterator:
    """Move batches to the device in a background thread, ``size`` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def producer():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(jax.device_put(item, sharding) if sharding is not None else jax.device_put(item))
        except Exception as e:  # surfaced in the consumer
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()


def first_nonfinite_leaf(tree: Any) -> str | None:
    """Path of the first leaf containing NaN or Inf, or None."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            return jax.tree_util.keystr(path)
    return None


def fit(
    state: TrainState,
    train_split: data_lib.Split,
    *,
    num_steps: int,
    batch_size: int,
    seed: int = 0,
    eval_split: data_lib.Split | None = None,
    eval_every: int = 0,
    eval_batch_size: int = 500,
    log_every: int = 50,
    workdir: str | None = None,
    checkpoint_every: int = 0,
    remainder: str = "drop",
    callbacks: Sequence[Callable[[int, TrainState], None]] = (),
    loss_fn: Callable = softmax_loss,
    step_fn: Callable | None = None,
    progress: bool = True,
    manifest: Mapping | None = None,
    overwrite: bool = False,
    devices: Sequence | None = None,
) -> tuple[TrainState, list[dict]]:
    """Train ``state`` for ``num_steps`` optimizer steps; returns ``(state, history)``.

    Deterministic in ``(seed, step)``: batch order comes from :func:`data.batches` and the
    step rng is ``fold_in(key(seed), step)``. With ``workdir`` the loop checkpoints to
    ``workdir/checkpoints`` every ``checkpoint_every`` steps and at the end, appends metrics
    to ``workdir/metrics.jsonl`` (``null`` for non-finite values), and resumes from the newest
    intact checkpoint when restarted, so an interrupted run ends with the same parameters as
    an uninterrupted one. The workdir is locked while training and carries a manifest of what
    produced it: the loop settings, content hashes of the data and of the initial state, and
    the caller's ``manifest`` (e.g. the resolved config, which is the only place an optimizer
    or schedule change can show). A workdir of another run is refused
    (:class:`~mergejax.core.errors.ConfigMismatch`) unless ``overwrite``.

    Parameters are checked for NaN/Inf before every checkpoint and the loss at every log
    step; the first failure raises :class:`~mergejax.core.errors.Diverged` naming the step and
    the first bad leaf, so the newest checkpoint on disk is always finite.
    ``history`` holds the records of this call; ``read_metrics(workdir)`` the whole run.
    ``callbacks(step, state)`` run on the host after every step (``step`` = steps taken).
    The step is ``jax.jit(train_step)`` with ``loss_fn`` (a static argument: pass a
    value-equal object, e.g. a module-level function or frozen dataclass, for compile reuse
    across calls), or ``step_fn(state, batch, rng) -> (state, metrics)``.

    ``devices`` (several local devices, e.g. :func:`~mergejax.averaging.parallel.resolve_devices`)
    split every batch over them with BatchNorm synchronised
    (:func:`~mergejax.averaging.parallel.data_parallel`): equal to one device up to float
    rounding; the returned state holds the plain model on the first device. Callbacks see the
    replicated state. The model must take ``bn_axis_name``.
    """
    per_epoch = data_lib.steps_per_epoch(len(train_split), batch_size, remainder)
    eval_every = eval_every or per_epoch
    checkpoint_every = checkpoint_every or per_epoch
    plain, devices = state.apply_fn, (list(devices) if devices is not None and len(devices) > 1 else None)
    if devices is not None:  # batch split over a data mesh, BatchNorm synchronised
        if step_fn is not None:
            raise ValueError("fit takes devices or a step_fn, not both")
        from mergejax.averaging.parallel import data_parallel  # that package's modules import this one

        state, step_fn = data_parallel(state, devices, loss_fn=loss_fn)
    loop = dict(num_steps=num_steps, batch_size=batch_size, seed=seed, eval_split=eval_split, eval_every=eval_every,
                eval_batch_size=eval_batch_size, log_every=log_every, checkpoint_every=checkpoint_every,
                remainder=remainder, callbacks=callbacks, step_fn=step_fn or _default_step(loss_fn), progress=progress)
    if workdir is None:
        state, history = _fit_loop(state, train_split, None, None, 0, **loop)
    else:
        settings = {"num_steps": num_steps, "batch_size": batch_size, "seed": seed, "remainder": remainder}
        run_manifest = workdir_manifest("fit", settings, manifest, train_split, eval_split, state.arrays())
        with resumable_workdir(workdir, run_manifest, state.arrays(), overwrite=overwrite) as run:
            state = state.replace_arrays(run.arrays)
            state, history = _fit_loop(state, train_split, run.manager, run.log_file, run.start, elapsed=run.elapsed, **loop)
    if devices is not None:  # back to the plain model on one device (trains and evaluates anywhere)
        state = jax.device_put(state.replace(apply_fn=plain), devices[0])
    return state, history


def workdir_manifest(kind: str, settings: Mapping, caller: Mapping | None, train_split: data_lib.Split,
                     eval_split: data_lib.Split | None, arrays: Any) -> dict:
    """The manifest of a training workdir: ``config = {kind: settings, 'caller': caller}``,
    ``inputs`` = fingerprints of the data splits and of the initial ``arrays``."""
    return rundir.make_manifest(
        kind,
        {kind: dict(settings), "caller": dict(caller or {})},
        {"train": rundir.fingerprint_split(train_split),
         "eval": rundir.fingerprint_split(eval_split) if eval_split is not None else None,
         "initial_state": tree_fingerprint(arrays)},
    )


@dataclasses.dataclass
class Resumed:
    """What :func:`resumable_workdir` hands the loop: the arrays to start from (restored or
    the initial ones), the step they are at, the checkpoint manager, the open metrics log and
    the training seconds already spent (``time_s`` of the last kept train record)."""

    arrays: Any
    start: int
    manager: ckpt_lib.Manager
    log_file: TextIO
    elapsed: float


@contextlib.contextmanager
def resumable_workdir(workdir: str, manifest: Mapping, arrays: Any, *, overwrite: bool = False) -> Iterator[Resumed]:
    """Open ``workdir`` for training, as :func:`fit` does: lock it, refuse another run's
    manifest (:class:`~mergejax.core.errors.ConfigMismatch`, one line) unless ``overwrite``,
    restore the newest intact checkpoint of ``workdir/checkpoints`` into the structure of
    ``arrays`` (a dict with a ``'step'`` leaf: a scalar, or ``(N,)`` equal steps of stacked
    models), and cut ``metrics.jsonl`` back to that step. The log is open for appending
    inside the ``with``; the lock is released on exit."""
    with rundir.RunDir(workdir, manifest, overwrite=overwrite):
        manager = ckpt_lib.Manager(os.path.join(workdir, "checkpoints"))
        start = 0
        if manager.latest_step() is not None:
            arrays = manager.restore(arrays)
            start = int(np.max(np.asarray(jax.device_get(arrays["step"]))))
        log_path = os.path.join(workdir, "metrics.jsonl")
        elapsed = _truncate_log(log_path, start)
        try:
            with open(log_path, "a") as log_file:
                yield Resumed(arrays, start, manager, log_file, elapsed)
        finally:
            manager.close()


def write_record(log_file: TextIO | None, record: Mapping) -> None:
    """Append ``record`` to an open ``metrics.jsonl`` as one JSON line (NaN/Inf -> null)."""
    if log_file is not None:
        log_file.write(json.dumps(rundir.jsonable(record), allow_nan=False) + "\n")
        log_file.flush()


def save_checked(manager: ckpt_lib.Manager, step: int, arrays: Any) -> None:
    """Checkpoint ``arrays`` as ``step`` after checking them for NaN/Inf on the device; a bad
    value raises :class:`~mergejax.core.errors.Diverged` naming the first bad leaf, so the
    newest checkpoint on disk is always finite."""
    if not all_finite(arrays):
        raise Diverged(f"non-finite values at step {step} before writing its checkpoint; "
                       f"first bad leaf: {_first_bad(arrays)}")
    manager.save(step, arrays)


def _fit_loop(state, train_split, manager, log_file, start, *, num_steps, batch_size, seed, eval_split, eval_every,
              eval_batch_size, log_every, checkpoint_every, remainder, callbacks, step_fn, progress, elapsed=0.0):
    """The host loop of :func:`fit` from step ``start``; ``manager``/``log_file`` None without a workdir."""
    history: list[dict] = []

    def log(record):
        history.append(record)
        write_record(log_file, record)

    base_rng = jax.random.key(seed)
    # One jitted fold_in: ~20 us instead of ~200 us of eager dispatch per step (same bits).
    step_rng = jax.jit(jax.random.fold_in)
    stream = data_lib.batches(train_split, batch_size, seed=seed, start_step=start, remainder=remainder)
    if jax.default_backend() != "cpu":
        # On CPU "device" memory is host memory: a prefetch thread gains nothing and its GIL
        # contention cost ~5-10 ms per step in benchmarks/train_step.py.
        stream = prefetch_to_device(stream, sharding=getattr(step_fn, "batch_sharding", None))  # a placed step's: no re-shard
    bar = _progress(start, num_steps, progress)
    pending: list = []  # device metrics not yet fetched
    t0 = time.perf_counter() - elapsed  # time_s continues across resumes
    try:
        for step in range(start, num_steps):
            batch = next(stream)
            state, metrics = step_fn(state, batch, step_rng(base_rng, step))
            pending.append(metrics)
            done = step + 1
            for cb in callbacks:
                cb(done, state)
            if done % log_every == 0 or done == num_steps:
                values = fetch_metrics(pending)
                pending = []
                record = _mean_metrics(values)
                if not np.isfinite(record["loss"]):
                    first = next(i for i, v in enumerate(values) if not np.isfinite(v["loss"]))
                    bad = _first_bad(state.arrays())
                    raise Diverged(
                        f"non-finite loss {float(values[first]['loss'])} at step {done - len(values) + first + 1} "
                        f"(detected at step {done}); first bad parameter: {bad}"
                    )
                log({"step": done, "split": "train", **record, "time_s": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
            if eval_split is not None and (done % eval_every == 0 or done == num_steps):
                log({"step": done, "split": "test", **evaluate(state, eval_split, eval_batch_size)})
            if manager is not None and (done % checkpoint_every == 0 or done == num_steps):
                save_checked(manager, done, state.arrays())
            bar.update(1)
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    return state, history


def _first_bad(arrays: dict) -> str | None:
    """The first non-finite leaf, parameters before statistics and optimizer state."""
    for key in ("params", "batch_stats", "opt_state"):
        if (bad := first_nonfinite_leaf(arrays.get(key))) is not None:
            return f"['{key}']{bad}"
    return None


def all_finite(tree: Any) -> bool:
    """Whether every floating leaf of ``tree`` is free of NaN/Inf: one fused reduction on
    the device, one scalar fetched to the host."""
    if not any(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(tree)):
        return True
    # jit at the call: JAX keys its cache on the function, so the wrapper is cheap to re-make
    return bool(jax.jit(_all_finite_device)(tree))


def _all_finite_device(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def tree_fingerprint(tree: Any) -> str:
    """Content hash (blake2b, hex) of a pytree's structure, shapes, dtypes and values."""
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
        h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.hexdigest()


def _truncate_log(path: str, step: int) -> float:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (drop what a killed run logged
    past its last checkpoint, and a torn last line); returns the last kept train ``time_s``."""
    if not os.path.exists(path):
        return 0.0
    kept, elapsed = [], 0.0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
                if record.get("split") == "train" and record.get("time_s") is not None:
                    elapsed = float(record["time_s"])
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return elapsed


_FETCH_CHUNK = 16


def _stack_chunk(chunk: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *chunk)


def fetch_metrics(pending: list) -> list:
    """Host (numpy) copies of per-step metric pytrees, in order.

    Full chunks of 16 steps are stacked on the device first (one jitted call, compiled once
    per metric structure), so each metric crosses to the host once per chunk rather than once
    per step: ~5 ms -> ~1 ms per 50 steps of five scalars on CPU, which matters when a step
    takes a fraction of a millisecond. The remainder is fetched leaf by leaf.
    """
    out: list = []
    stack = jax.jit(_stack_chunk)  # JAX caches on the function: compiled once per structure
    full = len(pending) - len(pending) % _FETCH_CHUNK
    for i in range(0, full, _FETCH_CHUNK):
        stacked = jax.device_get(stack(pending[i:i + _FETCH_CHUNK]))
        out.extend(jax.tree.map(lambda v, j=j: v[j], stacked) for j in range(_FETCH_CHUNK))
    out.extend(jax.device_get(pending[full:]))
    return out


def _mean_metrics(values: list) -> dict:
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def read_metrics(workdir: str) -> list[dict]:
    """The JSON-lines records ``fit`` wrote to ``workdir/metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics log at {path}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

