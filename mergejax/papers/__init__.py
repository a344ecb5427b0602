"""Published numbers as data, each with its source, and the side-by-side comparison with ours.

One module per paper (``snapshot``, ``freezeout``, ``merging``, ``swa_fge``) defines
``CELLS``: a tuple of :class:`Cell`. An experiment looks up the cells of the table it ran
(:func:`cells`), puts its own value under the same ``(table, row, column)`` key and calls
:func:`side_by_side`, which returns paper / ours / difference for every cell it ran and lists
the cells it did not run.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Iterable, Mapping, Sequence

PAPERS = ("snapshot", "freezeout", "merging", "swa_fge")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One published number. ``metric``: what ``value`` is, with its unit, e.g. ``error_pct``
    (test error, %), ``accuracy_pct``, ``speedup_pct`` (wall-clock saving, %), ``params_m``
    (millions of parameters). ``source``: paper, table/figure, row and column, so that a
    reader can find the number in print."""

    table: str
    row: str
    column: str
    value: float
    metric: str
    source: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.table, self.row, self.column)


def cells(paper: str, table: str | None = None) -> tuple[Cell, ...]:
    """The published cells of ``paper`` (one of :data:`PAPERS`), optionally of one ``table``."""
    if paper not in PAPERS:
        raise ValueError(f"unknown paper {paper!r}; available: {', '.join(PAPERS)}")
    found = importlib.import_module(f"mergejax.papers.{paper}").CELLS
    return tuple(c for c in found if table is None or c.table == table)


def side_by_side(published: Sequence[Cell], ours: Mapping[tuple[str, str, str], float]) -> dict:
    """Compare our values with the published cells.

    ``ours``: ``{(table, row, column): value}`` in the cell's own metric. Returns
    ``{'rows': [{table, row, column, metric, paper, ours, diff, source}], 'not_run':
    [cell keys], 'unmatched': [our keys with no published cell]}``; ``diff = ours - paper``.
    """
    by_key = {c.key: c for c in published}
    rows, not_run = [], []
    for c in published:
        if c.key in ours and ours[c.key] is not None:
            v = float(ours[c.key])
            rows.append({"table": c.table, "row": c.row, "column": c.column, "metric": c.metric, "paper": c.value,
                         "ours": v, "diff": v - c.value, "source": c.source})
        else:
            not_run.append("/".join(c.key))
    unmatched = ["/".join(k) for k in ours if k not in by_key]
    return {"rows": rows, "not_run": not_run, "unmatched": unmatched}


def markdown(comparison: dict, *, max_not_run: int = 12) -> str:
    """The comparison of :func:`side_by_side` as a Markdown table plus a line on the cells not run."""
    lines = ["| table | row | column | metric | paper | ours | ours - paper |", "|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        lines.append(f"| {r['table']} | {r['row']} | {r['column']} | {r['metric']} | {r['paper']:g} | {r['ours']:.2f} | "
                     f"{r['diff']:+.2f} |")
    text = "\n".join(lines) + "\n"
    if not comparison["rows"]:
        text = "No cell of the paper's tables was run at this preset.\n"
    nr = comparison["not_run"]
    if nr:
        shown = ", ".join(nr[:max_not_run]) + (f", ... ({len(nr) - max_not_run} more)" if len(nr) > max_not_run else "")
        text += f"\nNot run at this preset ({len(nr)} published cells): {shown}.\n"
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
