"""Configs are frozen dataclasses; presets are functions returning one; the command line
overrides any field with ``key=value`` (dotted paths reach nested configs and dicts)."""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One supervised training run. Steps are optimizer steps (mini-batches)."""

    dataset: str = "digits"
    model: str = "cnn"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"width": 2.0}
    batch_size: int = 64
    epochs: float = 10.0  # used when steps == 0
    steps: int = 0  # total optimizer steps; 0 -> round(epochs * steps_per_epoch)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # coupled L2 for sgd/adam (PyTorch style), decoupled for adamw
    grad_clip: float = 0.0  # global-norm clip; 0 = off
    schedule: str = "cosine"  # constant | cosine | step
    warmup_steps: int = 0
    step_boundaries: Sequence[float] = (0.5, 0.75)  # fractions of training, for schedule="step"
    step_factor: float = 0.1
    augment: bool = False  # CIFAR pad-crop-flip on device
    remainder: str = "drop"  # last training batch of an epoch: drop | pad
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # steps; 0 = once per epoch
    checkpoint_every: int = 0  # steps; 0 = once per epoch
    eval_batch_size: int = 500


def override(config: Any, assignments: Sequence[str]) -> Any:
    """Return ``config`` with ``["lr=0.05", "train.model_kwargs.width=2"]`` applied.

    Values are Python literals (``ast.literal_eval``); anything else is kept as a string.
    An unknown key raises ``KeyError`` listing the valid ones.
    """
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        config = _set(config, key.strip().split("."), value, key)
    return config


def _set(obj: Any, path: list[str], value: Any, full: str) -> Any:
    head, rest = path[0], path[1:]
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        if head not in names:
            raise KeyError(f"unknown config key {full!r}: {type(obj).__name__} has {', '.join(names)}")
        current = getattr(obj, head)
        new = _set(current, rest, value, full) if rest else _coerce(current, value, full)
        return dataclasses.replace(obj, **{head: new})
    if isinstance(obj, Mapping):
        if rest and head not in obj:
            raise KeyError(f"unknown config key {full!r}: no {head!r} in {{{', '.join(map(str, obj))}}}")
        new = _set(obj[head], rest, value, full) if rest else value
        return {**obj, head: new}
    raise KeyError(f"config key {full!r}: cannot descend into {type(obj).__name__}")


def _coerce(current: Any, value: Any, full: str) -> Any:
    if current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"  # `augment=false` must not become the truthy string "false"
        if not isinstance(value, bool):
            raise TypeError(f"config key {full!r} expects bool (True/False), got {value!r}")
        return value
    if isinstance(value, bool) and isinstance(current, (int, float, str)):
        raise TypeError(f"config key {full!r} expects {type(current).__name__}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, (int, float, str)) and not isinstance(value, type(current)):
        raise TypeError(f"config key {full!r} expects {type(current).__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict:
    """JSON-friendly dict of a (nested) config."""
    return dataclasses.asdict(config)


def choose_preset(presets: Mapping[str, Callable[[], Any]], name: str) -> Any:
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(presets)}")
    return presets[name]()
