"""N models in one vmapped program: each ends where its solo ``fit`` ends (float tolerance);
a killed stacked run resumes to the uninterrupted result; ``train_and_evaluate_many`` equals
solo ``train_and_evaluate`` per seed; ``mergejax train --set seeds=(..)`` writes and resumes."""

from __future__ import annotations

import json
import os
import types

import jax
import numpy as np
import pytest

from mergejax import cli
from mergejax.config import replace, train_config
from mergejax.core.errors import ConfigMismatch
from mergejax.core.data import augment_cifar
from mergejax.core.loop import fit, read_metrics
from mergejax.core.models import make_model
from mergejax.core.multi import (fit_many, models_per_program, read_many_metrics, stack_states, step_memory_bytes,
                                 unstack_states, vmapped_step_memory_bytes)
from mergejax.core.optim import make_optimizer, make_schedule
from mergejax.core.train import create_state
from mergejax.run import setup, train_and_evaluate, train_and_evaluate_many


def _state(model, seed, steps, augment=False):
    lr = make_schedule("cosine", 0.1, steps)
    tx = make_optimizer("sgd", lr, momentum=0.9, weight_decay=5e-4)
    return create_state(model, jax.random.key(100 + seed), (1, 8, 8, 1), tx, lr_fn=lr,
                        augment_fn=augment_cifar if augment else None)


@pytest.mark.parametrize("name,kw,augment", [("mlp", {"hidden": (32,)}, False), ("cnn", {"width": 0.25}, False),
                                             ("cnn", {"width": 0.25}, True)])  # augment: each model its own crops/flips
def test_each_vmapped_model_equals_its_solo_fit(digits, name, kw, augment):
    train, _ = digits
    model, steps, seeds = make_model(name, 10, **kw), 12, (0, 1, 2)
    together, hist = fit_many([_state(model, s, steps, augment) for s in seeds], train, num_steps=steps, batch_size=32,
                              seeds=seeds, log_every=4, progress=False)
    for s, got, h in zip(seeds, together, hist):
        solo, solo_hist = fit(_state(model, s, steps, augment), train, num_steps=steps, batch_size=32, seed=s, log_every=4,
                              progress=False)
        for a, b in zip(jax.tree.leaves(got.arrays()), jax.tree.leaves(solo.arrays())):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
        assert [r["step"] for r in h] == [r["step"] for r in solo_hist] == [4, 8, 12]
        np.testing.assert_allclose([r["loss"] for r in h], [r["loss"] for r in solo_hist], rtol=1e-4)
    # the models really are different (own init and data order), not N copies of one
    assert not np.allclose(together[0].params["head"]["dense"]["kernel"], together[1].params["head"]["dense"]["kernel"])


