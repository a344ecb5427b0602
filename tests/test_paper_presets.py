"""The FreezeOut and merging ``paper`` presets: they run end to end (mock CIFAR data, tiny
widths, a few steps), their ``plan()`` has the runs a hand count says, the authors' lambda
schedule gives the authors' numbers, the FreezeOut 45k/5k split is what the authors describe,
and the published numbers are the ones the authors' code and notebook print."""

from __future__ import annotations

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from conftest import load_experiment
from mergejax import papers
from mergejax.core import data
from mergejax.papers import freezeout as papers_freezeout
from mergejax.config import override
from mergejax.core.data import Split
from mergejax.merging import gates as G

FO = load_experiment("freezeout")
MN = load_experiment("merge_networks")


# ------------------------------------------------------------------ lambda schedule (authors' numbers)


def test_lambda_update_first_gives_the_authors_numbers():
    # fmfi-compbio/neural-network-merging: `for epoch: lam += c * sqrt(lam); train(epoch)`, (0.05, 0.05):
    # 0.0612 in epoch 1 and 7.2496 in epoch 100; mergejax's original order: 0.05 and 7.116.
    v = G.lambda_values(0.05, 0.05, 100, update_first=True)
    assert v.shape == (100,)
    assert v[0] == pytest.approx(0.05 + 0.05 * math.sqrt(0.05), rel=1e-6) and round(float(v[0]), 4) == 0.0612
    assert round(float(v[-1]), 4) == 7.2496
    old = G.lambda_values(0.05, 0.05, 100)
    assert old[0] == pytest.approx(0.05) and round(float(old[-1]), 3) == 7.116
    np.testing.assert_allclose(v[:-1], old[1:], rtol=1e-6)  # the same sequence, one epoch earlier
    # the VGG-11 CIFAR-10 notebook: 0.01 / 0.01, 100 epochs; its first printed lambda is 0.011, the last ~0.355
    vgg = G.lambda_values(0.01, 0.01, 100, update_first=True)
    assert vgg[0] == pytest.approx(0.011, rel=1e-6) and vgg[-1] == pytest.approx(0.355, abs=5e-4)


def test_merge_presets_use_the_authors_lambda():
    from mergejax.cli.merge import get_config, stage_args

    gate, _ = stage_args(get_config("paper"), 50_000)  # batch 128: 390 steps per epoch, 100 epochs
    lam = gate["lambda_fn"]
    assert float(lam(0)) == pytest.approx(0.0612, abs=5e-5) and float(lam(390 * 99)) == pytest.approx(7.2496, abs=5e-5)
    assert float(lam(390 * 99 - 1)) < 7.2  # epoch 99 still has the previous value
    gate, _ = stage_args(get_config("paper_vgg11"), 50_000)
    assert float(gate["lambda_fn"](0)) == pytest.approx(0.011, rel=1e-6)
    gate, _ = stage_args(get_config("tiny"), 1437)  # tiny keeps lambda0 in the first epoch (results unchanged)
    assert float(gate["lambda_fn"](0)) == pytest.approx(5.0)


# ------------------------------------------------------------------ the 45k / 5k split


def _split(n):
    return Split(images=np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), labels=np.arange(n, dtype=np.int32),
                 num_classes=100, name="cifar100")


def test_holdout_45k_5k_sizes_disjoint_deterministic():
    full = _split(50_000)
    train, val = data.holdout(full, 5000, seed=0)
    assert (len(train), len(val)) == (45_000, 5000)
    a, b = train.labels, val.labels
    assert not set(a.tolist()) & set(b.tolist())  # disjoint
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(50_000))  # together: everything once
    assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)  # original order kept
    np.testing.assert_array_equal(train.images[:, 0, 0, 0], a.astype(np.float32))  # images follow their labels
    assert train.num_classes == 100 and val.name == "cifar100"
    again = data.holdout(full, 5000, seed=0)[1].labels
    np.testing.assert_array_equal(again, b)  # deterministic
    other = data.holdout(full, 5000, seed=1)[1].labels
    assert not np.array_equal(other, b) and len(set(other.tolist()) & set(b.tolist())) < 1000  # ~500 expected by chance
    with pytest.raises(ValueError, match="cannot hold out"):
        data.holdout(full, 50_000)


