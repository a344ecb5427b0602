"""``--dry-run``: XLA FLOPs of one training step against a hand count, GPU-hours arithmetic,
and every experiment's dry run at the smoke and paper presets (nothing trained, nothing written)."""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import pytest

from mergejax import cost
from mergejax.config import train_config
from mergejax.experiment import dry_run, experiment_main

REPO = Path(__file__).resolve().parents[1]
TOTAL = re.compile(r"^(.+?) total: (\d+) run\(s\), ([\d,]+) steps, (\S+) FLOPs, (\S+) GPU-hours at ([\d.]+) TFLOP/s", re.M)


def mlp_dot_flops(batch: int, sizes: list[int]) -> int:
    """FLOPs of the matrix products of one MLP training step, 2 per multiply-add (XLA's count for
    a dot): forward x W_i and backward dW_i = x^T g (one each per layer), dx = g W_i^T for every
    layer but the first (the images get no gradient)."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    forward = sum(2 * batch * a * b for a, b in pairs)
    return 2 * forward + sum(2 * batch * a * b for a, b in pairs[1:])


@pytest.mark.parametrize("hidden,batch", [((32,), 16), ((48, 24), 64)])
@pytest.mark.parametrize("compiled", [False, True])
def test_step_flops_of_an_mlp_matches_a_hand_count(hidden, batch, compiled):
    dots = mlp_dot_flops(batch, [8 * 8 * 1, *hidden, 10])
    flops = cost.step_flops("mlp", {"hidden": hidden}, (8, 8, 1), 10, batch, compiled=compiled)
    # XLA adds elementwise work (bias, ReLU, softmax, SGD momentum, norms) on top of the dots,
    # a small share for these shapes; missing a matmul would fall below the lower bound.
    assert dots <= flops <= 1.5 * dots, (flops, dots, flops / dots)


def test_width_factor_is_a_wider_network_and_the_cache_counts_once(monkeypatch):
    row = cost.check_row({"name": "r", "model": "mlp", "model_kwargs": {"hidden": (32,)}, "dataset": "digits", "steps": 3,
                          "batch_size": 16, "width_factor": 2.0}, "test")
    wide = mlp_dot_flops(16, [64, 64, 10])
    assert wide <= cost.row_flops(row) <= 1.5 * wide

    calls = []
    real = cost.step_flops
    monkeypatch.setattr(cost, "step_flops", lambda *a, **k: calls.append(a) or real(*a, **k))
    mod = types.SimpleNamespace(NAME="demo", plan=lambda config: [
        {"name": f"seed{s}", "model": "mlp", "model_kwargs": {"hidden": (8,)}, "dataset": "digits", "steps": 10 * (s + 1),
         "batch_size": 4} for s in range(3)] + [
        {"name": "big", "model": "mlp", "model_kwargs": {"hidden": (8,)}, "dataset": "digits", "steps": 5, "batch_size": 8}])
    lines = []
    out = dry_run(mod, None, peak_tflops=1.0, utilisation=0.5, echo=lines.append)
    assert len(calls) == 2  # (hidden 8, batch 4) once for three seeds, (hidden 8, batch 8) once
    per_step = {r["batch_size"]: r["flops_per_step"] for r in out["rows"]}
    assert out["steps"] == 65 and out["flops"] == pytest.approx(60 * per_step[4] + 5 * per_step[8])
    assert out["gpu_hours"] == pytest.approx(out["flops"] / 0.5e12 / 3600)
    assert "demo/big" in lines[0] and "demo total: 4 run(s), 65 steps" in lines[1]


def test_gpu_hours_arithmetic():
    assert cost.gpu_hours(3.6e15, 1e12, 0.5) == pytest.approx(2.0)  # 3.6e15 / (0.5e12 FLOP/s) = 7200 s
    assert cost.gpu_hours(0.0, 67e12, 0.3) == 0.0
    with pytest.raises(ValueError, match="utilisation must be in"):
        cost.gpu_hours(1.0, 1e12, 0.0)
    with pytest.raises(ValueError, match="peak FLOP/s must be positive"):
        cost.gpu_hours(1.0, -1.0, 0.3)


def test_bf16_hours_use_the_same_devices_tensor_core_peak():
    assert cost.bf16_peak(67.0) == 989.4 and cost.bf16_peak(494.7) == 989.4  # H100 SXM fp32 / tf32 -> bf16
    assert cost.bf16_peak(19.5) == 312.0 and cost.bf16_peak(12.3) is None  # A100; a peak not in the table
    mod = types.SimpleNamespace(NAME="demo", plan=lambda config: [
        {"name": "r", "model": "mlp", "model_kwargs": {"hidden": (8,)}, "dataset": "digits", "steps": 7, "batch_size": 4}])
    lines = []
    out = dry_run(mod, None, peak_tflops=67.0, utilisation=0.3, echo=lines.append)
    assert out["gpu_hours_bf16"] == pytest.approx(out["gpu_hours"] * 67.0 / 989.4)
    assert lines[2].startswith(f"demo with precision=bf16: {out['gpu_hours_bf16']:.4g} GPU-hours at 989.4 TFLOP/s (H100 SXM bf16)")
    assert "gpu_hours_bf16" not in dry_run(mod, None, peak_tflops=12.3, utilisation=0.3, echo=lines.append)


def test_cost_analysis_dict_or_list():
    assert cost._flops_of({"flops": 7.0, "bytes accessed": 1.0}) == 7.0  # noqa: SLF001
    assert cost._flops_of([{"flops": 7.0}, {"flops": 2.0}, {}]) == 9.0  # older jax: one dict per computation  # noqa: SLF001


def test_steps_from_epochs_without_loading_data():
    # CIFAR-10: 50,000 // 128 = 390 full batches per epoch ('drop'), 391 with 'pad'.
    assert cost.train_steps(train_config(dataset="cifar10", batch_size=128, epochs=2.0, steps=0)) == 780
    assert cost.train_steps(train_config(dataset="cifar10", batch_size=128, epochs=1.0, steps=0, remainder="pad")) == 391
    assert cost.train_steps(train_config(dataset="cifar10", steps=64_000)) == 64_000
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        cost.dataset_shape("imagenet")
    with pytest.raises(ValueError, match="plan row 'r' has steps=1.5, expected int"):
        cost.check_row({"name": "r", "model": "mlp", "model_kwargs": {}, "dataset": "digits", "steps": 1.5, "batch_size": 4}, "x")


def _experiments() -> list:
    spec = importlib.util.spec_from_file_location("mergejax_experiments_reproduce", REPO / "experiments" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.discover()


EXPERIMENTS = {m.NAME: m for m in _experiments()}


# paper: XLA traces ResNet-110/DenseNet-100 steps for FLOPs (no compile); DenseNet-100 takes ~1 min a shape on a
# loaded 2-core CPU and the snapshot paper plan has 4 such shapes, so the paper dry runs are in the slow set.
@pytest.mark.parametrize("name, preset", [
    pytest.param(n, p, marks=() if p == "smoke" else pytest.mark.slow)  # every preset of every experiment (FreezeOut's
    for n in sorted(EXPERIMENTS) for p in EXPERIMENTS[n].PRESETS])     # paper_resnet, paper_vgg too); smoke by default
def test_dry_run_of_every_experiment(name, preset, tmp_path, capsys):
    mod = EXPERIMENTS[name]
    if not callable(getattr(mod, "plan", None)):
        pytest.skip(f"experiments/{name}.py has no plan(config) yet (issue 13: every experiment must define one)")
    out = tmp_path / "out"
    rc = mod.main(["--preset", preset, "--dry-run", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing trained, nothing written
    (exp, runs, steps, flops, hours, peak), = TOTAL.findall(text)
    plan = mod.plan(mod.get_config(preset))
    assert (exp, int(runs), int(steps.replace(",", ""))) == (name, len(plan), sum(r["steps"] for r in plan))
    assert float(flops) > 0 and float(peak) == cost.PEAK_TFLOPS[cost.DEFAULT_DEVICE]
    assert float(hours) == pytest.approx(cost.gpu_hours(float(flops), float(peak) * 1e12, cost.DEFAULT_UTILISATION), rel=1.5e-3)


def test_reproduce_dry_run_sums_the_experiments(tmp_path, capsys):
    with_plan = [n for n, m in EXPERIMENTS.items() if callable(getattr(m, "plan", None))]
    spec = importlib.util.spec_from_file_location("mergejax_experiments_reproduce2", REPO / "experiments" / "reproduce.py")
    repro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repro)
    only = [a for n in with_plan for a in ("--only", n)]
    rc = repro.main(["--preset", "smoke", "--dry-run", "--results", str(tmp_path / "results"),
                     "--device-peak-tflops", "989.4", "--utilisation", "0.5", *only])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert list(tmp_path.iterdir()) == []
    totals = TOTAL.findall(text)
    per_exp, (last,) = totals[:-1], totals[-1:]
    assert [t[0] for t in per_exp] == [n for n in EXPERIMENTS if n in with_plan] and last[0] == "all experiments"
    assert int(last[2].replace(",", "")) == sum(int(t[2].replace(",", "")) for t in per_exp)
    assert float(last[3]) == pytest.approx(sum(float(t[3]) for t in per_exp), rel=1e-3)
    assert "(H100 SXM bf16) x 0.5 utilisation" in text
    assert float(last[4]) == pytest.approx(cost.gpu_hours(float(last[3]), 989.4e12, 0.5), rel=1.5e-3)


def test_dry_run_without_plan_and_bad_utilisation_are_one_line(tmp_path, capsys):
    mod = types.SimpleNamespace(NAME="demo", PRESETS=("tiny",), get_config=lambda preset: train_config(), __doc__="demo")
    assert experiment_main(["--dry-run", "--out", str(tmp_path / "o")], mod) == 2
    assert "experiment demo has no plan(config), so --dry-run cannot estimate it" in capsys.readouterr().err
    mod.plan = lambda config: [cost.plan_row("run", config)]
    assert experiment_main(["--dry-run", "--utilisation", "1.5", "--out", str(tmp_path / "o")], mod) == 2
    assert "utilisation must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_each_run_at_its_precisions_peak_or_its_measured_rate(tmp_path, monkeypatch):
    """A bf16 run is estimated at the device's bf16 peak, a run that benchmarks/speed.py timed (same
    network, precision, batch) at its measured FLOP/s, the others at utilisation x the fp32 peak."""
    import json

    monkeypatch.setattr(cost, "step_flops", lambda name, kw, shape, classes, batch: 1e12 * batch * (2 if "dtype" in kw else 1))
    table = tmp_path / "speed.json"
    table.write_text(json.dumps({"device_kind": "NVIDIA H200", "results": [
        {"impl": "mergejax", "model": "resnet20", "precision": "fp32", "n": 1, "batch": 128, "flops": 3e10, "step_s": 0.01},
        {"impl": "mergejax", "model": "resnet20", "precision": "fp32", "n": 4, "batch": 128, "flops": 12e10, "step_s": 0.02},
        {"impl": "PyTorch", "model": "resnet20", "precision": "fp32", "n": 1, "batch": 64, "flops": 3e10, "step_s": 0.001}]}))
    plan = [cost.plan_row("timed", train_config(model="resnet20", dataset="cifar10", batch_size=128, steps=100)),
            cost.plan_row("batch64", train_config(model="resnet20", dataset="cifar10", batch_size=64, steps=100)),
            cost.plan_row("wide", train_config(model="resnet20", dataset="cifar10", batch_size=128, steps=100), width_factor=2.0),
            cost.plan_row("option_a", train_config(model="resnet20", model_kwargs={"shortcut": "A"}, dataset="cifar10",
                                                   batch_size=128, steps=100)),
            cost.plan_row("bf16", train_config(model="resnet20", dataset="cifar10", batch_size=128, steps=100, precision="bf16"))]
    mod = types.SimpleNamespace(NAME="demo", plan=lambda config: plan)
    lines = []
    out = dry_run(mod, None, peak_tflops=67.0, utilisation=0.25, echo=lines.append, speed_table=str(table))
    hours = {r["name"]: (r["hours"], r["rate_source"]) for r in out["rows"]}
    f128, f64 = 128e12, 64e12  # FLOPs per step of the fake count above
    assert hours["timed"] == pytest.approx((100 * f128 / 3e12 / 3600, "measured"))  # 3e10 FLOPs / 0.01 s
    assert hours["batch64"] == pytest.approx((100 * f64 / (67e12 * 0.25) / 3600, "peak"))  # PyTorch rows are not ours
    assert hours["wide"] == pytest.approx((100 * f128 / (67e12 * 0.25) / 3600, "peak"))  # another network
    assert hours["option_a"] == pytest.approx((100 * f128 / 3e12 / 3600, "measured (shortcut B)"))  # timed with projections
    assert hours["bf16"] == pytest.approx((100 * 2 * f128 / (989.4e12 * 0.25) / 3600, "bf16 peak"))
    assert out["gpu_hours"] == pytest.approx(sum(h for h, _ in hours.values()))
    assert "resnet20 bf16" in lines[0] and "1 precision=bf16 run(s) at 989.4 TFLOP/s (H100 SXM bf16)" in lines[1]
    assert "2 run(s) at the rate measured on NVIDIA H200" in lines[1]
    table.write_text("{}")
    with pytest.raises(ValueError, match=r"cannot read a measured speed table from .*speed.json: KeyError"):
        dry_run(mod, None, peak_tflops=67.0, utilisation=0.25, echo=lines.append, speed_table=str(table))
    with pytest.raises(ValueError, match="has precision='fp16', expected one of fp32, bf16"):
        cost.check_row({**plan[0], "precision": "fp16"}, "demo.plan")
