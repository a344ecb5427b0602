"""Published numbers as data (mergejax.papers): every cell sourced and unique, values as printed in the papers
(checked by hand against shared/reference/snapshot_ensembles.md), and the side-by-side comparison on a hand example."""

from __future__ import annotations

import dataclasses

import pytest

from mergejax import papers
from mergejax.papers import Cell
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
                             "diff": 1.5, "source": "paper, Table 1, Net, A"}]
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
