"""mergejax: average, collect and merge neural networks in JAX/Flax (Linen).

Submodules, each one concept:
  data        datasets by name, CIFAR augmentation, seeded batch iterator
  models      Flax Linen models (MLP, SmallCNN, CIFAR ResNet, Wide-ResNet, VGG) and the one
              Linen <-> pytree boundary (init_variables / apply_model)
  units       which parameter axes belong to which group of units (shared by alignment,
              concatenation, gating and compression)
  train       TrainState, pure train_step / eval_step, the fit loop
  schedules   optax learning-rate schedules
  checkpoint  atomic orbax checkpoints and resume
  config      frozen-dataclass configs and command-line overrides
  run         config -> trained state glue used by experiments
  report      results.json, Markdown tables, plots
"""

from mergejax import checkpoint, config, data, models, report, run, schedules, train, units
from mergejax.config import TrainConfig, override
from mergejax.data import augment_cifar, batches, load
from mergejax.models import apply_model, init_variables, make_model
from mergejax.train import TrainState, create_state, eval_step, evaluate, fit, make_optimizer, train_step
from mergejax.units import UnitSpec, take_units, unit_spec

__version__ = "0.1.0"

__all__ = [
    "checkpoint", "config", "data", "models", "report", "run", "schedules", "train", "units",
    "TrainConfig", "override", "augment_cifar", "batches", "load", "apply_model", "init_variables",
    "make_model", "TrainState", "create_state", "eval_step", "evaluate", "fit", "make_optimizer",
    "train_step", "UnitSpec", "take_units", "unit_spec",
]
