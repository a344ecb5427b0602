"""Published numbers as data (mergejax.papers): every cell sourced and unique, values as printed in the papers
(checked by hand against shared/reference/snapshot_ensembles.md), and the side-by-side comparison on a hand example."""

from __future__ import annotations

import dataclasses

import pytest

from mergejax import papers
from mergejax.papers import Cell
from mergejax.papers import resnet
from mergejax.papers import snapshot as snap


@pytest.mark.parametrize("paper", ["snapshot", "swa_fge"])
def test_cells_have_sources_and_unique_keys(paper):
    cells = papers.cells(paper)
    assert cells
    papers.check(cells)  # raises on a duplicate key or an empty source
    for c in cells:
        assert c.source.strip() and c.metric in ("error_pct", "accuracy_pct")
        assert c.row in c.source and "column" in c.source  # the row is named, and the column
        if paper == "snapshot":
            assert f"Table {c.table[-1]}" in c.source


def test_snapshot_table_sizes_by_hand():
    # Table 1: ResNet-110 5 columns, WRN-32 and DenseNet-40 6 (with Dropout), x 4 datasets; DenseNet-100 6 x 2 (C10, C100)
    assert len(papers.cells("snapshot", "table1")) == 5 * 4 + 6 * 4 + 6 * 4 + 6 * 2
    assert len(papers.cells("snapshot", "table2")) == 3
    assert len(papers.cells("snapshot", "table3")) == 5
    keys = {c.key for c in papers.cells("snapshot")}
    assert ("table1", "DenseNet-100", "SVHN/Single") not in keys  # not in the paper
    assert ("table1", "ResNet-110", "C10/Dropout") not in keys  # no ResNet-110 Dropout row


@pytest.mark.parametrize("key, value", [
    (("table1", "ResNet-110", "C100/Single"), 28.02),
    (("table1", "ResNet-110", "SVHN/SingleCycle"), 1.81),
    (("table1", "Wide-ResNet-32", "TinyImageNet/Snapshot a0=0.2"), 32.90),
    (("table1", "Wide-ResNet-32", "C10/Dropout"), 4.68),
    (("table1", "DenseNet-40", "C100/Snapshot a0=0.2"), 21.93),
    (("table1", "DenseNet-40", "SVHN/NoCycle"), 1.80),
    (("table1", "DenseNet-100", "C10/Snapshot a0=0.1"), 3.57),
    (("table1", "DenseNet-100", "C100/Dropout"), 18.77),
    (("table2", "ResNet-50", "ImageNet/Single"), 24.01),
    (("table2", "ResNet-50", "ImageNet/Snapshot M=3"), 23.96),
    (("table3", "DenseNet-40", "C100/M=2"), 22.92),
    (("table3", "DenseNet-40", "C100/M=8"), 21.89),
])
def test_snapshot_values_as_printed(key, value):
    cell = {c.key: c for c in papers.cells("snapshot")}[key]
    assert cell.value == value and cell.metric == "error_pct"
    assert key[1] in cell.source and key[0][-1] in cell.source


def test_table3_m6_is_table1_densenet40_c100_a02():  # the same run in the paper, printed twice
    by_key = {c.key: c.value for c in papers.cells("snapshot")}
    assert by_key[("table3", "DenseNet-40", "C100/M=6")] == by_key[("table1", "DenseNet-40", "C100/Snapshot a0=0.2")] == 21.93


def test_swa_fge_reference_points():
    by_key = {c.key: c.value for c in papers.cells("swa_fge")}
    assert by_key == {("swa", "WRN-28-10", "C100/SGD"): 80.82, ("swa", "WRN-28-10", "C100/SWA 1.5 budgets"): 82.15,
                      ("fge", "WRN-28-10", "C100/Ind 1 budget"): 80.8, ("fge", "WRN-28-10", "C100/FGE 1 budget"): 82.3}


def test_our_names_map_to_paper_keys():
    assert snap.table1_key("wrn32_4", "svhn_cropped", "snapshot_0.2") == ("table1", "Wide-ResNet-32", "SVHN/Snapshot a0=0.2")
    assert snap.table1_key("densenet100", "cifar100", "single_cycle") == ("table1", "DenseNet-100", "C100/SingleCycle")
    assert snap.table1_key("cnn", "digits", "single") is None and snap.table1_key("resnet110", "cifar10", "swa") is None
    assert snap.table3_key(4) == ("table3", "DenseNet-40", "C100/M=4")
    keys = {c.key for c in papers.cells("snapshot", "table1")}
    assert all(snap.table1_key(n, d, col) in keys for n in snap.NETWORKS for d in ("cifar10", "cifar100")
               for col in snap.COLUMNS if not (n == "resnet110" and col == "dropout"))


