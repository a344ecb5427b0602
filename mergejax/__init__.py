"""mergejax: average, collect and merge neural networks in JAX/Flax (Linen).

Submodules, each one concept:
  data        datasets by name, CIFAR augmentation, seeded batch iterator
  models      Flax Linen models (MLP, SmallCNN, CIFAR ResNet, Wide-ResNet, VGG) and the one
              Linen <-> pytree boundary (init_variables / apply_model)
  units       which parameter axes belong to which group of units (shared by alignment,
              concatenation, gating and compression)
  train       TrainState, pure train_step / eval_step, the fit loop
  schedules   optax learning-rate schedules (step, cosine, snapshot cosine, SGDR, FGE, SWA)
  checkpoint  atomic orbax checkpoints and resume
  config      frozen-dataclass configs and command-line overrides
  run         config -> trained state glue used by experiments
  report      results.json, Markdown tables, plots
  averaging   weight averaging of N pytrees, streaming mean, EMA
  parallel    data-parallel train step (shard_map; pmap kept for comparison)
  local_sgd   local SGD / FedAvg / DiLoCo rounds with an outer optax optimizer
  rebasin     Git Re-Basin weight matching over the unit spec
  soups       uniform and greedy model soups
  snapshot    snapshot collection and vmap ensemble evaluation
  swa         SWA running average, BatchNorm re-estimation, FGE
  freezeout   FreezeOut per-layer rates, staged compiled steps, FLOP cost model
  merging     concat -> gate -> compress -> fine-tune of two networks
"""

from mergejax import (
    averaging, checkpoint, config, data, freezeout, local_sgd, merging, models, parallel, rebasin, report,
    run, schedules, snapshot, soups, swa, train, units,
)
from mergejax.averaging import average, check_compatible, ema, ema_params, interpolate, stream_average
from mergejax.config import TrainConfig, override
from mergejax.data import augment_cifar, batches, load
from mergejax.merging import MergeConfig, merge
from mergejax.models import apply_model, init_variables, make_model
from mergejax.parallel import make_dp_step
from mergejax.rebasin import align, weight_matching
from mergejax.snapshot import SnapshotCollector, evaluate_ensemble
from mergejax.soups import greedy_soup, uniform_soup
from mergejax.swa import recompute_batch_stats, running_mean, swa_average
from mergejax.train import TrainState, create_state, eval_step, evaluate, fit, make_optimizer, train_step
from mergejax.units import UnitSpec, take_units, unit_spec

__version__ = "0.1.0"

__all__ = [
    "averaging", "checkpoint", "config", "data", "freezeout", "local_sgd", "merging", "models", "parallel", "rebasin",
    "report", "run", "schedules", "snapshot", "soups", "swa", "train", "units",
    "average", "check_compatible", "ema", "ema_params", "interpolate", "stream_average",
    "TrainConfig", "override", "augment_cifar", "batches", "load", "apply_model", "init_variables",
    "make_model", "MergeConfig", "merge", "make_dp_step", "align", "weight_matching", "SnapshotCollector", "evaluate_ensemble",
    "greedy_soup", "uniform_soup", "recompute_batch_stats", "running_mean", "swa_average",
    "TrainState", "create_state", "eval_step", "evaluate", "fit", "make_optimizer", "train_step",
    "UnitSpec", "take_units", "unit_spec",
]
