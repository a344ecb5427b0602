"""L0 hard-concrete gates (Louizos, Welling & Kingma 2018) on unit groups, and the gated
forward pass of any mergejax model.

One gate vector per unit group of a :class:`~mergejax.core.units.UnitSpec` (a residual stream is
one group, so all its blocks share one gate and one sampled mask). A group's gate multiplies
the *input units of every kernel that consumes the group* (``spec.consumers(g)``): after the
ReLU (and pooling) and before the next conv/dense, never right before a BatchNorm (which
would undo it). On a residual stream only the consuming convs (and the classifier) see the
gate, not the identity shortcut, so the gate can be folded exactly into the consuming
weights (:mod:`mergejax.merging.compress`).

Constants: beta = 2/3, gamma = -0.1, zeta = 1.1.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core.models import apply_model
from mergejax.core.optim import value_equal
from mergejax.core.units import UnitSpec

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1

Gates = Mapping[str, jax.Array]  # group -> (units,) or (B, units)

__all__ = [
    "BETA", "GAMMA", "ZETA", "sample", "deterministic", "prob_open", "l_half", "total_l_half",
    "init_log_alpha", "lambda_values", "lambda_schedule", "consumer_groups", "gated_apply",
    "sample_gates", "deterministic_gates", "binariness",
]


def sample(rng: jax.Array, log_alpha: jax.Array, shape: tuple = ()) -> jax.Array:
    """Hard-concrete sample: u ~ U(0,1), s = sigmoid((log u - log(1-u) + log_alpha) / beta),
    g = clip(s (zeta - gamma) + gamma, 0, 1). log_alpha (k,) -> gates (*shape, k) in [0, 1]."""
    log_alpha = jnp.asarray(log_alpha)
    u = jax.random.uniform(rng, (*shape, *log_alpha.shape), log_alpha.dtype, 1e-6, 1.0 - 1e-6)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def deterministic(log_alpha: jax.Array) -> jax.Array:
    """Test-time gate clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1); (k,) -> (k,)."""
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def prob_open(log_alpha: jax.Array) -> jax.Array:
    """P[g > 0] = sigmoid(log_alpha - beta log(-gamma / zeta)); (k,) -> (k,)."""
    return jax.nn.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def l_half(log_alpha: jax.Array) -> jax.Array:
    """(1/2 - mean_i P[g_i > 0])^2 for one gated group; scalar."""
    return (0.5 - jnp.mean(prob_open(log_alpha))) ** 2


def total_l_half(log_alphas: Mapping[str, jax.Array]) -> jax.Array:
    """Sum of :func:`l_half` over every gated group; scalar."""
    return sum(l_half(la) for la in log_alphas.values())


def init_log_alpha(rng: jax.Array, spec: UnitSpec, mean: float = 3.0, std: float = 0.01) -> dict:
    """``{group: log_alpha (units,)}`` drawn from N(mean, std^2). With mean >= log(11) ~ 2.40
    every deterministic gate is exactly 1, so the gated big student starts as the ensemble."""
    keys = jax.random.split(rng, len(spec.groups))
    return {g: mean + std * jax.random.normal(k, (n,)) for k, (g, n) in zip(keys, sorted(spec.groups.items()))}


def lambda_values(lam0: float, c: float, epochs: int, *, update_first: bool = False) -> np.ndarray:
    """lambda per epoch, growing by lambda <- lambda + c sqrt(lambda) once per epoch; (epochs,).

    ``update_first=False``: epoch 0 uses lam0 (lambda_0 = lam0, lambda_{e+1} = lambda_e + c sqrt(lambda_e)).
    ``update_first=True``: the update runs *before* every epoch, the first included, as the
    authors' code does (fmfi-compbio/neural-network-merging): epoch 0 already uses
    lam0 + c sqrt(lam0), e.g. 0.0612 for (0.05, 0.05), and epoch 100 uses 7.2496 (7.116 without).
    """
    lam = [float(lam0)]
    for _ in range(max(0, epochs - 1 + int(update_first))):
        lam.append(lam[-1] + c * math.sqrt(lam[-1]))
    lam = lam[1:] if update_first else lam
    return np.asarray(lam[:max(epochs, 0)], np.float32)


@value_equal
def lambda_schedule(lam0: float, c: float, steps_per_epoch: int, epochs: int, update_first: bool = False):
    """optax-style schedule ``step -> lambda`` constant within an epoch (the last epoch's value
    after the end); ``update_first``: see :func:`lambda_values`. Equal arguments give equal
    schedules (one compiled gate step)."""
    values = jnp.asarray(lambda_values(lam0, c, max(1, epochs), update_first=update_first))

    def schedule(step):
        e = jnp.minimum(jnp.asarray(step) // steps_per_epoch, values.shape[0] - 1)
        return values[e]

    return schedule


def sample_gates(rng: jax.Array, log_alphas: Mapping[str, jax.Array], batch: int) -> dict:
    """One sample per example per group: ``{group: (batch, units)}``."""
    keys = jax.random.split(rng, len(log_alphas))
    return {g: sample(k, log_alphas[g], (batch,)) for k, g in zip(keys, sorted(log_alphas))}


def deterministic_gates(log_alphas: Mapping[str, jax.Array]) -> dict:
    return {g: deterministic(la) for g, la in log_alphas.items()}


def consumer_groups(spec: UnitSpec) -> dict[tuple[str, ...], str]:
    """Module path of every kernel that reads a unit group -> that group, e.g.
    ``('stage1_block1', 'conv1') -> 'stage1'``."""
    out = {}
    for g in spec.groups:
        for path in spec.consumers(g):
            if path[0] != "params" or path[-1] != "kernel":
                raise ValueError(f"consumer {'/'.join(path)} of group {g!r} is not a params kernel")
            out[tuple(path[1:-1])] = g
    return out


def gated_apply(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    x: jax.Array,
    gates: Gates | None,
    spec: UnitSpec,
    *,
    train: bool,
    frozen: int = 0,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """:func:`mergejax.core.models.apply_model` with each group's gate multiplying the input units
    of that group's consuming kernels. gates: ``{group: (units,) or (B, units)}`` (a group
    left out is ungated); ``None`` = the plain model. Returns (logits (B, K), batch_stats).

    Implemented with a Linen method interceptor on ``nn.Dense`` / ``nn.Conv``, so the models
    themselves are unchanged. A model that fuses several groups' kernels into one op (a
    ``fused`` field, e.g. :class:`~mergejax.core.models.DenseNet`) runs unfused here, one
    ``nn.Conv`` per kernel: the same parameters and function.
    """
    if not gates:
        return apply_model(model, params, batch_stats, x, train=train, frozen=frozen, rng=rng)
    if "fused" in getattr(model, "__dataclass_fields__", {}):
        model = model.clone(fused=False)
    where = consumer_groups(spec)
    unknown = set(gates) - set(spec.groups)
    if unknown:
        raise ValueError(f"gates for unknown groups {sorted(unknown)}; the spec has {sorted(spec.groups)}")

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            group = where.get(tuple(context.module.scope.path))
            if group is not None and group in gates:
                inputs, *rest = args
                g = jnp.asarray(gates[group], inputs.dtype)
                if g.shape[-1] != inputs.shape[-1]:
                    raise ValueError(
                        f"gate of group {group!r} has {g.shape[-1]} units, layer "
                        f"{'/'.join(context.module.scope.path)} reads {inputs.shape[-1]}"
                    )
                if g.ndim == 2:  # per example: (B, units) -> (B, 1, ..., 1, units)
                    g = g.reshape(g.shape[:1] + (1,) * (inputs.ndim - 2) + g.shape[1:])
                return next_fun(inputs * g, *rest, **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        return apply_model(model, params, batch_stats, x, train=train, frozen=frozen, rng=rng)


def binariness(log_alphas: Mapping[str, jax.Array]) -> dict:
    """How close the deterministic gates are to {0, 1}, pooled over groups: fraction exactly
    0, exactly 1, in (0, 1), mean distance to the nearest of 0/1, and the mean open
    probability (floats)."""
    z = np.concatenate([np.asarray(deterministic(la)).ravel() for la in log_alphas.values()])
    p = np.concatenate([np.asarray(prob_open(la)).ravel() for la in log_alphas.values()])
    return {
        "frac_zero": float(np.mean(z == 0.0)),
        "frac_one": float(np.mean(z == 1.0)),
        "frac_between": float(np.mean((z > 0.0) & (z < 1.0))),
        "mean_dist_to_binary": float(np.mean(np.minimum(z, 1.0 - z))),
        "mean_prob_open": float(np.mean(p)),
    }
