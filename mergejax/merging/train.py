"""Gate learning on the big student (step 2b): one optimizer with two parameter groups.

The train state is an ordinary :class:`mergejax.core.train.TrainState` whose ``params`` are
``{'model': big-student params, 'gates': {group: log_alpha (units,)}}`` and whose
``apply_fn`` (:class:`GatedApply`) samples one hard-concrete gate per example per group in
training (from the step's explicit rng) and uses the deterministic gates in evaluation, so
the core ``train_step``, ``fit`` and ``evaluate`` work unchanged. The loss is
:class:`GateLoss`: L = cross-entropy + lambda(step) * sum_groups L_half. :class:`GateHistory`
is the ``fit`` callback that records the gates' open probabilities (on disk, so a resumed
run keeps what it recorded before the interruption).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.core.optim import make_optimizer, value_equal
from mergejax.core.train import TrainState, softmax_loss
from mergejax.core.units import UnitSpec
from mergejax.merging import gates as G

__all__ = ["gate_optimizer", "GatedApply", "gated_apply_fn", "GateLoss", "create_gate_state", "split_params",
           "GateHistory"]


@value_equal
def gate_optimizer(
    weight_lr: float | optax.Schedule = 0.1,
    gate_lr: float | optax.Schedule = 0.2,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    gate_momentum: float = 0.9,
) -> optax.GradientTransformation:
    """optax.partition over ``{'model': ..., 'gates': ...}``: the weights get SGD (coupled
    weight decay, momentum), the gate parameters SGD with momentum and no weight decay.
    Defaults are the authors' CIFAR-100 ResNet-20 settings."""
    return optax.partition(
        {
            "weights": make_optimizer("sgd", weight_lr, momentum=momentum, weight_decay=weight_decay),
            "gates": make_optimizer("sgd", gate_lr, momentum=gate_momentum),
        },
        lambda params: {"model": jax.tree.map(lambda _: "weights", params["model"]),
                        "gates": jax.tree.map(lambda _: "gates", params["gates"])},
    )


def _spec_key(spec: UnitSpec) -> tuple:
    return tuple(sorted(spec.groups.items())), tuple(sorted(spec.axes.items()))


@dataclasses.dataclass(frozen=True)
class GatedApply:
    """``apply_fn(params, batch_stats, x, *, train, frozen=0, rng=None)`` for
    ``params = {'model', 'gates'}``: per-example sampled gates in training (``rng`` needed,
    split into gate and dropout keys), deterministic gates in evaluation.

    Compares by ``(model, spec)`` and hashes by the spec's contents, so two gate states of
    equal networks are one static value to ``jax.jit``."""

    model: nn.Module
    spec: UnitSpec

    def __hash__(self):
        return hash((self.model, _spec_key(self.spec)))

    def __call__(self, params, batch_stats, x, *, train, frozen=0, rng=None):
        log_alphas = params["gates"]
        if train:
            if rng is None:
                raise ValueError("gated training needs an explicit rng for the gate samples")
            gate_rng, rng = jax.random.split(rng)
            gates = G.sample_gates(gate_rng, log_alphas, x.shape[0])
        else:
            gates = G.deterministic_gates(log_alphas)
        return G.gated_apply(self.model, params["model"], batch_stats, x, gates, self.spec, train=train, frozen=frozen,
                             rng=rng)


def gated_apply_fn(model: nn.Module, spec: UnitSpec) -> Callable:
    """:class:`GatedApply` of ``model``; a plain closure if the model is unhashable (a list
    field, say), which still works but compiles once per closure."""
    apply_fn = GatedApply(model, spec)
    try:
        hash(apply_fn)
    except TypeError:
        return lambda *args, **kwargs: GatedApply.__call__(apply_fn, *args, **kwargs)
    return apply_fn


