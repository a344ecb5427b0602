"""Experiments with ``models_per_program`` > 1 (seeds, teachers, ensemble members vmapped in one program)
equal the same experiments trained one model at a time."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import REPO, load_experiment
from mergejax.config import override
from mergejax.core import checkpoint
from mergejax.ensembles.snapshot import final_snapshot
from mergejax.experiment import config_file, run_experiment


def test_vmapped_seeds_equal_solo_seeds_and_resume(tmp_path):
    mod = load_experiment("train_baseline")
    assert mod.get_config is config_file(str(REPO / "experiments" / "train_baseline.py")).get_config  # one config file
    base = override(mod.get_config("smoke"), ["seeds=(0,1)"])
    out = {}
    for n in (1, 2):
        d = tmp_path / f"n{n}"
        run_experiment(mod, override(base, [f"models_per_program={n}"]), str(d), progress=False)
        out[n] = json.loads((d / "results.json").read_text())
        units = sorted(p.name for p in (d / "units").iterdir())
        assert units == (["seed0", "seed1"] if n == 1 else ["seeds0_1"]), units
    solo, many = out[1]["runs"], out[2]["runs"]
    assert [r["seed"] for r in solo] == [r["seed"] for r in many] == [0, 1]
    for a, b in zip(solo, many):
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / 360 + 1e-9  # at most one of 360 test images
        np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-3)
        la = [h["loss"] for h in a["history"] if h["split"] == "train"]
        lb = [h["loss"] for h in b["history"] if h["split"] == "train"]
        assert len(la) == len(lb) > 0
        np.testing.assert_allclose(la, lb, rtol=1e-3)
    assert solo[0]["test_loss"] != solo[1]["test_loss"]  # the seeds differ: the comparison is not vacuous
    # a re-run reads the finished unit: the same results, no retraining
    again = run_experiment(mod, override(base, ["models_per_program=2"]), str(tmp_path / "n2"), progress=False)
    assert again["results"]["runs"] == many


@pytest.mark.slow  # CI time (test_multi and the snapshot members cover fit_many); `python -m pytest -q -m slow` runs it
def test_merge_teachers_in_one_program_equal_solo_teachers(tmp_path):
    """experiments/merge_networks.py with models_per_program=2 trains both teachers as one vmapped
    program (unit ``teachers``); each equals its solo run and the later stages read them."""
    mod = load_experiment("merge_networks")
    base = override(mod.get_config("smoke"), ["baselines=('naive_average',)"])
    out = {}
    for n in (1, 2):
        d = tmp_path / f"n{n}"
        run_experiment(mod, override(base, [f"models_per_program={n}"]), str(d), progress=False)
        out[n] = json.loads((d / "results.json").read_text())["runs"][0]
        units = sorted(p.name for p in (d / "units" / "seed0").iterdir())
        assert ("teachers" in units) == (n == 2) and ("teacher_a" in units) == (n == 1), units
    for key in ("teacher_a", "teacher_b", "naive_average", "ensemble"):
        assert abs(out[1][key] - out[2][key]) <= 1 / 360 + 1e-9, (key, out[1][key], out[2][key])  # one test image at most
    seeds = out[1]["seeds"]
    assert seeds == out[2]["seeds"] and seeds["teacher_a"] != seeds["teacher_b"]  # two different teachers, same seeds both ways


@pytest.mark.slow  # CI time (test_multi checks fit_many member by member; the vmapped seeds test below stays); `python -m pytest -q -m slow` runs it
def test_snapshot_members_in_one_program_equal_solo_members(tmp_path):
    """experiments/snapshot_ensemble.py with models_per_program=4: the true ensemble's members 1..3
    and the 4 single-cycle runs each train as one vmapped program; every member's final model
    equals its solo run (float rounding, amplified over 11 steps at lr 0.1, stays below 5e-3 of
    each leaf's scale) and the ensembles' errors agree to one test image."""
    mod = load_experiment("snapshot_ensemble")
    base = override(mod.get_config("smoke"), ["num_snapshots=4", "extras=('true_ensemble',)", "columns=('single','single_cycle')"])
    out = {}
    for n in (1, 4):
        d = tmp_path / f"n{n}"
        run_experiment(mod, override(base, [f"models_per_program={n}"]), str(d), progress=False)
        out[n] = json.loads((d / "results.json").read_text())["summary"]
        units = sorted(p.name for p in (d / "units" / "seed0").iterdir())
        grouped = ["single-1..3", "single_cycle-0..3"]
        assert all((g in units) == (n == 4) for g in grouped) and ("single-2" in units) == (n == 1), units
    for key in ("single", "single_cycle", "true_ensemble"):
        a, b = out[1][key], out[4][key]
        assert a["members"] == b["members"] == (1 if key == "single" else 4)
        for x, y in zip(a["error_vs_m_pct"], b["error_vs_m_pct"]):
            assert abs(x["mean"] - y["mean"]) <= 100 / 360 + 1e-6, (key, a["error_vs_m_pct"], b["error_vs_m_pct"])
        np.testing.assert_allclose(a["nll"]["mean"], b["nll"]["mean"], rtol=1e-3)
    for group, members in (("single-1..3", ("single-1", "single-2", "single-3")), ("single_cycle-0..3", ("single_cycle-0", "single_cycle-3"))):
        for m in members:
            solo = final_snapshot(str(tmp_path / "n1" / "units" / "seed0" / m))
            many = checkpoint.load(str(tmp_path / "n4" / "units" / "seed0" / group / m))
            for x, y in zip(jax.tree.leaves(solo), jax.tree.leaves(many)):
                x, y = np.asarray(x), np.asarray(y)
                np.testing.assert_allclose(y, x, atol=5e-3 * np.abs(x).max(), rtol=0)
    first = [np.asarray(v) for v in jax.tree.leaves(checkpoint.load(str(tmp_path / "n4/units/seed0/single-1..3/single-1")))]
    other = [np.asarray(v) for v in jax.tree.leaves(checkpoint.load(str(tmp_path / "n4/units/seed0/single-1..3/single-2")))]
    assert max(np.abs(a - b).max() for a, b in zip(first, other)) > 1e-2  # the members differ: not one model saved twice
    # a re-run reads the finished units: the same results
    again = run_experiment(mod, override(base, ["models_per_program=4"]), str(tmp_path / "n4"), progress=False)
    assert again["results"]["summary"] == out[4]


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_averaging_pair_in_one_program_equals_solo_pair(tmp_path):
    """experiments/averaging.py with models_per_program=2 trains (b)'s two networks as one vmapped
    program (unit ``interp/seed0/nets``); both interpolation paths equal the solo pair's."""
    mod = load_experiment("averaging")
    out = {}
    for n in (1, 2):
        d = tmp_path / f"n{n}"
        out[n] = run_experiment(mod, override(mod.get_config("smoke"), [f"models_per_program={n}"]), str(d),
                                progress=False)["results"]["interpolation"][0]
        assert sorted(p.name for p in (d / "units" / "interp" / "seed0").iterdir()) == (["nets", "path"] if n == 2 else
                                                                                         ["net0", "net1", "path"])
    for key in ("naive_loss", "aligned_loss"):
        np.testing.assert_allclose(out[2][key], out[1][key], rtol=1e-5)
    for key in ("naive_acc", "aligned_acc", "end_acc"):
        np.testing.assert_allclose(out[2][key], out[1][key], atol=1 / 360 + 1e-7, err_msg=key)  # one test image at most
    assert out[1]["naive_barrier"] > 2 * out[1]["aligned_barrier"] > 0  # two different networks, one alignment that matters
