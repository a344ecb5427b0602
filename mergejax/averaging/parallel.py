"""Data-parallel training: the batch split over a ``data`` mesh axis, gradients and BatchNorm
running statistics averaged across it.

Recommended: :func:`make_dp_step` (``jax.shard_map`` over a :class:`jax.sharding.Mesh`).
:func:`make_pmap_step` does the same with ``jax.pmap`` (maintenance mode in JAX 0.10; kept
because it is still what many codebases use; tested to agree).

The step inside is the library's one step, :func:`mergejax.core.train.train_step` with
``axis_name``: it computes the exact full-batch mean loss (each shard contributes
``sum(loss * mask) / global_count`` and the shards' gradients are summed, so padded or
unequal shards are handled). TRAP (jax >= 0.7, ``check_vma=True``): the gradient with
respect to a replicated (axis-invariant) parameter is already summed over the axis by
autodiff; ``vma=True`` marks the params varying with ``lax.pcast`` before ``grad`` so the
explicit ``psum`` is the only one (tests pin the ratio to the single-device gradient at 1).

BatchNorm, two modes chosen when the model is built:

* default (``bn_axis_name=None``): per-device ("ghost batch") BN. Each device normalises
  with its own shard's statistics (as PyTorch DDP without SyncBN); the running statistics
  are averaged over the axis. The step equals one device running each shard as a ghost
  batch and averaging the shard losses.
* synchronised BN: build the model with ``bn_axis_name=<mesh axis>``, e.g.
  ``make_model('resnet20', 10, bn_axis_name='data')``. Flax ``BatchNorm`` then averages
  (``lax.pmean``) the batch moments (E[x], E[x^2]) over the axis, so every device normalises with the
  global-batch statistics and the step equals one device on the whole batch (params,
  batch_stats, loss; tests check 3 steps on 8 devices). This composes with the
  ``pcast`` above: the BN ``pmean`` of varying moments is invariant, and its transpose
  hands each shard its share of the cotangent, so the psum'ed gradient is the full-batch
  gradient (no double counting). Equal shard sizes are assumed (the mean of shard means is
  the global mean); padded examples count in the BN statistics, as on one device.
  Such a model only trains under its named axis (``train_step`` on one device fails with
  an unbound axis name); evaluation (``train=False``) runs anywhere, and
  ``model.clone(bn_axis_name=None)`` takes the same params and batch_stats.

Models without BatchNorm give the full-batch step either way.

Every run through :func:`mergejax.run.train_and_evaluate` (``mergejax train``, the
experiments) uses this with synchronised BN when the train config key ``devices`` resolves
to more than one local device (:func:`resolve_devices`; 0 = all): :func:`make_fit_step` is
its ``fit`` step, and :func:`dp_train_step` augments the whole batch before the split, so a
run equals one device's up to float rounding (tests/test_devices.py: |gap| <= 3e-7 after 6
steps). One device runs the plain step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax.core.train import placed_step, softmax_loss, train_step

AXIS = "data"


def data_mesh(devices=None, axis: str = AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with Auto axis type."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (axis,))


def make_dp_step(mesh: Mesh, axis: str = AXIS, donate: bool = False, *, loss_fn: Callable = softmax_loss, frozen: int = 0):
    """``step(state, batch, rng) -> (state, metrics)`` jitted over ``mesh``: ``batch``'s
    leading axis (global batch, divisible by the axis size; place it with
    :func:`mergejax.core.data.shard_batch`) is split over ``axis``; state, rng and metrics are
    replicated. Plug into ``fit(..., step_fn=...)``."""
    inner = functools.partial(train_step, loss_fn=loss_fn, frozen=frozen, axis_name=axis, vma=True)
    sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=(P(), P()), check_vma=True)
    return jax.jit(sm, donate_argnums=(0,) if donate else ())


def resolve_devices(requested: int, batch_size: int | None = None) -> list:
    """The local devices a run with config key ``devices`` uses: 0 = all, ``k`` = the first ``k``.

    Refuses (:class:`~mergejax.core.errors.UserError`, one line) a count outside
    ``0..local devices`` and a ``batch_size`` (global batch; None: not split) that does not
    split into equal shards; no padding, since padded examples would count in synchronised
    BN statistics.
    """
    from mergejax.core.errors import UserError

    local = jax.local_devices()
    if not 0 <= requested <= len(local):
        raise UserError(f"devices={requested} but this process sees {len(local)} local device(s); "
                        f"use 0 (all) or 1..{len(local)}")
    chosen = local[:requested or len(local)]
    if batch_size is not None and batch_size % len(chosen):
        raise UserError(f"batch_size {batch_size} does not split over {len(chosen)} devices; set devices to a divisor "
                        f"of {batch_size} (devices=1: one device) or a batch_size divisible by {len(chosen)}")
    return chosen


def dp_train_step(state, batch: dict, rng: jax.Array, *, mesh: Mesh, axis: str = AXIS, loss_fn: Callable = softmax_loss,
                  frozen: int = 0):
    """``train_step`` over ``mesh`` (global ``batch``, state and rng replicated) with the
    augmentation taken out of the shard_map: ``state.augment_fn`` runs on the whole batch with
    the key one device uses (``split(rng)[0]``), so the augmented images are one device's
    bit for bit. Dropout (the model key) is still drawn per device (``fold_in`` of the
    device index): same distribution, not the same masks. jit with
    ``static_argnames=DP_STATIC``."""
    augment_fn = state.augment_fn
    if augment_fn is not None:
        batch = {**batch, "image": augment_fn(jax.random.split(rng)[0], batch["image"])}
        state = state.replace(augment_fn=None)
    inner = functools.partial(train_step, loss_fn=loss_fn, frozen=frozen, axis_name=axis, vma=True)
    sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=(P(), P()), check_vma=True)
    new_state, metrics = sm(state, batch, rng)
    return new_state.replace(augment_fn=augment_fn), metrics


#: :func:`dp_train_step`'s static keyword arguments.
DP_STATIC = ("mesh", "axis", "loss_fn", "frozen")


def make_fit_step(mesh: Mesh, axis: str = AXIS, *, loss_fn: Callable = softmax_loss, frozen: int = 0) -> Callable:
    """``fit``'s ``step_fn(state, batch, rng) -> (state, metrics)`` for :func:`dp_train_step`:
    places a host (or single-device) batch split over ``axis``, the rng and (when it is not yet
    there: a fresh or restored state) the state replicated on ``mesh``, then runs the jitted
    step (state donated).
    With a model built with ``bn_axis_name=axis`` the step equals one device's on the whole
    batch, augmentation included; states built from equal configs share one compile."""
    step = jax.jit(dp_train_step, donate_argnums=0, static_argnames=DP_STATIC)
    return place_on(mesh, lambda state, batch, rng: step(state, batch, rng, mesh=mesh, axis=axis, loss_fn=loss_fn, frozen=frozen),
                    axis)


def place_on(mesh: Mesh, step: Callable, axis: str = AXIS) -> Callable:
    """``step(state, batch, rng)`` with the batch split over ``axis`` of ``mesh`` and the rng and
    state replicated (:func:`~mergejax.core.train.placed_step`)."""
    replicated = NamedSharding(mesh, P())
    return placed_step(step, replicated, (NamedSharding(mesh, P(axis)), replicated))


def sync_bn(state, devices):
    """``state`` with its model rebuilt with ``bn_axis_name=AXIS`` (BatchNorm synchronised over
    the ``data`` axis). The state's ``apply_fn`` must be a frozen dataclass with a ``model`` field
    (:class:`~mergejax.core.train.ModelApply`, the merging gates'
    :class:`~mergejax.merging.train.GatedApply`) whose model takes ``bn_axis_name``; otherwise
    :class:`~mergejax.core.errors.UserError` (one line, naming the ``len(devices)`` devices)."""
    from mergejax.core.errors import UserError

    apply_fn = state.apply_fn
    model = getattr(apply_fn, "model", None) if dataclasses.is_dataclass(apply_fn) else None
    if model is None or "bn_axis_name" not in getattr(model, "__dataclass_fields__", {}):
        name = type(model).__name__ if model is not None else "this state's model"
        raise UserError(f"{name} takes no bn_axis_name, so it cannot train on {len(devices)} devices; set devices=1")
    return state.replace(apply_fn=dataclasses.replace(apply_fn, model=model.clone(bn_axis_name=AXIS)))


def data_parallel(state, devices, *, loss_fn: Callable = softmax_loss, frozen: int = 0):
    """``(state, step_fn)`` for ``fit`` on a ``data`` mesh over ``devices``: :func:`sync_bn` of the
    state and :func:`make_fit_step`."""
    return sync_bn(state, devices), make_fit_step(data_mesh(devices), loss_fn=loss_fn, frozen=frozen)


def make_pmap_step(axis: str = AXIS, devices=None, *, loss_fn: Callable = softmax_loss, frozen: int = 0):
    """The same step with ``jax.pmap``: ``step(rep_state, batch (D, b, ...), rng) ->
    (rep_state, metrics)`` where ``rep_state`` has a leading device axis
    (:func:`replicate`). Prefer :func:`make_dp_step`."""
    inner = functools.partial(train_step, loss_fn=loss_fn, frozen=frozen, axis_name=axis, vma=False)
    return jax.pmap(inner, axis_name=axis, in_axes=(0, 0, None), devices=devices)


def replicate(tree: Any, n: int) -> Any:
    """Stack ``n`` copies of every leaf along a new leading axis (pmap/vmap layout)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def split_batch(batch: dict, n: int) -> dict:
    """``(n * b, ...) -> (n, b, ...)`` for every entry."""
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not split into {n} equal shards")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(f, batch)
