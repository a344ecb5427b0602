"""The merge pipeline as one function: concat -> learn gates -> compress -> fine-tune.

``merge(vars_a, vars_b, config, train, test)`` returns the student's variables and a summary
with the test accuracy after every stage; the CLI (``mergejax merge``) and
``experiments/merge_networks.py`` both call it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mergejax import data as data_lib
from mergejax.config import TrainConfig
from mergejax.merging import gates as G
from mergejax.merging.compress import compress
from mergejax.merging.concat import concat
from mergejax.merging.train import create_gate_state, gate_optimizer, jit_gate_step, split_params
from mergejax.models import make_model
from mergejax.run import setup
from mergejax.schedules import step_decay
from mergejax.train import TrainState, evaluate, fit, model_apply_fn
from mergejax.units import unit_spec, variables_of

__all__ = ["MergeConfig", "PRESETS", "tiny_config", "paper_config", "finetune_config", "merge", "shrink", "big_model_kwargs", "evaluate_vars"]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Gate stage and fine-tuning. Defaults: the authors' CIFAR-100 ResNet-20 code
    (fmfi-compbio/neural-network-merging, cifar100/), except ``log_alpha_mean`` (they use 1.0;
    we start every deterministic gate at exactly 1 so the big student starts as the ensemble)."""

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
    eval_batch_size: int = 500


def tiny_config() -> MergeConfig:
    """Width-0.5 SmallCNN on digits, a few hundred steps on a CPU. The gate stage is ~100 steps
    instead of the authors' ~39k, so lambda and the gate learning rate are scaled up to let
    the gates reach half-open within it (lambda 5, +5 sqrt(lambda) per epoch, gate lr 5)."""
    return MergeConfig(dataset="digits", model="cnn", model_kwargs={"width": 0.5}, batch_size=64, gate_epochs=4.0,
                       finetune_epochs=4.0, lambda0=5.0, lambda_step=5.0, gate_lr=5.0, log_alpha_mean=3.0, log_every=22)


def paper_config() -> MergeConfig:
    """ResNet-20 on CIFAR-100 with the authors' settings (the MergeConfig defaults) and
    pad-crop-flip augmentation."""
    return MergeConfig(dataset="cifar100", model="resnet20", batch_size=128, augment=True, log_every=200)


PRESETS = {"tiny": tiny_config, "paper": paper_config}


def big_model_kwargs(model_kwargs: Mapping[str, Any]) -> dict:
    """The teachers' model kwargs at double width."""
    return {**dict(model_kwargs), "width": float(model_kwargs.get("width", 1.0)) * 2}


def finetune_config(config: MergeConfig) -> TrainConfig:
    """The normal-training config of the fine-tuning stage."""
    return TrainConfig(
        dataset=config.dataset, model=config.model, model_kwargs=dict(config.model_kwargs),
        batch_size=config.batch_size, epochs=config.finetune_epochs, lr=config.finetune_lr,
        momentum=config.momentum, weight_decay=config.weight_decay, schedule="step",
        step_boundaries=tuple(config.finetune_boundaries), augment=config.augment, seed=config.seed,
        log_every=config.log_every, eval_batch_size=config.eval_batch_size,
    )


def evaluate_vars(model, variables: Mapping[str, Any], split: data_lib.Split, batch_size: int = 500) -> dict:
    """Test loss and accuracy of plain model variables ``{'params', 'batch_stats'}``."""
    state = TrainState(step=np.zeros((), np.int32), params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=(), apply_fn=model_apply_fn(model), tx=None)
    return evaluate(state, split, batch_size)


def merge(
    vars_a: Mapping[str, Any],
    vars_b: Mapping[str, Any],
    config: MergeConfig,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    workdir: str | None = None,
    progress: bool = True,
    record_every: int = 0,
) -> tuple[dict, dict]:
    """Merge two trained teachers (``{'params', 'batch_stats'}`` each) into one network of
    their architecture: :func:`concat`, then :func:`shrink`. Returns ``(student_vars,
    summary)``; summary has the test accuracy of the big student at the start (``big_start``:
    the teachers' ensemble; ``big_student_step0``: the same with the initial gates), the
    big student after gate learning (deterministic gates), the student right after
    compression and after fine-tuning, the gate open-probability history per group, and how
    binary the gates were."""
    model = make_model(config.model, train.num_classes, **dict(config.model_kwargs))
    spec = unit_spec(model, vars_a)
    big = concat(vars_a, vars_b, spec)
    return shrink(big, config, train, test, workdir=workdir, progress=progress, record_every=record_every,
                  teacher_units=spec.groups)


