"""Train state and the one pure training step.

``train_step(state, batch, rng, *, loss_fn, frozen, axis_name) -> (state, metrics)`` is the
only step body in the library: plain supervised training uses the default loss, gate
learning passes CE + lambda L_half, FreezeOut passes ``frozen``, data parallelism runs it
under a named mesh axis. jit it where you call it::

    step = jax.jit(train_step, donate_argnums=0, static_argnames=STEP_STATIC)

The static fields of :class:`TrainState` (``apply_fn``, ``tx``, ``lr_fn``, ``augment_fn``)
compare by value (:class:`ModelApply`, :func:`mergejax.core.optim.value_equal`), so states
built from equal configs reuse one compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mergejax.core.models import apply_model, init_variables
from mergejax.core.models.core import to_logits

Params = Any
#: ``train_step``'s static keyword arguments, for ``jax.jit(..., static_argnames=STEP_STATIC)``.
STEP_STATIC = ("loss_fn", "frozen", "axis_name", "vma")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (pytree leaves) plus the static functions
    that define the step (``apply_fn``, ``tx``, ``lr_fn``, ``augment_fn``; not leaves).

    apply_fn(params, batch_stats, images, *, train, frozen, rng) -> (logits, batch_stats)
    """

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params
    batch_stats: Params
    opt_state: optax.OptState
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    lr_fn: Callable | None = flax.struct.field(pytree_node=False, default=None)
    augment_fn: Callable | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, apply_fn, params, batch_stats, tx, lr_fn=None, augment_fn=None) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                   apply_fn=apply_fn, tx=tx, lr_fn=lr_fn, augment_fn=augment_fn)

    def arrays(self) -> dict:
        """The checkpointed part: ``{'step', 'params', 'batch_stats', 'opt_state'}``."""
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state}

    def replace_arrays(self, tree: dict) -> "TrainState":
        return self.replace(**tree)


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """A Linen model as ``apply_fn(params, batch_stats, x, *, train, frozen=0, rng=None)``.

    Compares by the model (Linen modules compare by their fields), so two states of equal
    models are one static value to ``jax.jit``.
    """

    model: nn.Module

    def __call__(self, params, batch_stats, x, *, train, frozen=0, rng=None):
        return apply_model(self.model, params, batch_stats, x, train=train, frozen=frozen, rng=rng)


def model_apply_fn(model: nn.Module) -> Callable:
    """:class:`ModelApply` of ``model``; a plain closure if the model is unhashable (a list
    field, say), which still works but compiles once per closure."""
    try:
        hash(model)
    except TypeError:
        return lambda params, batch_stats, x, *, train, frozen=0, rng=None: apply_model(
            model, params, batch_stats, x, train=train, frozen=frozen, rng=rng)
    return ModelApply(model)


def create_state(
    model: nn.Module,
    rng: jax.Array,
    input_shape: Sequence[int],
    tx: optax.GradientTransformation,
    *,
    lr_fn: Callable | None = None,
    augment_fn: Callable | None = None,
) -> TrainState:
    """Initialise ``model`` and wrap it in a :class:`TrainState`."""
    params, batch_stats = init_variables(model, rng, input_shape)
    return TrainState.create(apply_fn=model_apply_fn(model), params=params, batch_stats=batch_stats, tx=tx,
                             lr_fn=lr_fn, augment_fn=augment_fn)