# ------------------------------------------------------------------ plan() row counts


def test_freezeout_paper_plan_counts():
    c = FO.get_config("paper")
    assert tuple(c.networks) == ("densenet_bc76", "wrn40_4", "vgg16") and c.validation == 5000
    assert tuple(FO.get_config("paper_resnet").networks) == ("wrn40_4",)
    assert tuple(FO.get_config("paper_vgg").networks) == ("vgg16",)
    rows = FO.plan(c)
    # per network: 7 t0 x 3 spacings x 2 scalings = 42 points, and the baseline timed first, after points
    # 4, 8, ..., 40 and last (12): 54 trainings of 100 epochs x 45,000 / 50 = 90,000 steps
    assert len(rows) == 3 * (42 + 12)
    assert {r["steps"] for r in rows} == {90_000} and {r["batch_size"] for r in rows} == {50}
    assert [sum(r["model"] == m for r in rows) for m in ("densenet_bc76", "wrn", "vgg16")] == [54, 54, 54]
    assert len({r["name"] for r in rows}) == len(rows)
    one = FO.plan(override(c, ["networks=('vgg16',)", "t0s=(0.8,)", "spacings=('cubic',)", "scalings=(True,)"]))
    assert len(one) == 1 + 2  # point between two baselines


def test_merge_paper_plan_counts():
    c = MN.get_config("paper")
    assert tuple(c.rows) == ("resnet20_c100", "vgg11_c10")
    rows = MN.plan(c)
    # per row and seed: teachers a, b, long teacher, FLOP-matched long teacher, gates (double width),
    # fine-tuning, double width from scratch, its gates and its fine-tuning = 9; 3 seeds, 2 rows
    assert len(rows) == 2 * 3 * 9
    r0 = {r["name"]: r for r in rows if r["name"].startswith("resnet20_c100/seed0/")}
    per_epoch = 50_000 // 128
    assert r0["resnet20_c100/seed0/teacher_a"]["steps"] == 200 * per_epoch
    assert r0["resnet20_c100/seed0/long_teacher"]["steps"] == 600 * per_epoch
    assert r0["resnet20_c100/seed0/gates"]["steps"] == 100 * per_epoch and r0["resnet20_c100/seed0/gates"]["width_factor"] == 2
    assert {r["model"] for r in rows if r["name"].startswith("vgg11_c10/")} == {"vgg11_nobn"}
    assert {r["dataset"] for r in rows if r["name"].startswith("vgg11_c10/")} == {"cifar10"}
    assert len(MN.plan(override(c, ["rows=('vgg11_c10',)", "seeds=(0,)", "baselines=()"]))) == 5


def test_epoch_keys_take_floats_as_typed():
    c = override(FO.get_config("paper"), ["train.epochs=0.5"])
    assert c.train.epochs == 0.5
    c = override(MN.get_config("tiny"), ["teacher.epochs=1.0", "merge.gate_epochs=0.5", "merge.finetune_epochs=2"])
    assert (c.teacher.epochs, c.merge.gate_epochs, c.merge.finetune_epochs) == (1.0, 0.5, 2.0)
    c = override(MN.get_config("paper"), ["vgg11_c10.teacher.epochs=1.0", "resnet20_c100.merge.gate_epochs=0.5"])
    assert c.vgg11_c10.teacher.epochs == 1.0 and c.resnet20_c100.merge.gate_epochs == 0.5


# ------------------------------------------------------------------ published numbers


def _calc_speedup(t0, spacing):
    """The FLOP model of ajbrock/FreezeOut utils.py for DenseNet-BC k=12 with 12 layers per block,
    written out by hand: per-layer cost c_i, forward always, backward until t_i."""
    g, hw, c, n = 12, (32 ** 2, 16 ** 2, 8 ** 2), [3 * 2 * 12 * 32 ** 2 * 9], 2
    for s in range(3):
        for _ in range(12):
            c.append(n * 4 * g * g * hw[s] + 4 * 9 * g * g * hw[s])
            n += 1
        n = n // 2
    p = {"linear": 1, "cubic": 3}[spacing]
    with_fo = sum(c) + sum(ci * (t0 + (1 - t0) * i / len(c)) ** p for i, ci in enumerate(c))
    saving = 1 - with_fo / (2 * sum(c))
    return 100 * (1.3 * saving if spacing == "linear" else saving)


