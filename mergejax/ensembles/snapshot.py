"""Snapshot ensembles (Huang et al. 2017): collect params + BatchNorm statistics at the end of
every cycle of a cyclic schedule, then ensemble their predictions (never their weights).

    lr_fn = schedules.snapshot_cosine(0.2, T, M)
    collector = SnapshotCollector(schedules.snapshot_boundaries(T, M))
    state, _ = fit(state, train, num_steps=T, ..., callbacks=[collector])
    params, batch_stats = collector.stacked()               # leaves (M, ...)
    curve = evaluate_ensemble(state.apply_fn, params, batch_stats, test)  # every m = 1..M

Resumable (a SIGKILL loses at most ``checkpoint_every`` steps; snapshots stay on disk):

    state, snaps, records = fit_with_snapshots(state, train, boundaries, workdir, num_steps=T, ...)
    curve = ensemble_curve(state.apply_fn, snaps, test)
    last = final_snapshot(workdir)  # later, in another process: the run's final model

Members of one schedule (a true ensemble) train as one vmapped program with
:func:`mergejax.core.multi.fit_members`.

Each snapshot is written once: the one at the last step is ``fit``'s final checkpoint, and
snapshots taken in this process are kept in memory, so only those of an earlier (killed)
process are read back.

``ensemble_sums`` is the pure per-batch function: one call, ``vmap`` over the stacked
snapshots, metrics of the ensemble of the last m snapshots for every m at once.
"""

from __future__ import annotations

import os
import re
import statistics
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core import checkpoint as ckpt_lib
from mergejax.core import data as data_lib
from mergejax.core import trees
from mergejax.core.loop import fit, read_metrics
from mergejax.core.train import TrainState

Params = Any


def stack_snapshots(snapshots: Sequence[Params]) -> Params:
    """Stack snapshots of equal structure along a new leading axis (leaves (M, ...)); a
    mismatch names the snapshot and the leaf path (:func:`mergejax.core.trees.stack`)."""
    if not snapshots:
        raise ValueError("need at least one snapshot")
    return trees.stack(list(snapshots), [f"snapshot {i}" for i in range(len(snapshots))])


def _copy(tree: Params) -> Params:
    """A device copy (jitted where called: one dispatch for the whole tree, where eager
    per-leaf copies cost ~100 ms per snapshot on a busy CPU); it keeps a snapshot alive when
    the next step donates the state's buffers."""
    return jax.tree.map(jnp.copy, tree)


class SnapshotCollector:
    """A ``fit`` callback that keeps ``{'params', 'batch_stats'}`` after each step in
    ``boundaries`` (steps taken, from ``schedules.*_boundaries``).

    In memory by default (a device copy, so buffer donation in the next step cannot clobber
    it). With ``directory`` each snapshot is also written once, as an orbax checkpoint
    ``directory/step_<n>``; snapshots already on disk are picked up (a resumed ``fit`` keeps
    them) and read back only when asked for, since those taken in this process are still in
    memory (a host copy). On other steps the callback costs one set lookup.
    """

    def __init__(self, boundaries: Sequence[int], directory: str | None = None):
        self.boundaries = tuple(sorted(int(b) for b in boundaries))
        if len(set(self.boundaries)) != len(self.boundaries) or (self.boundaries and self.boundaries[0] < 1):
            raise ValueError(f"snapshot boundaries must be distinct steps >= 1, got {tuple(boundaries)}")
        self._todo = set(self.boundaries)
        self.directory = None if directory is None else os.path.abspath(directory)
        self.steps: list[int] = []
        self._trees: dict[int, Params] = {}  # taken in this process
        if self.directory is not None and os.path.isdir(self.directory):
            self.steps = [b for b in self.boundaries if os.path.isdir(self._path(b))]

    def _path(self, step: int) -> str:
        return _snapshot_path(self.directory, step)

    def __call__(self, step: int, state) -> None:
        if step not in self._todo or step in self.steps:
            return
        tree = {"params": state.params, "batch_stats": state.batch_stats}
        if self.directory is None:
            self._trees[step] = jax.jit(_copy)(tree)
        else:
            host = jax.tree.map(np.array, tree)  # a copy (np.asarray may alias a CPU buffer the next step donates)
            ckpt_lib.save(self._path(step), host, overwrite=True)
            self._trees[step] = host
        self.steps.append(step)

    def snapshots(self, target: Params | None = None) -> list[Params]:
        """``[{'params', 'batch_stats'}, ...]`` in step order (``target`` shapes a disk restore)."""
        return [self._trees[s] if s in self._trees else ckpt_lib.load(self._path(s), target) for s in sorted(self.steps)]

    def stacked(self, last: int | None = None, target: Params | None = None) -> tuple[Params, Params]:
        """``(params, batch_stats)`` of the last ``last`` (default all) snapshots, leaves (m, ...)."""
        snaps = self.snapshots(target)
        if not snaps:
            raise ValueError(f"no snapshot collected yet (boundaries {self.boundaries})")
        stacked = stack_snapshots(snaps[-last:] if last else snaps)
        return stacked["params"], stacked["batch_stats"]


