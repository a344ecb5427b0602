"""Configs (ml_collections ConfigDict): typed command-line overrides, nested keys, clear errors,
listing every key with its default and type, experiment argument parsing."""

from __future__ import annotations

import json
import types

import ml_collections
import pytest

from mergejax.config import describe, format_config, override, placeholder, replace, to_dict, train_config
from mergejax.experiment import experiment_args, get_config


def outer(**train) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train = train_config(**train)
    c.seeds = (0,)
    c.note = placeholder(str)
    return c


def test_override_types():
    cfg = override(train_config(), [
        "lr=1", "batch_size=32", "model=resnet20", "nesterov=True", "augment=false",
        "step_boundaries=(0.3, 0.6)", "model_kwargs.width=2.0", "dataset=cifar10",
    ])
    assert cfg.lr == 1.0 and type(cfg.lr) is float  # int literal widened to the float key
    assert cfg.batch_size == 32 and type(cfg.batch_size) is int
    assert cfg.model == "resnet20" and cfg.dataset == "cifar10"  # non-literals stay strings
    assert cfg.nesterov is True and cfg.augment is False  # lower-case true/false accepted for bools
    assert cfg.step_boundaries == (0.3, 0.6)
    assert cfg.model_kwargs.to_dict() == {"width": 2.0}
    assert train_config().lr == 0.1 and train_config().model_kwargs.to_dict() == {}  # defaults untouched


def test_numbers_as_people_type_them():
    # An int key takes a float with a whole value as that int; a float key takes an int.
    c = outer()
    c.max_stages = placeholder(int)
    c.train.model_kwargs.depth = 20
    cfg = override(c, ["train.batch_size=32.0", "train.steps=64e3", "train.lr=1", "train.momentum=0.5",
                       "max_stages=3.0", "train.model_kwargs.depth=110.0", "train.seed=-2.0"])
    assert (cfg.train.batch_size, cfg.train.steps, cfg.max_stages, cfg.train.model_kwargs.depth, cfg.train.seed) == (32, 64000, 3, 110, -2)
    assert all(type(v) is int for v in (cfg.train.batch_size, cfg.train.steps, cfg.max_stages, cfg.train.model_kwargs.depth, cfg.train.seed))
    assert (cfg.train.lr, cfg.train.momentum) == (1.0, 0.5) and type(cfg.train.lr) is float
    for item in ("max_stages=2.5", "train.model_kwargs.depth=20.5", "train.log_every=1e-3"):
        key = item.split("=")[0]
        with pytest.raises(TypeError, match=f"'{key}' expects int, got .*: it needs a whole number"):
            override(c, [item])


def test_nested_keys_and_copies():
    base = outer()
    cfg = override(base, ["train.lr=0.05", "train.model_kwargs.width=2", "seeds=(0, 1, 2)", "note=hello world"])
    assert cfg.train.lr == 0.05 and cfg.train.model_kwargs.to_dict() == {"width": 2} and cfg.seeds == (0, 1, 2)
    assert cfg.note == "hello world"
    assert base.train.lr == 0.1 and base.train.model_kwargs.to_dict() == {} and base.note is None  # not mutated
    assert override(base, ["note=a=b"]).note == "a=b"  # a value containing '=' splits at the first one
    r = replace(base.train, seed=3)
    assert (r.seed, base.train.seed) == (3, 0)
    with pytest.raises(KeyError, match="unknown config key 'sede'"):
        replace(base.train, sede=3)
    with pytest.raises(TypeError):
        replace(base.train, seed="three")


