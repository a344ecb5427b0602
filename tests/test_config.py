"""Configs: typed command-line overrides, nested keys, clear errors, experiment argument parsing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mergejax.config import TrainConfig, choose_preset, override, to_dict
from mergejax.experiment import experiment_args


@dataclasses.dataclass(frozen=True)
class Outer:
    train: TrainConfig = TrainConfig()
    seeds: tuple = (0,)
    note: str | None = None


def test_override_types():
    cfg = override(TrainConfig(), [
        "lr=1", "batch_size=32", "model=resnet20", "nesterov=True", "augment=false",
        "step_boundaries=(0.3, 0.6)", "model_kwargs={'width': 2.0}", "dataset=cifar10",
    ])
    assert cfg.lr == 1.0 and type(cfg.lr) is float  # int literal widened to the float field
    assert cfg.batch_size == 32 and type(cfg.batch_size) is int
    assert cfg.model == "resnet20" and cfg.dataset == "cifar10"  # non-literals stay strings
    assert cfg.nesterov is True and cfg.augment is False  # lower-case true/false accepted for bools
    assert cfg.step_boundaries == (0.3, 0.6)
    assert cfg.model_kwargs == {"width": 2.0}
    assert TrainConfig().lr == 0.1  # the original is untouched (frozen dataclasses)


def test_nested_and_dict_keys():
    cfg = override(Outer(), ["train.lr=0.05", "train.model_kwargs.width=2", "seeds=(0, 1, 2)", "note=hello world"])
    assert cfg.train.lr == 0.05 and cfg.train.model_kwargs == {"width": 2} and cfg.seeds == (0, 1, 2)
    assert cfg.note == "hello world"
    assert Outer().train.model_kwargs == {}  # the default dict was not mutated
    # value containing '=' splits at the first one only
    assert override(Outer(), ["note=a=b"]).note == "a=b"


@pytest.mark.parametrize(
    "item,exc,match",
    [
        ("lrate=0.1", KeyError, "unknown config key 'lrate': TrainConfig has dataset, model"),
        ("train.bogus=1", KeyError, "unknown config key 'train.bogus'"),
        ("train.model_kwargs.a.b=1", KeyError, "no 'a' in"),
        ("batch_size=1.5", TypeError, "'batch_size' expects int, got 1.5"),
        ("lr=fast", TypeError, "'lr' expects float, got 'fast'"),
        ("augment=1", TypeError, "'augment' expects bool"),
        ("lr=True", TypeError, "'lr' expects float, got True"),
        ("lr", ValueError, "not of the form key=value"),
        ("train.lr.x=1", KeyError, "cannot descend into float"),
    ],
)
def test_override_errors(item, exc, match):
    cfg = Outer() if item.startswith(("train.", "seeds")) else TrainConfig()
    with pytest.raises(exc, match=match):
        override(cfg, [item])


def test_to_dict_is_json():
    d = to_dict(Outer())
    assert json.loads(json.dumps(d))["train"]["lr"] == 0.1 and d["seeds"] == (0,)


def test_experiment_args_and_presets():
    presets = {"tiny": lambda: Outer(), "paper": lambda: Outer(train=TrainConfig(model="resnet20"))}
    cfg, out, progress, name, args = experiment_args(["--set", "train.lr=0.2", "--set", "seeds=(1,2)", "--quiet"], presets, "demo")
    assert (cfg.train.lr, cfg.seeds, out, progress, name, args.overwrite) == (0.2, (1, 2), "results/tiny/demo", False, "tiny", False)
    cfg, out, progress, name, args = experiment_args(["--preset", "paper", "--out", "/tmp/x", "--overwrite"], presets, "demo")
    assert (cfg.train.model, out, progress, name, args.overwrite) == ("resnet20", "/tmp/x", True, "paper", True)
    with pytest.raises(ValueError, match="unknown preset 'huge'; available: tiny, paper"):
        choose_preset(presets, "huge")
    with pytest.raises(KeyError, match="unknown config key"):
        experiment_args(["--set", "nope=1"], presets, "demo")
