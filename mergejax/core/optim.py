"""Optimizers and learning-rate schedules, as optax objects that compare by value.

Schedules map ``count`` (optimizer steps taken) to a learning rate. Every factory here is
decorated with :func:`value_equal`: two calls with equal arguments return objects that are
``==`` and hash alike, so a ``TrainState`` built from an equal config is the same static
value to ``jax.jit`` and reuses the compiled step (across seeds, runs and re-created
optimizers) without anyone keeping Python objects alive.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import optax


def value_equal(factory: Callable) -> Callable:
    """Decorate a pure factory of an optax schedule or ``GradientTransformation`` so that its
    results compare (``==``/``hash``) by ``(factory, arguments)`` instead of by identity.

    Arguments are frozen (lists -> tuples, dicts -> sorted items); if one is unhashable (an
    array, say) the plain result is returned, which is still correct, only not shared.
    """

    @functools.wraps(factory)
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        try:
            key = (factory.__module__, factory.__qualname__, _freeze(args), _freeze(kwargs))
            hash(key)
        except TypeError:
            return out
        if isinstance(out, optax.GradientTransformation):
            update = out.update if isinstance(out, optax.GradientTransformationExtraArgs) else (
                optax.with_extra_args_support(out).update)
            return _ValueEqualTransform(out.init, update, key)
        if callable(out):
            return _ValueEqualSchedule(out, key)
        return out

    return make


def _freeze(x: Any) -> Any:
    if type(x) is dict:
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if type(x) in (list, tuple):  # not tuple subclasses: a value-equal transform is its own key
        return tuple(_freeze(v) for v in x)
    if hasattr(x, "dtype") and getattr(x, "shape", None) == ():  # numpy/jax scalar
        return x.item() if hasattr(x, "item") else x
    return x


class _ValueEqualTransform(optax.GradientTransformationExtraArgs):
    """An optax transform (a named tuple ``(init, update)``) that compares by its recipe."""

    def __new__(cls, init, update, key):
        self = super().__new__(cls, init, update)
        self._key = key  # noqa: SLF001 (tuple subclass instances carry a __dict__)
        return self

    def __eq__(self, other):
        return isinstance(other, _ValueEqualTransform) and self._key == other._key

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"<optax transform {self._key[1]}{self._key[2:]}>"


@dataclasses.dataclass(frozen=True)
class _ValueEqualSchedule:
    """An optax schedule that compares by its recipe."""

    fn: Callable = dataclasses.field(compare=False, repr=False)
    key: tuple

    def __call__(self, count):
        return self.fn(count)


@value_equal
def make_optimizer(
    name: str,
    lr: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """SGD (coupled L2 like PyTorch's ``weight_decay``, then momentum), Adam (coupled L2) or
    AdamW (decoupled), with optional global-norm clipping first."""
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    if name == "sgd":
        parts += [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        parts += [optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)]
    elif name == "adam":
        parts += [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        parts += [optax.adam(lr)]
    elif name == "adamw":
        parts += [optax.adamw(lr, weight_decay=weight_decay)]
    else:
        raise ValueError(f"unknown optimizer {name!r}; available: sgd, adam, adamw")
    return optax.chain(*parts)


@value_equal
def step_decay(lr: float, total_steps: int, boundaries: Sequence[float] = (0.5, 0.75), factor: float = 0.1) -> optax.Schedule:
    """``lr`` multiplied by ``factor`` at each boundary (fractions of ``total_steps``).

    The default is the single-model CIFAR baseline of He et al. / Huang et al.: 0.1, /10 at
    50% and 75% of training.
    """
    if any(not 0.0 < b < 1.0 for b in boundaries):
        raise ValueError(f"step boundaries are fractions of training in (0, 1), got {tuple(boundaries)}")
    return optax.piecewise_constant_schedule(lr, {int(round(b * total_steps)): factor for b in boundaries})


@value_equal
def make_schedule(
    name: str,
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    boundaries: Sequence[float] = (0.5, 0.75),
    factor: float = 0.1,
) -> optax.Schedule:
    """``constant``, ``cosine`` (to 0 at ``total_steps``, optional linear warm-up) or ``step``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "cosine":
        if warmup_steps:
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps, end_value=0.0)
        return optax.cosine_decay_schedule(lr, total_steps)
    if name == "step":
        return step_decay(lr, total_steps, boundaries, factor)
    raise ValueError(f"unknown schedule {name!r}; available: constant, cosine, step")