def shrink(
    big: Mapping[str, Any],
    config: MergeConfig,
    train: data_lib.Split,
    test: data_lib.Split,
    *,
    workdir: str | None = None,
    progress: bool = True,
    record_every: int = 0,
    teacher_units: Mapping[str, int] | None = None,
) -> tuple[dict, dict]:
    """Learn gates on a double-width network's variables ``big`` (a concatenation, or one
    trained from scratch), compress it to the ``config.model_kwargs`` width and fine-tune.
    ``teacher_units`` (group -> n) adds the fraction of kept units that came from teacher A."""
    k = train.num_classes
    model = make_model(config.model, k, **dict(config.model_kwargs))
    big_model = make_model(config.model, k, **big_model_kwargs(config.model_kwargs))
    big_spec = unit_spec(big_model, big)
    summary: dict = {"timing_s": {}}
    t0 = time.perf_counter()
    summary["big_start"] = evaluate_vars(big_model, big, test, config.eval_batch_size)

    per_epoch = data_lib.steps_per_epoch(len(train), config.batch_size, "drop")
    gate_steps = max(1, int(round(config.gate_epochs * per_epoch)))
    n_epochs = int(np.ceil(gate_steps / per_epoch))
    weight_lr = step_decay(config.lr, gate_steps, config.gate_boundaries)
    tx = gate_optimizer(weight_lr, config.gate_lr, momentum=config.momentum, weight_decay=config.weight_decay,
                        gate_momentum=config.gate_momentum)
    lambda_fn = G.lambda_schedule(config.lambda0, config.lambda_step, per_epoch, n_epochs)
    log_alphas = G.init_log_alpha(jax.random.key(config.seed + 10_000), big_spec, config.log_alpha_mean, config.log_alpha_std)
    state = create_gate_state(big_model, big_spec, big, log_alphas, tx, lr_fn=weight_lr,
                              augment_fn=data_lib.augment_cifar if config.augment else None)
    summary["big_student_step0"] = evaluate(state, test, config.eval_batch_size)

    groups = list(big_spec.groups)
    history = {"step": [], "prob_open": {g: [] for g in groups}, "lambda": []}
    record_every = record_every or max(1, per_epoch // 5)

    def snapshot(step, log_alphas):
        las = jax.device_get(log_alphas)
        history["step"].append(step)
        history["lambda"].append(float(lambda_fn(max(step - 1, 0))))
        for g in groups:
            history["prob_open"][g].append(float(np.mean(np.asarray(G.prob_open(las[g])))))

    def record(step, st):  # host callback after every step; fetches gates once per record_every
        if step % record_every == 0 or step == gate_steps:
            snapshot(step, st.params["gates"])

    snapshot(0, state.params["gates"])
    state, gate_log = fit(
        state, train, num_steps=gate_steps, batch_size=config.batch_size, seed=config.seed + 20_000,
        eval_split=None, log_every=min(config.log_every, gate_steps), callbacks=[record],
        workdir=None if workdir is None else os.path.join(workdir, "gates"),
        step_fn=jit_gate_step(lambda_fn), progress=progress,
    )
    summary["timing_s"]["gates"] = time.perf_counter() - t0
    summary["big_student_after_gates"] = evaluate(state, test, config.eval_batch_size)
    big_after, las = split_params(state)
    las = jax.device_get(las)
    summary["gate_binariness"] = G.binariness(las)
    summary["gate_binariness_per_group"] = {g: G.binariness({g: las[g]}) for g in groups}
    summary["gate_history"] = history
    summary["gate_log"] = gate_log

    student, keep = compress(big_after, las, big_spec)
    if teacher_units is not None:
        summary["kept_from_teacher_a"] = {g: float(np.mean(np.asarray(keep[g]) < teacher_units[g])) for g in groups}
    summary["after_compression"] = evaluate_vars(model, student, test, config.eval_batch_size)

    t1 = time.perf_counter()
    ft = setup(finetune_config(config), train=train, test=test)
    st = ft.state.replace(params=student["params"], batch_stats=student["batch_stats"],
                          opt_state=ft.state.tx.init(student["params"]))
    st, ft_log = fit(st, train, num_steps=ft.num_steps, batch_size=config.batch_size, seed=config.seed + 30_000,
                     eval_split=test, log_every=min(config.log_every, ft.num_steps),
                     workdir=None if workdir is None else os.path.join(workdir, "finetune"), progress=progress)
    summary["timing_s"]["finetune"] = time.perf_counter() - t1
    final = variables_of(st.params, st.batch_stats)
    summary["after_finetune"] = evaluate_vars(model, final, test, config.eval_batch_size)
    summary["finetune_log"] = ft_log
    summary["steps"] = {"gates": gate_steps, "finetune": ft.num_steps, "per_epoch": per_epoch}
    return jax.device_get(final), summary
