"""The merge pipeline: concat -> learn gates -> compress -> fine-tune, one function per stage.

  gate_stage(big_model, big_vars, config, train, test, key=k)   -> (big_vars, log_alphas, summary)
  compress_stage(big_model, model, big_vars, log_alphas, ...)   -> (student_vars, summary)
  shrink(big_model, model, big_vars, ..., key=k)                 gate_stage + compress_stage
  merge(vars_a, vars_b, config, train, test, key=k, model=m)     concat + shrink

Models are Linen modules; optimizers and schedules are built from :class:`MergeConfig`'s
settings (:func:`gate_tx`, :func:`finetune_tx`); randomness comes from a ``jax.random`` key,
split once per stage. With ``workdir`` each training stage checkpoints and resumes (``fit``)
and the gate history is kept on disk, so an interrupted stage re-run with the same arguments
returns the same summary. Only core modules are used (data, models, train, schedules, units).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from mergejax import data as data_lib
from mergejax.merging import gates as G
from mergejax.merging.compress import compress
from mergejax.merging.concat import concat
from mergejax.merging.train import GateHistory, create_gate_state, gate_optimizer, jit_gate_step, split_params
from mergejax.models import make_model
from mergejax.schedules import step_decay
from mergejax.train import TrainState, eval_sums, evaluate, fit, make_optimizer, model_apply_fn, read_metrics
from mergejax.units import unit_spec

__all__ = ["MergeConfig", "PRESETS", "tiny_config", "paper_config", "gate_tx", "finetune_tx", "gate_stage", "finetune",
           "compress_stage", "shrink", "merge", "double_width", "big_model_kwargs", "evaluate_vars", "seed_of"]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Gate stage and fine-tuning. Defaults: the authors' CIFAR-100 ResNet-20 code
    (fmfi-compbio/neural-network-merging, cifar100/), except ``log_alpha_mean`` (they use 1.0;
    we start every deterministic gate at exactly 1 so the big student starts as the ensemble).
    ``dataset``/``model``/``model_kwargs`` name the teachers (used by :func:`merge` when no
    model is given); ``seed`` is :func:`merge`'s default key."""

    dataset: str = "digits"
    model: str = "cnn"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the teachers'
    batch_size: int = 128
    augment: bool = False
    # importance (gate) learning
    gate_epochs: float = 100.0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gate_boundaries: Sequence[float] = (0.5, 0.7)  # weight LR x0.1 at epochs 50 and 70 of 100
    gate_lr: float = 0.2
    gate_momentum: float = 0.9
    lambda0: float = 0.05
    lambda_step: float = 0.05  # lambda <- lambda + lambda_step * sqrt(lambda), once per epoch
    log_alpha_mean: float = 3.0
    log_alpha_std: float = 0.01
    # fine-tuning of the compressed student (normal training)
    finetune_epochs: float = 100.0
    finetune_lr: float = 0.1
    finetune_boundaries: Sequence[float] = (0.5, 0.75)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # steps, with a workdir; 0 = once per epoch
    eval_batch_size: int = 500


def tiny_config() -> MergeConfig:
    """Width-0.5 SmallCNN on digits, a few hundred steps on a CPU. The gate stage is ~100 steps
    instead of the authors' ~39k, so lambda and the gate learning rate are scaled up to let
    the gates reach half-open within it (lambda 5, +5 sqrt(lambda) per epoch, gate lr 5)."""
    return MergeConfig(dataset="digits", model="cnn", model_kwargs={"width": 0.5}, batch_size=64, gate_epochs=4.0,
                       finetune_epochs=4.0, lambda0=5.0, lambda_step=5.0, gate_lr=5.0, log_alpha_mean=3.0, log_every=22,
                       checkpoint_every=44)  # digits epochs are 22 steps: a checkpoint per epoch costs more than it saves


def paper_config() -> MergeConfig:
    """ResNet-20 on CIFAR-100 with the authors' settings (the MergeConfig defaults) and
    pad-crop-flip augmentation."""
    return MergeConfig(dataset="cifar100", model="resnet20", batch_size=128, augment=True, log_every=200)


PRESETS = {"tiny": tiny_config, "paper": paper_config}  # for ``mergejax merge --preset``