# --- cyclic schedules: snapshot ensembles, SGDR, SWA, FGE -------------------------------------
#
# Every cyclic schedule here comes with a ``*_boundaries`` function giving the steps at which a
# snapshot is taken, in "steps taken" (the ``step`` a ``fit`` callback receives: snapshot after
# the optimizer step whose count is ``boundary - 1``). The collector reads these; no loop guesses.


def _check_steps(total_steps: int, num_cycles: int) -> None:
    if num_cycles < 1:
        raise ValueError(f"num_cycles must be >= 1, got {num_cycles}")
    if total_steps < num_cycles:
        raise ValueError(f"total_steps ({total_steps}) must be >= num_cycles ({num_cycles}): every cycle needs a step")


def cycle_starts(total_steps: int, num_cycles: int) -> tuple[int, ...]:
    """``num_cycles + 1`` step counts ``s_i = floor(i * T / M)``: cycle i covers counts
    ``[s_i, s_{i+1})``. Lengths differ by at most one, so ``T % M != 0`` still gives exactly
    M complete cycles (Eq. 2 with ``ceil(T/M)`` would truncate the last one or drop it)."""
    _check_steps(total_steps, num_cycles)
    return tuple((i * total_steps) // num_cycles for i in range(num_cycles + 1))


def snapshot_boundaries(total_steps: int, num_cycles: int) -> tuple[int, ...]:
    """Steps taken at the end of each cycle of :func:`snapshot_cosine` (the last is ``T``)."""
    return cycle_starts(total_steps, num_cycles)[1:]


def _piecewise_cosine(peak: float, starts: Sequence[int], end_value: float = 0.0) -> optax.Schedule:
    """Cosine from ``peak`` to ``end_value`` over each cycle ``[starts[i], starts[i+1])``;
    counts past the last start hold ``end_value``. Position and length are integers, so the
    value at a restart is exactly ``peak``."""
    starts_arr = jnp.asarray(starts[:-1], jnp.int32)
    lengths = jnp.asarray([b - a for a, b in zip(starts[:-1], starts[1:])], jnp.int32)
    last = starts[-1]

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        i = jnp.clip(jnp.sum(count >= starts_arr) - 1, 0, len(starts) - 2)
        pos = jnp.clip(count - starts_arr[i], 0, lengths[i]).astype(jnp.float32)
        pos = jnp.where(count >= last, lengths[i].astype(jnp.float32), pos)
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * pos / lengths[i].astype(jnp.float32)))
        return end_value + (peak - end_value) * cos

    return schedule


@value_equal
def snapshot_cosine(alpha0: float, total_steps: int, num_cycles: int) -> optax.Schedule:
    """Cyclic cosine annealing of Huang et al. 2017, Eq. 2, per iteration:

        lr(count) = alpha0 / 2 * (cos(pi * (count - s_i) / L_i) + 1),   count in [s_i, s_i + L_i)

    with ``count = t - 1`` and the cycles of :func:`cycle_starts`. When ``M`` divides ``T`` this
    is Eq. 2 exactly (``L_i = T / M``); otherwise the cycles are ``floor(T/M)`` or
    ``floor(T/M) + 1`` steps and each one still anneals towards 0 before its restart.
    Counts >= T give 0. Momentum is untouched at restarts (the schedule only scales steps).
    """
    return _piecewise_cosine(alpha0, cycle_starts(total_steps, num_cycles))


