"""mergejax: average, collect and merge neural networks in JAX/Flax (Linen).

Layout (one package per pillar, on one core):
  core/        data, models, units, train (state + step), loop (fit), optim (schedules +
               optimizers), checkpoint, rundir, trees, errors
  averaging/   weights (average, EMA), parallel, local_sgd, distributed, soups, rebasin,
               connectivity
  ensembles/   snapshot, swa (SWA, FGE)
  freezeout/   FreezeOut per-layer rates, staged compiled steps, FLOP cost model; sweep
  merging/     concat -> gate -> compress -> fine-tune of two networks
  cli/         the ``mergejax`` command: train, average, merge, prepare
  config, run, experiment, report   the thin layer under experiments/: configs, config ->
               trained model(s) on all local devices, resumable units, results tables and plots
"""

import importlib
from typing import Any

# Public name -> module that defines it. Imported on first use (PEP 562), so
# ``mergejax --help`` and ``import mergejax.cli`` do not pay for importing jax.
_EXPORTS = {
    "averaging.weights": ("average", "check_compatible", "ema", "ema_params", "interpolate", "stream_average"),
    "config": ("override", "train_config"),
    "core.data": ("augment_cifar", "batches", "load"),
    "core.loop": ("evaluate", "fit"),
    "core.multi": ("fit_many", "stack_states", "unstack_states"),
    "core.models": ("apply_model", "init_variables", "make_model"),
    "core.optim": ("make_optimizer", "make_schedule"),
    "core.train": ("TrainState", "create_state", "eval_step", "train_step"),
    "core.units": ("UnitSpec", "take_units", "unit_spec"),
    "averaging.parallel": ("make_dp_step",),
    "averaging.rebasin": ("align", "weight_matching"),
    "averaging.soups": ("greedy_soup", "uniform_soup"),
    "ensembles.snapshot": ("SnapshotCollector", "evaluate_ensemble"),
    "ensembles.swa": ("recompute_batch_stats", "running_mean", "swa_average"),
    "merging.pipeline": ("merge", "shrink"),
}
_SUBMODULES = ("averaging", "cli", "config", "core", "ensembles", "experiment", "freezeout", "merging", "report", "run")
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"mergejax.{name}")
    if name in _WHERE:
        return getattr(importlib.import_module(f"mergejax.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mergejax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [*_SUBMODULES, *_WHERE]
