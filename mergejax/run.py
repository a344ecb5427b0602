"""From a :func:`~mergejax.config.train_config` to a trained state: the glue every experiment uses,
and the persistent compilation cache that entry points turn on."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections

from mergejax.averaging import parallel
from mergejax.config import to_dict
from mergejax.core import data as data_lib
from mergejax.core import multi, rundir
from mergejax.core.loop import evaluate, fit, read_metrics
from mergejax.core.models import make_model, precision_dtype
from mergejax.core.optim import make_optimizer, make_schedule
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


def model_of(config: ml_collections.ConfigDict, num_classes: int, **kwargs) -> object:
    """The model a train config trains: ``config.model`` with ``config.model_kwargs`` (``kwargs``
    added) and the compute dtype of ``config.precision`` ("fp32": float32, the default; "bf16":
    bfloat16 compute with float32 parameters). Every training path builds its model here, so a
    precision set in the config is never silently dropped."""
    model_kwargs = {**to_dict(config.model_kwargs), **kwargs}
    dtype = precision_dtype(config.get("precision", "fp32"))
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    return make_model(config.model, num_classes, **model_kwargs)


def setup(config: ml_collections.ConfigDict, *, train: data_lib.Split | None = None, test: data_lib.Split | None = None, seed: int | None = None) -> Setup:
    """Load data (unless given; ``config.train_split`` and test), build model, schedule, optimizer and the initial state.

    ``seed`` overrides ``config.seed`` for the initialisation (the data order uses
    ``config.seed`` in :func:`fit`). ``config.precision`` ("fp32" | "bf16") sets the model's
    compute dtype; an unknown one is refused before any data is loaded.
    """
    precision_dtype(config.get("precision", "fp32"))  # refuse an unknown precision before loading data
    train = train if train is not None else data_lib.load_train(config.dataset, config.get("train_split", "train"))
    test = test if test is not None else data_lib.load(config.dataset, "test")
    model = model_of(config, train.num_classes)
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
    summed over resumes), ``num_devices_used`` and the history (the whole ``metrics.jsonl``
    when ``workdir`` is set, so a resumed or re-run summary equals an uninterrupted one).

    ``config.devices`` local devices (0 = all) share each batch of ``config.batch_size``
    (:func:`mergejax.averaging.parallel.resolve_devices` refuses one that does not divide it):
    the model trains with BatchNorm synchronised over them and gradients summed, which equals
    one device on the whole batch up to float rounding (augmentation included; dropout masks
    are drawn per device). With one device it is the plain single-device step, bit for bit.
    The returned state holds the plain model on one device.
    """
    devices = parallel.resolve_devices(config.get("devices", 0), config.batch_size)  # refuse before loading data
    s = setup_ or setup(config)
    t0 = time.perf_counter()
    state, history = fit(  # devices > 1: batch split over a mesh, synchronised BN (equals one device to float rounding)
        s.state, s.train, num_steps=s.num_steps, batch_size=config.batch_size, seed=config.seed,
        eval_split=s.test, eval_every=config.eval_every, eval_batch_size=config.eval_batch_size,
        log_every=config.log_every, workdir=workdir, checkpoint_every=config.checkpoint_every,
        remainder=config.remainder, progress=progress, manifest={"train_config": to_dict(config)}, overwrite=overwrite,
        devices=devices,
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
        "num_devices_used": len(devices),
        "history": history,
    }
    return state, summary


