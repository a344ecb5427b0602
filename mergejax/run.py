"""From a :class:`~mergejax.config.TrainConfig` to a trained state: the glue every experiment uses."""

from __future__ import annotations

import dataclasses
import time

import jax

from mergejax import data as data_lib
from mergejax.config import TrainConfig
from mergejax.models import make_model
from mergejax.schedules import make_schedule
from mergejax.train import TrainState, create_state, evaluate, fit, make_optimizer


@dataclasses.dataclass
class Setup:
    """What a config resolves to: model, data, step budget, and the initial state."""

    config: TrainConfig
    model: object
    train: data_lib.Split
    test: data_lib.Split
    num_steps: int
    steps_per_epoch: int
    state: TrainState


def num_steps(config: TrainConfig, num_train: int) -> tuple[int, int]:
    """``(total optimizer steps, steps per epoch)`` for ``config`` on ``num_train`` examples."""
    per_epoch = data_lib.steps_per_epoch(num_train, config.batch_size, config.remainder)
    total = config.steps or max(1, int(round(config.epochs * per_epoch)))
    return total, per_epoch


def setup(config: TrainConfig, *, train: data_lib.Split | None = None, test: data_lib.Split | None = None, seed: int | None = None) -> Setup:
    """Load data (unless given), build model, schedule, optimizer and the initial state.

    ``seed`` overrides ``config.seed`` for the initialisation (the data order uses
    ``config.seed`` in :func:`fit`).
    """
    train = train if train is not None else data_lib.load(config.dataset, "train")
    test = test if test is not None else data_lib.load(config.dataset, "test")
    model = make_model(config.model, train.num_classes, **dict(config.model_kwargs))
    total, per_epoch = num_steps(config, len(train))
    lr_fn = make_schedule(
        config.schedule, config.lr, total, warmup_steps=config.warmup_steps,
        boundaries=config.step_boundaries, factor=config.step_factor,
    )
    tx = make_optimizer(
        config.optimizer, lr_fn, momentum=config.momentum, nesterov=config.nesterov,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
    )
    rng = jax.random.key(config.seed if seed is None else seed)
    state = create_state(
        model, rng, (1, *train.images.shape[1:]), tx, lr_fn=lr_fn,
        augment_fn=data_lib.augment_cifar if config.augment else None,
    )
    return Setup(config, model, train, test, total, per_epoch, state)


def train_and_evaluate(config: TrainConfig, workdir: str | None = None, *, progress: bool = True, setup_: Setup | None = None) -> tuple[TrainState, dict]:
    """Train per ``config`` (resuming from ``workdir`` if it holds checkpoints) and evaluate.

    Returns ``(state, summary)`` with test accuracy/loss, steps, wall time (s) and history.
    """
    s = setup_ or setup(config)
    t0 = time.perf_counter()
    state, history = fit(
        s.state, s.train, num_steps=s.num_steps, batch_size=config.batch_size, seed=config.seed,
        eval_split=s.test, eval_every=config.eval_every, eval_batch_size=config.eval_batch_size,
        log_every=config.log_every, workdir=workdir, checkpoint_every=config.checkpoint_every,
        remainder=config.remainder, progress=progress,
    )
    wall = time.perf_counter() - t0
    final = evaluate(state, s.test, config.eval_batch_size)
    summary = {
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "steps": s.num_steps,
        "steps_per_epoch": s.steps_per_epoch,
        "wall_time_s": wall,
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "history": history,
    }
    return state, summary
