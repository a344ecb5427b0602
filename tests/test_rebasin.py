"""Weight matching recovers a hidden permutation exactly and improves the average."""

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from mergejax.core.models import apply_model, init_variables, make_model
from mergejax.averaging.rebasin import align, matching_cost, weight_matching
from mergejax.core import trees
from mergejax.core.units import take_units, unit_spec, variables_of

from conftest import params_slow

CASES = [
    ("mlp", dict(hidden=(32, 24)), (2, 8, 8, 1)),
    ("cnn", dict(channels=(8, 12, 16)), (2, 8, 8, 1)),
    ("resnet20", dict(width=0.5), (2, 16, 16, 3)),
    ("vgg11", dict(width=0.125), (2, 32, 32, 3)),
]


def _vars(name, kw, shape, seed):
    model = make_model(name, 10, **kw)
    p, s = jax.jit(lambda k: init_variables(model, k, shape))(jax.random.key(seed))
    s = jax.tree.map(lambda x: x + jax.random.uniform(jax.random.key(seed + 100), x.shape), s)
    return model, variables_of(p, s)


@pytest.mark.parametrize("name,kw,shape", params_slow(CASES, [c[0] for c in CASES], {"cnn", "vgg11"}))
def test_permuted_copy_is_matched_back_exactly(name, kw, shape):
    model, va = _vars(name, kw, shape, 0)
    spec = unit_spec(model, va)
    rng = np.random.default_rng(1)
    hidden = {g: rng.permutation(n) for g, n in spec.groups.items()}
    vb = take_units(va, spec, hidden)
    aligned = align(spec, va, vb, rng=np.random.default_rng(2))
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(aligned)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The function is unchanged by the alignment.
    x = jax.random.normal(jax.random.key(3), shape)
    la, _ = apply_model(model, vb["params"], vb["batch_stats"], x, train=False)
    lb, _ = apply_model(model, aligned["params"], aligned["batch_stats"], x, train=False)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)


def test_cost_matches_bruteforce_for_single_layer():
    """Tiny MLP, one hidden group: the cost is W1a^T W1b + b1a b1b^T + W2a W2b^T (float64)."""
    model, va = _vars("mlp", dict(hidden=(5,)), (1, 2, 2, 1), 0)
    _, vb = _vars("mlp", dict(hidden=(5,)), (1, 2, 2, 1), 1)
    spec = unit_spec(model, va)
    fa, fb = trees.flatten_paths(va), trees.flatten_paths(vb)
    pa, pb = va["params"], vb["params"]
    ref = (np.asarray(pa["dense0"]["dense"]["kernel"], np.float64).T @ np.asarray(pb["dense0"]["dense"]["kernel"], np.float64)
           + np.outer(pa["dense0"]["dense"]["bias"], pb["dense0"]["dense"]["bias"])
           + np.asarray(pa["head"]["dense"]["kernel"], np.float64) @ np.asarray(pb["head"]["dense"]["kernel"], np.float64).T)
    cost = matching_cost(spec, fa, fb, "dense0", {"dense0": np.arange(5)})
    np.testing.assert_allclose(cost, ref, rtol=1e-10)
    # One group: weight matching is a single exact assignment.
    perm = weight_matching(spec, va, vb)
    _, cols = linear_sum_assignment(ref, maximize=True)
    np.testing.assert_array_equal(perm["dense0"], cols)


def test_matching_increases_similarity_of_independent_nets():
    model, va = _vars("mlp", dict(hidden=(64,)), (1, 8, 8, 1), 0)
    _, vb = _vars("mlp", dict(hidden=(64,)), (1, 8, 8, 1), 1)
    spec = unit_spec(model, va)
    aligned = align(spec, va, vb)
    dist = lambda u, v: sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(jax.tree.leaves(u["params"]), jax.tree.leaves(v["params"])))  # noqa: E731
    assert dist(va, aligned) < 0.9 * dist(va, vb)


def test_mismatched_shapes_name_leaf():
    model, va = _vars("mlp", dict(hidden=(8,)), (1, 8, 8, 1), 0)
    _, vb = _vars("mlp", dict(hidden=(9,)), (1, 8, 8, 1), 1)
    with pytest.raises(ValueError, match="dense0/dense/bias"):
        weight_matching(unit_spec(model, va), va, vb)
