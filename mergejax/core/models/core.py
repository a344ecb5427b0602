"""The one boundary between Flax Linen modules and plain pytrees, and the layer runner.

Every mergejax model is a sequence of named top-level layers (``model.layer_names()``):
the top-level keys of ``params`` and ``batch_stats`` are exactly those names, in forward
order, the last one being ``"head"``. Per-layer code (FreezeOut, gates, merging) addresses
a layer by that name or by its index.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any  # a pytree of arrays

EAGER_INIT_ROWS = 500  # init_variables runs eagerly above this many unit-table rows (DenseNet-40: 547)
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He et al. 2015


def scaled(channels: int, width: float) -> int:
    """Channel count after a width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def batch_norm(train: bool, name: str | None = None, axis_name: str | None = None, dtype: Any = None) -> nn.BatchNorm:
    """BatchNorm over (B, H, W) per channel. ``axis_name``: a named (mesh/pmap) axis over
    which the training batch moments are averaged (synchronised BN: the statistics of the
    global batch); ``None`` (default) uses this device's batch only. ``dtype``: output dtype;
    the moments, scale/bias and running statistics stay float32 (Flax's
    ``force_float32_reductions``, on by default)."""
    # momentum 0.9 == PyTorch's momentum=0.1; eps as in PyTorch.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name, dtype=dtype,
                        name=name)


def to_compute(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` in the compute dtype (model entry); ``dtype=None`` leaves it as it is."""
    return x if dtype is None else jnp.asarray(x, dtype)


def to_logits(y: jax.Array) -> jax.Array:
    """Logits at least float32 (bf16 -> float32, float64 kept), so softmax and the loss run in fp32."""
    return y.astype(jnp.promote_types(y.dtype, jnp.float32))


def run_layers(layers: Sequence[Callable], x: jax.Array, train: bool, frozen: int) -> jax.Array:
    """Apply ``layers`` in order; the first ``frozen`` run in eval mode and no gradient
    flows back through them (``stop_gradient`` at the prefix output), so XLA drops their
    backward pass when ``frozen`` is static."""
    if not 0 <= frozen < len(layers):
        raise ValueError(f"frozen must be in [0, {len(layers) - 1}] (the head is never frozen), got {frozen}")
    for i, layer in enumerate(layers):
        x = layer(x, train=train and i >= frozen)
        if i == frozen - 1:
            x = jax.lax.stop_gradient(x)
    return x


class Head(nn.Module):
    """Optional BN-ReLU, global average pool over (H, W) if the input is 4-D, then Dense
    (with a bias unless ``use_bias=False``). Computes in ``dtype``; logits at least float32."""

    num_classes: int
    pre_norm: bool = False
    bn_axis_name: str | None = None  # synchronised BN over this named axis (see batch_norm)
    use_bias: bool = True
    dtype: Any = None  # compute dtype (see MLP)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.pre_norm:
            x = nn.relu(batch_norm(train, name="bn", axis_name=self.bn_axis_name, dtype=self.dtype)(x))
        if x.ndim == 4:
            x = jnp.mean(x, axis=(1, 2))
        return to_logits(nn.Dense(self.num_classes, use_bias=self.use_bias, dtype=self.dtype, name="dense")(x))


def init_variables(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> tuple[Params, Params]:
    """Initialise ``model`` for inputs of shape ``input_shape`` (batch first).

    Returns ``(params, batch_stats)``; ``batch_stats`` is ``{}`` for models without BatchNorm.
    Runs jitted, compiled once per (model config, input shape) in a process: Linen modules
    compare by value, so every seed of a sweep reuses it (eager ``init`` costs ~0.3 s of
    op-by-op dispatch per call on CPU). Models with unhashable fields (e.g. a list) and models
    whose unit table has more than :data:`EAGER_INIT_ROWS` rows run eagerly: XLA's compile time
    of an init grows faster than its number of parameters (DenseNet-100, 8,417 variables: 12.8 min
    to compile on a 2-core CPU against 46 s eager; ResNet-110, 223 rows, compiles in seconds).
    """
    x = jnp.zeros(tuple(input_shape), jnp.float32)
    table = getattr(model, "unit_table", None)
    try:
        hash(model)  # jit's static argument
        compiled = table is None or len(table()) <= EAGER_INIT_ROWS
    except TypeError:  # an unhashable module field
        compiled = False
    except NotImplementedError:  # no unit table for this configuration (ResNet shortcut="A"): compile as without one
        compiled = True
    variables = jax.jit(_init, static_argnums=0)(model, rng, x) if compiled else _init(model, rng, x)
    return variables["params"], variables.get("batch_stats", {})


def _init(model: nn.Module, rng: jax.Array, x: jax.Array) -> dict:
    return model.init(rng, x, train=False)


def apply_model(
    model: nn.Module,
    params: Params,
    batch_stats: Params,
    x: jax.Array,
    *,
    train: bool,
    frozen: int = 0,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, Params]:
    """Logits (B, num_classes) and the updated batch statistics (unchanged in eval mode).

    ``rng`` feeds dropout in training (only models with dropout need it).
    """
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return model.apply(variables, x, train=False, frozen=frozen), batch_stats
    rngs = {"dropout": rng} if rng is not None else {}
    logits, updates = model.apply(variables, x, train=True, frozen=frozen, mutable=["batch_stats"], rngs=rngs)
    return logits, updates.get("batch_stats", batch_stats)


def count_params(params: Params) -> int:
    """Total number of scalars in a pytree (works on ``jax.eval_shape`` output too)."""
    return sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree.leaves(params))