def big_model_kwargs(model_kwargs: Mapping[str, Any]) -> dict:
    """The teachers' model kwargs at double width."""
    return {**dict(model_kwargs), "width": float(model_kwargs.get("width", 1.0)) * 2}


def double_width(model: nn.Module) -> nn.Module:
    """The big student's architecture: ``model`` with twice its ``width``."""
    return model.clone(width=float(model.width) * 2)


def seed_of(key: jax.Array) -> int:
    """A non-negative int32 drawn from ``key``, for ``fit``'s integer seed (batch order and
    step keys)."""
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def _num_steps(epochs: float, per_epoch: int) -> int:
    return max(1, int(round(epochs * per_epoch)))


def _settings(config: MergeConfig) -> dict:
    """What ``fit`` cannot see (optimizer, schedules, lambda), for its workdir manifest."""
    return {"merge_config": dataclasses.asdict(config)}


def _eval_sums(apply_fn: Callable, variables: Mapping[str, Any], batch: dict) -> dict:
    logits, _ = apply_fn(variables["params"], variables["batch_stats"], batch["image"], train=False)
    return eval_sums(logits, batch["label"], batch.get("mask"))


def evaluate_vars(model: nn.Module | Callable, variables: Mapping[str, Any], split: data_lib.Split,
                  batch_size: int = 500) -> dict:
    """Loss (nats) and accuracy on ``split`` of ``variables = {'params', 'batch_stats'}``
    under a Linen ``model`` or an ``apply_fn(params, batch_stats, x, *, train)``."""
    apply_fn = model_apply_fn(model) if isinstance(model, nn.Module) else model
    # One jit per call, but over the same function with apply_fn static: the compiled
    # evaluation is reused across calls with the same apply_fn.
    step = jax.jit(_eval_sums, static_argnums=0)
    return evaluate(variables, split, batch_size, step_fn=lambda v, batch: step(apply_fn, v, batch))


def gate_tx(config: MergeConfig, num_steps: int) -> tuple[Any, Callable]:
    """``(optimizer, weight lr schedule)`` of the gate stage: SGD on the weights with step
    decay at ``gate_boundaries``, SGD with momentum on the gates (:func:`gate_optimizer`)."""
    weight_lr = step_decay(config.lr, num_steps, config.gate_boundaries)
    tx = gate_optimizer(weight_lr, config.gate_lr, momentum=config.momentum, weight_decay=config.weight_decay,
                        gate_momentum=config.gate_momentum)
    return tx, weight_lr


def finetune_tx(config: MergeConfig, num_steps: int) -> tuple[Any, Callable]:
    """``(optimizer, lr schedule)`` of fine-tuning: SGD, momentum, coupled weight decay, LR
    x0.1 at ``finetune_boundaries``."""
    lr_fn = step_decay(config.finetune_lr, num_steps, config.finetune_boundaries)
    return make_optimizer("sgd", lr_fn, momentum=config.momentum, weight_decay=config.weight_decay), lr_fn


def _augment(config: MergeConfig):
    return data_lib.augment_cifar if config.augment else None


def _on_device(state: TrainState) -> TrainState:
    """``state`` with every array committed to the default device. Inputs of mixed placement
    (committed arrays from a checkpoint or a computation on them, uncommitted fresh optimizer
    state) made the first step compile once more than the later ones (~12 s per stage on CPU)."""
    return jax.device_put(state, jax.devices()[0])


