"""Data-parallel training: the batch split over a ``data`` mesh axis, gradients and BatchNorm
running statistics averaged across it.

Recommended: :func:`make_dp_step` (``jax.shard_map`` over a :class:`jax.sharding.Mesh`).
:func:`make_pmap_step` does the same with ``jax.pmap`` (maintenance mode in JAX 0.10; kept
because it is still what many codebases use; tested to agree).

The step inside is :func:`dp_train_step`, a pure function to run under a named axis. It
computes the exact full-batch mean loss: each shard contributes ``sum(loss * mask) /
global_count`` and the shards' gradients are summed, so padded or unequal shards are
handled. TRAP (jax >= 0.7, ``check_vma=True``): the gradient with respect to a replicated
(axis-invariant) parameter is already summed over the axis by autodiff; we mark the params
varying with ``lax.pcast`` before ``grad`` and sum explicitly, so each collective happens
exactly once (tests pin the ratio to the single-device gradient at 1).

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
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mergejax.train import TrainState

AXIS = "data"


def data_mesh(devices=None, axis: str = AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with Auto axis type."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (axis,))


def dp_train_step(state: TrainState, batch: dict, rng: jax.Array, *, axis: str = AXIS, vma: bool = True) -> tuple[TrainState, dict]:
    """One synchronous data-parallel SGD step; call under the named ``axis`` (shard_map,
    pmap or vmap). ``batch`` is this device's shard ``{'image' (b,...), 'label' (b,),
    ['mask' (b,)]}``; ``state`` is replicated and stays identical on every device.
    ``vma``: True under ``shard_map(check_vma=True)`` (params are cast to varying first).
    ``rng`` must be the same on every device; it is folded with the device index so
    augmentation/dropout differ per shard."""
    idx = jax.lax.axis_index(axis)
    aug_rng, model_rng = jax.random.split(jax.random.fold_in(rng, idx))
    images = batch["image"]
    if state.augment_fn is not None:
        images = state.augment_fn(aug_rng, images)
    labels = batch["label"]
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    count = jax.lax.psum(mask.sum(), axis)

    def loss_fn(params):
        logits, batch_stats = state.apply_fn(params, state.batch_stats, images, train=True, rng=model_rng)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (losses * mask).sum() / jnp.maximum(count, 1.0), (logits, batch_stats)

    params = jax.lax.pcast(state.params, axis, to="varying") if vma else state.params
    (local_loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = jax.lax.psum(grads, axis)
    loss = jax.lax.psum(local_loss, axis)
    # Ghost-batch BN: equal-size shards, so the mean of shard means is the full-batch mean of
    # the statistic. Synchronised BN: the stats are already global and axis-invariant, and
    # pmean leaves them unchanged (up to rounding).
    batch_stats = jax.lax.pmean(batch_stats, axis)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    correct = ((jnp.argmax(logits, -1) == labels) * mask).sum()
    metrics = {
        "loss": loss,
        "accuracy": jax.lax.psum(correct, axis) / jnp.maximum(count, 1.0),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(new_params),
        "lr": state.lr_fn(state.step) if state.lr_fn is not None else jnp.nan,
    }
    new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def make_dp_step(mesh: Mesh, axis: str = AXIS, donate: bool = False):
    """``step(state, batch, rng) -> (state, metrics)`` jitted over ``mesh``: ``batch``'s
    leading axis (global batch, divisible by the axis size) is split over ``axis``; state,
    rng and metrics are replicated. Plug into ``fit(..., step_fn=...)``."""
    inner = functools.partial(dp_train_step, axis=axis, vma=True)
    sm = jax.shard_map(inner, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=(P(), P()), check_vma=True)
    return jax.jit(sm, donate_argnums=(0,) if donate else ())


def shard(batch: dict, mesh: Mesh, axis: str = AXIS) -> dict:
    """Place a host batch with its leading axis split over ``axis``."""
    return jax.device_put(batch, NamedSharding(mesh, P(axis)))


def make_pmap_step(axis: str = AXIS, devices=None):
    """The same step with ``jax.pmap``: ``step(rep_state, batch (D, b, ...), rng) ->
    (rep_state, metrics)`` where ``rep_state`` has a leading device axis
    (:func:`replicate`). Prefer :func:`make_dp_step`."""
    inner = functools.partial(dp_train_step, axis=axis, vma=False)
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