_SNAPSHOT_DIR = re.compile(r"^step_(\d+)$")  # not ``step_<n>.tmp-*`` left by a killed save


def _snapshot_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{int(step)}")


def load_snapshots(directory: str, target: Params | None = None) -> list[Params]:
    """Every snapshot a :class:`SnapshotCollector` wrote to ``directory``, in step order
    (``target``, e.g. ``{'params', 'batch_stats'}`` of a fresh model, fixes shapes and dtypes).
    Raises ``FileNotFoundError`` when there is none."""
    steps = sorted(int(m.group(1)) for n in (os.listdir(directory) if os.path.isdir(directory) else ())
                   if (m := _SNAPSHOT_DIR.match(n)))
    if not steps:
        raise FileNotFoundError(f"no snapshot in {directory}")
    return [ckpt_lib.load(_snapshot_path(directory, s), target) for s in steps]


def fit_with_snapshots(state: TrainState, train_split: data_lib.Split, boundaries: Sequence[int], workdir: str, *,
                       num_steps: int, **fit_kwargs) -> tuple[TrainState, list[Params], list[dict]]:
    """``fit`` in ``workdir/fit`` (checkpointed, resumed after a kill) with a
    :class:`SnapshotCollector` at ``boundaries`` writing to ``workdir/snapshots``.

    Returns ``(final state, snapshots in step order, the whole run's metrics records)``: the
    same whether the run was interrupted and resumed or not, since snapshots taken before a
    kill are on disk and ``fit`` skips none of the later steps. A boundary at ``num_steps``
    is the final state, stored once as ``fit``'s last checkpoint (:func:`final_snapshot`).
    ``fit_kwargs`` go to ``fit`` (``batch_size``, ``seed``, ``manifest``...; extra
    ``callbacks`` run after the collector).
    """
    boundaries = sorted(int(b) for b in boundaries if b <= num_steps)
    collector = SnapshotCollector([b for b in boundaries if b < num_steps], directory=os.path.join(workdir, "snapshots"))
    callbacks = [collector, *fit_kwargs.pop("callbacks", ())]
    fit_dir = os.path.join(workdir, "fit")
    state, _ = fit(state, train_split, num_steps=num_steps, workdir=fit_dir, callbacks=callbacks, **fit_kwargs)
    final = {"params": state.params, "batch_stats": state.batch_stats}
    snaps = collector.snapshots(final)
    if boundaries and boundaries[-1] == num_steps:
        snaps.append(final)
    return state, snaps, read_metrics(fit_dir)


def final_snapshot(workdir: str, target: Params | None = None) -> Params:
    """``{'params', 'batch_stats'}`` of the newest checkpoint of a :func:`fit_with_snapshots`
    run in ``workdir`` (its final state once it has finished). ``target`` (a tree of that
    structure) checks leaf paths and shapes; a mismatch names the leaf."""
    path = ckpt_lib.resolve(os.path.join(workdir, "fit"))  # the newest intact step
    tree = ckpt_lib.load(path)
    snap = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}
    if target is not None and (msg := trees.first_mismatch(target, snap, ("the model", f"checkpoint {path}"))) is not None:
        raise ValueError(msg)
    return snap


def ensemble_log_probs(log_probs: jax.Array) -> jax.Array:
    """Log of the mean softmax of the LAST m members, for every m.

    log_probs (M, B, K) per-member log-softmax in snapshot order -> (M, B, K) where row
    m-1 is ``log(mean_{j > M-m} softmax_j)``; computed as a reversed cumulative logsumexp.
    """
    m = log_probs.shape[0]
    cum = jax.lax.cumlogsumexp(log_probs[::-1], axis=0)
    return cum - jnp.log(jnp.arange(1, m + 1, dtype=log_probs.dtype))[:, None, None]


def vote_predictions(log_probs: jax.Array) -> jax.Array:
    """Hard-voting prediction of the last m members for every m: (M, B, K) -> (M, B) int32.
    Ties go to the lowest class index."""
    k = log_probs.shape[-1]
    votes = jax.nn.one_hot(jnp.argmax(log_probs, -1), k, dtype=jnp.int32)[::-1]
    return jnp.argmax(jnp.cumsum(votes, axis=0), -1)