def test_side_by_side_and_markdown_on_a_hand_example():
    pub = [Cell("t1", "Net", "C10/A", 5.0, "error_pct", "paper, Table 1, Net, A"),
           Cell("t1", "Net", "C10/B", 10.0, "error_pct", "paper, Table 1, Net, B")]
    comp = papers.side_by_side(pub, {("t1", "Net", "C10/A"): 6.5, ("t1", "Net", "C10/Z"): 1.0})
    assert comp["rows"] == [{"table": "t1", "row": "Net", "column": "C10/A", "metric": "error_pct", "paper": 5.0, "ours": 6.5,
                             "diff": 1.5, "source": "paper, Table 1, Net, A", "note": "", "deviations": []}]
    assert comp["not_run"] == ["t1/Net/C10/B"] and comp["unmatched"] == ["t1/Net/C10/Z"]
    md = papers.markdown(comp)
    assert "| t1 | Net | C10/A | error_pct | 5 | 6.50 | +1.50 |" in md
    assert "Not run at this preset (1 published cells): t1/Net/C10/B." in md
    nothing = papers.markdown(papers.side_by_side(pub, {}))
    assert nothing.startswith("No cell of the paper's tables was run") and "(2 published cells)" in nothing
    many = papers.markdown(papers.side_by_side(papers.cells("snapshot", "table1"), {}), max_not_run=3)
    assert "(80 published cells)" in many and "... (77 more)" in many


def test_check_refuses_duplicates_and_empty_sources():
    a = Cell("t", "r", "c", 1.0, "error_pct", "somewhere")
    with pytest.raises(ValueError, match="duplicate"):
        papers.check([a, a])
    with pytest.raises(ValueError, match="no source"):
        papers.check([dataclasses.replace(a, source=" ")])
    with pytest.raises(ValueError, match="unknown paper"):
        papers.cells("nope")


def test_deviations_flag_only_the_settings_that_differ():
    paper = {"M": 5, "epochs": 200, "batch_size": 64, "model_kwargs": {}, "shortcut": "A"}
    assert papers.deviations({"M": 5, "epochs": 200.0, "batch_size": 64, "model_kwargs": {}, "shortcut": "A"}, paper) == []
    assert papers.deviations({"epochs": 200 * 781 / 781.0001}, paper) == []  # step rounding is not a deviation
    got = papers.deviations({"M": 2, "epochs": 1.0, "batch_size": 64, "model_kwargs": {"width": 0.25}, "shortcut": "B"}, paper)
    assert got == ["M=2 (paper 5)", "epochs=1 (paper 200)", "model_kwargs={width=0.25} (paper {})", "shortcut=B (paper A)"]
    assert papers.deviations({"extra": 1}, paper) == []  # a setting the paper does not state is not compared


def test_deviations_and_notes_reach_the_rows_and_the_table():
    pub = [Cell("t1", "Net", "C10/A", 5.0, "error_pct", "paper, A", note="another method"),
           Cell("t1", "Net", "C10/B", 10.0, "error_pct", "paper, B")]
    key_a, key_b = ("t1", "Net", "C10/A"), ("t1", "Net", "C10/B")
    comp = papers.side_by_side(pub, {key_a: 6.5, key_b: 9.0}, {key_b: ["M=2 (paper 5)"]}, {key_a: "ours folds the gates"})
    a, b = comp["rows"]
    assert (a["note"], a["deviations"]) == ("another method; ours folds the gates", [])
    assert (b["note"], b["deviations"]) == ("", ["M=2 (paper 5)"])
    md = papers.markdown(comp)
    assert "| +1.50 | another method; ours folds the gates |" in md and "| -1.00 | setup differs: M=2 (paper 5) |" in md
    assert "2 of 2 compared cells are not like for like" in md
    clean = papers.markdown(papers.side_by_side(pub[1:], {key_b: 9.0}))
    assert "| -1.00 |  |" in clean and "not like for like" not in clean
    listed = papers.markdown(papers.also_not_run(comp, papers.cells("swa_fge"), "no preset trains it"))
    assert "Not run (no preset trains it): swa/WRN-28-10/C100/SGD," in listed


def test_resnet_table6_and_its_deviations():
    by = {c.key: c.value for c in papers.cells("resnet")}
    assert by[("table6", "ResNet-20", "C10")] == 8.75 and by[("table6", "ResNet-56", "C10")] == 6.97
    assert by[("table6", "ResNet-110", "C10")] == 6.43 and by[("table6", "ResNet-110", "C10 (mean of 5 runs)")] == 6.61
    papers.check(papers.cells("resnet"))
    train = dict(model="resnet110", dataset="cifar10", steps=64_000, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                 schedule="step", step_boundaries=[0.5, 0.75], augment=True, model_kwargs={"shortcut": "A"})
    runs = [{"test_accuracy": 0.93, "steps": 64_000}, {"test_accuracy": 0.94, "steps": 64_000}]
    comp = resnet.compare(train, runs)
    assert [(r["column"], round(r["ours"], 6), r["deviations"]) for r in comp["rows"]] == [
        ("C10", 6.5, []), ("C10 (mean of 5 runs)", 6.5, [])]
    assert len(comp["not_run"]) == 5
    # our default shortcut (B, a 1x1 conv), a quarter width and a short run are each flagged
    short = resnet.compare({**train, "model": "resnet20", "model_kwargs": {"width": 0.25}}, [{"test_accuracy": 0.5, "steps": 20}])
    assert short["rows"][0]["deviations"] == ["steps=20 (paper 64000)", "shortcut=B (paper A)", "model_kwargs={width=0.25} (paper {})"]
    assert not resnet.compare({**train, "model": "cnn"}, runs)["rows"]
    assert not resnet.compare({**train, "dataset": "cifar100"}, runs)["rows"]
