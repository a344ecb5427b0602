"""``fit`` as a trustworthy run: manifest refusal, finite checkpoints only, valid JSON
metrics, resume that drops records past the checkpoint and continues the clock."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core import checkpoint
from mergejax.core.errors import ConfigMismatch, Diverged
from mergejax.core.models import make_model
from mergejax.core.loop import fit, read_metrics
from mergejax.core.optim import make_optimizer
from mergejax.core.train import create_state, train_step


def _state(seed=0, lr=0.05):
    model = make_model("mlp", 10, hidden=(16,))
    return create_state(model, jax.random.key(seed), (1, 8, 8, 1), make_optimizer("sgd", lr, momentum=0.9))


def _strict_records(path):
    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name} in {path}")

    with open(path) as f:
        return [json.loads(line, parse_constant=no_constants) for line in f]


KW = dict(num_steps=12, batch_size=32, log_every=3, checkpoint_every=4, progress=False)


def test_workdir_of_another_run_is_refused_and_the_same_run_resumes(digits, tmp_path):
    train, _ = digits
    wd = str(tmp_path / "run")
    ref, _ = fit(_state(0), train, seed=1, workdir=wd, manifest={"lr": 0.05}, **KW)
    with pytest.raises(ConfigMismatch) as e:  # another initial state (seed) -> refused, nothing touched
        fit(_state(5), train, seed=1, workdir=wd, manifest={"lr": 0.05}, **KW)
    assert "inputs.initial_state=" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigMismatch, match=r"config.caller.lr=0.05 \(asked: 0.1\)"):
        fit(_state(0), train, seed=1, workdir=wd, manifest={"lr": 0.1}, **KW)
    with pytest.raises(ConfigMismatch, match=r"config.fit.seed=1 \(asked: 2\)"):
        fit(_state(0), train, seed=2, workdir=wd, manifest={"lr": 0.05}, **KW)
    again, history = fit(_state(0), train, seed=1, workdir=wd, manifest={"lr": 0.05}, **KW)
    assert history == []  # finished: nothing re-run
    for a, b in zip(jax.tree.leaves(ref.arrays()), jax.tree.leaves(again.arrays())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other, _ = fit(_state(5), train, seed=1, workdir=wd, manifest={"lr": 0.05}, overwrite=True, **KW)
    assert int(other.step) == 12


def test_metrics_are_strict_json_with_null_for_nan(digits, tmp_path):
    train, _ = digits
    fit(_state(), train, workdir=str(tmp_path), **KW)  # no lr_fn: the step reports lr = NaN
    records = _strict_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert all(r["lr"] is None for r in records) and all(isinstance(r["loss"], float) for r in records)


def _poison_after(n):
    jitted = jax.jit(train_step)

    def step(state, batch, rng):
        state, metrics = jitted(state, batch, rng)
        if int(state.step) == n:
            params = jax.tree.map(lambda x: x, state.params)
            params["head"]["dense"]["kernel"] = params["head"]["dense"]["kernel"].at[0, 0].set(jnp.inf)
            state = state.replace(params=params)
        return state, metrics

    return step


def test_divergence_never_reaches_a_checkpoint_and_a_sane_rerun_recovers(digits, tmp_path):
    train, _ = digits
    wd = str(tmp_path / "run")
    kw = dict(KW, log_every=100)  # only the checkpoint guard can catch it
    with pytest.raises(Diverged) as e:
        fit(_state(), train, workdir=wd, step_fn=_poison_after(6), **kw)
    assert isinstance(e.value, FloatingPointError)
    msg = str(e.value)
    assert "at step 8 before writing its checkpoint" in msg and "first bad leaf: ['params']" in msg and "\n" not in msg
    with checkpoint.Manager(os.path.join(wd, "checkpoints")) as m:
        assert m.steps() == [4]  # the newest checkpoint is the last finite one
    # the user fixes the bug (same config) and re-runs: resumes from step 4 and ends finite,
    # equal to a run that never diverged
    resumed, _ = fit(_state(), train, workdir=wd, **kw)
    clean, _ = fit(_state(), train, **kw)
    for a, b in zip(jax.tree.leaves(resumed.arrays()), jax.tree.leaves(clean.arrays())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


class _Killed(Exception):
    pass


def test_resume_drops_records_past_the_checkpoint_and_continues_time(digits, tmp_path):
    train, test = digits
    wd = str(tmp_path / "run")
    kw = dict(KW, log_every=1, eval_split=test, eval_every=5)

    def kill(step, state):
        if step == 10:
            raise _Killed

    with pytest.raises(_Killed):
        fit(_state(), train, workdir=wd, callbacks=[kill], **kw)
    before = read_metrics(wd)
    assert max(r["step"] for r in before) == 9  # logged past the step-8 checkpoint
    fit(_state(), train, workdir=wd, **kw)
    records = _strict_records(os.path.join(wd, "metrics.jsonl"))
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, 13))  # no repeats
    assert [r["step"] for r in records if r["split"] == "test"] == [5, 10, 12]
    times = [r["time_s"] for r in records if r["split"] == "train"]
    assert times == sorted(times) and times[8] >= times[7]  # the clock continues after step 8


def test_torn_last_line_of_the_log_is_dropped_on_resume(digits, tmp_path):
    train, _ = digits
    wd = str(tmp_path / "run")
    with pytest.raises(_Killed):
        fit(_state(), train, workdir=wd, callbacks=[lambda s, st: (_ for _ in ()).throw(_Killed) if s == 9 else None], **KW)
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 9, "split": "tr')  # a write cut by SIGKILL
    fit(_state(), train, workdir=wd, **KW)
    assert [r["step"] for r in _strict_records(os.path.join(wd, "metrics.jsonl"))] == [3, 6, 9, 12]
