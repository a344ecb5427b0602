"""mergejax: average, collect and merge neural networks in JAX/Flax (Linen).

Submodules, each one concept:
  data        datasets by name, CIFAR augmentation, seeded batch iterator
  models      Flax Linen models (MLP, SmallCNN, CIFAR ResNet, Wide-ResNet, VGG) and the one
              Linen <-> pytree boundary (init_variables / apply_model)
  units       which parameter axes belong to which group of units (shared by alignment,
              concatenation, gating and compression)
  train       TrainState, pure train_step / eval_step, the fit loop
  schedules   optax learning-rate schedules (step, cosine, snapshot cosine, SGDR, FGE, SWA)
  checkpoint  atomic, checksummed orbax checkpoints; a step manager that skips damaged steps
  rundir      run identity: manifests, one-writer locks, resumable units
  errors      UserError and friends: one-line errors for people
  config      frozen-dataclass configs and command-line overrides
  run         config -> trained state glue used by experiments
  experiment  the thin layer under experiments/: command line, run_experiment, unit
  report      results.json, Markdown tables, plots
  averaging   weight averaging of N pytrees, streaming mean, EMA
  parallel    data-parallel train step (shard_map; pmap kept for comparison)
  local_sgd   local SGD / FedAvg / DiLoCo rounds with an outer optax optimizer
  distributed the 2-process (jax.distributed, CPU) local-SGD run and its 1-process reference
  connectivity loss barriers and interpolation paths, naive vs permutation-aligned
  rebasin     Git Re-Basin weight matching over the unit spec
  soups       uniform and greedy model soups
  snapshot    snapshot collection and vmap ensemble evaluation
  swa         SWA running average, BatchNorm re-estimation, FGE
  freezeout   FreezeOut per-layer rates, staged compiled steps, FLOP cost model
  merging     concat -> gate -> compress -> fine-tune of two networks
"""

import importlib
from typing import Any

# Public name -> module that defines it. Imported on first use (PEP 562), so
# ``mergejax --help`` and ``import mergejax.cli`` do not pay for importing jax.
_EXPORTS = {
    "averaging": ("average", "check_compatible", "ema", "ema_params", "interpolate", "stream_average"),
    "config": ("TrainConfig", "override"),
    "data": ("augment_cifar", "batches", "load"),
    "merging": ("MergeConfig", "merge"),
    "models": ("apply_model", "init_variables", "make_model"),
    "parallel": ("make_dp_step",),
    "rebasin": ("align", "weight_matching"),
    "snapshot": ("SnapshotCollector", "evaluate_ensemble"),
    "soups": ("greedy_soup", "uniform_soup"),
    "swa": ("recompute_batch_stats", "running_mean", "swa_average"),
    "train": ("TrainState", "create_state", "eval_step", "evaluate", "fit", "make_optimizer", "train_step"),
    "units": ("UnitSpec", "take_units", "unit_spec"),
}
_SUBMODULES = (
    "averaging", "checkpoint", "config", "connectivity", "data", "distributed", "errors", "experiment", "freezeout",
    "local_sgd", "merging", "models", "parallel", "rebasin", "report", "run", "rundir", "schedules", "snapshot", "soups",
    "swa", "train", "units",
)
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