def test_published_cells():
    for paper in ("freezeout", "merging"):
        papers.check(papers.cells(paper))
    flops = papers.cells("freezeout", "flop_estimate")
    assert len(flops) == 5 + 7
    for cell in flops:
        spacing, t0 = cell.column.split(" t0=")
        assert cell.value == pytest.approx(_calc_speedup(float(t0), spacing), abs=0.05), cell
    vgg = {c.column: c.value for c in papers.cells("merging", "cifar10_vgg11")}
    assert vgg["C10/after fine-tuning"] == 91.13 and vgg["C10/big student, gate stage start"] == 80.0


def test_freezeout_paper_comparison_mapping():
    """Synthetic runs: predicted saving -> flop_estimate cells (DenseNet-BC-76 only); the abstract
    cells take the largest measured saving within the paper's accuracy loss."""
    def run(net, label, t0=None, spacing=None, scaled=True, pred=0.0, meas=0.0, acc=0.7):
        return {"network": net, "label": label, "t0": t0, "spacing": spacing, "scaled": scaled, "predicted_saving": pred,
                "measured_saving": meas, "test_accuracy": acc}
    runs = [run("densenet_bc76", "baseline", acc=0.70), run("densenet_bc76", "a", 0.8, "cubic", True, 0.17, 0.25, 0.68),
            run("densenet_bc76", "b", 0.8, "cubic", False, 0.17, 0.30, 0.60), run("densenet_bc76", "c", 0.5, "linear", True, 0.2, 0.1, 0.7),
            run("wrn40_4", "baseline", acc=0.5), run("wrn40_4", "d", 0.5, "cubic", True, 0.3, 0.2, 0.49)]
    cmp = papers_freezeout.compare(runs, "cifar100", {"densenet_bc76": {}})
    got = {(x["row"], x["column"]): x["ours"] for x in cmp["rows"]}
    assert got[("DenseNet-BC (L=76, k=12)", "cubic t0=0.8")] == pytest.approx(17.0)
    assert got[("DenseNet-BC (L=76, k=12)", "linear t0=0.5")] == pytest.approx(20.0)
    assert got[("DenseNet", "C100/best speedup")] == pytest.approx(25.0)  # b loses 10 points > 3
    assert got[("DenseNet", "C100/accuracy loss")] == pytest.approx(2.0)
    assert ("ResNet", "C100/best speedup") not in got  # d loses 1 point; the paper claims none
    assert not papers_freezeout.compare(runs, "cifar10", {})["rows"][2:]  # abstract cells are CIFAR-100 only
    assert all(x["deviations"] == [] for x in cmp["rows"])  # the authors' networks: nothing flagged
    narrow = papers_freezeout.compare(runs, "cifar100", {"densenet_bc76": {"width": 0.5}, "wrn40_4": {"depth": 40, "widen": 4}})
    flagged = {(x["row"], x["column"]): x["deviations"] for x in narrow["rows"]}
    assert flagged[("DenseNet-BC (L=76, k=12)", "cubic t0=0.8")] == ["model_kwargs={width=0.5} (paper {})"]
    assert flagged[("DenseNet", "C100/best speedup")] == ["model_kwargs={width=0.5} (paper {})"]


