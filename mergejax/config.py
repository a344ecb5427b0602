"""Configs as the JAX ecosystem writes them: ``ml_collections.ConfigDict``.

An experiment's ``get_config(preset)`` returns a ConfigDict (big_vision / Flax examples
style); the command line overrides any key with ``key=value`` (dotted paths reach nested
dicts) and ``--list-config`` prints every key with its value and type. ConfigDicts are
type-safe: ``lr=abc`` on a float key is refused, ints widen to floats, whole floats (``32.0``,
``64e3``) narrow to int keys and ``batch_size=1.5`` is refused as not a whole number.

:func:`train_config` is the one description of a supervised training run, used by every
pillar's experiment (a merge's fine-tuning, a snapshot run, a FreezeOut sweep point).
"""

from __future__ import annotations

import ast
import copy
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
    """One supervised training run. Steps are optimizer steps (mini-batches)."""
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.train_split = "train"  # split trained on: a name or a TFDS-style sum, e.g. "train+extra" (SVHN)
    c.model = "cnn"
    c.model_kwargs = ml_collections.ConfigDict()  # e.g. {"width": 2.0}; any keys the model takes
    c.batch_size = 64
    c.epochs = 10.0  # used when steps == 0
    c.steps = 0  # total optimizer steps; 0 -> round(epochs * steps_per_epoch)
    c.optimizer = "sgd"  # sgd | adam | adamw
    c.lr = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 5e-4  # coupled L2 for sgd/adam (PyTorch style), decoupled for adamw
    c.grad_clip = 0.0  # global-norm clip; 0 = off
    c.schedule = "cosine"  # constant | cosine | step
    c.warmup_steps = 0
    c.step_boundaries = (0.5, 0.75)  # fractions of training, for schedule="step"
    c.step_factor = 0.1
    c.augment = False  # CIFAR pad-crop-flip on device
    c.precision = "fp32"  # fp32 | bf16 (compute dtype; params, optimizer state, BN stats and loss stay fp32)
    c.remainder = "drop"  # last training batch of an epoch: drop | pad
    c.seed = 0
    c.log_every = 50
    c.eval_every = 0  # steps; 0 = once per epoch
    c.checkpoint_every = 0  # steps; 0 = once per epoch
    c.eval_batch_size = 500
    c.devices = 0  # local devices each batch is split over (sync BN): 0 = all, k = the first k; 1 device = the plain step
    unknown = set(overrides) - set(c.keys())  # update() would add an unknown key: refuse it instead
    if unknown:
        raise KeyError(f"unknown train config key(s) {sorted(unknown)}; known: {', '.join(c.keys())}")
    model_kwargs = overrides.pop("model_kwargs", None)
    c.update(overrides)
    if model_kwargs:
        c.model_kwargs = ml_collections.ConfigDict(dict(model_kwargs))
    return c


def placeholder(kind: type) -> Any:
    """A key that may be None but only takes ``kind`` values (e.g. ``max_stages``)."""
    return config_dict.placeholder(kind)


def replace(config: ml_collections.ConfigDict, **updates: Any) -> ml_collections.ConfigDict:
    """A copy of ``config`` with top-level ``updates`` (type-checked), the original untouched."""
    new = copy.deepcopy(config)
    for key, value in updates.items():
        if key not in new:
            raise KeyError(f"unknown config key {key!r}; known: {', '.join(new.keys())}")
        setattr(new, key, value)
    return new


def override(config: ml_collections.ConfigDict, assignments: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``["lr=0.05", "train.model_kwargs.width=2"]`` applied.

    Values are Python literals (``ast.literal_eval``); anything else is kept as a string.
    An unknown key raises ``KeyError`` listing the valid ones; a value of the wrong type
    raises ``TypeError`` naming the key (ConfigDict's type safety). Numbers are taken as people
    type them: an int widens to a float key, a float with a whole value (``32.0``, ``64e3``)
    narrows to an int key, and any other float on an int key is refused.
    """
    config = copy.deepcopy(config)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise KeyError(f"unknown config key {key!r}: no {'.'.join(parents[:i + 1])!r}; "
                               f"known: {', '.join(k for k, _, _ in describe(config))}")
            node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
            raise KeyError(f"config key {key!r}: {'.'.join(parents)!r} is a value, not a group")
        is_kwargs = parents and parents[-1] == "model_kwargs"  # a model's free-form keyword arguments
        if leaf not in node and not is_kwargs:
            raise KeyError(f"unknown config key {key!r}; known: {', '.join(k for k, _, _ in describe(config))}")
        current = node[leaf] if leaf in node else None
        kind = getattr(node._fields.get(leaf), "_field_type", None) or type(current)  # noqa: SLF001 (placeholders)
        if isinstance(current, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"  # `augment=false` must not become the truthy string "false"
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, bool):
            raise TypeError(f"config key {key!r} expects {type(current).__name__}, got {value!r}")
        if kind is int and isinstance(value, float):  # numbers as people type them: steps=64e3, batch_size=32.0
            if not value.is_integer():
                raise TypeError(f"config key {key!r} expects int, got {value!r}: it needs a whole number")
            value = int(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise TypeError(f"config key {key!r} expects {kind.__name__}, got {value!r}") from e
    return config


def describe(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every leaf key of ``config`` as ``(dotted key, value, type name)``, in definition order."""
    rows = []
    for key in config.keys():
        value = config[key]
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            rows.extend(describe(value, name + ".") or [(name, {}, "dict")])
        else:
            field = config._fields[key]  # noqa: SLF001 (the placeholder type of a None key)
            kind = getattr(field, "_field_type", None) or type(value)
            rows.append((name, value, getattr(kind, "__name__", str(kind))))
    return rows


def format_config(config: ml_collections.ConfigDict) -> str:
    """``describe`` as aligned text lines ``key = value  (type)``."""
    rows = describe(config)
    width = max((len(k) for k, _, _ in rows), default=0)
    return "\n".join(f"{k:<{width}} = {v!r}  ({t})" for k, v, t in rows)


def to_dict(config: Any) -> dict:
    """JSON-friendly dict of a config (ConfigDict, dataclass or mapping)."""
    if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return config.to_dict()
    if hasattr(config, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(config)
    return dict(config)
