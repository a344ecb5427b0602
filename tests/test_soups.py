"""Uniform and greedy soups on a hand-worked problem."""

import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.averaging import soups


def test_greedy_soup_hand_example():
    # Score: -(x - 1)^2. Ingredients 0.9 (best), 1.3, -2.0, 1.1.
    xs = [{"w": jnp.array(v)} for v in (1.3, 0.9, -2.0, 1.1)]
    score = lambda t: -float((t["w"] - 1.0) ** 2)  # noqa: E731
    soup, info = soups.greedy_soup(xs, score)
    # Order by own score: 0.9 (-0.01), 1.1 (-0.01, tie keeps list order), 1.3 (-0.09), -2.0.
    assert info["order"] == [1, 3, 0, 2]
    # 0.9 -> +1.1: mean 1.0 (score 0, added) -> +1.3: mean 1.1 (-0.01, dropped) -> +(-2): 0.0 (dropped).
    assert info["chosen"] == [1, 3]
    np.testing.assert_allclose(float(soup["w"]), 1.0, rtol=1e-6)
    assert [t[2] for t in info["trials"]] == [True, False, False]
    np.testing.assert_allclose(info["trials"][1][1], -(1.1 - 1.0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(float(soups.uniform_soup(xs)["w"]), np.mean([1.3, 0.9, -2.0, 1.1]), rtol=1e-6)


def test_soup_ingredients_can_be_loaders():
    loaded = []

    def loader(v):
        def f():
            loaded.append(v)
            return {"w": jnp.array([v, 2 * v])}
        return f

    soup = soups.uniform_soup([loader(1.0), loader(2.0), loader(6.0)], weights=[1, 1, 2])
    np.testing.assert_allclose(soup["w"], [3.75, 7.5], rtol=1e-6)
    assert loaded == [1.0, 2.0, 6.0]
    with pytest.raises(ValueError):
        soups.greedy_soup([], lambda t: 0.0)


def test_compare_best_single_uniform_greedy():
    xs = [{"w": jnp.array(v)} for v in (1.3, 0.9, -2.0, 1.1)]
    val = lambda t: -float((t["w"] - 1.0) ** 2)  # noqa: E731
    test = lambda t: -float((t["w"] - 1.2) ** 2)  # noqa: E731
    r = soups.compare(xs, val, test)
    assert r["best_single"] == 1  # 0.9 and 1.1 tie on val; the first wins
    np.testing.assert_allclose(r["best_single_test"], -(0.9 - 1.2) ** 2, rtol=1e-6)
    np.testing.assert_allclose(r["uniform_val"], -(0.325 - 1.0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(r["uniform_test"], -(0.325 - 1.2) ** 2, rtol=1e-5)
    assert r["greedy_chosen"] == [1, 3]
    np.testing.assert_allclose([r["greedy_val"], r["greedy_test"]], [0.0, -0.04], atol=1e-6)
    # Known scores are used as given (no re-scoring of the ingredients).
    r2 = soups.compare(xs, val, test, val_scores=[0.0, -1.0, -1.0, -1.0], test_scores=[5.0, 6.0, 7.0, 8.0])
    assert r2["best_single"] == 0 and r2["best_single_test"] == 5.0 and r2["test"] == [5.0, 6.0, 7.0, 8.0]
