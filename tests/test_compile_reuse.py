"""Compile once, reuse everywhere, with no import-time state: jitted init, value-equal apply_fn,
optimizers and schedules (equal configs share one compiled step however the objects were
made), the persistent compilation cache switch of the entry points, and a scan of the
library for module-level jit/cache globals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax.core import loop, optim
from mergejax.core import train as train_lib
from mergejax.core.models import MLP, init_variables, make_model


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
    assert hash(make_model("mlp", 10, hidden=[16, 8])) == hash(make_model("mlp", 10, hidden=(16, 8)))  # lists -> tuples
    model = MLP(10, hidden=[16, 8])  # a list field built by hand: unhashable
    with pytest.raises(TypeError):
        hash(model)
    params, _ = init_variables(model, jax.random.key(0), (1, 64))
    ref = make_model("mlp", 10, hidden=(16, 8)).init(jax.random.key(0), jnp.zeros((1, 64)), train=False)
    _leaves_equal(params, ref["params"], rtol=1e-6, atol=1e-7)


def test_apply_fn_is_equal_for_equal_models_and_fresh_for_unhashable():
    a, b = make_model("cnn", 10, width=0.25), make_model("cnn", 10, width=0.25)
    fa, fb = train_lib.model_apply_fn(a), train_lib.model_apply_fn(b)
    assert fa is not fb and fa == fb and hash(fa) == hash(fb)  # equal by value, no cache
    assert fa != train_lib.model_apply_fn(make_model("cnn", 10, width=0.5))
    lst = MLP(10, hidden=[4])
    f, g = train_lib.model_apply_fn(lst), train_lib.model_apply_fn(lst)
    assert f is not g  # no cache, but both work
    params, stats = init_variables(lst, jax.random.key(0), (2, 64))
    x = jnp.ones((2, 64))
    np.testing.assert_array_equal(f(params, stats, x, train=False)[0], g(params, stats, x, train=False)[0])


class _CountTraces:
    """Counts how often ``apply_model`` is traced (each new compile of a step traces it once)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = train_lib.apply_model

        def counting(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(train_lib, "apply_model", counting)


def test_evaluate_compiles_once_across_optimizers(digits, monkeypatch):
    train, test = digits
    model = make_model("mlp", 10, hidden=(8,))
    states = [train_lib.create_state(model, jax.random.key(i), (1, 64), tx)
              for i, tx in enumerate([optax.sgd(0.1), optax.adam(1e-3), optax.sgd(0.3, momentum=0.9)])]
    traces = _CountTraces(monkeypatch)
    results = [loop.evaluate(s, test, 500) for s in states]
    # one trace for the (apply_fn, shapes) pair, however many optimizers
    assert traces.n == 1
    # and the numbers equal an independent numpy evaluation
    for s, r in zip(states, results):
        logits, _ = s.apply_fn(s.params, s.batch_stats, jnp.asarray(test.images), train=False)
        logits = np.asarray(logits, np.float64)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        assert r["loss"] == pytest.approx(-logp[np.arange(len(test)), test.labels].mean(), rel=1e-5)
        assert r["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == test.labels))


def _fresh_state(seed, lr=0.1):
    """A state built from scratch (new model, schedule and optimizer objects) for ``seed``."""
    model = make_model("mlp", 10, hidden=(8,))
    lr_fn = optim.make_schedule("cosine", lr, 30)
    tx = optim.make_optimizer("sgd", lr_fn, momentum=0.9, weight_decay=5e-4)
    return train_lib.create_state(model, jax.random.key(seed), (1, 64), tx, lr_fn=lr_fn, augment_fn=None)


def test_fit_reuses_the_compiled_step_for_fresh_but_equal_objects(digits, monkeypatch):
    """Seeds of a sweep build new optimizer/schedule/model objects; equal values must not
    recompile (no object kept alive by anyone), a different learning rate must."""
    train, test = digits
    traces = _CountTraces(monkeypatch)
    finals = [loop.fit(_fresh_state(seed), train, num_steps=6, batch_size=32, seed=seed, log_every=3, progress=False)[0]
              for seed in (0, 1, 2)]
    assert traces.n == 1  # one train-step trace for three fits (no eval split)
    loop.fit(_fresh_state(0, lr=0.2), train, num_steps=6, batch_size=32, log_every=3, progress=False)
    assert traces.n == 2  # a new learning rate is a new static value: one more trace
    assert not np.allclose(finals[0].params["head"]["dense"]["kernel"], finals[1].params["head"]["dense"]["kernel"])


def test_value_equal_factories_compare_by_arguments():
    a = optim.make_optimizer("sgd", optim.make_schedule("cosine", 0.1, 100), momentum=0.9)
    b = optim.make_optimizer("sgd", optim.make_schedule("cosine", 0.1, 100), momentum=0.9)
    c = optim.make_optimizer("sgd", optim.make_schedule("cosine", 0.1, 101), momentum=0.9)
    assert a is not b and a == b and hash(a) == hash(b) and a != c
    assert isinstance(a, optax.GradientTransformation)
    init, update = a  # still the (init, update) pair optax combinators unpack
    params = {"w": jnp.ones(3)}
    # the value-equal transform computes exactly what the plain optax chain computes
    ref = optax.chain(optax.sgd(optax.cosine_decay_schedule(0.1, 100), momentum=0.9))
    u1, _ = update({"w": jnp.full(3, 0.5)}, init(params), params)
    u2, _ = ref.update({"w": jnp.full(3, 0.5)}, ref.init(params), params)
    np.testing.assert_array_equal(u1["w"], u2["w"])
    s1, s2 = optim.snapshot_cosine(0.2, 50, 5), optim.snapshot_cosine(0.2, 50, 5)
    assert s1 == s2 and s1 != optim.snapshot_cosine(0.2, 50, 2)
    np.testing.assert_allclose(float(s1(7)), float(optim.snapshot_cosine(0.2, 50, 5)(7)))
    # a scalar array argument is its value; a plain closure is itself (identity): correct, not shared
    assert optim.make_optimizer("sgd", jnp.asarray(0.5)) == optim.make_optimizer("sgd", 0.5)
    assert optim.make_optimizer("sgd", lambda c: 0.1) != optim.make_optimizer("sgd", lambda c: 0.1)
    unhashable = optim.make_optimizer("sgd", 0.1, momentum=jnp.asarray([0.9]))  # not hashable: plain chain
    assert type(unhashable) is not type(a) and unhashable != optim.make_optimizer("sgd", 0.1, momentum=jnp.asarray([0.9]))


def test_no_import_time_jit_or_cache_in_the_library():
    """Module-level ``jax.jit(...)``, ``@jax.jit`` or ``lru_cache``/``cache`` anywhere in mergejax/."""
    import ast
    import pathlib

    import mergejax

    bad = []
    for path in pathlib.Path(mergejax.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            decorators = getattr(node, "decorator_list", [])
            values = [node.value] if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None else []
            for expr in [*decorators, *values]:
                src = ast.unparse(expr)
                if any(k in src for k in ("jax.jit", "lru_cache", "functools.cache", "jax.pmap")):
                    bad.append(f"{path.name}:{node.lineno}: {src[:60]}")
    assert not bad, bad


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
    got = loop.fetch_metrics(pending)
    ref = jax.device_get(pending)
    assert len(got) == len(ref) == n
    for g, r in zip(got, ref):
        assert set(g) == set(r)
        for k in r:
            np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(r[k]))
            assert np.asarray(g[k]).dtype == np.asarray(r[k]).dtype