def gate_stage(
    big_model: nn.Module,
    big_vars: Mapping[str, Any],
    config: MergeConfig,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    workdir: str | None = None,
    progress: bool = True,
    record_every: int = 0,
    callbacks: Sequence[Callable] = (),
) -> tuple[dict, dict, dict]:
    """Learn L0 gates and weights of a double-width network for ``config.gate_epochs``.

    ``big_vars`` (``{'params', 'batch_stats'}`` of ``big_model``; donated to the training
    step) is a concatenation of two teachers or a network trained at double width. ``key``
    is split into the gates' initial log-alphas and the training seed. With ``workdir``,
    training checkpoints to ``workdir/fit`` (every ``config.checkpoint_every`` steps) and
    the gate history goes to ``workdir/gate_history.jsonl``. Returns ``(big_vars after, log_alphas {group: (units,)},
    summary)``; summary: test loss/accuracy of ``big_start`` (no gates), ``big_student_step0``
    (initial deterministic gates) and ``big_student_after_gates``; ``gate_binariness`` (pooled
    and ``_per_group``); ``gate_history`` (mean P[g > 0] per group and lambda every
    ``record_every`` steps, default 1/5 epoch); ``gate_log`` (the training metrics);
    ``steps``; ``timing_s``.
    """
    t0 = time.perf_counter()
    spec = unit_spec(big_model, big_vars)
    per_epoch = data_lib.steps_per_epoch(len(train), config.batch_size, "drop")
    num_steps = _num_steps(config.gate_epochs, per_epoch)
    tx, weight_lr = gate_tx(config, num_steps)
    lambda_fn = G.lambda_schedule(config.lambda0, config.lambda_step, per_epoch, int(np.ceil(num_steps / per_epoch)))
    init_key, fit_key = jax.random.split(key)
    log_alphas = G.init_log_alpha(init_key, spec, config.log_alpha_mean, config.log_alpha_std)
    state = _on_device(create_gate_state(big_model, spec, big_vars, log_alphas, tx, lr_fn=weight_lr, augment_fn=_augment(config)))
    bs = config.eval_batch_size
    summary = {"big_start": evaluate_vars(big_model, big_vars, test, bs),
               "big_student_step0": evaluate_vars(state.apply_fn, _gated_vars(state), test, bs)}
    history = GateHistory(lambda_fn, record_every or per_epoch // 5, num_steps,
                          None if workdir is None else os.path.join(workdir, "gate_history.jsonl"))
    history.start(log_alphas)
    fit_dir = None if workdir is None else os.path.join(workdir, "fit")
    state, log = fit(state, train, num_steps=num_steps, batch_size=config.batch_size, seed=seed_of(fit_key),
                     log_every=min(config.log_every, num_steps), workdir=fit_dir, checkpoint_every=config.checkpoint_every,
                     callbacks=[history, *callbacks], step_fn=jit_gate_step(lambda_fn), progress=progress,
                     manifest=_settings(config))
    summary["big_student_after_gates"] = evaluate_vars(state.apply_fn, _gated_vars(state), test, bs)
    big_after, las = jax.device_get(split_params(state))
    summary.update(
        gate_binariness=G.binariness(las), gate_binariness_per_group={g: G.binariness({g: las[g]}) for g in sorted(las)},
        gate_history=history.history(), gate_log=log if fit_dir is None else read_metrics(fit_dir),
        steps={"gates": num_steps, "per_epoch": per_epoch}, timing_s={"gates": time.perf_counter() - t0},
    )
    return big_after, las, summary


