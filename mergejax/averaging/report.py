"""The averaging experiment's tables and plots, from its unit results (lists of dicts).

``divergence``: rows of :func:`mergejax.averaging.local_sgd.divergence` tagged with
``optimizer`` and ``seed``; ``pairs``: per seed, :func:`connectivity.naive_vs_aligned`;
``soup_runs``: per seed, :func:`soups.compare` with ``val_acc``/``test_acc``; ``dist``: the
2-process check (``{'ok': ...}``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mergejax import report

OPTIMIZERS = ("sgd", "momentum")


def _sel(divergence, opt, k, key) -> list:
    return [r[key] for r in divergence if r["optimizer"] == opt and r["K"] == k]


def tables(config, divergence: Sequence[dict], pairs: Sequence[dict], soup_runs: Sequence[dict], dist: dict) -> str:
    """Markdown sections (a)-(d): mean ± std over seeds (accuracies in %)."""
    ms = report.fmt_mean_std
    rows_a = [{"optimizer": o, "K": k, "param dist": "{mean:.2e} ± {std:.1e}".format(**report.mean_std(_sel(divergence, o, k, "param_dist"))),
               "rel dist": ms(_sel(divergence, o, k, "rel_dist"), digits=4), "local SGD acc": ms(_sel(divergence, o, k, "local_acc"), 100),
               "grad-avg acc": ms(_sel(divergence, o, k, "sync_acc"), 100)} for o in OPTIMIZERS for k in config.ks]
    rows_b = [{"method": m, "loss barrier": ms([r[f"{m}_barrier"] for r in pairs], digits=3), "midpoint acc":
               ms([r[f"{m}_mid_acc"] for r in pairs], 100), "endpoint acc": ms([x for r in pairs for x in r["end_acc"]], 100)}
              for m in ("naive", "aligned")]
    rows_c = [{"model": m, "test acc": ms([r[f"{k}_test"] for r in soup_runs], 100), "val acc": ms([r[f"{k}_val"] for r in soup_runs], 100)}
              for m, k in (("best single (by val)", "best_single"), ("uniform soup", "uniform"), ("greedy soup", "greedy"))]
    table = (f"## (a) Local SGD (K local steps, then weight averaging) vs gradient averaging\n\n{config.workers} workers x batch "
             f"{config.worker_batch}, {config.total_steps} steps, MLP {config.hidden}; distance to the synchronous run on the same batches "
             f"(L2 over all params; rel = / distance the sync run moved).\n\n{report.markdown_table(rows_a)}\n"
             f"## (b) Two independently trained networks: linear interpolation\n\n{report.markdown_table(rows_b)}\n"
             f"## (c) Soups of {len(config.soup_lrs)} fine-tunes (lrs {config.soup_lrs}) of one pre-trained MLP (test acc %)\n\n"
             f"{report.markdown_table(rows_c)}\n## (d) Local SGD across 2 processes (jax.distributed, CPU)\n\n")
    return table + (f"max |params(proc 0) - params(proc 1)| = {dist['max_gap_between_processes']}, max |2-process - 1-process| = "
                    f"{dist['max_gap_vs_single_process']}\n" if dist.get("ok") else f"not run / failed: {dist}\n")


def plots(out_dir: str, config, divergence: Sequence[dict], pairs: Sequence[dict]) -> list[str]:
    """``interpolation.png`` (mean test loss along both paths) and ``divergence.png``."""
    ts, mean_loss = pairs[0]["t"], lambda m: list(np.mean([r[f"{m}_loss"] for r in pairs], 0))  # noqa: E731
    p1 = report.plot_curves(os.path.join(out_dir, "interpolation.png"),
                            {"naive": (ts, mean_loss("naive")), "aligned (weight matching)": (ts, mean_loss("aligned"))},
                            xlabel="t  ((1-t) A + t B)", ylabel="test loss (nats)", title="Interpolating two independently trained MLPs")
    p2 = report.plot_curves(os.path.join(out_dir, "divergence.png"),
                            {o: (list(np.log2(config.ks)), [float(np.mean(_sel(divergence, o, k, "rel_dist"))) for k in config.ks])
                             for o in OPTIMIZERS},
                            xlabel="log2 K (local steps between averages)", ylabel="relative distance to gradient averaging",
                            title="Local SGD vs gradient averaging")
    return [p1, p2]
