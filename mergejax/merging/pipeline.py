"""The merge pipeline: concat -> learn gates -> compress -> fine-tune, one function per stage.

  gate_stage(big_model, big_vars, train, test, key=k, tx=..., num_steps=..., lambda_fn=...)
                                                  -> (big_vars, log_alphas, summary)
  finetune(model, variables, train, test, key=k, tx=..., num_steps=...)   -> (variables, log)
  compress_stage(big_model, model, big_vars, log_alphas, train, test, key=k, **finetune)
                                                  -> (student_vars, summary)
  shrink(big_model, model, big_vars, train, test, key=k, gate={...}, finetune={...})
  merge(vars_a, vars_b, model, train, test, key=k, gate={...}, finetune={...})

Stages take Linen models, optax optimizers and schedules (:func:`gate_tx`, :func:`finetune_tx`
build the authors' ones), step counts (:func:`stage_steps`) and a ``jax.random`` key, split
once per stage. Settings ``fit`` cannot see (the optimizer, the lambda schedule) belong in
the ``manifest`` a caller passes, which guards a stage's workdir. With ``workdir`` each
training stage checkpoints and resumes (``fit``) and the gate history is kept on disk, so an
interrupted stage re-run with the same arguments returns the same summary. Only the core is
used; mapping a config onto these arguments is the caller's (``mergejax.cli.merge``).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from mergejax.core import data as data_lib
from mergejax.core.loop import evaluate, fit, read_metrics
from mergejax.core.optim import make_optimizer, step_decay
from mergejax.core.train import TrainState, eval_sums, model_apply_fn, model_eval_sums
from mergejax.core.units import unit_spec
from mergejax.merging import gates as G
from mergejax.merging.compress import compress
from mergejax.merging.concat import concat
from mergejax.merging.train import GateHistory, GateLoss, create_gate_state, gate_optimizer, split_params

__all__ = ["gate_tx", "finetune_tx", "stage_steps", "gate_stage", "finetune", "compress_stage", "shrink", "merge",
           "double_width", "evaluate_vars", "evaluate_sampled_gates", "seed_of"]


def double_width(model: nn.Module) -> nn.Module:
    """The big student's architecture: ``model`` with twice its ``width``."""
    return model.clone(width=float(model.width) * 2)


def seed_of(key: jax.Array) -> int:
    """A non-negative int32 drawn from ``key``, for ``fit``'s integer seed (batch order and
    step keys)."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def stage_steps(epochs: float, num_examples: int, batch_size: int) -> tuple[int, int]:
    """``(optimizer steps of ``epochs``, steps per epoch)``, full batches only, at least one step."""
    per_epoch = data_lib.steps_per_epoch(num_examples, batch_size, "drop")
    return max(1, int(round(epochs * per_epoch))), per_epoch


def evaluate_vars(model: nn.Module | Callable, variables: Mapping[str, Any], split: data_lib.Split,
                  batch_size: int = 500) -> dict:
    """Loss (nats) and accuracy on ``split`` of ``variables = {'params', 'batch_stats'}``
    under a Linen ``model`` or an ``apply_fn(params, batch_stats, x, *, train)``."""
    apply_fn = model_apply_fn(model) if isinstance(model, nn.Module) else model
    sums = jax.jit(model_eval_sums, static_argnums=0)  # keyed on apply_fn (by value) and shapes
    return evaluate(variables, split, batch_size, step_fn=lambda v, b: sums(apply_fn, v["params"], v["batch_stats"], b))


def gate_tx(steps: int, lr: float = 0.1, gate_lr: float = 0.2, *, momentum: float = 0.9, weight_decay: float = 1e-4,
            gate_momentum: float = 0.9, boundaries: Sequence[float] = (0.5, 0.7)) -> tuple[Any, Callable]:
    """``(optimizer, weight lr schedule)`` of a gate stage of ``steps``: SGD on the weights with
    LR x0.1 at ``boundaries`` (fractions of ``steps``), SGD with momentum on the gates
    (:func:`~mergejax.merging.train.gate_optimizer`). Defaults: the authors' CIFAR-100 settings."""
    weight_lr = step_decay(lr, steps, tuple(boundaries))
    tx = gate_optimizer(weight_lr, gate_lr, momentum=momentum, weight_decay=weight_decay, gate_momentum=gate_momentum)
    return tx, weight_lr


