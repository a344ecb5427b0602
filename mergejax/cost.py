"""What a planned run costs before it runs: XLA FLOPs of one training step, GPU-hours.

:func:`step_flops` traces :func:`mergejax.core.train.train_step` (default SGD, no augmentation)
on abstract inputs (``jax.eval_shape``, ``jax.ShapeDtypeStruct``: no parameter or batch is
materialised) and reads XLA's cost analysis of that program. :func:`gpu_hours` turns a FLOP
count into hours at a stated peak and utilisation. Dataset shapes come from :data:`DATASETS`,
so nothing is loaded or downloaded.

``experiments/*.py --dry-run`` uses these through each experiment's ``plan(config)``: one dict per
training run, ``{"name", "model", "model_kwargs", "dataset", "steps", "batch_size", "width_factor"}``
(:func:`plan_row` builds one from a :func:`mergejax.config.train_config`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple


class DatasetShape(NamedTuple):
    shape: tuple[int, int, int]  # (H, W, C) of one image
    num_classes: int
    num_train: int  # training examples (steps per epoch for epoch-based configs)


#: Shapes of the datasets ``mergejax.core.data`` knows (TFDS metadata; digits: our fixed 1437-image split).
DATASETS = {
    "digits": DatasetShape((8, 8, 1), 10, 1437),
    "mnist": DatasetShape((28, 28, 1), 10, 60_000),
    "fashion_mnist": DatasetShape((28, 28, 1), 10, 60_000),
    "cifar10": DatasetShape((32, 32, 3), 10, 50_000),
    "cifar100": DatasetShape((32, 32, 3), 100, 50_000),
    "svhn_cropped": DatasetShape((32, 32, 3), 10, 73_257),
    "tiny_imagenet": DatasetShape((64, 64, 3), 200, 100_000),
}
#: Sizes of the other splits (TFDS metadata; digits: the 360 left of 1,797), for split sums such as "train+extra".
OTHER_SPLITS = {"digits": {"test": 360}, "mnist": {"test": 10_000}, "fashion_mnist": {"test": 10_000},
                "cifar10": {"test": 10_000}, "cifar100": {"test": 10_000},
                "svhn_cropped": {"test": 26_032, "extra": 531_131}, "tiny_imagenet": {"test": 10_000}}

#: Peak dense throughput in TFLOP/s (vendor datasheets: NVIDIA H100 Tensor Core GPU datasheet,
#: SXM5 column; NVIDIA A100 Tensor Core GPU datasheet, SXM column). Tensor-core figures are
#: without structured sparsity (the datasheets print the sparse number, twice these).
PEAK_TFLOPS = {
    "H100 SXM fp32": 67.0,  # CUDA cores, no tensor cores
    "H100 SXM tf32": 494.7,
    "H100 SXM bf16": 989.4,
    "A100 SXM fp32": 19.5,
    "A100 SXM tf32": 156.0,
    "A100 SXM bf16": 312.0,
}
#: The device the estimate states unless ``--device-peak-tflops`` says otherwise: our models train
#: in float32, and plain fp32 is the peak no compiler setting can exceed.
DEFAULT_DEVICE = "H100 SXM fp32"
#: Fraction of peak a training step sustains; 0.3 is a common planning figure for convnets
#: at CIFAR sizes (small kernels, BatchNorm and elementwise work are memory-bound).
DEFAULT_UTILISATION = 0.3


def bf16_peak(peak_tflops: float) -> float | None:
    """The bf16 tensor-core peak of the :data:`PEAK_TFLOPS` device whose fp32 or tf32 peak is
    ``peak_tflops`` (``precision=bf16`` runs there), or None for a peak not in the table."""
    for name, value in PEAK_TFLOPS.items():
        device, _, kind = name.rpartition(" ")
        if value == peak_tflops and kind in ("fp32", "tf32"):
            return PEAK_TFLOPS.get(f"{device} bf16")
    return None


def dataset_shape(name: str) -> DatasetShape:
    """:data:`DATASETS` entry of ``name``, refusing an unknown one in one line."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} for a cost estimate; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _flops_of(analysis: Any) -> float:
    """The ``flops`` entry of ``cost_analysis()``: a dict, or a list of dicts (one per
    computation/device in older jax versions), or None where the backend has none."""
    if analysis is None:
        raise RuntimeError("XLA returned no cost analysis for the training step on this backend")
    parts = [analysis] if isinstance(analysis, Mapping) else list(analysis)
    return float(sum(p.get("flops", 0.0) for p in parts if p))


