"""Model soups (Wortsman et al. 2022): average fine-tuned models that share a pre-trained start.

* :func:`uniform_soup` — the plain average of all ingredients (streaming).
* :func:`greedy_soup` — ingredients sorted by their own held-out score; each is added only if
  the soup's held-out score does not drop.

Ingredients are variable trees ``{'params', 'batch_stats'}`` (or any pytree), or zero-argument
callables returning one (e.g. a checkpoint loader) so at most two models are in memory.
BatchNorm statistics are averaged with the weights; re-estimate them for the final soup with
:func:`mergejax.ensembles.swa.recompute_batch_stats` (SWA-style pass over training data).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from mergejax.averaging import weights as averaging

Tree = Any


def _get(c):
    return c() if callable(c) else c


def uniform_soup(ingredients: Sequence[Tree | Callable[[], Tree]], weights: Sequence[float] | None = None) -> Tree:
    """Weighted (default uniform) mean of the ingredients, holding two at a time."""
    return averaging.stream_average((_get(c) for c in ingredients), weights)


def greedy_soup(ingredients: Sequence[Tree | Callable[[], Tree]], score_fn: Callable[[Tree], float], *,
                scores: Sequence[float] | None = None) -> tuple[Tree, dict]:
    """Greedy soup. ``score_fn(tree) -> float`` is the held-out metric (higher is better,
    e.g. validation accuracy). ``scores``: the ingredients' own scores if already known.

    Returns ``(soup, info)`` with ``info = {'order': indices by score, 'chosen': indices in the
    soup, 'scores': per ingredient, 'soup_score': final, 'trials': [(index, score, added)]}``.
    Ties are accepted (``>=``), as in the paper's recipe.
    """
    if not ingredients:
        raise ValueError("greedy_soup needs at least one ingredient")
    scores = [float(score_fn(_get(c))) for c in ingredients] if scores is None else [float(s) for s in scores]
    order = sorted(range(len(ingredients)), key=lambda i: -scores[i])
    state = averaging.stream_init(_get(ingredients[order[0]]))
    best = scores[order[0]]
    chosen, trials = [order[0]], []
    for i in order[1:]:
        trial = averaging.stream_add(state, _get(ingredients[i]))
        s = float(score_fn(trial.mean))
        added = s >= best
        trials.append((i, s, added))
        if added:
            state, best = trial, s
            chosen.append(i)
    return state.mean, {"order": order, "chosen": chosen, "scores": scores, "soup_score": best, "trials": trials}


def compare(ingredients: Sequence[Tree | Callable[[], Tree]], val_fn: Callable[[Tree], float], test_fn: Callable[[Tree], float],
            *, val_scores: Sequence[float] | None = None, test_scores: Sequence[float] | None = None) -> dict:
    """The comparison of Wortsman et al. 2022 (Table 1): the best single ingredient by its
    held-out score, the uniform soup and the greedy soup, each scored by ``val_fn`` (held-out)
    and ``test_fn``. ``val_scores``/``test_scores``: the ingredients' own scores if known.

    Returns ``{'val', 'test'}`` (per ingredient) and ``{best_single, uniform, greedy}_{val, test}``
    floats, ``best_single`` (index) and ``greedy_chosen`` (indices in the greedy soup).
    """
    val = [float(val_fn(_get(c))) for c in ingredients] if val_scores is None else [float(s) for s in val_scores]
    test = [float(test_fn(_get(c))) for c in ingredients] if test_scores is None else [float(s) for s in test_scores]
    best = max(range(len(val)), key=lambda i: val[i])
    uniform = uniform_soup(ingredients)
    greedy, info = greedy_soup(ingredients, val_fn, scores=val)
    return {"val": val, "test": test, "best_single": best, "best_single_val": val[best], "best_single_test": test[best],
            "uniform_val": float(val_fn(uniform)), "uniform_test": float(test_fn(uniform)),
            "greedy_val": info["soup_score"], "greedy_test": float(test_fn(greedy)), "greedy_chosen": info["chosen"]}
