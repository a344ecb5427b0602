"""Published numbers as data, each with its source, and the side-by-side comparison with ours.

One module per paper (``snapshot``, ``freezeout``, ``merging``, ``swa_fge``, ``resnet``) defines
``CELLS``: a tuple of :class:`Cell`. An experiment looks up the cells of the table it ran
(:func:`cells`), puts its own value under the same ``(table, row, column)`` key and calls
:func:`side_by_side`, which returns paper / ours / difference for every cell it ran and lists
the cells it did not run.

A compared cell carries what makes it less than like for like: the published cell's own
``note`` (a known difference of protocol) and the run's ``deviations`` from the paper's
setting (:func:`deviations`: ``["M=2 (paper 5)", "epochs=1 (paper 200)"]``), shown in
results.json and in the table's ``notes`` column.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Iterable, Mapping, Sequence

from mergejax.config import to_dict

PAPERS = ("snapshot", "freezeout", "merging", "swa_fge", "resnet")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One published number. ``metric``: what ``value`` is, with its unit, e.g. ``error_pct``
    (test error, %), ``accuracy_pct``, ``speedup_pct`` (wall-clock saving, %), ``params_m``
    (millions of parameters). ``source``: paper, table/figure, row and column, so that a
    reader can find the number in print. ``note``: how the published measurement differs from
    ours even at the paper's setting (empty if it does not), carried into every comparison row."""

    table: str
    row: str
    column: str
    value: float
    metric: str
    source: str
    note: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.table, self.row, self.column)


def cells(paper: str, table: str | None = None) -> tuple[Cell, ...]:
    """The published cells of ``paper`` (one of :data:`PAPERS`), optionally of one ``table``."""
    if paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; available: {', '.join(PAPERS)}")
    found = importlib.import_module(f"mergejax.papers.{paper}").CELLS
    return tuple(c for c in found if table is None or c.table == table)


def _show(v) -> str:
    if isinstance(v, float) and not isinstance(v, bool):
        return f"{v:.4g}"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}={_show(x)}" for k, x in sorted(v.items())) + "}"
    return str(v)


def _same(a, b) -> bool:
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-12)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def arch_kwargs(model_kwargs: Mapping | None, *without: str) -> dict:
    """A run's model kwargs as a paper states its network: without the compute ``dtype`` (a
    precision, not an architecture) and the keys ``without`` (settings compared on their own,
    e.g. a ResNet's ``shortcut``). Takes a dict or a ConfigDict."""
    kw = to_dict(model_kwargs or {})
    return {k: v for k, v in kw.items() if k not in ("dtype", *without)}


def deviations(ours: Mapping, paper: Mapping) -> list[str]:
    """``["key=ours (paper value)"]`` for every setting of ``paper`` (``{name: value}``, e.g. ``M``,
    ``epochs``, ``batch_size``, ``model_kwargs``) that ``ours`` gives a different value; numbers
    within 0.1 % count as equal, a setting ``ours`` does not state is not compared."""
    return [f"{k}={_show(ours[k])} (paper {_show(v)})" for k, v in paper.items() if k in ours and not _same(ours[k], v)]


def side_by_side(published: Sequence[Cell], ours: Mapping[tuple[str, str, str], float],
                 deviations: Mapping[tuple[str, str, str], Sequence[str]] | None = None,
                 notes: Mapping[tuple[str, str, str], str] | None = None) -> dict:
    """Compare our values with the published cells.

    ``ours``: ``{(table, row, column): value}`` in the cell's own metric; ``deviations``: per key,
    how our run's setting differs from the paper's (:func:`deviations`); ``notes``: per key, a
    caveat of ours added to the cell's own ``note``. Returns ``{'rows': [{table, row, column,
    metric, paper, ours, diff, source, note, deviations}], 'not_run': [cell keys], 'unmatched':
    [our keys with no published cell]}``; ``diff = ours - paper``.
    """
    by_key = {c.key: c for c in published}
    rows, not_run = [], []
    for c in published:
        if c.key in ours and ours[c.key] is not None:
            v = float(ours[c.key])
            note = "; ".join(x for x in (c.note, (notes or {}).get(c.key, "")) if x)
            rows.append({"table": c.table, "row": c.row, "column": c.column, "metric": c.metric, "paper": c.value,
                         "ours": v, "diff": v - c.value, "source": c.source, "note": note,
                         "deviations": list((deviations or {}).get(c.key, ()))})
        else:
            not_run.append("/".join(c.key))
    unmatched = ["/".join(k) for k in ours if k not in by_key]
    return {"rows": rows, "not_run": not_run, "unmatched": unmatched}


def also_not_run(comparison: dict, cells_: Iterable[Cell], reason: str) -> dict:
    """``comparison`` with ``cells_`` (published cells that no preset of the experiment runs) listed
    under ``not_run_reasons[reason]``, apart from the preset's own ``not_run``."""
    reasons = {**comparison.get("not_run_reasons", {}), reason: ["/".join(c.key) for c in cells_]}
    return {**comparison, "not_run_reasons": reasons}


def _notes(r: dict) -> str:
    dev = r.get("deviations") or []
    text = "; ".join(([f"setup differs: {', '.join(dev)}"] if dev else []) + ([r["note"]] if r.get("note") else []))
    return text.replace("|", "/")


def markdown(comparison: dict, *, max_not_run: int = 12) -> str:
    """The comparison of :func:`side_by_side` as a Markdown table (a ``notes`` column with each row's
    deviations from the paper's setting and protocol notes) plus a line on the cells not run."""
    lines = ["| table | row | column | metric | paper | ours | ours - paper | notes |", "|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        lines.append(f"| {r['table']} | {r['row']} | {r['column']} | {r['metric']} | {r['paper']:g} | {r['ours']:.2f} | "
                     f"{r['diff']:+.2f} | {_notes(r)} |")
    text = "\n".join(lines) + "\n"
    flagged = sum(bool(r.get("deviations") or r.get("note")) for r in comparison["rows"])
    if flagged:
        text += (f"\n{flagged} of {len(comparison['rows'])} compared cells are not like for like (see notes): "
                 "read their difference with that in mind.\n")
    if not comparison["rows"]:
        text = "No cell of the paper's tables was run at this preset.\n"
    nr = comparison["not_run"]
    if nr:
        shown = ", ".join(nr[:max_not_run]) + (f", ... ({len(nr) - max_not_run} more)" if len(nr) > max_not_run else "")
        text += f"\nNot run at this preset ({len(nr)} published cells): {shown}.\n"
    reasons = comparison.get("not_run_reasons") or {}
    for reason, keys in reasons.items():
        text += f"Not run ({reason}): {', '.join(keys)}.\n"
    return text


def check(cells_: Iterable[Cell]) -> None:
    """Raise ``ValueError`` on a duplicate key or an empty source (used by the tests)."""
    seen = set()
    for c in cells_:
        if c.key in seen:
            raise ValueError(f"duplicate published cell {c.key}")
        if not c.source.strip():
            raise ValueError(f"published cell {c.key} has no source")
        seen.add(c.key)
