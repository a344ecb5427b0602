"""Learning-rate schedules as optax schedules: ``count (optimizer steps taken) -> lr``."""

from __future__ import annotations

from typing import Sequence

import optax


def step_decay(lr: float, total_steps: int, boundaries: Sequence[float] = (0.5, 0.75), factor: float = 0.1) -> optax.Schedule:
    """``lr`` multiplied by ``factor`` at each boundary (fractions of ``total_steps``).

    The default is the single-model CIFAR baseline of He et al. / Huang et al.: 0.1, /10 at
    50% and 75% of training.
    """
    if any(not 0.0 < b < 1.0 for b in boundaries):
        raise ValueError(f"step boundaries are fractions of training in (0, 1), got {tuple(boundaries)}")
    return optax.piecewise_constant_schedule(lr, {int(round(b * total_steps)): factor for b in boundaries})


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