def test_merge_vgg11_comparison_says_where_protocol_and_setting_differ():
    """Old runs (before the notebook's measurements) fall back to ours with a caveat beside the two cells; runs that
    have them are compared the notebook's way; settings away from the notebook's are listed per cell."""
    from mergejax.cli.merge import get_config as merge_config
    from mergejax.merging import report as merge_report

    base = {"big_step0_gated": 0.90, "big_after_gates": 0.89, "after_compression": 0.88, "merged": 0.91, "merged_best": 0.92,
            "aligned_average": 0.80}
    old = {x["column"]: x for x in merge_report.paper_comparison({"vgg11_c10": {"runs": [base]}})["rows"]}
    assert old["C10/big student, gate stage start"]["ours"] == pytest.approx(90.0)
    assert "protocol differs" in old["C10/big student, gate stage start"]["note"] and "random" in old["C10/big student, gate stage start"]["note"]
    assert "protocol differs" in old["C10/after compression"]["note"] and "folds" in old["C10/after compression"]["note"]
    assert old["C10/after fine-tuning"]["note"] == "" and "another method" in old["C10/OT fusion"]["note"]
    assert all(x["deviations"] == [] for x in old.values())  # no config given: settings not compared
    runs = [{**base, "big_step0_sampled": 0.80, "after_compression_unfolded": 0.70},
            {**base, "big_step0_sampled": 0.82, "after_compression_unfolded": 0.72}]
    group = ml_collections.ConfigDict({"teacher": {"model": "vgg11_nobn", "model_kwargs": {"width": 0.25}},
                                       "merge": merge_config("paper_vgg11")})
    comp = merge_report.paper_comparison({"vgg11_c10": {"runs": runs}}, ml_collections.ConfigDict({"vgg11_c10": group}))
    new = {x["column"]: x for x in comp["rows"]}
    assert new["C10/big student, gate stage start"]["ours"] == pytest.approx(81.0)
    assert new["C10/after compression"]["ours"] == pytest.approx(71.0)
    assert new["C10/big student, gate stage start"]["note"] == new["C10/after compression"]["note"] == ""
    width = "model_kwargs={width=0.25} (paper {})"
    assert new["C10/big student, gate stage start"]["deviations"] == [width]  # measured at the authors' log_alpha = 1
    assert new["C10/big student, gate stage end"]["deviations"] == [width, "log_alpha_mean=3 (paper 1)"]
    assert new["C10/after fine-tuning"]["deviations"] == [width, "log_alpha_mean=3 (paper 1)"]
    assert "setup differs: model_kwargs={width=0.25} (paper {})" in papers.markdown(comp)


# ------------------------------------------------------------------ end to end on mock CIFAR


