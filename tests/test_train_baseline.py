"""experiments/train_baseline.py: seeds vmapped in one program equal the seeds trained one by one."""

from __future__ import annotations

import json

import numpy as np

from conftest import REPO, load_experiment
from mergejax.config import override
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