@dataclasses.dataclass(frozen=True)
class GateLoss:
    """The ``loss_fn`` of :func:`mergejax.core.train.train_step` for gate learning:
    L = CE + lambda(step) * sum_groups L_half(params['gates']).

    ``lambda_fn``: schedule ``step -> lambda`` (e.g. :func:`gates.lambda_schedule`, which
    compares by value, so equal schedules share a compile). Returns this shard's share of the
    loss and the shares of ``ce``, ``l_half``, ``lambda`` and ``prob_open`` (mean P[g > 0]
    over all gates, before the update); summed over shards they are the batch values."""

    lambda_fn: Callable

    def __call__(self, logits, labels, weights, params, step):
        share = weights.sum()
        ce, _ = softmax_loss(logits, labels, weights, params, step)
        lam = jnp.asarray(self.lambda_fn(step), ce.dtype)
        half = G.total_l_half(params["gates"])
        p_open = jnp.mean(jnp.concatenate([G.prob_open(a) for a in params["gates"].values()]))
        metrics = {"ce": ce, "l_half": half * share, "lambda": lam * share, "prob_open": p_open * share}
        return ce + lam * half * share, metrics


def create_gate_state(
    model: nn.Module,
    spec: UnitSpec,
    big_vars: Mapping[str, Any],
    log_alphas: Mapping[str, jax.Array],
    tx: optax.GradientTransformation,
    *,
    lr_fn: Callable | None = None,
    augment_fn: Callable | None = None,
) -> TrainState:
    """A TrainState for gate learning from big-student variables ``{'params', 'batch_stats'}``."""
    params = {"model": big_vars["params"], "gates": dict(log_alphas)}
    return TrainState.create(apply_fn=gated_apply_fn(model, spec), params=params, batch_stats=big_vars["batch_stats"],
                             tx=tx, lr_fn=lr_fn, augment_fn=augment_fn)


def split_params(state: TrainState) -> tuple[dict, dict]:
    """``(big_vars {'params', 'batch_stats'}, log_alphas)`` of a gate-learning state."""
    return {"params": state.params["model"], "batch_stats": state.batch_stats}, state.params["gates"]


class GateHistory:
    """A ``fit`` callback recording, every ``every`` steps and at step ``last``, the mean open
    probability P[g > 0] of each gate group and lambda(step - 1) (the value that step used).

    With ``path`` each record is appended to a JSON-lines file and the records already there
    are read back, so a resumed ``fit`` returns the whole history: at its first call (step s,
    one past the checkpoint it resumed from) the records of steps >= s, written by the killed
    run after that checkpoint, are dropped and recomputed. Call :meth:`start` with the
    initial log-alphas before ``fit`` to record step 0.
    """

    def __init__(self, lambda_fn: Callable, every: int, last: int, path: str | None = None):
        self.lambda_fn, self.every, self.last, self.path = lambda_fn, max(1, int(every)), int(last), path
        self.records: list[dict] = []
        self._resumed = False
        if path is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:  # a line torn by a kill
                        pass

    def _write(self, records: list[dict], mode: str) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        target = self.path if mode == "a" else f"{self.path}.tmp-{os.getpid()}"  # a rewrite is atomic
        with open(target, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if target != self.path:
            os.replace(target, self.path)

    def record(self, step: int, log_alphas: Mapping[str, jax.Array]) -> None:
        las = jax.device_get(log_alphas)
        rec = {"step": int(step), "lambda": float(self.lambda_fn(max(step - 1, 0))),
               "prob_open": {g: float(np.mean(np.asarray(G.prob_open(las[g])))) for g in sorted(las)}}
        self.records.append(rec)
        self._write([rec], "a")

    def start(self, log_alphas: Mapping[str, jax.Array]) -> None:
        """Record step 0 unless a previous run already did."""
        if not any(r["step"] == 0 for r in self.records):
            self.record(0, log_alphas)

    def __call__(self, step: int, state: TrainState) -> None:
        if not self._resumed:
            self._resumed = True
            if any(r["step"] >= step for r in self.records):
                self.records = [r for r in self.records if r["step"] < step]
                self._write(self.records, "w")
        if step % self.every == 0 or step == self.last:
            self.record(step, state.params["gates"])

    def history(self) -> dict:
        """``{'step': [...], 'lambda': [...], 'prob_open': {group: [...]}}`` in step order."""
        recs = sorted(self.records, key=lambda r: r["step"])
        groups = sorted(recs[0]["prob_open"]) if recs else []
        return {"step": [r["step"] for r in recs], "lambda": [r["lambda"] for r in recs],
                "prob_open": {g: [r["prob_open"][g] for r in recs] for g in groups}}