def _gated_vars(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def finetune(
    model: nn.Module,
    variables: Mapping[str, Any],
    config: MergeConfig,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    workdir: str | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Normal training of ``variables`` (``{'params', 'batch_stats'}`` of ``model``) for
    ``config.finetune_epochs`` with :func:`finetune_tx`, evaluated on ``test`` once per epoch.
    Returns ``(variables, metrics records)``; with ``workdir`` the run checkpoints there and
    the records are the whole run's (``read_metrics``)."""
    num_steps = _num_steps(config.finetune_epochs, data_lib.steps_per_epoch(len(train), config.batch_size, "drop"))
    tx, lr_fn = finetune_tx(config, num_steps)
    state = _on_device(TrainState.create(apply_fn=model_apply_fn(model), params=variables["params"],
                                         batch_stats=variables["batch_stats"], tx=tx, lr_fn=lr_fn, augment_fn=_augment(config)))
    state, log = fit(state, train, num_steps=num_steps, batch_size=config.batch_size, seed=seed_of(key), eval_split=test,
                     eval_batch_size=config.eval_batch_size, log_every=min(config.log_every, num_steps), workdir=workdir,
                     checkpoint_every=config.checkpoint_every, progress=progress, manifest=_settings(config))
    out = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return out, log if workdir is None else read_metrics(workdir)


def compress_stage(
    big_model: nn.Module,
    model: nn.Module,
    big_vars: Mapping[str, Any],
    log_alphas: Mapping[str, Any],
    config: MergeConfig,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    workdir: str | None = None,
    progress: bool = True,
    teacher_units: Mapping[str, int] | None = None,
) -> tuple[dict, dict]:
    """Keep the best half of every unit group of the gated ``big_vars`` (gates folded into
    the weights) as variables of ``model``, then :func:`finetune` them (``key``; with
    ``workdir``, in ``workdir/fit``). Returns ``(student_vars, summary)``; summary: test
    loss/accuracy ``after_compression`` and ``after_finetune``, ``finetune_log``, ``steps``,
    ``timing_s``, and with ``teacher_units`` (group -> units of teacher A, which come first
    in a concatenation) ``kept_from_teacher_a``: the fraction of kept units from A."""
    t0 = time.perf_counter()
    student, keep = compress(big_vars, log_alphas, unit_spec(big_model, big_vars))
    bs = config.eval_batch_size
    summary: dict = {"after_compression": evaluate_vars(model, student, test, bs)}
    if teacher_units is not None:
        summary["kept_from_teacher_a"] = {g: float(np.mean(np.asarray(keep[g]) < teacher_units[g])) for g in sorted(keep)}
    final, log = finetune(model, student, config, train, test, key=key, progress=progress,
                          workdir=None if workdir is None else os.path.join(workdir, "fit"))
    summary.update(after_finetune=evaluate_vars(model, final, test, bs), finetune_log=log,
                   steps={"finetune": _num_steps(config.finetune_epochs, data_lib.steps_per_epoch(len(train), config.batch_size, "drop"))},
                   timing_s={"finetune": time.perf_counter() - t0})
    return final, summary


def shrink(
    big_model: nn.Module,
    model: nn.Module,
    big_vars: Mapping[str, Any],
    config: MergeConfig,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array,
    workdir: str | None = None,
    progress: bool = True,
    record_every: int = 0,
    teacher_units: Mapping[str, int] | None = None,
) -> tuple[dict, dict]:
    """:func:`gate_stage` then :func:`compress_stage` on a double-width network's variables
    (``key`` split between them; stages in ``workdir/gates`` and ``workdir/finetune``).
    Returns ``(student_vars, summary)`` with both stages' entries (``steps`` and
    ``timing_s`` merged)."""
    gate_key, finetune_key = jax.random.split(key)
    sub = (lambda name: None) if workdir is None else (lambda name: os.path.join(workdir, name))
    big_after, las, s1 = gate_stage(big_model, big_vars, config, train, test, key=gate_key, workdir=sub("gates"),
                                    progress=progress, record_every=record_every)
    student, s2 = compress_stage(big_model, model, big_after, las, config, train, test, key=finetune_key,
                                 workdir=sub("finetune"), progress=progress, teacher_units=teacher_units)
    return student, {**s1, **s2, "steps": {**s1["steps"], **s2["steps"]}, "timing_s": {**s1["timing_s"], **s2["timing_s"]}}


def merge(
    vars_a: Mapping[str, Any],
    vars_b: Mapping[str, Any],
    config: MergeConfig,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    key: jax.Array | None = None,
    model: nn.Module | None = None,
    workdir: str | None = None,
    progress: bool = True,
    record_every: int = 0,
) -> tuple[dict, dict]:
    """Merge two trained teachers (``{'params', 'batch_stats'}`` of ``model``, default
    ``make_model(config.model, classes, **config.model_kwargs)``) into one network of their
    architecture: :func:`concat`, then :func:`shrink` with ``key`` (default
    ``jax.random.key(config.seed)``). Returns ``(student_vars, summary)``; ``big_start`` is
    the teachers' ensemble."""
    model = model if model is not None else make_model(config.model, train.num_classes, **dict(config.model_kwargs))
    key = key if key is not None else jax.random.key(config.seed)
    spec = unit_spec(model, vars_a)
    big = concat(vars_a, vars_b, spec)
    return shrink(double_width(model), model, big, config, train, test, key=key, workdir=workdir, progress=progress,
                  record_every=record_every, teacher_units=spec.groups)