def step_flops(model_name: str, model_kwargs: Mapping, dataset_shape: tuple[int, ...], num_classes: int,
               batch_size: int, *, compiled: bool = False) -> float:
    """XLA's FLOP count of one ``train_step`` of ``model_name`` on a float32 batch
    ``(batch_size, *dataset_shape)`` with SGD (momentum 0.9): forward, backward and update.

    ``compiled=False`` (default) reads the cost analysis of the lowered (unoptimised) program,
    seconds even for ResNet-110; ``compiled=True`` compiles it for this machine's backend first
    (optimised HLO; on CPU ResNet-110 takes ~30 s and counts ~6% more). Either way the count
    is the program's, not a measurement: dots and convolutions count 2 FLOPs per
    multiply-add, elementwise ops 1 per element.
    """
    import jax
    import jax.numpy as jnp

    from mergejax.core.models import make_model
    from mergejax.core.optim import make_optimizer
    from mergejax.core.train import create_state, train_step

    model = make_model(model_name, num_classes, **dict(model_kwargs))
    tx = make_optimizer("sgd", 0.1, momentum=0.9)
    shape = tuple(int(d) for d in dataset_shape)
    state = jax.eval_shape(lambda key: create_state(model, key, (1, *shape), tx), jax.random.key(0))
    batch = {"image": jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    lowered = jax.jit(train_step).lower(state, batch, rng)
    return _flops_of(lowered.compile().cost_analysis() if compiled else lowered.cost_analysis())


def gpu_hours(total_flops: float, peak_flops: float, utilisation: float) -> float:
    """Hours to do ``total_flops`` at ``utilisation`` (0, 1] of ``peak_flops`` FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    return total_flops / (peak_flops * utilisation) / 3600.0


def num_examples(dataset: str, split: str = "train") -> int:
    """Examples in ``split`` of ``dataset`` (a name, or a sum such as ``"train+extra"``: SVHN 604,388), without loading it."""
    from mergejax.core.data import split_parts

    sizes = {"train": dataset_shape(dataset).num_train, **OTHER_SPLITS.get(dataset, {})}
    return sum(sizes[p] for p in split_parts(dataset, split))


def train_steps(train: Any, holdout: int = 0) -> int:
    """Optimizer steps of a :func:`mergejax.config.train_config` (``steps``, or ``epochs`` x steps
    per epoch on its ``train_split`` less ``holdout`` examples, sizes from :func:`num_examples`), without loading it."""
    from mergejax.run import num_steps

    return num_steps(train, num_examples(train.dataset, train.get("train_split", "train")) - holdout)[0]


def plan_row(name: str, train: Any, **extra: Any) -> dict:
    """The ``plan()`` row of one run of ``train`` (a train_config); ``extra`` overrides keys."""
    from mergejax.config import to_dict

    kwargs = to_dict(train.model_kwargs)
    row = {"name": name, "model": train.model, "model_kwargs": kwargs, "dataset": train.dataset,
           "steps": train_steps(train), "batch_size": int(train.batch_size), "width_factor": 1.0,
           "precision": train.get("precision", "fp32")}
    row.update(extra)
    return row


PLAN_KEYS = {"name": str, "model": str, "model_kwargs": Mapping, "dataset": str, "steps": int, "batch_size": int}


def check_row(row: Mapping, where: str) -> dict:
    """``row`` with ``width_factor`` defaulted, or a one-line error naming ``where`` and the key."""
    for key, kind in PLAN_KEYS.items():
        if key not in row:
            raise ValueError(f"{where}: plan row {dict(row).get('name', '?')!r} has no {key!r}")
        if not isinstance(row[key], kind) or (kind is int and isinstance(row[key], bool)):
            raise ValueError(f"{where}: plan row {row.get('name', '?')!r} has {key}={row[key]!r}, expected {kind.__name__}")
    width = float(row.get("width_factor", 1.0))
    if width <= 0:
        raise ValueError(f"{where}: plan row {row['name']!r} has width_factor={width}, expected > 0")
    from mergejax.core.models import PRECISIONS

    precision = row.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: plan row {row['name']!r} has precision={precision!r}, expected one of {', '.join(PRECISIONS)}")
    return {**row, "model_kwargs": dict(row["model_kwargs"]), "width_factor": width, "precision": precision}


def row_flops(row: Mapping, cache: dict | None = None) -> float:
    """:func:`step_flops` of a checked plan row; ``width_factor`` multiplies the model's
    ``width`` kwarg (a run of a network that many times wider). ``cache`` (a dict the caller
    owns) keeps one count per distinct (model, kwargs, dataset, batch)."""
    from mergejax.core.models import PRECISIONS

    kwargs = dict(row["model_kwargs"])
    if PRECISIONS[row.get("precision", "fp32")] is not None:  # the step XLA compiles for a bf16 run
        kwargs["dtype"] = PRECISIONS[row["precision"]]
    if row.get("width_factor", 1.0) != 1.0:
        kwargs["width"] = float(kwargs.get("width", 1.0)) * row["width_factor"]
    ds = dataset_shape(row["dataset"])
    key = (row["model"], repr(sorted(kwargs.items())), ds.shape, ds.num_classes, row["batch_size"])  # cifar10 == svhn
    if cache is not None and key in cache:
        return cache[key]
    flops = step_flops(row["model"], kwargs, ds.shape, ds.num_classes, row["batch_size"])
    if cache is not None:
        cache[key] = flops
    return flops


def measured_rates(path: str) -> dict:
    """Training-step throughput measured by ``benchmarks/speed.py`` (its ``speed_<device>.json``):
    ``{"device": str, "rates": {(model, precision, batch): FLOP/s}}`` of its one-model mergejax rows
    (XLA's FLOPs per step / the fastest round's seconds per step, on that device). A missing or
    malformed file is one line naming it."""
    import json

    try:
        with open(path) as f:
            table = json.load(f)
        rows = [r for r in table["results"] if r.get("impl") == "mergejax" and r.get("n") == 1 and r.get("step_s")]
        rates = {(r["model"], r["precision"], int(r["batch"])): float(r["flops"]) / float(r["step_s"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read a measured speed table from {path}: {type(e).__name__}: {e} "
                         "(expected benchmarks/speed.py's JSON output)") from None
    if not rates:
        raise ValueError(f"{path} holds no timed one-model mergejax row to take a rate from")
    return {"device": str(table.get("device_kind") or table.get("device", "?")), "rates": rates}


def row_rate(row: Mapping, peak_flops: float, utilisation: float, measured: Mapping | None = None) -> tuple[float, str]:
    """``(FLOP/s, source)`` a checked plan row trains at: the measured rate of the same network
    (default kwargs, width factor 1), precision and batch when ``measured`` (:func:`measured_rates`)
    has one (source ``"measured"``; ``"measured (shortcut B)"`` for a ResNet with another ``shortcut``,
    the timed one having the default projections), else ``utilisation`` x the peak for its precision: a bf16 row
    at :func:`bf16_peak` of ``peak_flops`` (source ``"bf16 peak"``; the fp32 peak when the
    device's bf16 peak is unknown), an fp32 row at ``peak_flops`` (source ``"peak"``)."""
    key = (row["model"], row.get("precision", "fp32"), int(row["batch_size"]))
    if measured and row.get("width_factor", 1.0) == 1.0 and key in measured["rates"]:
        if not row["model_kwargs"]:
            return measured["rates"][key], "measured"
        if set(row["model_kwargs"]) == {"shortcut"}:  # the timed network has projection shortcuts: a few % of its FLOPs
            return measured["rates"][key], "measured (shortcut B)"
    if row.get("precision", "fp32") == "bf16":
        bf16 = bf16_peak(peak_flops / 1e12)
        return (bf16 * 1e12 if bf16 else peak_flops) * utilisation, "bf16 peak" if bf16 else "peak"
    return peak_flops * utilisation, "peak"
