"""Linear mode connectivity: evaluate the straight path between two networks' weights and its
loss barrier (Frankle et al. 2020), before and after permutation alignment (Ainsworth et al.
2022, Git Re-Basin).

    path = interpolation_path(state, params_a, params_b, test, ts)   # test loss/accuracy at each t
    loss_barrier(path["loss"], ts)
    naive_vs_aligned(model, state_a, state_b, test, ts)             # both paths, both barriers
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import flax.linen as nn
import numpy as np

from mergejax.core import data as data_lib
from mergejax.averaging import rebasin
from mergejax.averaging.weights import interpolate
from mergejax.core.loop import evaluate
from mergejax.core.train import TrainState
from mergejax.core.units import unit_spec, variables_of


def loss_barrier(losses: Sequence[float], ts: Sequence[float]) -> float:
    """``max_t L((1-t) a + t b) - ((1-t) L(a) + t L(b))`` over the evaluated points ``ts``
    (``ts[0] = 0``, ``ts[-1] = 1``; losses in nats). 0 when the path is never above the chord."""
    return max(loss - ((1 - t) * losses[0] + t * losses[-1]) for loss, t in zip(losses, ts))


def interpolation_path(state: TrainState, a: Any, b: Any, split: data_lib.Split, ts: Sequence[float], *,
                       batch_size: int = 500) -> dict:
    """Loss (nats) and accuracy on ``split`` of the params ``(1-t) a + t b`` for each ``t``
    (``state`` supplies the model and BatchNorm statistics): ``{'t', 'loss', 'accuracy'}``, lists."""
    evals = [evaluate(state.replace(params=interpolate(a, b, t)), split, batch_size) for t in ts]
    return {"t": [float(t) for t in ts], "loss": [e["loss"] for e in evals], "accuracy": [e["accuracy"] for e in evals]}


def naive_vs_aligned(model: nn.Module, a: TrainState, b: TrainState, split: data_lib.Split, ts: Sequence[float], *,
                     rng: np.random.Generator | None = None) -> dict:
    """Interpolate from ``a`` to ``b`` as trained (``naive``) and to ``b`` with its units
    permuted to match ``a`` by weight matching (``aligned``; the same function as ``b``).
    BatchNorm statistics are ``a``'s along both paths.

    Returns, for ``m`` in naive/aligned: ``{m}_loss``, ``{m}_acc`` (lists over ``ts``),
    ``{m}_barrier``, ``{m}_mid_acc`` (at ``ts[len(ts) // 2]``); ``t``, ``end_acc`` ([A, B]) and
    ``match_time_s``.
    """
    va, vb = variables_of(a.params, a.batch_stats), variables_of(b.params, b.batch_stats)
    t0 = time.perf_counter()
    vb_aligned = rebasin.align(unit_spec(model, va), va, vb, rng=rng)
    out = {"t": [float(t) for t in ts], "match_time_s": time.perf_counter() - t0}
    for name, other in (("naive", vb["params"]), ("aligned", vb_aligned["params"])):
        path = interpolation_path(a, a.params, other, split, ts)
        out.update({f"{name}_loss": path["loss"], f"{name}_acc": path["accuracy"], f"{name}_mid_acc": path["accuracy"][len(ts) // 2],
                    f"{name}_barrier": loss_barrier(path["loss"], ts)})
    out["end_acc"] = [out["naive_acc"][0], out["naive_acc"][-1]]
    return out
