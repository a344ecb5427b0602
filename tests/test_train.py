"""Training: golden steps against float64 numpy, masking, evaluation, NaN detection, schedules, digits accuracy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.core.models import make_model
from mergejax.core.optim import make_schedule, step_decay
from mergejax.core.loop import evaluate, fit, read_metrics
from mergejax.core.optim import make_optimizer
from mergejax.core.train import TrainState, create_state, cross_entropy, model_apply_fn, train_step

# ---------------------------------------------------------------- golden steps (float64 numpy reference)


def _np_mlp_grads(p, x, y, mask):
    """Loss, accuracy and gradients of Dense-ReLU-Dense with masked mean cross-entropy (float64)."""
    w1, b1, w2, b2 = p["w1"], p["b1"], p["w2"], p["b2"]
    x = x.reshape(len(x), -1)
    a = x @ w1 + b1
    h = np.maximum(a, 0.0)
    z = h @ w2 + b2
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    weights = mask / mask.sum()
    loss = -(weights * logp[np.arange(len(y)), y]).sum()
    acc = (weights * (logp.argmax(1) == y)).sum()
    dz = np.exp(logp)
    dz[np.arange(len(y)), y] -= 1.0
    dz *= weights[:, None]
    dh = (dz @ w2.T) * (a > 0)
    grads = {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ dz, "b2": dz.sum(0)}
    return loss, acc, grads


def _to_np(params):
    return {
        "w1": np.asarray(params["dense0"]["dense"]["kernel"], np.float64),
        "b1": np.asarray(params["dense0"]["dense"]["bias"], np.float64),
        "w2": np.asarray(params["head"]["dense"]["kernel"], np.float64),
        "b2": np.asarray(params["head"]["dense"]["bias"], np.float64),
    }


def test_golden_two_steps_sgd_momentum_weight_decay_float64():
    """Two jitted ``train_step`` calls on an MLP in float64 == hand-written numpy forward/backward with
    PyTorch-style SGD (coupled L2, then heavy-ball momentum) and a cosine learning rate."""
    lr0, mu, wd, total = 0.3, 0.9, 0.01, 10
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        mask = np.ones(6)
        mask[-1] = 0.0  # one padded example: must not contribute to loss or gradient
        batches.append({"image": rng.normal(size=(6, 3, 2, 1)), "label": rng.integers(0, 4, 6).astype(np.int32), "mask": mask})
    with jax.enable_x64(True):
        model = make_model("mlp", 4, hidden=(5,))
        state = create_state(model, jax.random.key(0), (1, 3, 2, 1), optax_identity())
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state.params)
        lr_fn = make_schedule("cosine", lr0, total)
        tx = make_optimizer("sgd", lr_fn, momentum=mu, weight_decay=wd)
        state = TrainState.create(apply_fn=model_apply_fn(model), params=params, batch_stats={}, tx=tx, lr_fn=lr_fn)
        step = jax.jit(train_step)
        p = _to_np(state.params)
        trace = {k: np.zeros_like(v) for k, v in p.items()}
        for t, batch in enumerate(batches):
            batch64 = jax.tree.map(jnp.asarray, batch)
            state, metrics = step(state, batch64, jax.random.key(t))
            loss, acc, g = _np_mlp_grads(p, batch["image"], batch["label"], batch["mask"])
            lr = lr0 * 0.5 * (1 + math.cos(math.pi * t / total))
            for k in p:
                trace[k] = g[k] + wd * p[k] + mu * trace[k]
                p[k] = p[k] - lr * trace[k]
            got = _to_np(state.params)
            assert state.params["head"]["dense"]["kernel"].dtype == jnp.float64
            for k in p:
                np.testing.assert_allclose(got[k], p[k], rtol=1e-12, atol=1e-14, err_msg=f"step {t + 1}: {k}")
            np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-12)
            np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-12)
            np.testing.assert_allclose(float(metrics["grad_norm"]), math.sqrt(sum((v**2).sum() for v in g.values())), rtol=1e-12)
            np.testing.assert_allclose(float(metrics["param_norm"]), math.sqrt(sum((v**2).sum() for v in p.values())), rtol=1e-12)
            np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-12)
            assert int(state.step) == t + 1


def optax_identity():
    import optax

    return optax.identity()


def test_masked_batch_equals_unpadded_batch(digits):
    """Padding rows (mask 0, arbitrary content) change nothing: same update as the real rows alone."""
    train, _ = digits
    model = make_model("mlp", 10, hidden=(16,))
    state = create_state(model, jax.random.key(0), (1, 8, 8, 1), make_optimizer("sgd", 0.1, weight_decay=1e-3))
    real = {"image": train.images[:5], "label": train.labels[:5]}
    garbage = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32) * 100
    padded = {
        "image": np.concatenate([real["image"], garbage]),
        "label": np.concatenate([real["label"], np.array([1, 2, 3], np.int32)]),
        "mask": np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32),
    }
    step = jax.jit(train_step)
    a, ma = step(state, real, jax.random.key(0))
    b, mb = step(state, padded, jax.random.key(0))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["accuracy"]), float(mb["accuracy"]), rtol=1e-6)


def test_cross_entropy_against_numpy():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(7, 5)), rng.integers(0, 5, 7)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], np.float64)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    nll = -logp[np.arange(7), labels]
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), labels), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), labels, jnp.asarray(mask)), nll[mask == 1].mean(), rtol=1e-5)
    assert float(cross_entropy(jnp.asarray(logits), labels, jnp.zeros(7))) == 0.0  # all padding: no NaN


def test_evaluate_counts_every_example_once(digits):
    _, test = digits
    model = make_model("mlp", 10, hidden=(8,))
    state = create_state(model, jax.random.key(3), (1, 8, 8, 1), make_optimizer("sgd", 0.1))
    logits = np.asarray(model.apply({"params": state.params}, test.images), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    expected_loss = -logp[np.arange(len(test)), test.labels].mean()
    expected_acc = (logits.argmax(1) == test.labels).mean()
    for bs in (360, 100, 7):  # divides, does not divide, tiny
        res = evaluate(state, test, batch_size=bs)
        np.testing.assert_allclose(res["loss"], expected_loss, rtol=1e-5)
        np.testing.assert_allclose(res["accuracy"], expected_acc, rtol=1e-6)


def test_make_optimizer_variants_and_errors():
    import optax

    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    # adamw: decoupled decay, first step = -lr * (sign(g) + wd * p) for adam's bias-corrected first step
    tx = make_optimizer("adamw", 0.1, weight_decay=0.01)
    up, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(up["w"], -0.1 * (np.sign([0.5, 0.5]) * (0.5 / (0.5 + 1e-8)) + 0.01 * np.array([1.0, -2.0])), rtol=1e-5)
    # global-norm clipping happens first: grad (3, 4) clipped to norm 1 -> (0.6, 0.8); plain SGD step
    tx = make_optimizer("sgd", 1.0, momentum=0.0, grad_clip=1.0)
    up, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    np.testing.assert_allclose(up["w"], [-0.6, -0.8], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; available: sgd, adam, adamw"):
        make_optimizer("rmsprop", 0.1)
    assert isinstance(make_optimizer("adam", 0.1, weight_decay=1e-4), optax.GradientTransformation)


# ---------------------------------------------------------------- NaN detection


def test_nan_raises_floating_point_error_naming_the_step(digits):
    train, _ = digits
    model = make_model("mlp", 10, hidden=(8,))
    state = create_state(model, jax.random.key(0), (1, 8, 8, 1), make_optimizer("sgd", 0.05))
    jitted = jax.jit(train_step)

    def poisoned_step(state, batch, rng):
        state, metrics = jitted(state, batch, rng)
        if int(state.step) == 6:  # parameters go bad after step 6: step 7's loss is NaN
            params = jax.tree.map(lambda x: x, state.params)
            params["head"]["dense"]["bias"] = params["head"]["dense"]["bias"].at[0].set(jnp.nan)
            state = state.replace(params=params)
        return state, metrics

    seen = []
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 7 \(detected at step 10\)") as e:
        fit(state, train, num_steps=20, batch_size=32, log_every=5, step_fn=poisoned_step,
            callbacks=[lambda s, st: seen.append(s)], progress=False)
    assert "first bad parameter: ['" in str(e.value)
    assert seen[-1] == 10  # stopped at the first logging point after the NaN


# ---------------------------------------------------------------- schedules vs closed forms


def test_schedules_closed_forms():
    lr, total = 0.2, 40
    t = np.arange(0, total + 1)
    const = make_schedule("constant", lr, total)
    np.testing.assert_allclose([float(const(i)) for i in t], lr, rtol=1e-7)
    cos = make_schedule("cosine", lr, total)
    np.testing.assert_allclose([float(cos(i)) for i in t], lr * 0.5 * (1 + np.cos(np.pi * t / total)), rtol=1e-5, atol=1e-7)
    w = 8
    warm = make_schedule("cosine", lr, total, warmup_steps=w)
    expected = np.where(t < w, lr * t / w, lr * 0.5 * (1 + np.cos(np.pi * (t - w) / (total - w))))
    np.testing.assert_allclose([float(warm(i)) for i in t], expected, rtol=1e-5, atol=1e-7)
    step = make_schedule("step", lr, total)  # x0.1 at 50% and 75% of training
    expected = lr * 0.1 ** ((t >= 20).astype(int) + (t >= 30).astype(int))
    np.testing.assert_allclose([float(step(i)) for i in t], expected, rtol=1e-5)
    custom = step_decay(1.0, 100, boundaries=(0.3,), factor=0.5)
    assert [float(custom(i)) for i in (0, 29, 30, 99)] == [1.0, 1.0, 0.5, 0.5]


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule 'linear'; available: constant, cosine, step"):
        make_schedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="total_steps must be positive"):
        make_schedule("cosine", 0.1, 0)
    with pytest.raises(ValueError, match=r"fractions of training in \(0, 1\)"):
        step_decay(0.1, 10, boundaries=(0.5, 1.5))


# ---------------------------------------------------------------- end to end on digits


def test_small_cnn_reaches_95_percent_on_digits(digits, tmp_path):
    train, test = digits
    steps = 200
    lr_fn = make_schedule("cosine", 0.1, steps)
    tx = make_optimizer("sgd", lr_fn, momentum=0.9, weight_decay=5e-4)
    state = create_state(make_model("cnn", 10), jax.random.key(0), (1, 8, 8, 1), tx, lr_fn=lr_fn)
    state, history = fit(state, train, num_steps=steps, batch_size=64, seed=0, eval_split=test, eval_every=steps,
                         log_every=50, workdir=str(tmp_path), progress=False)
    final = evaluate(state, test)
    assert final["accuracy"] >= 0.95, final
    # the log: train records every 50 steps with the schedule's lr, one test record at the end
    records = read_metrics(str(tmp_path))
    assert records == history
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [50, 100, 150, 200]
    lrs = [r["lr"] for r in records if r["split"] == "train"]
    np.testing.assert_allclose(lrs, [np.mean([float(lr_fn(i)) for i in range(s - 50, s)]) for s in train_steps], rtol=1e-5)
    assert [r for r in records if r["split"] == "test"] == [{"step": steps, "split": "test", **final}]
    assert records[-2]["loss"] < records[0]["loss"]


def test_prefetch_to_device_keeps_order_and_raises_producer_errors():
    from mergejax.core.loop import prefetch_to_device

    items = [{"x": np.full(3, i, np.float32)} for i in range(7)]
    out = list(prefetch_to_device(iter(items), size=2))
    assert [int(o["x"][0]) for o in out] == list(range(7)) and isinstance(out[0]["x"], jax.Array)

    def broken():
        yield {"x": np.zeros(2)}
        raise RuntimeError("disk gone")

    stream = prefetch_to_device(broken())
    next(stream)
    with pytest.raises(RuntimeError, match="disk gone"):
        next(stream)
