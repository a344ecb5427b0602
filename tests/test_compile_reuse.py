"""Compile once, reuse everywhere: jitted init, shared apply_fn / eval step, jitted step rng,
and the persistent compilation cache switch of the entry points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax import train as train_lib
from mergejax.models import init_variables, make_model
from mergejax.models.core import _init


def _leaves_equal(a, b, **tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.mark.parametrize("name,kw,shape", [("cnn", {"width": 0.25}, (1, 8, 8, 1)), ("mlp", {"hidden": (16, 8)}, (1, 64))])
def test_jitted_init_matches_eager_linen_init(name, kw, shape):
    model = make_model(name, 10, **kw)
    rng = jax.random.key(7)
    params, stats = init_variables(model, rng, shape)
    ref = model.init(rng, jnp.zeros(shape), train=False)  # eager Linen, the reference
    _leaves_equal(params, ref["params"], rtol=1e-6, atol=1e-7)
    _leaves_equal(stats, ref.get("batch_stats", {}), rtol=0, atol=0)
    # a different seed gives different parameters through the same compiled init
    other, _ = init_variables(model, jax.random.key(8), shape)
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(other)))


def test_init_with_unhashable_model_field_falls_back_to_eager():
    model = make_model("mlp", 10, hidden=[16, 8])  # a list, as `--set model_kwargs.hidden=[16,8]` gives
    with pytest.raises(TypeError):
        hash(model)
    params, _ = init_variables(model, jax.random.key(0), (1, 64))
    ref = _init(make_model("mlp", 10, hidden=(16, 8)), jax.random.key(0), jnp.zeros((1, 64)))
    _leaves_equal(params, ref["params"], rtol=1e-6, atol=1e-7)


def test_apply_fn_is_shared_by_equal_models_and_fresh_for_unhashable():
    a, b = make_model("cnn", 10, width=0.25), make_model("cnn", 10, width=0.25)
    assert train_lib.model_apply_fn(a) is train_lib.model_apply_fn(b)
    assert train_lib.model_apply_fn(a) is not train_lib.model_apply_fn(make_model("cnn", 10, width=0.5))
    lst = make_model("mlp", 10, hidden=[4])
    f, g = train_lib.model_apply_fn(lst), train_lib.model_apply_fn(lst)
    assert f is not g  # no cache, but both work
    params, stats = init_variables(lst, jax.random.key(0), (2, 64))
    x = jnp.ones((2, 64))
    np.testing.assert_array_equal(f(params, stats, x, train=False)[0], g(params, stats, x, train=False)[0])


def test_evaluate_compiles_once_across_optimizers(digits):
    train, test = digits
    model = make_model("mlp", 10, hidden=(8,))
    states = [train_lib.create_state(model, jax.random.key(i), (1, 64), tx)
              for i, tx in enumerate([optax.sgd(0.1), optax.adam(1e-3), optax.sgd(0.3, momentum=0.9)])]
    before = train_lib._jitted_model_eval_sums._cache_size()
    results = [train_lib.evaluate(s, test, 500) for s in states]
    # one compile for the (apply_fn, shapes) pair, however many optimizers
    assert train_lib._jitted_model_eval_sums._cache_size() - before == 1
    # and the numbers equal an independent numpy evaluation
    for s, r in zip(states, results):
        logits, _ = s.apply_fn(s.params, s.batch_stats, jnp.asarray(test.images), train=False)
        logits = np.asarray(logits, np.float64)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        assert r["loss"] == pytest.approx(-logp[np.arange(len(test)), test.labels].mean(), rel=1e-5)
        assert r["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == test.labels))


def test_step_rng_equals_eager_fold_in():
    key = jax.random.key(3)
    for step in (0, 1, 12345, 2**31 - 1):
        np.testing.assert_array_equal(jax.random.key_data(train_lib.step_rng(key, step)),
                                      jax.random.key_data(jax.random.fold_in(key, step)))


def test_enable_compilation_cache(run_python, tmp_path):
    code = """
        import os, jax
        from mergejax.run import enable_compilation_cache, compilation_cache_dir
        assert enable_compilation_cache("off") is None and compilation_cache_dir() is None
        path = enable_compilation_cache()  # from the environment
        assert path == os.environ["MERGEJAX_COMPILATION_CACHE"] and compilation_cache_dir() == path
        jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
        assert len(os.listdir(path)) >= 1, os.listdir(path)
        print("ok")
    """
    proc = run_python(code, env={"MERGEJAX_COMPILATION_CACHE": str(tmp_path / "xla")})
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("n", [0, 5, 16, 70])
def test_fetch_metrics_equals_plain_device_get(n):
    pending = [{"loss": jnp.float32(i) / 3, "acc": jnp.float32(-i), "vec": jnp.arange(3.0) * i} for i in range(n)]
    got = train_lib.fetch_metrics(pending)
    ref = jax.device_get(pending)
    assert len(got) == len(ref) == n
    for g, r in zip(got, ref):
        assert set(g) == set(r)
        for k in r:
            np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(r[k]))
            assert np.asarray(g[k]).dtype == np.asarray(r[k]).dtype
