"""The snapshot_ensemble ``paper`` preset: its plan covers Table 1 (networks x datasets x columns) and Table 3 with
the paper's budgets (hand-counted here), a subset chosen on the command line runs end to end on mock TFDS data,
and results.json carries the comparison with the published cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_experiment
from mergejax.config import override
from mergejax.papers import snapshot as snap_paper
from mergejax.papers import swa_fge as snap_paper_swa


@pytest.fixture(scope="module")
def se():
    return load_experiment("snapshot_ensemble")


def _names(rows):
    return [r["name"] for r in rows]


def test_paper_plan_covers_tables_1_and_3_with_the_papers_budgets(se):
    rows = se.plan(se.get_config("paper"))
    # per network x dataset: single-0 (Single and NoCycle), M Single-Cycle runs, Dropout (WRN, DenseNets), 2 snapshot runs;
    # Tiny ImageNet (last term of each): M = 6
    resnet, wrn = 3 * (1 + 5 + 2) + (1 + 6 + 2), 3 * (1 + 5 + 1 + 2) + (1 + 6 + 1 + 2)
    densenet40 = 2 * (1 + 6 + 1 + 2) + (1 + 5 + 1 + 2) + 4 + (1 + 6 + 1 + 2)  # CIFAR M = 6, SVHN M = 5, Table 3 M = 2, 4, 8, 10
    densenet100 = 2 * (1 + 6 + 1 + 2)  # no SVHN or Tiny ImageNet in the paper
    assert len(rows) == resnet + wrn + densenet40 + densenet100 == 133
    assert len(set(_names(rows))) == len(rows)
    # budgets: CIFAR 200 epochs (ResNet/WRN) or 300 (DenseNet) of floor(50000 / 64) = 781 steps; SVHN 40 epochs of
    # train + extra (73,257 + 531,131 = 604,388, TFDS metadata) less 6,000 withheld: floor(598,388 / 64) = 9,349 steps
    svhn_epoch = (73_257 + 531_131 - 6_000) // 64
    assert svhn_epoch == 9349
    by = {r["name"]: r for r in rows}
    assert by["resnet110/cifar10/seed0/single-0"]["steps"] == 200 * 781
    assert by["densenet100/cifar100/seed0/snapshot_0.2"]["steps"] == 300 * 781
    assert by["wrn32_4/svhn_cropped/seed0/snapshot_0.1"]["steps"] == 40 * svhn_epoch
    assert sum(by[f"densenet40/cifar10/seed0/single_cycle-{j}"]["steps"] for j in range(6)) == 300 * 781
    assert by["densenet40/cifar100/M10/seed0/snapshot_0.2"]["steps"] == 300 * 781
    # Tiny ImageNet: 150 epochs of 100,000 images, batch 128 (ResNet/WRN: 781 steps an epoch) or 64 (DenseNet-40: 1562)
    tiny = {n: r for n, r in by.items() if "/tiny_imagenet/" in n}
    assert {r["batch_size"] for n, r in by.items() if n not in tiny} == {64}
    assert {n.split("/")[0]: r["batch_size"] for n, r in tiny.items()} == {"resnet110": 128, "wrn32_4": 128, "densenet40": 64}
    assert by["resnet110/tiny_imagenet/seed0/single-0"]["steps"] == 150 * 781
    assert by["densenet40/tiny_imagenet/seed0/snapshot_0.2"]["steps"] == 150 * 1562
    assert sum(by[f"wrn32_4/tiny_imagenet/seed0/single_cycle-{j}"]["steps"] for j in range(6)) == 150 * 781
    assert by["wrn32_4/cifar100/seed0/dropout"]["model_kwargs"] == {"shortcut": "A", "dropout": 0.2}
    # option-A shortcuts for the ResNets (the authors' fb.resnet.torch opts.lua), none for the DenseNets
    assert {n.split("/")[0]: r["model_kwargs"].get("shortcut") for n, r in by.items() if not n.endswith("/dropout")} == {
        "resnet110": "A", "wrn32_4": "A", "densenet40": None, "densenet100": None}
    assert not any(n.startswith("resnet110/") and n.endswith("/dropout") for n in by)
    steps_t = {"resnet": 200 * 781, "wrn": 200 * 781, "dn": 300 * 781, "svhn": 40 * svhn_epoch, "tiny": 150 * 781, "tiny_dn": 150 * 1562}
    total = (2 * 4 * steps_t["resnet"] + 4 * steps_t["svhn"] + 2 * 5 * steps_t["wrn"] + 5 * steps_t["svhn"]
             + 2 * 5 * steps_t["dn"] + 5 * steps_t["svhn"] + 4 * steps_t["dn"] + 2 * 5 * steps_t["dn"]
             + 4 * steps_t["tiny"] + 5 * steps_t["tiny"] + 5 * steps_t["tiny_dn"])
    assert sum(r["steps"] for r in rows) == total


def test_paper_config_is_the_papers_and_extras_are_off(se):
    c = se.get_config("paper")
    t = c.train
    assert (t.batch_size, t.momentum, t.nesterov, t.weight_decay, t.lr) == (64, 0.9, True, 1e-4, 0.1)
    assert tuple(c.extras) == () and tuple(c.table3_ms) == (2, 4, 6, 8, 10)
    assert set(c.networks) == set(snap_paper.NETWORKS) and set(c.datasets) == {"cifar10", "cifar100", "svhn_cropped", "tiny_imagenet"}
    cells = {cell.prefix: cell for cell in se.grid(c)}
    assert cells["resnet110/cifar10/"].train.augment and not cells["resnet110/svhn_cropped/"].train.augment
    assert (cells["densenet40/cifar100/"].M, cells["resnet110/cifar100/"].M, cells["wrn32_4/svhn_cropped/"].M) == (6, 5, 5)
    for prefix, cell in cells.items():  # SVHN on train + extra with 6,000 withheld; option A for ResNet-110 and WRN-32-4 only
        assert cell.train.train_split == ("train+extra" if "/svhn_cropped/" in prefix else "train"), prefix
        assert dict(cell.train.model_kwargs) == ({"shortcut": "A"} if prefix.startswith(("resnet110/", "wrn32_4/")) else {}), prefix
    assert c.holdout.to_dict() == {"svhn_cropped": 6000}
    # extras switch on separately: a true ensemble adds M - 1 members and the ensemble of M budgets
    sub = override(c, ["networks=('resnet110',)", "datasets=('cifar10',)", "columns=('single',)", "table3_ms=()",
                       "extras=('true_ensemble', 'long_teacher')"])
    assert _names(se.plan(sub)) == [f"resnet110/cifar10/seed0/single-{j}" for j in range(5)] + ["resnet110/cifar10/seed0/long_teacher"]
    assert se.plan(sub)[-1]["steps"] == 5 * 200 * 781


def test_paper_subset_runs_end_to_end_on_mock_cifar(se, tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("MERGEJAX_DATA", str(tmp_path / "data"))
    config = override(se.get_config("paper"), [
        "networks=('resnet110',)", "datasets=('cifar10',)", "columns=('single', 'snapshot_a0.2')", "table3_ms=()",
        "num_snapshots=2", "train.steps=4", "train.batch_size=8", "train.log_every=2", "train.model_kwargs.width=0.0625",
        "train.model_kwargs.depth=8", "eval_batch_size=16"])  # ResNet-110's row at depth 8: a deviation, flagged below
    assert [r["name"] for r in se.plan(config)] == ["resnet110/cifar10/seed0/single-0", "resnet110/cifar10/seed0/snapshot_0.2"]
    with tfds.testing.mock_data(num_examples=16):
        out = se.run(config, str(tmp_path / "out"), progress=False)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["summary"]) == {"single", "snapshot_0.2"} and res["budget_steps"] == 4
    assert res["summary"]["snapshot_0.2"]["members"] == 2
    comp = res["paper_comparison"]
    ran = {(r["row"], r["column"]): r for r in comp["rows"]}
    assert set(ran) == {("ResNet-110", "C10/Single"), ("ResNet-110", "C10/Snapshot a0=0.2")}
    assert ran[("ResNet-110", "C10/Single")]["paper"] == 5.52 and ran[("ResNet-110", "C10/Snapshot a0=0.2")]["paper"] == 5.32
    for (row, col), r in ran.items():
        key = {"C10/Single": "single", "C10/Snapshot a0=0.2": "snapshot_0.2"}[col]
        assert r["ours"] == res["summary"][key]["error_pct"]["mean"] and r["diff"] == pytest.approx(r["ours"] - r["paper"])
    assert len(comp["not_run"]) == 80 - 2 and comp["unmatched"] == []
    assert "| table1 | ResNet-110 | C10/Single | error_pct | 5.52 |" in out["table"] and "(78 published cells)" in out["table"]
    # 4 steps of 8 (2 epochs of the 16 mock images), M = 2, depth 8 and a 1/16 width: each flagged, M only where it matters
    common = ["epochs=2 (paper 200)", "batch_size=8 (paper 64)", "model_kwargs={depth=8, width=0.0625} (paper {})"]  # shortcut A: the paper's
    assert ran[("ResNet-110", "C10/Single")]["deviations"] == common
    assert ran[("ResNet-110", "C10/Snapshot a0=0.2")]["deviations"] == [common[0], "M=2 (paper 5)", *common[1:]]
    assert "setup differs: epochs=2 (paper 200), M=2 (paper 5)" in out["table"]
    assert comp["not_run_reasons"] == {snap_paper_swa.NOT_RUN: ["/".join(c.key) for c in snap_paper_swa.CELLS]}


@pytest.mark.slow  # ~80 s: ResNet-110 compiled at 64x64 (the CIFAR subset test above covers the pipeline in the default run)
def test_paper_tiny_imagenet_cell_runs_on_mock_data(se, tmp_path, monkeypatch):
    """The Tiny ImageNet column: the CIFAR ResNet-110 on 64x64 inputs with 200 classes, batch 128, through
    mergejax's own TFDS builder (mock data), compared with the paper's Tiny ImageNet cells."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("MERGEJAX_DATA", str(tmp_path / "data"))
    config = override(se.get_config("paper"), [
        "networks=('resnet110',)", "datasets=('tiny_imagenet',)", "columns=('single', 'snapshot_a0.2')", "table3_ms=()",
        "num_snapshots=2", "train.steps=2", "train.log_every=1", "train.model_kwargs.width=0.0625", "eval_batch_size=16"])
    assert [(r["name"], r["batch_size"], r["dataset"]) for r in se.plan(config)] == [
        ("resnet110/tiny_imagenet/seed0/single-0", 128, "tiny_imagenet"), ("resnet110/tiny_imagenet/seed0/snapshot_0.2", 128, "tiny_imagenet")]
    with tfds.testing.mock_data(num_examples=128):
        se.run(config, str(tmp_path / "out"), progress=False)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ran = {(r["row"], r["column"]): r for r in res["paper_comparison"]["rows"]}
    assert set(ran) == {("ResNet-110", "TinyImageNet/Single"), ("ResNet-110", "TinyImageNet/Snapshot a0=0.2")}
    assert ran[("ResNet-110", "TinyImageNet/Single")]["paper"] == 46.50
    assert ran[("ResNet-110", "TinyImageNet/Snapshot a0=0.2")]["paper"] == 39.40
    assert 0 <= ran[("ResNet-110", "TinyImageNet/Single")]["ours"] <= 100


