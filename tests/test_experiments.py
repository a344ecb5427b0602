"""End to end: ``experiments/reproduce.py --preset smoke`` runs every experiment in a fresh
process and writes the report, results, tables and plots each one promises; the numbers
in them obey the identities the methods guarantee (not the papers' accuracies: the smoke
presets train for seconds)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO

EXPERIMENTS = ["train_baseline", "averaging", "snapshot_ensemble", "freezeout", "merge_networks"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    import subprocess

    out = tmp_path_factory.mktemp("smoke")
    cache = out / "xla"
    proc = subprocess.run(
        [sys.executable, "experiments/reproduce.py", "--preset", "smoke", "--results", str(out / "results"), "--quiet"],
        cwd=REPO, env={**os.environ, "MERGEJAX_COMPILATION_CACHE": str(cache)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"reproduce.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out / "results", cache, proc.stdout


def _results(root, name):
    with open(root / name / "results.json") as f:
        return json.load(f)


def test_report_lists_every_experiment_in_order_with_existing_plots(smoke_run):
    root, cache, stdout = smoke_run
    report = (root / "REPORT.md").read_text()
    assert report.startswith("# mergejax report (preset `smoke`)")
    assert "5 experiment(s) in" in report and "(cold)" in report
    positions = [report.index(f"## {name}\n") for name in EXPERIMENTS]
    assert positions == sorted(positions)  # ORDER respected
    links = [line[line.index("](") + 2:-1] for line in report.splitlines() if line.startswith("![")]
    assert len(links) >= 5
    for link in links:
        assert (root / link).is_file() and (root / link).stat().st_size > 1000, link
    for name in EXPERIMENTS:
        assert (root / name / "results.json").is_file() and (root / name / "table.md").is_file()
        assert f"[{name}/results.json]" in report
    # the persistent compilation cache was used and filled
    assert cache.is_dir() and len(os.listdir(cache)) > 5


def test_baseline_results(smoke_run):
    r = _results(smoke_run[0], "train_baseline")
    run = r["runs"][0]
    assert run["steps"] == 20 and 0.0 <= run["test_accuracy"] <= 1.0
    assert r["test_accuracy"]["mean"] == pytest.approx(run["test_accuracy"])
    assert [h["step"] for h in run["history"] if h["split"] == "train"] == [10, 20]
    # a CNN on digits is no cell of He et al.'s Table 6: every published cell listed as not run
    assert r["paper_comparison"]["rows"] == [] and len(r["paper_comparison"]["not_run"]) == 7


def test_averaging_k1_local_sgd_is_gradient_averaging(smoke_run):
    r = _results(smoke_run[0], "averaging")
    for opt in ("sgd", "momentum"):
        k1 = [d for d in r["divergence"] if d["optimizer"] == opt and d["K"] == 1]
        k4 = [d for d in r["divergence"] if d["optimizer"] == opt and d["K"] == 4]
        assert k1 and k4
        # One local step per round: averaging weights = averaging gradients (float32 rounding only).
        assert all(d["rel_dist"] < 1e-4 for d in k1), k1
        assert all(d["local_acc"] == d["sync_acc"] for d in k1)
        assert all(b["param_dist"] > 10 * a["param_dist"] for a, b in zip(k1, k4))
    assert r["two_process"] == {"ok": None, "skipped": True}
    for pair in r["interpolation"]:
        # t = 0 is network A on both paths; t = 1 is B or its permutation: the same function
        assert pair["aligned_acc"][0] == pair["naive_acc"][0]
        assert pair["aligned_acc"][-1] == pytest.approx(pair["naive_acc"][-1], abs=1 / 360 + 1e-9)
        assert pair["aligned_loss"][-1] == pytest.approx(pair["naive_loss"][-1], rel=1e-4)


def test_snapshot_rows_and_member_counts(smoke_run):
    r = _results(smoke_run[0], "snapshot_ensemble")
    M = r["config"]["num_snapshots"]
    assert r["snapshot_boundaries"] == [r["budget_steps"] // M, r["budget_steps"]]
    s = r["summary"]
    for key in ("single", "nocycle", "single_cycle", "snapshot_0.1", "snapshot_0.2", "swa", "swa_final_sgd", "fge", "true_ensemble"):
        assert key in s, key
        assert 0.0 <= s[key]["error_pct"]["mean"] <= 100.0
    assert s["single"]["members"] == 1 and s["swa"]["members"] == 1
    assert s["snapshot_0.1"]["members"] == M and s["true_ensemble"]["members"] == M
    # error vs m: m = 1 is the last member alone, m = M the full ensemble reported in the row
    assert s["snapshot_0.2"]["error_vs_m_pct"][-1]["mean"] == pytest.approx(s["snapshot_0.2"]["error_pct"]["mean"])


def test_freezeout_predicted_saving_and_stages(smoke_run):
    r = _results(smoke_run[0], "freezeout")
    base = [x for x in r["runs"] if x["label"] == "baseline"]
    frozen = [x for x in r["runs"] if x["label"] != "baseline"]
    assert len(base) == 2 and len(frozen) == 1  # baseline first and last
    assert all(x["predicted_saving"] == 0.0 and x["stages"] == 1 for x in base)
    f = frozen[0]
    assert 0.0 < f["predicted_saving"] < 1.0
    # timed between the two baselines: compared with their mean (linear drift correction)
    assert [x["order"] for x in r["runs"]] == [0, 1, 2] and f["order"] == 1
    assert f["baseline_ref_s"] == pytest.approx((base[0]["train_s"] + base[1]["train_s"]) / 2)
    assert f["measured_saving"] == pytest.approx(1 - f["train_s"] / f["baseline_ref_s"])
    assert all(x["measured_saving"] == 0.0 for x in base)
    # stage k runs with the first k layers frozen: 0 first, strictly increasing, head never frozen
    prefixes = f["stage_prefixes"]
    assert prefixes[0] == 0 and all(a < b for a, b in zip(prefixes, prefixes[1:])) and f["stages"] == len(prefixes)
    assert prefixes[-1] <= len(r["config"]["train"]["model_kwargs"]["hidden"])
    assert f["freeze_steps"] == sorted(f["freeze_steps"]) and f["freeze_steps"][-1] <= r["total_steps"]


def test_merge_stages_present(smoke_run):
    r = _results(smoke_run[0], "merge_networks")
    run = r["runs"][0]
    for key in ("teacher", "long_teacher", "long_teacher_flops", "ensemble", "naive_average", "aligned_average",
                "big_after_gates", "after_compression", "merged", "double_width_pruned"):
        assert 0.0 <= run[key] <= 1.0, key
    assert run["teacher"] == pytest.approx((run["teacher_a"] + run["teacher_b"]) / 2)
    g = run["gate_binariness"]
    assert g["frac_zero"] + g["frac_one"] + g["frac_between"] == pytest.approx(1.0)


def test_reproduce_rejects_unknown_experiment(run_python):
    proc = run_python("import sys, runpy; sys.argv = ['reproduce.py', '--only', 'nope']; runpy.run_path('experiments/reproduce.py', run_name='__main__')",
                      env={"MERGEJAX_COMPILATION_CACHE": "off"}, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown experiment(s) ['nope']; available: train_baseline, averaging" in lines[0]


# measured speed (FreezeOut's savings are ratios of wall times) and resume bookkeeping
TIMING_KEYS = ("resumed", "wall_s", "train_s", "cpu_s", "compile_s", "baseline_ref_s", "measured_saving", "cpu_saving",
               "measured_saving_with_compile", "timed_from_step", "timed_runs", "units_timed_after_resume")


def _without_times(obj):
    """results.json minus what legitimately differs between runs: wall times, resume flags."""
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if "time" not in k and k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def _assert_close(a, b, path="results"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (path, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


def _reproduce(results, cache, *extra, timeout=600):
    import subprocess

    return subprocess.run([sys.executable, "experiments/reproduce.py", "--preset", "smoke", "--results", str(results), "--quiet", *extra],
                          cwd=REPO, env={**os.environ, "MERGEJAX_COMPILATION_CACHE": str(cache)}, capture_output=True, text=True,
                          timeout=timeout)


def test_rerun_returns_the_finished_results_from_disk(smoke_run):
    root, cache, _ = smoke_run
    before = {name: _results(root, name) for name in EXPERIMENTS}
    proc = _reproduce(root, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in EXPERIMENTS:
        _assert_close(_without_times(before[name]), _without_times(_results(root, name)), name)
    # another config into the same directory: one line, nothing touched
    proc = _reproduce(root, cache, "--only", "train_baseline", "--preset", "tiny")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "holds a different run" in lines[0], proc.stderr[-2000:]
    assert _results(root, "train_baseline") == before["train_baseline"]


def _finished_units(root):
    return sum(f == "result.json" for _, _, files in os.walk(root) for f in files)


def _kill_resume_matches(smoke_run, tmp_path, plan):
    """Run reproduce.py into a fresh directory and, for each ``(units, extra_s)`` of ``plan``,
    SIGKILL it ``extra_s`` seconds after ``units`` more units have finished than at its start
    (kills land inside training, checkpoint writes, evaluation...); then finish it and compare
    every results.json with the uninterrupted run's."""
    import signal
    import subprocess
    import time

    root, cache, _ = smoke_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "experiments/reproduce.py", "--preset", "smoke", "--results", str(out), "--quiet"]
    env = {**os.environ, "MERGEJAX_COMPILATION_CACHE": str(cache)}
    hits = 0
    for units, extra in plan:
        seen = _finished_units(out)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and _finished_units(out) < seen + units and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(extra)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    proc = _reproduce(out, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in EXPERIMENTS:
        _assert_close(_without_times(_results(root, name)), _without_times(_results(out, name)), name)
    return hits


def test_sigkill_during_reproduce_then_rerun_gives_the_same_results(smoke_run, tmp_path):
    assert _kill_resume_matches(smoke_run, tmp_path, [(6, 0.3)]) == 1


@pytest.mark.slow
def test_sigkills_at_several_moments_of_reproduce(smoke_run, tmp_path):
    import random

    rng = random.Random(0)
    plan = [(rng.randint(1, 6), rng.uniform(0.0, 1.5)) for _ in range(8)]
    hits = _kill_resume_matches(smoke_run, tmp_path, plan)
    print(f"reproduce.py kills that hit a live process: {hits}/{len(plan)}")
    assert hits >= 6


def test_experiments_are_a_config_file_and_a_short_script(tmp_path):
    """Each experiment script loads its config file by path (no sys.path edit, nothing from tests/)
    and stays short: the method lives in the library."""
    import ast

    from mergejax.core.errors import UserError
    from mergejax.experiment import config_file

    scripts = sorted(p for p in (REPO / "experiments").glob("*.py") if p.name != "reproduce.py")
    assert {p.stem for p in scripts} == {p.stem for p in (REPO / "experiments" / "configs").glob("*.py")}
    for path in scripts:
        text = path.read_text()
        names = {n.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Name)}
        assert "CONFIG" in names and "config_file(__file__)" in text, path.name
        assert "sys.path" not in text and "tests" not in {m.split(".")[0] for m in _imports(text)}, path.name
        assert len(text.splitlines()) <= 155, (path.name, len(text.splitlines()))
        cfg = config_file(str(path))
        assert cfg is config_file(str(path)) and cfg.__file__ == str(REPO / "experiments" / "configs" / path.name)
        assert callable(cfg.get_config) and callable(cfg.plan) and cfg.PRESETS
    (tmp_path / "lonely.py").write_text("")
    with pytest.raises(UserError, match="has no config file .*configs/lonely.py"):
        config_file(str(tmp_path / "lonely.py"))


def _imports(text: str) -> list[str]:
    import ast

    out = []
    for n in ast.walk(ast.parse(text)):
        if isinstance(n, ast.Import):
            out += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.append(n.module)
    return out