def ensemble_sums(apply_fn: Callable, params: Params, batch_stats: Params, batch: dict, member_map: str = "vmap") -> dict:
    """Sums over one batch for the ensemble of the last m snapshots, every m = 1..M at once.

    ``params``/``batch_stats`` are stacked (leaves (M, ...)); ``batch = {'image': (B,H,W,C),
    'label': (B,), ['mask': (B,)]}``. Returns ``nll_sum``, ``correct``, ``vote_correct``
    (each (M,), index m-1) and ``count`` (scalar); NLL in nats of the averaged softmax.
    ``member_map``: ``"vmap"`` (all members batched: convolutions become grouped
    convolutions, fast on accelerators, slow on XLA:CPU) or ``"map"`` (``lax.map``: members
    one after another inside the same compiled call, less memory). Jit with both static:
    ``jax.jit(ensemble_sums, static_argnums=0, static_argnames="member_map")``.
    """
    def member(p, s):
        logits, _ = apply_fn(p, s, batch["image"], train=False)
        return jax.nn.log_softmax(logits.astype(jnp.float32), -1)

    if member_map == "vmap":
        log_probs = jax.vmap(member)(params, batch_stats)  # (M, B, K)
    elif member_map == "map":
        log_probs = jax.lax.map(lambda ps: member(*ps), (params, batch_stats))
    else:
        raise ValueError(f"member_map must be 'vmap' or 'map', got {member_map!r}")
    labels = batch["label"]
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    ens = ensemble_log_probs(log_probs)
    nll = -jnp.take_along_axis(ens, labels[None, :, None], -1)[..., 0]  # (M, B)
    correct = (jnp.argmax(ens, -1) == labels).astype(jnp.float32)
    vote_correct = (vote_predictions(log_probs) == labels).astype(jnp.float32)
    return {
        "nll_sum": (nll * mask).sum(-1),
        "correct": (correct * mask).sum(-1),
        "vote_correct": (vote_correct * mask).sum(-1),
        "count": mask.sum(),
    }


def ensemble_curve(apply_fn: Callable, snapshots: Sequence[Params], split: data_lib.Split, batch_size: int = 500,
                   **kwargs) -> dict:
    """:func:`evaluate_ensemble` of a list of ``{'params', 'batch_stats'}`` snapshots (oldest
    first): metrics of the ensemble of the last m, for m = 1..len(snapshots)."""
    stacked = stack_snapshots(snapshots)
    return evaluate_ensemble(apply_fn, stacked["params"], stacked["batch_stats"], split, batch_size, **kwargs)


def evaluate_ensemble(
    apply_fn: Callable,
    params: Params,
    batch_stats: Params,
    split: data_lib.Split,
    batch_size: int = 500,
    *,
    member_map: str = "vmap",
    sums_fn: Callable | None = None,
) -> dict:
    """Ensemble of the last m stacked snapshots on every example of ``split``, for m = 1..M.

    Returns lists indexed by m-1: ``accuracy`` and ``nll`` (nats) of the softmax average,
    ``vote_accuracy`` (hard voting), ``error`` (1 - accuracy), and ``m``. One compiled
    :func:`ensemble_sums` call per batch (``member_map`` as there).
    """
    # jit here: JAX keys its cache on ensemble_sums, apply_fn (static, value-equal) and shapes
    sums_fn = sums_fn or jax.jit(ensemble_sums, static_argnums=0, static_argnames="member_map")
    totals = None
    for batch in data_lib.batches(split, min(batch_size, len(split)), seed=0, shuffle=False, remainder="pad", epochs=1):
        sums = sums_fn(apply_fn, params, batch_stats, batch, member_map=member_map)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = jax.device_get(totals)
    acc = t["correct"] / t["count"]
    return {
        "m": list(range(1, len(acc) + 1)),
        "accuracy": [float(a) for a in acc],
        "error": [float(1.0 - a) for a in acc],
        "nll": [float(x) for x in t["nll_sum"] / t["count"]],
        "vote_accuracy": [float(x) for x in t["vote_correct"] / t["count"]],
    }


def curve_summary(curves: Sequence[dict]) -> dict:
    """Mean and sample std (``{'mean', 'std', 'n'}``) over runs (seeds) of :func:`evaluate_ensemble`
    curves of equal length M: ``error_pct``, ``nll`` and ``vote_error_pct`` of the whole ensemble,
    ``error_vs_m_pct`` for every m, and ``members`` (M)."""
    def stats(values):
        values = [float(v) for v in values]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    m = len(curves[0]["m"])
    return {"error_pct": stats(100 * c["error"][-1] for c in curves), "nll": stats(c["nll"][-1] for c in curves),
            "vote_error_pct": stats(100 * (1 - c["vote_accuracy"][-1]) for c in curves), "members": m,
            "error_vs_m_pct": [stats(100 * c["error"][i] for c in curves) for i in range(m)]}