@pytest.fixture
def mock_cifar(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("MERGEJAX_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("MERGEJAX_COMPILATION_CACHE", "off")
    with tfds.testing.mock_data(num_examples=160):  # > 128: BN statistics are recomputed in batches of 128
        yield tmp_path


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_freezeout_paper_preset_end_to_end(mock_cifar):
    out = str(mock_cifar / "fo")
    argv = ["--preset", "paper", "--out", out, "--quiet", "--set", "train.model_kwargs.width=0.125", "--set", "train.steps=16",
            "--set", "train.batch_size=8", "--set", "train.eval_batch_size=16", "--set", "train.log_every=2",
            "--set", "train.checkpoint_every=4", "--set", "validation=16", "--set", "t0s=(0.5,)",
            # shallow DenseNet-BC / WRN (compiling the 76-layer DenseNet takes minutes on a CPU)
            "--set", "densenet_bc76.model_kwargs.depth=10", "--set", "wrn40_4.model_kwargs.depth=10",
            "--set", "spacings=('cubic',)", "--set", "scalings=(True,)", "--set", "max_stages=2",
            "--set", "baseline_every=0"]
    assert FO.main(argv) == 0
    r = _results(out)
    assert r["evaluated_on"].startswith("16 examples held out") and "trained on the other 144" in r["evaluated_on"]
    assert [x["network"] for x in r["runs"]] == [n for n in ("densenet_bc76", "wrn40_4", "vgg16") for _ in range(3)]
    for x in r["runs"]:
        assert x["total_steps"] == 16 and 0.0 <= x["test_accuracy"] <= 1.0
        assert (x["predicted_saving"] == 0.0) == (x["label"] == "baseline")
    assert {x["network"] for x in r["rows"]} == {"densenet_bc76", "wrn40_4", "vgg16"}
    assert r["config"]["densenet_bc76"]["model_kwargs"]["depth"] == 10
    cmp = r["paper_comparison"]
    # a depth-10 DenseNet-BC is not the paper's L=76: its FLOP saving is not set beside the paper's
    assert not [x for x in cmp["rows"] if x["table"] == "flop_estimate"]
    assert "flop_estimate/DenseNet-BC (L=76, k=12)/cubic t0=0.5" in cmp["not_run"]
    for x in cmp["rows"]:  # abstract: our best saving within the paper's accuracy loss, and that loss
        assert x["table"] == "abstract" and x["row"] in ("DenseNet", "ResNet")
    table = (mock_cifar / "fo" / "table.md").read_text()
    assert "### densenet_bc76" in table and "### vgg16" in table and "**Published numbers**" in table


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_merge_paper_preset_both_rows_end_to_end(mock_cifar):
    out = str(mock_cifar / "merge")
    sets = ["seeds=(0,)", "baselines=('aligned_average',)"]
    for row in ("resnet20_c100", "vgg11_c10"):
        sets += [f"{row}.teacher.model_kwargs.width=0.25", f"{row}.teacher.batch_size=16", f"{row}.teacher.epochs=0.5",
                 f"{row}.teacher.eval_batch_size=16", f"{row}.teacher.log_every=1", f"{row}.merge.batch_size=16",
                 f"{row}.merge.gate_epochs=0.5", f"{row}.merge.finetune_epochs=0.5", f"{row}.merge.eval_batch_size=16",
                 f"{row}.merge.log_every=1"]
    argv = ["--preset", "paper", "--out", out, "--quiet"] + [a for s in sets for a in ("--set", s)]
    assert MN.main(argv) == 0
    r = _results(out)
    assert set(r["by_row"]) == {"resnet20_c100", "vgg11_c10"}
    for row, part in r["by_row"].items():
        run = part["runs"][0]
        for key in ("teacher", "ensemble", "aligned_average", "big_after_gates", "after_compression", "merged"):
            assert 0.0 <= run[key] <= 1.0, (row, key)
    cmp = r["paper_comparison"]
    assert len(cmp["rows"]) == 7 and not cmp["not_run"]  # every VGG-11 notebook cell has our value beside it
    by = {x["column"]: x for x in cmp["rows"]}
    vgg = r["by_row"]["vgg11_c10"]["runs"][0]
    assert by["C10/after fine-tuning"]["ours"] == pytest.approx(100 * vgg["merged"])
    assert by["C10/OT fusion"]["ours"] == pytest.approx(100 * vgg["aligned_average"])
    assert 0.0 <= by["C10/after fine-tuning (best epoch)"]["ours"] <= 100.0
    # measured the notebook's way (random gates at log_alpha 1; gates not folded), so no protocol caveat
    assert by["C10/big student, gate stage start"]["ours"] == pytest.approx(100 * vgg["big_step0_sampled"])
    assert by["C10/after compression"]["ours"] == pytest.approx(100 * vgg["after_compression_unfolded"])
    assert by["C10/big student, gate stage start"]["note"] == by["C10/after compression"]["note"] == ""
    assert {"model_kwargs={width=0.25} (paper {})", "gate_epochs=0.5 (paper 100)", "batch_size=16 (paper 128)",
            "finetune_epochs=0.5 (paper 100)"} <= set(by["C10/after fine-tuning"]["deviations"])
    assert r["config"]["vgg11_c10"]["merge"]["lambda_update_first"] is True
    assert (mock_cifar / "merge" / "rows" / "vgg11_c10" / "units").is_dir()


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_train_baseline_paper_preset_end_to_end(mock_cifar):
    """He et al.'s ResNet-20 on (mock) CIFAR-10 with option-A shortcuts: its Table 6 row beside ours,
    every setting we shrank named as a deviation and the shortcut not (it is the paper's)."""
    tb, out = load_experiment("train_baseline"), str(mock_cifar / "tb")
    sets = ["train.steps=4", "train.batch_size=8", "train.model_kwargs.width=0.125", "train.eval_batch_size=16",
            "train.log_every=2", "train.eval_every=2", "train.checkpoint_every=2"]
    assert tb.main(["--preset", "paper", "--out", out, "--quiet"] + [a for s in sets for a in ("--set", s)]) == 0
    r = _results(out)
    cmp = r["paper_comparison"]
    (row,) = cmp["rows"]
    assert (row["row"], row["column"], row["paper"]) == ("ResNet-20", "C10", 8.75)
    assert row["ours"] == pytest.approx(100 * (1 - r["runs"][0]["test_accuracy"]) if "runs" in r else row["ours"])
    assert row["deviations"] == ["steps=4 (paper 64000)", "batch_size=8 (paper 128)", "model_kwargs={width=0.125} (paper {})"]
    assert len(cmp["not_run"]) == 6 and "table6/ResNet-110/C10" in cmp["not_run"]


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_averaging_paper_preset_end_to_end(tmp_path, monkeypatch):
    """The averaging experiment's paper preset (MLPs on MNIST) on mock MNIST, every part shrunk."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("MERGEJAX_DATA", str(tmp_path / "data"))
    av = load_experiment("averaging")
    sets = ["seeds=(0,)", "hidden=(16,)", "pair_hidden=(16,)", "pair_steps=4", "soup_pretrain_steps=4", "soup_finetune_steps=2",
            "soup_lrs=(0.01,0.1)", "total_steps=4", "ks=(1,2)", "workers=2", "worker_batch=8", "batch_size=8",
            "checkpoint_every=2", "two_process=False", "interp_points=3"]
    with tfds.testing.mock_data(num_examples=64):
        assert av.main(["--preset", "paper", "--out", str(tmp_path / "av"), "--quiet"] + [a for s in sets for a in ("--set", s)]) == 0
    r = _results(str(tmp_path / "av"))
    assert r["config"]["dataset"] == "mnist" and len(r["soups"]) == len(r["interpolation"]) == 1
    assert {(d["optimizer"], d["K"]) for d in r["divergence"]} == {(o, k) for o in ("sgd", "momentum") for k in (1, 2)}
    assert max(d["param_dist"] for d in r["divergence"] if (d["optimizer"], d["K"]) == ("sgd", 1)) < 1e-5  # K=1: the same
    assert len(r["interpolation"][0]["naive_acc"]) == 3 and 0.0 <= r["soups"][0]["uniform_test"] <= 1.0


@pytest.mark.slow  # ~2-3 min: WRN, DenseNet, SVHN train+extra with a holdout, the Dropout column and Table 3 on mock data
def test_snapshot_paper_grid_beyond_resnet110_on_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("MERGEJAX_DATA", str(tmp_path / "data"))
    se = load_experiment("snapshot_ensemble")
    config = override(se.get_config("paper"), [
        "networks=('wrn32_4','densenet40')", "datasets=('cifar100','svhn_cropped')", "columns=('single','dropout','snapshot_a0.2')",
        "table3_ms=(2,)", "train.steps=30", "train.batch_size=8", "train.log_every=10", "train.model_kwargs.width=0.0625",
        "eval_batch_size=16"])
    config.network_kwargs = ml_collections.ConfigDict({"wrn32_4": {"shortcut": "A", "depth": 8}, "densenet40": {"depth": 10}})
    config.holdout = ml_collections.ConfigDict({"svhn_cropped": 4})
    with tfds.testing.mock_data(num_examples=16):
        out = se.run(config, str(tmp_path / "out"), progress=False)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = res["cells"]
    assert set(cells) == {"wrn32_4/cifar100", "wrn32_4/svhn_cropped", "densenet40/cifar100", "densenet40/svhn_cropped",
                          "densenet40/cifar100/M2"}
    for prefix, cell in cells.items():
        want = {"snapshot_0.2"} if prefix.endswith("/M2") else {"single", "dropout", "snapshot_0.2"}
        assert set(cell["summary"]) == want, prefix
    ran = {(r["row"], r["column"]): r for r in res["paper_comparison"]["rows"]}
    assert {("Wide-ResNet-32", "C100/Dropout"), ("Wide-ResNet-32", "SVHN/Snapshot a0=0.2"), ("DenseNet-40", "SVHN/Single"),
            ("DenseNet-40", "C100/M=2")} <= set(ran)
    # SVHN trained on train + extra (16 + 16 mock images) less the 4 withheld: 28 // 8 = 3 steps an epoch
    assert any("epochs=10 (paper 40)" in d for d in ran[("DenseNet-40", "SVHN/Single")]["deviations"])
    assert "model_kwargs={depth=8, width=0.0625} (paper {})" in ran[("Wide-ResNet-32", "C100/Dropout")]["deviations"]
    assert "| table3 | DenseNet-40 | C100/M=2 |" in out["table"]