def test_the_accelerator_prefetch_path_gives_the_same_models(digits, monkeypatch):
    """On an accelerator ``fit`` and ``fit_many`` prefetch their (stacked) batches in a thread; the
    models must be bit for bit those of the CPU path, which reads them inline."""
    train, _ = digits
    model, seeds = make_model("mlp", 10, hidden=(16,)), (0, 1)
    runs = {}
    for backend in ("cpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        many, _ = fit_many([_state(model, s, 6) for s in seeds], train, num_steps=6, batch_size=32, seeds=seeds,
                           log_every=3, progress=False)
        one, _ = fit(_state(model, 0, 6), train, num_steps=6, batch_size=32, seed=0, log_every=3, progress=False)
        runs[backend] = [np.asarray(x) for x in jax.tree.leaves([m.arrays() for m in many] + [one.arrays()])]
    for a, b in zip(runs["cpu"], runs["gpu"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_stack_states_refuses_different_optimizers_and_shapes(digits):
    model = make_model("mlp", 10, hidden=(8,))
    a = _state(model, 0, 10)
    b = create_state(model, jax.random.key(1), (1, 8, 8, 1), make_optimizer("adam", 1e-3))
    with pytest.raises(ValueError, match="state 1 has a different tx"):
        stack_states([a, b])
    with pytest.raises(ValueError, match="state 1 has a different apply_fn"):
        stack_states([a, _state(make_model("mlp", 10, hidden=(9,)), 0, 10)])
    wider = a.replace(params=jax.tree.map(lambda x: np.concatenate([x, x], -1), a.params))
    with pytest.raises(ValueError, match=r"state 1 has leaf \['params'\]\['dense0'\]\['dense'\]\['bias'\] of shape \(16,\)"):
        stack_states([a, wider])
    back = unstack_states(stack_states([a, _state(model, 1, 10)]))
    np.testing.assert_array_equal(back[0].params["head"]["dense"]["kernel"], a.params["head"]["dense"]["kernel"])


class _Killed(Exception):
    pass


def test_killed_fit_many_resumes_to_the_uninterrupted_result(digits, tmp_path):
    train, test = digits
    model, steps, seeds = make_model("mlp", 10, hidden=(16,)), 12, (0, 1)
    kw = dict(num_steps=steps, batch_size=32, seeds=seeds, log_every=2, checkpoint_every=4, eval_split=test,
              eval_every=6, progress=False, manifest={"note": "a"})
    straight, _ = fit_many([_state(model, s, steps) for s in seeds], train, workdir=str(tmp_path / "a"), **kw)

    def kill(step, stacked):
        if step == 7:  # past the checkpoint at 4 and the records of 6
            raise _Killed

    wd = str(tmp_path / "b")
    with pytest.raises(_Killed):
        fit_many([_state(model, s, steps) for s in seeds], train, workdir=wd, callbacks=[kill], **kw)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4"]
    assert max(r["step"] for r in read_metrics(wd)) == 6
    resumed, hist = fit_many([_state(model, s, steps) for s in seeds], train, workdir=wd, **kw)
    assert [r["step"] for r in hist[0] if r["split"] == "train"] == [6, 8, 10, 12]  # this call: from step 4
    for a, b in zip(resumed, straight):
        for x, y in zip(jax.tree.leaves(a.arrays()), jax.tree.leaves(b.arrays())):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    drop_time = lambda runs: [[{k: v for k, v in r.items() if k != "time_s"} for r in run] for run in runs]  # noqa: E731
    whole, ref = read_many_metrics(wd, 2), read_many_metrics(str(tmp_path / "a"), 2)
    assert drop_time(whole) == drop_time(ref)
    assert [(r["step"], r["split"]) for r in whole[1]] == [(2, "train"), (4, "train"), (6, "train"), (6, "test"),
                                                           (8, "train"), (10, "train"), (12, "train"), (12, "test")]
    assert {(r["model"], r["seed"]) for r in read_metrics(wd)} == {(0, 0), (1, 1)}
    # the stacked models are the solo ones: model 1 after 12 steps equals fit(seed=1)
    solo, _ = fit(_state(model, 1, steps), train, num_steps=steps, batch_size=32, seed=1, progress=False)
    np.testing.assert_allclose(resumed[1].params["head"]["dense"]["kernel"], solo.params["head"]["dense"]["kernel"],
                               rtol=2e-4, atol=2e-5)
    # another run in the same workdir is refused in one line, naming what differs
    with pytest.raises(ConfigMismatch, match=r"config.fit_many.seeds.*--overwrite") as e:
        fit_many([_state(model, s, steps) for s in (0, 2)], train, workdir=wd, **{**kw, "seeds": (0, 2)})
    assert "\n" not in str(e.value)


def _tiny_config(**kw):
    return train_config(model="mlp", model_kwargs={"hidden": (32,)}, steps=16, batch_size=32, log_every=8,
                        eval_every=8, checkpoint_every=8, devices=1, **kw)


def test_train_and_evaluate_many_equals_solo_train_and_evaluate(digits):
    train, test = digits
    config, seeds = _tiny_config(), (0, 3)
    states, summaries = train_and_evaluate_many(config, seeds, progress=False)
    for seed, state, summary in zip(seeds, states, summaries):
        cfg = replace(config, seed=seed)
        solo_state, solo = train_and_evaluate(cfg, progress=False, setup_=setup(cfg, train=train, test=test))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(solo_state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
        assert summary["seed"] == seed
        assert set(summary) - {"seed"} <= set(solo) and summary["steps"] == solo["steps"] == 16
        assert abs(summary["test_accuracy"] - solo["test_accuracy"]) <= 1 / len(test) + 1e-9
        assert [(r["step"], r["split"]) for r in summary["history"]] == [(r["step"], r["split"]) for r in solo["history"]]
        np.testing.assert_allclose([r["loss"] for r in summary["history"]], [r["loss"] for r in solo["history"]], rtol=1e-4)
    assert summaries[0]["test_loss"] != summaries[1]["test_loss"]


def test_cli_trains_several_seeds_in_one_program_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--set", "seeds=(0,1)", "--set", "models_per_program=2", "--set", "model=mlp",
            "--set", "model_kwargs={'hidden': (16,)}", "--set", "steps=8", "--set", "log_every=4",
            "--set", "checkpoint_every=4", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == printed["seeds"] == [0, 1] and summary["groups"] == [[0, 1]]
    assert [r["seed"] for r in summary["per_seed"]] == [0, 1] and summary["steps"] == 8
    assert printed["test_accuracy"] == [r["test_accuracy"] for r in summary["per_seed"]]
    assert all(0.1 < a <= 1.0 for a in printed["test_accuracy"]) and printed["test_accuracy"][0] != printed["test_accuracy"][1]
    assert summary["config"]["seeds"] == [0, 1] and summary["config"]["models_per_program"] == 2
    group = out / "seeds_0_1"
    assert sorted(d for d in os.listdir(group / "checkpoints") if d.isdigit()) == ["4", "8"]
    records = read_metrics(str(group))
    assert [(r["step"], r["model"]) for r in records if r["split"] == "train"] == [(4, 0), (4, 1), (8, 0), (8, 1)]
    # the same command again resumes the finished group: no new steps, the same result
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_accuracy"] == printed["test_accuracy"]
    assert read_metrics(str(group)) == records
    # another config in the same --out is refused in one line; the old summary stays
    assert cli.main([*args, "--set", "lr=0.05"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "lr=0.1 (asked: 0.05)" in err and "\n" not in err
    assert json.loads((out / "summary.json").read_text())["per_seed"] == summary["per_seed"]
    # ... and so is a single-seed run there (another kind of run)
    assert cli.main(["train", "--set", "model=mlp", "--set", "steps=8", "--out", str(out), "--quiet"]) == 2
    assert "holds a different run" in capsys.readouterr().err


def test_models_per_program_auto_is_one_on_cpu_and_fits_free_memory_on_an_accelerator():
    def never():
        raise AssertionError("CPU needs no measurement")

    cpu = types.SimpleNamespace(platform="cpu", memory_stats=lambda: None)
    assert models_per_program(0, 4, device=cpu, bytes_per_model=never) == 1
    if jax.local_devices()[0].platform == "cpu":
        assert models_per_program(0, 4, bytes_per_model=never) == 1
    assert models_per_program(2, 4, device=cpu) == 2 and models_per_program(8, 3, device=cpu) == 3  # N > 0 forces it
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 10_000, "bytes_in_use": 2_000})
    assert models_per_program(0, 4, device=gpu, bytes_per_model=lambda: 1_000) == 4  # 0.8 * 8000 / 1000 = 6.4 >= 4
    assert models_per_program(0, 8, device=gpu, bytes_per_model=lambda: 1_000) == 6
    assert models_per_program(0, 8, device=gpu, bytes_per_model=lambda: 100_000) == 1
    unknown = types.SimpleNamespace(platform="tpu", memory_stats=lambda: None)
    assert models_per_program(0, 5, device=unknown, bytes_per_model=lambda: 1) == 5
    with pytest.raises(ValueError, match="models_per_program must be >= 0"):
        models_per_program(-1, 2, device=cpu)


def test_seed_groups_on_an_accelerator_fit_the_measured_step_in_free_memory(monkeypatch):
    """``seed_groups(..., 0)`` on an accelerator: as many seeds per program as fit in 80% of the free
    memory at XLA's bytes for one model's step of this config (measured, not guessed)."""
    from mergejax import run as run_lib
    from mergejax.config import train_config

    config = train_config(model="mlp", model_kwargs={"hidden": (32,)}, batch_size=16)
    s = setup(config)
    need = step_memory_bytes(s.state, s.train.images.shape[1:], config.batch_size, s.train.images.dtype)
    assert need > 0
    free = int(2.6 * need / 0.8)  # room for 2.6 models -> 2 per program
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": free + 500, "bytes_in_use": 500})
    monkeypatch.setattr(jax, "local_devices", lambda: [gpu])
    assert run_lib.seed_groups(config, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3], [4]]
    assert run_lib.seed_groups(config, [0, 1, 2], 3) == [[0, 1, 2]]  # asked: no measurement


def test_an_auto_group_size_is_pinned_so_a_resumed_run_keeps_its_units(tmp_path, monkeypatch):
    """Free memory differs between a run and its resume; the groups (and so the unit names an
    experiment builds from them) must not: the first auto choice is recorded and read back."""
    from mergejax import run as run_lib
    from mergejax.config import train_config

    free = iter([2, 3])  # what auto would pick now: 2 models per program, then 3 after a restart
    monkeypatch.setattr(run_lib.multi, "models_per_program", lambda requested, n, **kw: requested or next(free))
    config, path = train_config(), str(tmp_path / "groups.json")
    first = run_lib.seed_groups(config, [0, 1, 2, 3], pin=(path, "cell/seed0"))
    assert first == [[0, 1], [2, 3]]
    assert run_lib.seed_groups(config, [0, 1, 2, 3], pin=(path, "cell/seed0")) == first  # auto would now say 3
    assert run_lib.seed_groups(config, [5, 6, 7], pin=(path, "other")) == [[5, 6, 7]]  # a new key: decided now
    assert json.loads((tmp_path / "groups.json").read_text()) == {"cell/seed0": [[0, 1], [2, 3]], "other": [[5, 6, 7]]}
    assert run_lib.seed_groups(config, [0, 1, 2, 3], 4, pin=(path, "cell/seed0")) == [[0, 1, 2, 3]]  # asked N: as asked
    with pytest.raises(ValueError, match=r"pins the model groups \[\[0, 1\], \[2, 3\]\] for 'cell/seed0', not seeds \[0, 1, 2\]"):
        run_lib.seed_groups(config, [0, 1, 2], pin=(path, "cell/seed0"))


def test_step_memory_bytes_covers_the_state_and_the_batch():
    model = make_model("mlp", 10, hidden=(64,))
    state = _state(model, 0, 10)
    state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.arrays()))
    batch_bytes = 128 * (8 * 8 * 1 * 4 + 4 + 4)
    got = step_memory_bytes(state, (8, 8, 1), 128)
    if got is not None:  # every backend we run on reports it; None is allowed by the API
        assert got >= state_bytes + batch_bytes


def test_vmapped_step_memory_grows_about_linearly_in_n():
    """XLA's bytes for the vmapped step of N models: at least N states and N batches, and within 1.5x of N
    times one model's step (observed on CPU, MLP 64: 1.003x for N = 2 and 4)."""
    model = make_model("mlp", 10, hidden=(64,))
    one = step_memory_bytes(_state(model, 0, 10), (8, 8, 1), 128)
    if one is None:  # None is allowed by the API
        return
    batch = {"image": np.zeros((128, 8, 8, 1), np.float32), "label": np.zeros(128, np.int32), "mask": np.ones(128, np.float32)}
    for n in (2, 4):
        stacked = stack_states([_state(model, i, 10) for i in range(n)])
        got = vmapped_step_memory_bytes(stacked, {k: np.stack([v] * n) for k, v in batch.items()}, jax.random.split(jax.random.key(0), n))
        state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(stacked.arrays()))
        assert got >= state_bytes + n * 128 * (8 * 8 * 4 + 8)
        assert 0.6 * n * one <= got <= 1.5 * n * one, (n, got, one)