def test_cell_data_withholds_the_holdout_from_the_train_split(se):
    from mergejax.core import data
    from mergejax.ensembles.comparison import cell_data

    c = override(se.get_config("tiny"), ["holdout={'digits': 37}"])  # (split sums: test_data; SVHN's train+extra)
    (cell,) = se.grid(c)
    train, test = cell_data(c, cell)
    full = data.load("digits", "train").labels  # 1,437
    keep = np.sort(np.random.default_rng(0).permutation(1437)[:1437 - 37])  # data.holdout's rule, seed 0
    assert len(train) == 1437 - 37 and len(test) == 360
    np.testing.assert_array_equal(train.labels, full[keep])
    assert se.plan(c)[0]["steps"] == round(15 * ((1437 - 37) // 64))  # the dry run counts the same examples
    with pytest.raises(ValueError, match="includes the test split"):  # never trained on the images it is scored on
        cell_data(c, se.grid(override(c, ["train.train_split='train+test'"]))[0])


def test_paper_deviations_flag_only_cells_run_away_from_the_papers_setting():
    from mergejax.config import replace, train_config
    from mergejax.ensembles.comparison import GridCell, paper_deviations

    summary = {k: {"error_pct": {"mean": 5.0}} for k in ("single", "snapshot_0.2")}
    at_paper = train_config(model="resnet110", dataset="cifar10", epochs=200.0, batch_size=64, weight_decay=1e-4, augment=True,
                            model_kwargs={"shortcut": "A"})

    def done(train, m, steps, per_epoch):
        return [{"cell": GridCell("c/", train, m, ("single", "snapshot_a0.2")), "budget_steps": steps,
                 "steps_per_epoch": per_epoch, "summary": summary}]

    single, snap = ("table1", "ResNet-110", "C10/Single"), ("table1", "ResNet-110", "C10/Snapshot a0=0.2")
    assert paper_deviations(done(at_paper, 5, 200 * 781, 781)) == {single: [], snap: []}
    small = replace(at_paper, batch_size=32, model_kwargs={"width": 0.5})  # and the default shortcut (B)
    got = paper_deviations(done(small, 2, 2 * 100, 100))
    flags = ["batch_size=32 (paper 64)", "model_kwargs={width=0.5} (paper {})", "shortcut=B (paper A)"]
    assert got[single] == ["epochs=2 (paper 200)", *flags]
    assert got[snap] == ["epochs=2 (paper 200)", "M=2 (paper 5)", *flags]
    # Table 3: M is the column's own (4 is the paper's for C100/M=4); the budget is 300 epochs
    d40 = replace(at_paper, model="densenet40", dataset="cifar100", model_kwargs={})
    t3 = paper_deviations([{"cell": GridCell("d/", d40, 4, ("snapshot_a0.2",), False), "budget_steps": 200 * 781,
                            "steps_per_epoch": 781, "summary": {"snapshot_0.2": summary["snapshot_0.2"]}}], (4,))
    assert t3 == {("table3", "DenseNet-40", "C100/M=4"): ["epochs=200 (paper 300)"]}