def train_and_evaluate_many(config: ml_collections.ConfigDict, seeds, workdir: str | None = None, *,
                            progress: bool = True, overwrite: bool = False) -> tuple[list[TrainState], list[dict]]:
    """:func:`train_and_evaluate` for several seeds in one compiled program
    (:func:`mergejax.core.multi.fit_many`): model i is initialised with
    ``seeds[i]`` and draws its batches and step rngs with it, so it ends where
    ``train_and_evaluate`` with ``config.seed = seeds[i]`` ends, up to float rounding of the
    batched kernels. The data are loaded once; ``config.seed`` is not used. ``config.devices``
    local devices (0 = all; as many of them as divide ``len(seeds)``, :func:`multi.spread_devices`)
    each train whole models (``num_devices_used``), which changes no model's arithmetic.

    ``workdir`` holds the one stacked run (checkpoints of all models, ``metrics.jsonl`` with a
    ``model`` index per line) and resumes like ``train_and_evaluate``'s. Returns the trained
    states and per seed a summary shaped like ``train_and_evaluate``'s plus ``seed``
    (``wall_time_s``: the whole group's training time; ``history``: this model's records).
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    devices = multi.spread_devices(len(seeds), parallel.resolve_devices(config.get("devices", 0)))  # refuse before loading data
    first = setup(config, seed=seeds[0])
    setups = [first] + [setup(config, train=first.train, test=first.test, seed=s) for s in seeds[1:]]
    t0 = time.perf_counter()
    states, histories = multi.fit_many(
        [s.state for s in setups], first.train, num_steps=first.num_steps, batch_size=config.batch_size, seeds=seeds,
        devices=devices,
        eval_split=first.test, eval_every=config.eval_every, eval_batch_size=config.eval_batch_size,
        log_every=config.log_every, workdir=workdir, checkpoint_every=config.checkpoint_every,
        remainder=config.remainder, progress=progress, overwrite=overwrite,
        # config.seed plays no part here (the seeds are fit_many's own setting), so it may differ on resume
        manifest={"train_config": {k: v for k, v in to_dict(config).items() if k != "seed"}},
    )
    wall = time.perf_counter() - t0
    if workdir is not None:
        histories = multi.read_many_metrics(workdir, len(seeds))
        times = [h["time_s"] for h in histories[0] if h["split"] == "train" and h.get("time_s") is not None]
        wall = times[-1] if times else wall
    finals = multi.evaluate_many(multi.stack_states(states), first.test, config.eval_batch_size)
    summaries = [{
        "seed": seed,
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "steps": first.num_steps,
        "steps_per_epoch": first.steps_per_epoch,
        "wall_time_s": wall,
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "num_devices_used": len(devices),
        "history": history,
    } for seed, final, history in zip(seeds, finals, histories)]
    return states, summaries


def seed_groups(config: ml_collections.ConfigDict, seeds, models_per_program: int = 0, *,
                pin: tuple[str, str] | None = None) -> list[list[int]]:
    """``seeds`` cut into groups trained together by :func:`train_and_evaluate_many` (a group of
    one: :func:`train_and_evaluate`). ``models_per_program``: seeds per group; 0 = auto
    (:func:`mergejax.core.multi.models_per_program`: 1 on CPU, on an accelerator as many as fit
    in its free memory at the measured bytes of ``config``'s step).

    ``pin=(json_path, key)``: an auto choice is recorded under ``key`` in ``json_path`` the first
    time and read back afterwards, so a resumed run keeps its groups (and the unit names built
    from them) whatever memory is free now; a record for other seeds is refused in one line.
    """
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints, at least one, e.g. seeds=(0,1,2), got {tuple(seeds)}")
    seeds = list(seeds)
    if pin is not None and not models_per_program:
        path, key = pin
        pinned = rundir.read_json(path) if os.path.exists(path) else {}
        if key not in pinned:
            pinned[key] = seed_groups(config, seeds)
            rundir.write_json(path, pinned)
        if sorted(s for g in pinned[key] for s in g) != sorted(seeds):
            raise ValueError(f"{path} pins the model groups {pinned[key]} for {key!r}, not seeds {seeds}: "
                             "the directory holds another run (use another output directory or --overwrite)")
        return [list(g) for g in pinned[key]]

    def bytes_per_model():  # only asked on an accelerator with memory statistics
        s = setup(config)
        return multi.step_memory_bytes(s.state, s.train.images.shape[1:], config.batch_size, s.train.images.dtype)

    n = multi.models_per_program(models_per_program, len(seeds), bytes_per_model=bytes_per_model)
    return [seeds[i:i + n] for i in range(0, len(seeds), n)]