@pytest.mark.parametrize(
    "item,exc,match",
    [
        ("lrate=0.1", KeyError, "unknown config key 'lrate'; known: .*train.lr"),
        ("train.bogus=1", KeyError, "unknown config key 'train.bogus'"),
        ("train.model_kwargs.a.b=1", KeyError, "no 'train.model_kwargs.a'"),
        ("train.batch_size=1.5", TypeError, "'train.batch_size' expects int, got 1.5"),
        ("train.steps=0.5", TypeError, "'train.steps' expects int, got 0.5: it needs a whole number"),
        ("train.batch_size=1e400", TypeError, "'train.batch_size' expects int, got inf: it needs a whole number"),
        ("train.augment=1.0", TypeError, "'train.augment' expects bool"),
        ("train.lr=fast", TypeError, "'train.lr' expects float, got 'fast'"),
        ("train.augment=1", TypeError, "'train.augment' expects bool"),
        ("train.lr=True", TypeError, "'train.lr' expects float, got True"),
        ("note=3", TypeError, "'note' expects str, got 3"),
        ("train.lr", ValueError, "not of the form key=value"),
        ("train.lr.x=1", KeyError, "'train.lr' is a value, not a group"),
    ],
)
def test_override_errors(item, exc, match):
    with pytest.raises(exc, match=match):
        override(outer(), [item])


def test_train_config_refuses_unknown_keys():
    with pytest.raises(KeyError, match="unknown train config key"):
        train_config(learning_rate=0.1)


def test_train_split_is_a_name_or_a_tfds_style_sum():
    assert train_config().train_split == "train"
    assert train_config(train_split="train+extra").train_split == "train+extra"
    assert override(train_config(), ["train_split=train+extra"]).train_split == "train+extra"  # typed bare on a command line


def test_describe_lists_every_key_with_value_and_type():
    rows = {k: (v, t) for k, v, t in describe(outer())}
    assert rows["train.lr"] == (0.1, "float") and rows["train.batch_size"] == (64, "int")
    assert rows["train.augment"] == (False, "bool") and rows["seeds"] == ((0,), "tuple")
    assert rows["note"] == (None, "str")  # a placeholder keeps its type
    assert rows["train.model_kwargs"] == ({}, "dict")
    assert len(rows) == 26 + 2  # every train key (model_kwargs empty; precision, devices, train_split included) + seeds + note
    text = format_config(outer())
    assert "train.lr               = 0.1  (float)" in text


def test_to_dict_is_json():
    d = to_dict(outer())
    assert json.loads(json.dumps(d))["train"]["lr"] == 0.1 and d["seeds"] == (0,)


def _module():
    def cfg(preset):
        return outer(model="resnet20") if preset == "paper" else outer()
    return types.SimpleNamespace(NAME="demo", PRESETS=("tiny", "paper"), get_config=cfg, __doc__="demo")


def test_experiment_args_and_presets():
    mod = _module()
    cfg, out, progress, name, args = experiment_args(["--set", "train.lr=0.2", "--set", "seeds=(1,2)", "--quiet"], mod)
    assert (cfg.train.lr, cfg.seeds, out, progress, name, args.overwrite) == (0.2, (1, 2), "results/tiny/demo", False, "tiny", False)
    cfg, out, progress, name, args = experiment_args(["--preset", "paper", "--out", "/tmp/x", "--overwrite"], mod)
    assert (cfg.train.model, out, progress, name, args.overwrite) == ("resnet20", "/tmp/x", True, "paper", True)
    with pytest.raises(ValueError, match="unknown preset 'huge' for demo; available: tiny, paper"):
        get_config(mod, "huge")
    with pytest.raises(KeyError, match="unknown config key"):
        experiment_args(["--set", "nope=1"], mod)


def test_list_config_from_the_command_line(run_python):
    proc = run_python("""
        import sys
        sys.argv = ["train_baseline.py", "--list-config", "--set", "train.lr=0.3"]
        import runpy
        runpy.run_path("experiments/train_baseline.py", run_name="__main__")
    """, check=False)
    assert "train.lr               = 0.3  (float)" in proc.stdout, proc.stdout + proc.stderr
    assert "seeds                  = (0,)  (tuple)" in proc.stdout
