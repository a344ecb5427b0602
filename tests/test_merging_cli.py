"""``mergejax merge CKPT_A CKPT_B --out DIR``: loads two checkpoints, writes a loadable student;
inputs are verified and read-only, a run's step directory brings the run's config, and the
output directory knows which merge it holds."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core import checkpoint
from mergejax.cli import merge as merge_cli
from mergejax.cli import COMMANDS, main
from mergejax.config import to_dict, train_config
from mergejax.core.errors import ConfigMismatch, CorruptCheckpoint, UserError
from mergejax.merging.pipeline import evaluate_vars
from mergejax.core.models import init_variables, make_model
from mergejax.core.optim import make_optimizer
from mergejax.core.units import variables_of

SHAPE = (1, 8, 8, 1)
FAST = ["--quiet", "--set", "gate_epochs=0.2", "--set", "finetune_epochs=0.2", "--set", "log_every=2"]
MLP = ["--set", "model=mlp", "--set", "model_kwargs={'hidden': (16,)}"]


def _digest(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            out[os.path.relpath(os.path.join(d, f), root)] = open(os.path.join(d, f), "rb").read()
    return out


def _data_file(ckpt):
    return max((os.path.relpath(os.path.join(d, f), ckpt) for d, _, fs in os.walk(ckpt) for f in fs if os.path.basename(d) == "d"),
               key=lambda f: os.path.getsize(os.path.join(ckpt, f)))


def test_merge_command_writes_student(tmp_path, digits, capsys):
    model = make_model("mlp", 10, hidden=(16,))
    for i, name in enumerate("abcd"):
        checkpoint.save(str(tmp_path / name), variables_of(*init_variables(model, jax.random.key(i), SHAPE)))
    assert "merge" in COMMANDS
    out = tmp_path / "merged"
    rc = main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), *FAST, *MLP])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == "mlp" and summary["steps"]["gates"] == 4
    student = checkpoint.load(str(out / "student"))
    assert jax.tree.map(np.shape, student) == jax.tree.map(np.shape, variables_of(*init_variables(model, jax.random.key(0), SHAPE)))
    # The saved student is the one the summary evaluated.
    acc = evaluate_vars(model, jax.tree.map(jnp.asarray, student), digits[1])["accuracy"]
    np.testing.assert_allclose(acc, summary["after_finetune"]["accuracy"], atol=1e-6)
    # The output knows what it holds: kind, the resolved config, both teachers' fingerprints.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "merge" and manifest["config"]["gate_epochs"] == 0.2
    assert [manifest["inputs"][k]["path"] for k in "ab"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    done = _digest(out)

    # The same command again returns the finished result without training.
    assert merge_cli.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), *FAST, *MLP]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed
    assert _digest(out) == done
    # Other teachers, or another config, into the same directory: refused with one line, nothing touched.
    for args in ([str(tmp_path / "c"), str(tmp_path / "d"), *FAST, *MLP],
                 [str(tmp_path / "a"), str(tmp_path / "b"), *FAST, *MLP, "--set", "lambda0=1.0"]):
        with pytest.raises(ConfigMismatch, match=r"holds a different run: .*--overwrite") as e:
            merge_cli.main([*args, "--out", str(out)])
        assert "\n" not in str(e.value)
    assert _digest(out) == done
    # An --out inside (or around) an input is refused; inputs are never written.
    inputs = {n: _digest(tmp_path / n) for n in "ab"}
    for bad in (tmp_path / "a", tmp_path / "a" / "merged", tmp_path):
        with pytest.raises(UserError, match=r"--out .* (is inside|contains) input a"):
            merge_cli.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(bad), *FAST, *MLP])
    assert {n: _digest(tmp_path / n) for n in "ab"} == inputs
    # A damaged teacher is refused with the file named, before anything is written.
    rel = _data_file(str(tmp_path / "d"))
    with open(tmp_path / "d" / rel, "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "d" / rel) // 2)
    with pytest.raises(CorruptCheckpoint, match=re.escape(rel)) as e:
        merge_cli.main([str(tmp_path / "c"), str(tmp_path / "d"), "--out", str(tmp_path / "cd"), *FAST, *MLP])
    assert "\n" not in str(e.value) and not (tmp_path / "cd").exists()


def _run_dir(path, net, config, *, step: int = 44, summary: bool = True):
    """A ``mergejax train`` work directory: ``checkpoints/<step>`` holding what ``fit`` saves
    (step, params, batch_stats, optax state with empty entries) and ``summary.json``."""
    tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
    with checkpoint.Manager(os.path.join(path, "checkpoints")) as m:
        m.save(step, {"step": jnp.array(step), **net, "opt_state": tx.init(net["params"])})
    if summary:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"test_accuracy": 0.1, "config": to_dict(config)}, f)
    return str(path)


def _net(seed, name="mlp", **kw):
    model = make_model(name, 10, **kw)
    return variables_of(*jax.jit(lambda k: init_variables(model, k, SHAPE))(jax.random.key(seed)))


def test_step_directory_brings_its_runs_config(tmp_path):
    """``merge RUN_A/checkpoints/44 RUN_B``: model, width and dataset come from RUN_A's
    summary.json (the tiny preset, a width-0.5 CNN, would not fit these MLP teachers)."""
    kw = {"hidden": (16,), "width": 0.5}
    config = train_config(dataset="digits", model="mlp", model_kwargs=kw)
    a = _run_dir(tmp_path / "run_a", _net(0, **kw), config)
    b = _run_dir(tmp_path / "run_b", _net(1, **kw), config, step=7)
    assert checkpoint.run_dir_of(os.path.join(a, "checkpoints", "44")) == a
    assert checkpoint.run_dir_of(os.path.join(a, "checkpoints")) == a == checkpoint.run_dir_of(a)
    assert merge_cli.teacher_config(os.path.join(a, "checkpoints", "44")) == {"dataset": "digits", "model": "mlp", "model_kwargs": kw}
    out = tmp_path / "m"
    assert merge_cli.main([os.path.join(a, "checkpoints", "44"), b, "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == "mlp" and summary["config"]["model_kwargs"] == {"hidden": [16], "width": 0.5}
    student = checkpoint.load(str(out / "student"))
    assert np.shape(student["params"]["dense0"]["dense"]["kernel"]) == (64, 8)  # width 0.5 of 16 units
    # Without a run directory there is no config to read: a config that does not fit says so in one line.
    lone = checkpoint.save(str(tmp_path / "lone"), _net(2, **kw))
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=re.escape("has leaf ['params']['dense0']['dense']['bias'] of shape (8,), model mlp {'hidden': (16,)} has (16,)")):
        merge_cli.main([lone, lone, "--out", str(tmp_path / "m2"), *FAST, *MLP])
    assert not (tmp_path / "m2").exists()


def test_mismatch_of_fit_checkpoints_names_leaf_and_both_shapes(tmp_path):
    config = train_config(dataset="digits", model="mlp", model_kwargs={"hidden": (16,)})
    a = _run_dir(tmp_path / "run_a", _net(0, hidden=(16,)), config, summary=False)
    b = _run_dir(tmp_path / "run_b", _net(1, hidden=(17,)), config, summary=False)
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=re.escape(f"checkpoint {b} has leaf ['params']['dense0']['dense']['bias'] of shape (17,), "
                                       f"checkpoint {a} has (16,)")) as e:
        merge_cli.main([a, b, "--out", str(tmp_path / "m"), *FAST, *MLP])
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()


def test_teacher_config_from_a_fit_manifest(tmp_path):
    """A run killed before its summary.json: the config comes from fit's manifest.json."""
    from mergejax.core import rundir

    kw = {"hidden": (16,), "width": 0.5}
    run = _run_dir(tmp_path / "run", _net(0, **kw), train_config(), summary=False)
    assert checkpoint.run_dir_of(run) is None and merge_cli.teacher_config(run) == {}
    config = to_dict(train_config(dataset="digits", model="mlp", model_kwargs=kw))
    rundir.write_json(os.path.join(run, "manifest.json"),
                      rundir.make_manifest("fit", {"fit": {"num_steps": 44}, "caller": {"train_config": config}}))
    assert merge_cli.teacher_config(os.path.join(run, "checkpoints", "44")) == {"dataset": "digits", "model": "mlp", "model_kwargs": kw}
    assert checkpoint.run_dir_of(checkpoint.save(str(tmp_path / "lone"), {"w": jnp.ones(2)})) is None
