"""From a :func:`~mergejax.config.train_config` to a trained state: the glue every experiment uses,
and the persistent compilation cache that entry points turn on."""

from __future__ import annotations

import dataclasses
import os
import time

import jax

from mergejax.core import data as data_lib
import ml_collections

from mergejax.config import to_dict
from mergejax.core.models import make_model
from mergejax.core.optim import make_schedule
from mergejax.core.loop import evaluate, fit, read_metrics
from mergejax.core.optim import make_optimizer
from mergejax.core.train import TrainState, create_state


CACHE_ENV = "MERGEJAX_COMPILATION_CACHE"


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory, or None when off.

    Executables are keyed by a hash of the lowered computation, so identical steps compile
    once across seeds, runs, processes and re-runs of an experiment (each new optimizer or
    ``apply_fn`` object is a new jit, but the same HLO). ``path`` defaults to
    ``$MERGEJAX_COMPILATION_CACHE``, else ``~/.cache/mergejax/xla``; the value ``off`` (or
    ``0``, ``none``, empty) disables it. Entry points (experiment scripts, ``reproduce.py``,
    the CLI) call this before their first compile; library functions never do.
    """
    if path is None:
        path = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "mergejax", "xla"))
    if path.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small steps dominate CPU runs
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compilation_cache_dir() -> str | None:
    """The persistent compilation cache directory in use, or None."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir


@dataclasses.dataclass
class Setup:
    """What a config resolves to: model, data, step budget, and the initial state."""

    config: ml_collections.ConfigDict
    model: object
    train: data_lib.Split
    test: data_lib.Split
    num_steps: int
    steps_per_epoch: int
    state: TrainState


def num_steps(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """``(total optimizer steps, steps per epoch)`` for ``config`` on ``num_train`` examples."""
    per_epoch = data_lib.steps_per_epoch(num_train, config.batch_size, config.remainder)
    total = config.steps or max(1, int(round(config.epochs * per_epoch)))
    return total, per_epoch


def setup(config: ml_collections.ConfigDict, *, train: data_lib.Split | None = None, test: data_lib.Split | None = None, seed: int | None = None) -> Setup:
    """Load data (unless given), build model, schedule, optimizer and the initial state.

    ``seed`` overrides ``config.seed`` for the initialisation (the data order uses
    ``config.seed`` in :func:`fit`).
    """
    train = train if train is not None else data_lib.load(config.dataset, "train")
    test = test if test is not None else data_lib.load(config.dataset, "test")
    model = make_model(config.model, train.num_classes, **to_dict(config.model_kwargs))
    total, per_epoch = num_steps(config, len(train))
    lr_fn = make_schedule(
        config.schedule, config.lr, total, warmup_steps=config.warmup_steps,
        boundaries=tuple(config.step_boundaries), factor=config.step_factor,
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None, *, progress: bool = True, setup_: Setup | None = None,
                       overwrite: bool = False) -> tuple[TrainState, dict]:
    """Train per ``config`` (resuming ``workdir`` if it holds this config's run) and evaluate.

    Returns ``(state, summary)`` with test accuracy/loss, steps, wall time (s, training only,
    summed over resumes) and the history (the whole ``metrics.jsonl`` when ``workdir`` is set,
    so a resumed or re-run summary equals an uninterrupted one).
    """
    s = setup_ or setup(config)
    t0 = time.perf_counter()
    state, history = fit(
        s.state, s.train, num_steps=s.num_steps, batch_size=config.batch_size, seed=config.seed,
        eval_split=s.test, eval_every=config.eval_every, eval_batch_size=config.eval_batch_size,
        log_every=config.log_every, workdir=workdir, checkpoint_every=config.checkpoint_every,
        remainder=config.remainder, progress=progress, manifest={"train_config": to_dict(config)}, overwrite=overwrite,
    )
    wall = time.perf_counter() - t0
    if workdir is not None:
        history = read_metrics(workdir)
        times = [h["time_s"] for h in history if h["split"] == "train" and h.get("time_s") is not None]
        wall = times[-1] if times else wall
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
