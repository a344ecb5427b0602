"""Weight averaging against float64 numpy references and closed forms."""

import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax.averaging import weights as avg


def _tree(seed, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return {
        "params": {"dense": {"kernel": jnp.asarray(r.normal(size=(3, 4)), dtype), "bias": jnp.asarray(r.normal(size=(4,)), dtype)}},
        "batch_stats": {"bn": {"mean": jnp.asarray(r.normal(size=(4,)), dtype)}},
    }


def _np_mean(trees, w):
    w = np.asarray(w, np.float64) / np.sum(w)
    return jax.tree.map(lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs)), *trees)


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5, 4.0]])
def test_average_matches_float64_numpy(weights):
    trees = [_tree(i) for i in range(4)]
    ref = _np_mean(trees, weights or [1, 1, 1, 1])
    out = avg.average(trees, weights)
    _close(out, ref, 1e-6)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    # Streaming gives the same mean holding two trees at a time.
    _close(avg.stream_average(iter(trees), weights), ref, 1e-6)


def test_average_in_float64_is_exact():
    jax.config.update("jax_enable_x64", True)
    try:
        trees = [_tree(i, jnp.float64) for i in range(5)]
        w = [3.0, 1.0, 1.0, 2.0, 0.25]
        _close(avg.average(trees, w), _np_mean(trees, w), 1e-14)
        _close(avg.stream_average(trees, w), _np_mean(trees, w), 1e-14)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_stream_holds_at_most_two_trees():
    """When tree i is produced, at most two earlier input trees are still alive (the loop's
    current one and, transiently, the first, which seeds the mean); a hoarding implementation
    would keep all i."""
    refs, alive_counts = [], []

    def gen():
        for i in range(8):
            alive_counts.append(sum(r() is not None for r in refs))
            t = jax.tree.map(np.asarray, _tree(i))
            refs.append(weakref.ref(t["params"]["dense"]["kernel"]))
            yield t

    out = avg.stream_average(gen())
    assert max(alive_counts) <= 2 and alive_counts[-1] <= 1, alive_counts
    _close(out, _np_mean([_tree(i) for i in range(8)], [1] * 8), 1e-6)


def test_hand_example():
    a = {"w": jnp.array([-1.0, -1.0])}
    b = {"w": jnp.array([-1.0, 1.0])}
    np.testing.assert_array_equal(avg.average([a, b])["w"], [-1.0, 0.0])
    np.testing.assert_array_equal(avg.interpolate(a, b, 0.5)["w"], [-1.0, 0.0])
    np.testing.assert_array_equal(avg.interpolate(a, b, 0.0)["w"], a["w"])
    np.testing.assert_array_equal(avg.average([a, b], [3, 1])["w"], [-1.0, -0.5])


def test_integer_leaves_pass_through():
    a = {"step": jnp.array(7, jnp.int32), "w": jnp.ones(2)}
    b = {"step": jnp.array(7, jnp.int32), "w": jnp.zeros(2)}
    out = avg.average([a, b])
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7


def test_mismatches_name_first_leaf():
    a = _tree(0)
    b = _tree(1)
    b["params"]["dense"]["bias"] = jnp.zeros((5,))
    with pytest.raises(ValueError, match=r"\['params'\]\['dense'\]\['bias'\] of shape \(5,\)"):
        avg.average([a, b])
    c = _tree(1)
    c["batch_stats"]["bn"]["mean"] = c["batch_stats"]["bn"]["mean"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"\['batch_stats'\]\['bn'\]\['mean'\] of dtype bfloat16"):
        avg.stream_add(avg.stream_init(a), c)
    d = _tree(1)
    d["params"]["extra"] = {"kernel": jnp.zeros(1)}
    with pytest.raises(ValueError, match="extra"):
        avg.average([a, d])
    with pytest.raises(ValueError, match="2 weights for 3"):
        avg.average([a, a, a], [1, 2])


def test_ema_transform_matches_closed_form():
    """Params follow a known path; the EMA must equal the float64 recursion."""
    decay = 0.8
    p = {"w": jnp.zeros(3)}
    tx = optax.chain(optax.sgd(1.0), avg.ema(decay))
    state = tx.init(p)
    grads = [jnp.array([1.0, -2.0, 0.5]) * (i + 1) for i in range(5)]
    ref_p = np.zeros(3)
    ref_e = np.zeros(3)
    for g in grads:
        u, state = tx.update({"w": g}, state, p)
        p = optax.apply_updates(p, u)
        ref_p = ref_p - np.asarray(g, np.float64)
        ref_e = decay * ref_e + (1 - decay) * ref_p
    np.testing.assert_allclose(p["w"], ref_p, rtol=1e-6)
    np.testing.assert_allclose(avg.ema_params(state)["w"], ref_e, rtol=1e-6)
    deb = avg.ema_params(tx.init({"w": jnp.zeros(3)}) , 0.8, debias=False)
    np.testing.assert_array_equal(deb["w"], 0.0)


def test_ema_debias():
    decay = 0.9
    tx = avg.ema(decay, debias=True)
    p = {"w": jnp.full((2,), 5.0)}
    s = tx.init(p)
    for _ in range(3):  # params constant: a debiased EMA of a constant is the constant
        _, s = tx.update({"w": jnp.zeros(2)}, s, p)
    np.testing.assert_allclose(avg.ema_params(s, decay, debias=True)["w"], 5.0, rtol=1e-6)
    assert float(avg.ema_params(s)["w"][0]) < 5.0 * (1 - decay**3) + 1e-5