# --- losses -------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over examples with ``mask`` 1 (nats), in at least float32.
    logits (B, K), labels (B,)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(to_logits(logits), labels)
    if mask is None:
        return losses.mean()
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of examples with ``mask`` 1 whose argmax is the label. logits (B, K), labels (B,)."""
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if mask is None:
        return correct.mean()
    return (correct * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def softmax_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, params: Params, step: jax.Array):
    """The default ``loss_fn`` of :func:`train_step`: ``sum_i w_i CE_i`` (nats), no extra metrics.

    Every ``loss_fn(logits (B,K), labels (B,), weights (B,), params, step) -> (loss, metrics)``
    gets ``weights`` = mask / (examples in the whole batch), which sum to 1 over all shards, so
    the loss is this shard's share and the shares add up to the batch mean. A term that does
    not depend on the batch (a penalty on ``params``) is a share when multiplied by
    ``weights.sum()``; extra ``metrics`` must be shares too (they are summed over shards).
    """
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights), {}


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    loss_fn: Callable = softmax_loss,
    frozen: int = 0,
    axis_name: str | None = None,
    vma: bool = True,
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch = {'image': (B,H,W,C), 'label': (B,), ['mask': (B,)]}``.

    ``rng`` drives augmentation and dropout. Static arguments (:data:`STEP_STATIC`):
    ``loss_fn`` (see :func:`softmax_loss`); ``frozen`` layers at the front run in eval mode
    without backward (FreezeOut); ``axis_name``: run under this named axis (shard_map, pmap,
    vmap) with ``batch`` this device's shard, the same ``rng`` on every device (folded with
    the device index), and gradients, loss and metrics summed and BatchNorm statistics
    averaged over it, so the replicated state stays identical everywhere; ``vma``: under
    ``shard_map(check_vma=True)`` the params are cast to varying first, because autodiff
    already sums the gradient of an axis-invariant input and the explicit ``psum`` must be
    the only one. Metrics (scalars): loss, accuracy, grad_norm, param_norm, lr and the
    loss's own.
    """
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    aug_rng, model_rng = jax.random.split(rng)
    images = batch["image"]
    if state.augment_fn is not None:
        images = state.augment_fn(aug_rng, images)
    labels = batch["label"]
    mask = batch.get("mask")
    real = jnp.result_type(float)  # float64 under jax_enable_x64 (golden tests), else float32
    mask = jnp.ones(labels.shape, real) if mask is None else mask.astype(real)
    total = _sum_over(mask.sum(), axis_name)
    weights = mask / jnp.maximum(total, 1.0)

    def objective(params):
        logits, batch_stats = state.apply_fn(params, state.batch_stats, images, train=True, frozen=frozen,
                                             rng=model_rng)
        logits = to_logits(logits)  # a bf16 model's loss and softmax still run in float32
        loss, extra = loss_fn(logits, labels, weights, params, state.step)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
        return loss, (batch_stats, {"accuracy": correct, **extra})

    params = state.params
    if axis_name is not None and vma:
        params = jax.lax.pcast(params, axis_name, to="varying")
    (loss, (batch_stats, shares)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    if axis_name is not None:
        grads, loss, shares = _sum_over((grads, loss, shares), axis_name)
        # Ghost-batch BN: the mean of equal shards' statistics; synchronised BN: unchanged.
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        **shares,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(new_params),
        "lr": state.lr_fn(state.step) if state.lr_fn is not None else jnp.nan,
    }
    new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def _sum_over(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


# --- evaluation -----------------------------------------------------------------------------


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> dict:
    """Sums over the batch (so batches add up exactly): loss_sum (nats), correct, count.
    Computed in at least float32 whatever the logits' dtype."""
    logits = to_logits(logits)
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def model_eval_sums(apply_fn: Callable, params: Params, batch_stats: Params, batch: dict) -> dict:
    """:func:`eval_sums` of ``apply_fn`` in eval mode on ``batch``. jit with
    ``static_argnums=0``: keyed on ``apply_fn`` and shapes only, so states that differ in
    optimizer or schedule share one compile."""
    logits, _ = apply_fn(params, batch_stats, batch["image"], train=False)
    return eval_sums(logits, batch["label"], batch.get("mask"))


def eval_step(state: TrainState, batch: dict) -> dict:
    """:func:`model_eval_sums` of ``state``."""
    return model_eval_sums(state.apply_fn, state.params, state.batch_stats, batch)


def placed_step(step: Callable, state_sharding: Any, input_sharding: Any) -> Callable:
    """``step(state, batch, rng)`` with its inputs placed: ``batch`` and ``rng`` on
    ``input_sharding`` (a pair of shardings, or one for both) every call, the state on
    ``state_sharding`` only when it is not there yet (a fresh or restored state: the step's own
    output already is, and a no-op ``device_put`` costs ~20 us per leaf). ``run.batch_sharding``:
    where the batch goes, so a loop can prefetch it there directly (``fit`` does on accelerators)."""
    def run(state, batch, rng):
        if getattr(state.step, "sharding", None) != state_sharding:
            state = jax.device_put(state, state_sharding)
        batch, rng = jax.device_put((batch, rng), input_sharding)
        return step(state, batch, rng)

    run.batch_sharding = input_sharding[0] if isinstance(input_sharding, (tuple, list)) else input_sharding
    return run