def sgdr_starts(first_period: int, total_steps: int, t_mult: float = 1.0) -> tuple[int, ...]:
    """Restart counts of SGDR: periods ``T_0, T_0 * T_mult, T_0 * T_mult^2, ...`` (each rounded
    to an integer >= 1), up to and including the first start >= ``total_steps``; the last
    cycle may be cut short by ``total_steps``."""
    if first_period < 1:
        raise ValueError(f"first_period must be >= 1, got {first_period}")
    if t_mult < 1:
        raise ValueError(f"t_mult must be >= 1, got {t_mult}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    starts, period = [0], float(first_period)
    while starts[-1] < total_steps:
        starts.append(starts[-1] + max(1, int(round(period))))
        period *= t_mult
    return tuple(starts)


def sgdr_boundaries(first_period: int, total_steps: int, t_mult: float = 1.0) -> tuple[int, ...]:
    """Steps taken at the end of every complete SGDR cycle within ``total_steps``."""
    return tuple(s for s in sgdr_starts(first_period, total_steps, t_mult)[1:] if s <= total_steps)


@value_equal
def sgdr(eta_max: float, first_period: int, total_steps: int, t_mult: float = 1.0, eta_min: float = 0.0) -> optax.Schedule:
    """SGDR (Loshchilov & Hutter 2017) per step:
    ``eta_min + (eta_max - eta_min) / 2 * (1 + cos(pi * T_cur / T_i))``, ``T_{i+1} = T_mult * T_i``.
    ``T_cur`` counts steps since the last restart (restart counts: :func:`sgdr_starts`)."""
    starts = sgdr_starts(first_period, total_steps, t_mult)
    cosine = _piecewise_cosine(eta_max, starts, eta_min)
    return lambda count: cosine(jnp.minimum(jnp.asarray(count, jnp.int32), starts[-1] - 1))


@value_equal
def fge_triangle(alpha1: float, alpha2: float, cycle_steps: int, start_step: int = 0) -> optax.Schedule:
    """Fast Geometric Ensembling's cyclic LR (Garipov et al. 2018): for ``count >= start_step``,
    ``t = ((count - start_step) mod c) / c`` and

        lr = (1 - 2t) alpha1 + 2t alpha2        for t <= 1/2
        lr = (2 - 2t) alpha2 + (2t - 1) alpha1  for t >  1/2

    i.e. linear alpha1 -> alpha2 over half a cycle and back. ``c`` must be even so that the
    minimum ``alpha2`` falls on a step. Counts before ``start_step`` give ``alpha1`` (join it
    after a pre-training schedule with ``optax.join_schedules``)."""
    if cycle_steps < 2 or cycle_steps % 2:
        raise ValueError(f"FGE cycle_steps must be even and >= 2, got {cycle_steps}")

    def schedule(count):
        count = jnp.asarray(count, jnp.int32)
        pos = jnp.mod(jnp.maximum(count - start_step, 0), cycle_steps)
        t = pos.astype(jnp.float32) / cycle_steps
        down = (1.0 - 2.0 * t) * alpha1 + 2.0 * t * alpha2
        up = (2.0 - 2.0 * t) * alpha2 + (2.0 * t - 1.0) * alpha1
        return jnp.where(pos <= cycle_steps // 2, down, up)

    return schedule


def fge_boundaries(start_step: int, cycle_steps: int, total_steps: int) -> tuple[int, ...]:
    """Steps taken right after each FGE minimum: the step with count ``start + k c + c/2`` (lr = alpha2)."""
    if cycle_steps < 2 or cycle_steps % 2:
        raise ValueError(f"FGE cycle_steps must be even and >= 2, got {cycle_steps}")
    return tuple(range(start_step + cycle_steps // 2 + 1, total_steps + 1, cycle_steps))


@value_equal
def swa_schedule(lr: float, swa_lr: float, swa_start: int) -> optax.Schedule:
    """The SWA learning rate of Izmailov et al. 2018 (their ``train.py``), per step with
    ``t = count / swa_start``: ``lr`` for t <= 0.5, linear to ``swa_lr`` at t = 0.9, then
    ``swa_lr`` (constant through the averaging phase, which starts at ``swa_start``)."""
    if swa_start < 1:
        raise ValueError(f"swa_start must be >= 1, got {swa_start}")

    def schedule(count):
        t = jnp.asarray(count, jnp.float32) / swa_start
        ratio = swa_lr / lr
        factor = jnp.where(t <= 0.5, 1.0, jnp.where(t <= 0.9, 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4, ratio))
        return lr * factor

    return schedule