def finetune_tx(steps: int, lr: float = 0.1, *, momentum: float = 0.9, weight_decay: float = 1e-4,
                boundaries: Sequence[float] = (0.5, 0.75)) -> tuple[Any, Callable]:
    """``(optimizer, lr schedule)`` of fine-tuning: SGD, momentum, coupled weight decay, LR
    x0.1 at ``boundaries``."""
    lr_fn = step_decay(lr, steps, tuple(boundaries))
    return make_optimizer("sgd", lr_fn, momentum=momentum, weight_decay=weight_decay), lr_fn


def _on_device(state: TrainState) -> TrainState:
    """``state`` with every array committed to the default device. Inputs of mixed placement
    (committed arrays from a checkpoint or a computation on them, uncommitted fresh optimizer
    state) made the first step compile once more than the later ones (~12 s per stage on CPU)."""
    return jax.device_put(state, jax.devices()[0])


def _sub(workdir: str | None, name: str) -> str | None:
    return None if workdir is None else os.path.join(workdir, name)


def gate_stage(
    big_model: nn.Module,
    big_vars: Mapping[str, Any],
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    tx: Any,
    num_steps: int,
    lambda_fn: Callable,
    batch_size: int,
    lr_fn: Callable | None = None,
    augment_fn: Callable | None = None,
    log_alpha_mean: float = 3.0,
    log_alpha_std: float = 0.01,
    sampled_eval_log_alpha: float | None = None,
    eval_batch_size: int = 500,
    log_every: int = 50,
    checkpoint_every: int = 0,
    record_every: int = 0,
    manifest: Mapping | None = None,
    workdir: str | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable] = (),
    devices: Sequence | None = None,
) -> tuple[dict, dict, dict]:
    """Learn L0 gates and weights of a double-width network for ``num_steps`` steps of
    ``batch_size`` with optimizer ``tx`` (over ``{'model', 'gates'}``, e.g. :func:`gate_tx`)
    and the L_half weight ``lambda_fn(step)`` (e.g. :func:`~mergejax.merging.gates.lambda_schedule`).

    ``big_vars`` (``{'params', 'batch_stats'}`` of ``big_model``; donated to the training
    step) is a concatenation of two teachers or a network trained at double width. ``key``
    is split into the gates' initial log-alphas (N(log_alpha_mean, log_alpha_std^2); the
    default 3.0 starts every deterministic gate at exactly 1, so the big student starts as
    the ensemble; the authors use 1.0) and the training seed. With ``workdir``, training
    checkpoints to ``workdir/fit`` (every ``checkpoint_every`` steps, 0 = once per epoch;
    ``manifest`` guards it) and the gate history goes to ``workdir/gate_history.jsonl``.
    Returns ``(big_vars after, log_alphas {group: (units,)}, summary)``; summary: test
    loss/accuracy of ``big_start`` (no gates), ``big_student_step0`` (initial deterministic
    gates), ``big_student_step0_sampled`` (the authors' measurement: gates sampled per example
    from log_alpha ~ N(``sampled_eval_log_alpha``, std^2), their init; None, the default: not measured) and
    ``big_student_after_gates``; ``gate_binariness`` (pooled and ``_per_group``);
    ``gate_history`` (mean P[g > 0] per group and lambda every ``record_every`` steps,
    default 1/5 epoch); ``gate_log`` (the training metrics); ``steps``; ``timing_s``.
    ``devices`` (several): each batch split over them with BatchNorm synchronised (``fit``'s);
    each device draws its examples' gate samples from its own key (the same distribution as one
    device, not the same samples).
    """
    t0 = time.perf_counter()
    spec = unit_spec(big_model, big_vars)
    per_epoch = data_lib.steps_per_epoch(len(train), batch_size, "drop")
    init_key, fit_key = jax.random.split(key)
    log_alphas = G.init_log_alpha(init_key, spec, log_alpha_mean, log_alpha_std)
    state = _on_device(create_gate_state(big_model, spec, big_vars, log_alphas, tx, lr_fn=lr_fn, augment_fn=augment_fn))
    summary = {"big_start": evaluate_vars(big_model, big_vars, test, eval_batch_size),
               "big_student_step0": evaluate(state, test, eval_batch_size)}
    if sampled_eval_log_alpha is not None:  # the authors' start: random gates at their init, random at test time too
        k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
        start = G.init_log_alpha(k1, spec, sampled_eval_log_alpha, log_alpha_std)
        summary["big_student_step0_sampled"] = evaluate_sampled_gates(big_model, big_vars, start, test, key=k2,
                                                                      batch_size=eval_batch_size)
    history = GateHistory(lambda_fn, record_every or per_epoch // 5, num_steps, _sub(workdir, "gate_history.jsonl"))
    history.start(log_alphas)
    fit_dir = _sub(workdir, "fit")
    state, log = fit(state, train, num_steps=num_steps, batch_size=batch_size, seed=seed_of(fit_key),
                     log_every=min(log_every, num_steps), workdir=fit_dir, checkpoint_every=checkpoint_every,
                     callbacks=[history, *callbacks], loss_fn=GateLoss(lambda_fn), progress=progress, manifest=manifest,
                     devices=devices)
    summary["big_student_after_gates"] = evaluate(state, test, eval_batch_size)
    big_after, las = jax.device_get(split_params(state))
    summary.update(
        gate_binariness=G.binariness(las), gate_binariness_per_group={g: G.binariness({g: las[g]}) for g in sorted(las)},
        gate_history=history.history(), gate_log=log if fit_dir is None else read_metrics(fit_dir),
        steps={"gates": num_steps, "per_epoch": per_epoch}, timing_s={"gates": time.perf_counter() - t0},
    )
    return big_after, las, summary


def evaluate_sampled_gates(big_model: nn.Module, big_vars: Mapping[str, Any], log_alphas: Mapping[str, Any],
                           split: data_lib.Split, *, key: jax.Array, batch_size: int = 500) -> dict:
    """Test loss/accuracy of ``big_vars`` (eval mode: BatchNorm running statistics) with one
    hard-concrete gate sample per example and group from ``log_alphas`` ``{group: (units,)}``
    (a new draw per batch, from ``key``): the authors' evaluation, whose gates stay random."""
    spec, batch_index = unit_spec(big_model, big_vars), itertools.count()

    @jax.jit
    def sums(variables, batch, rng):
        gates = G.sample_gates(rng, log_alphas, batch["image"].shape[0])
        logits, _ = G.gated_apply(big_model, variables["params"], variables["batch_stats"], batch["image"], gates, spec,
                                  train=False)
        return eval_sums(logits, batch["label"], batch.get("mask"))

    return evaluate(big_vars, split, batch_size, step_fn=lambda v, b: sums(v, b, jax.random.fold_in(key, next(batch_index))))


def finetune(
    model: nn.Module,
    variables: Mapping[str, Any],
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    tx: Any,
    num_steps: int,
    batch_size: int,
    lr_fn: Callable | None = None,
    augment_fn: Callable | None = None,
    eval_batch_size: int = 500,
    log_every: int = 50,
    checkpoint_every: int = 0,
    manifest: Mapping | None = None,
    workdir: str | None = None,
    progress: bool = True,
    devices: Sequence | None = None,
) -> tuple[dict, list[dict]]:
    """Normal training of ``variables`` (``{'params', 'batch_stats'}`` of ``model``) for
    ``num_steps`` with ``tx`` (e.g. :func:`finetune_tx`), evaluated on ``test`` once per epoch;
    ``key`` gives the batch order and step keys. Returns ``(variables, metrics records)``; with
    ``workdir`` the run checkpoints there and the records are the whole run's (``read_metrics``).
    ``devices`` (several): each batch split over them with BatchNorm synchronised (``fit``'s)."""
    state = _on_device(TrainState.create(apply_fn=model_apply_fn(model), params=variables["params"],
                                         batch_stats=variables["batch_stats"], tx=tx, lr_fn=lr_fn, augment_fn=augment_fn))
    state, log = fit(state, train, num_steps=num_steps, batch_size=batch_size, seed=seed_of(key), eval_split=test,
                     eval_batch_size=eval_batch_size, log_every=min(log_every, num_steps), workdir=workdir,
                     checkpoint_every=checkpoint_every, progress=progress, manifest=manifest, devices=devices)
    out = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return out, log if workdir is None else read_metrics(workdir)


def compress_stage(
    big_model: nn.Module,
    model: nn.Module,
    big_vars: Mapping[str, Any],
    log_alphas: Mapping[str, Any],
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    workdir: str | None = None,
    teacher_units: Mapping[str, int] | None = None,
    **finetune_args: Any,
) -> tuple[dict, dict]:
    """Keep the best half of every unit group of the gated ``big_vars`` (gates folded into
    the weights) as variables of ``model``, then :func:`finetune` them (``key`` and
    ``finetune_args``; with ``workdir``, in ``workdir/fit``). Returns ``(student_vars,
    summary)``; summary: test loss/accuracy ``after_compression``, ``after_compression_unfolded``
    (the same units with the gate values left out of the weights, as the authors' notebook
    measures it) and ``after_finetune``,
    ``finetune_log``, ``steps``, ``timing_s``, and with ``teacher_units`` (group -> units of
    teacher A, which come first in a concatenation) ``kept_from_teacher_a``: the fraction of
    kept units from A."""
    t0 = time.perf_counter()
    spec = unit_spec(big_model, big_vars)
    student, keep = compress(big_vars, log_alphas, spec)
    unfolded, _ = compress(big_vars, log_alphas, spec, fold=False)
    bs = finetune_args.get("eval_batch_size", 500)
    summary: dict = {"after_compression": evaluate_vars(model, student, test, bs),  # gates folded: the gated network
                     "after_compression_unfolded": evaluate_vars(model, unfolded, test, bs)}  # the notebook's: not folded
    if teacher_units is not None:
        summary["kept_from_teacher_a"] = {g: float(np.mean(np.asarray(keep[g]) < teacher_units[g])) for g in sorted(keep)}
    final, log = finetune(model, student, train, test, key=key, workdir=_sub(workdir, "fit"), **finetune_args)
    summary.update(after_finetune=evaluate_vars(model, final, test, bs), finetune_log=log,
                   steps={"finetune": finetune_args["num_steps"]}, timing_s={"finetune": time.perf_counter() - t0})
    return final, summary


def shrink(
    big_model: nn.Module,
    model: nn.Module,
    big_vars: Mapping[str, Any],
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    gate: Mapping[str, Any],
    finetune: Mapping[str, Any],
    workdir: str | None = None,
    progress: bool = True,
    record_every: int = 0,
    teacher_units: Mapping[str, int] | None = None,
) -> tuple[dict, dict]:
    """:func:`gate_stage` (keyword arguments ``gate``) then :func:`compress_stage` (keyword
    arguments ``finetune``) on a double-width network's variables (``key`` split between
    them; stages in ``workdir/gates`` and ``workdir/finetune``). Returns ``(student_vars,
    summary)`` with both stages' entries (``steps`` and ``timing_s`` merged)."""
    gate_key, finetune_key = jax.random.split(key)
    big_after, las, s1 = gate_stage(big_model, big_vars, train, test, key=gate_key, workdir=_sub(workdir, "gates"),
                                    progress=progress, record_every=record_every, **gate)
    student, s2 = compress_stage(big_model, model, big_after, las, train, test, key=finetune_key,
                                 workdir=_sub(workdir, "finetune"), progress=progress, teacher_units=teacher_units,
                                 **finetune)
    return student, {**s1, **s2, "steps": {**s1["steps"], **s2["steps"]}, "timing_s": {**s1["timing_s"], **s2["timing_s"]}}


def merge(
    vars_a: Mapping[str, Any],
    vars_b: Mapping[str, Any],
    model: nn.Module,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    gate: Mapping[str, Any],
    finetune: Mapping[str, Any],
    workdir: str | None = None,
    progress: bool = True,
    record_every: int = 0,
) -> tuple[dict, dict]:
    """Merge two trained teachers (``{'params', 'batch_stats'}`` of ``model``) into one
    network of their architecture: :func:`concat`, then :func:`shrink` with ``key``, ``gate``
    and ``finetune``. Returns ``(student_vars, summary)``; ``big_start`` is the teachers'
    ensemble."""
    spec = unit_spec(model, vars_a)
    big = concat(vars_a, vars_b, spec)
    return shrink(double_width(model), model, big, train, test, key=key, gate=gate, finetune=finetune, workdir=workdir,
                  progress=progress, record_every=record_every, teacher_units=spec.groups)
