"""Mixed precision: ``dtype=bfloat16`` models compute in bf16 and keep float32 parameters, BatchNorm
statistics, logits and loss; ``precision='bf16'`` training matches fp32 training on digits.

References: the same model in float32 (logits, BatchNorm statistics, test accuracy), and the
traced program itself (which dtype every conv/matmul and every exp/log of the loss runs in).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MODEL_CASES

from mergejax.config import train_config
from mergejax.core.models import apply_model, compute_dtype, make_model, precision_dtype
from mergejax.core.train import train_step
from mergejax.run import setup, train_and_evaluate

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
# bf16 keeps 8 significand bits (unit roundoff 2^-9 ~ 0.2%); through up to ~20 layers the logits of
# these nets drift by up to ~2% of their largest magnitude (measured), so allow 5% of it. BatchNorm
# moments are float32 reductions of bf16 activations: allow 3% of the largest statistic.
LOGIT_TOL, STATS_TOL = 0.05, 0.03
# Every family, plus the DenseNet (smallest: one layer per block) and VGG without BatchNorm.
CASES = MODEL_CASES + [("densenet40", dict(depth=7, growth=4), (4, 8, 8, 3)), ("vgg11_nobn", dict(width=0.125), (4, 32, 32, 3))]


def _eqns(jaxpr):
    """Every equation of ``jaxpr``, sub-jaxprs (pjit, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _op_dtypes(jaxpr, prims) -> list:
    """``(primitive, {operand and result dtypes})`` of every equation whose primitive is in ``prims``."""
    return [(e.primitive.name, {str(v.aval.dtype) for v in (*e.invars, *e.outvars)}) for e in _eqns(jaxpr.jaxpr)
            if e.primitive.name in prims]


def _variables(model, shape, seed=0):
    """Parameters and BatchNorm statistics of ``model`` drawn with numpy (no init to compile):
    kernels N(0, 1/fan_in), biases and BN shifts N(0, 0.1^2), BN scales 1 + N(0, 0.1^2), running
    means N(0, 0.1^2) and variances 1 + U(0, 0.5). Float32, in the tree ``model.init`` returns."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))

    def draw(path, leaf):
        kind = str(path[-1].key)
        if kind == "kernel":
            x = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif kind == "var":
            x = 1 + rng.uniform(0, 0.5, leaf.shape)
        else:
            x = (kind == "scale") + 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(x, leaf.dtype)

    v = jax.tree_util.tree_map_with_path(draw, shapes)
    return v["params"], v.get("batch_stats", {})


def _forward(model, params, stats, x):
    """Train-mode logits and new BatchNorm statistics, and eval-mode logits."""
    logits, new_stats = apply_model(model, params, stats, x, train=True)
    return logits, new_stats, apply_model(model, params, stats, x, train=False)[0]


@pytest.mark.parametrize("name,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_bf16_model_computes_in_bf16_keeps_float32_state(name, kw, shape):
    m32, m16 = make_model(name, 10, **kw), make_model(name, 10, dtype="bfloat16", **kw)
    params, stats = _variables(m32, shape)
    # The bf16 model has the same variable tree (names, shapes, float32 dtypes): unit tables and
    # checkpoints are unaffected.
    init16 = jax.eval_shape(lambda: m16.init(jax.random.key(0), jnp.zeros(shape), train=False))
    assert init16 == jax.eval_shape(lambda: {"params": params, **({"batch_stats": stats} if stats else {})})

    x = jax.random.normal(jax.random.key(1), shape)
    # Every conv and matmul runs on bf16 operands with a bf16 result (train and eval mode).
    for train in (True, False):
        ops = _op_dtypes(jax.make_jaxpr(lambda p, t=train: apply_model(m16, p, stats, x, train=t))(params),
                         {"conv_general_dilated", "dot_general"})
        assert ops and all(d == {"bfloat16"} for _, d in ops), (train, ops)

    forward = jax.jit(_forward, static_argnums=0)
    (l32, n32, e32), (l16, n16, e16) = forward(m32, params, stats, x), forward(m16, params, stats, x)
    assert l16.dtype == e16.dtype == F32
    assert {a.dtype for a in jax.tree.leaves(n16)} <= {F32}  # running statistics stay float32 after a train-mode pass
    for got, ref in ((l16, l32), (e16, e32)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=LOGIT_TOL * float(jnp.abs(ref).max()))
    for got, ref in zip(jax.tree.leaves(n16), jax.tree.leaves(n32)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=STATS_TOL * float(jnp.abs(ref).max()) + 1e-4)


def test_bf16_digits_training_matches_fp32(digits):
    """5 epochs of the digits CNN (110 steps, same seed): bf16 reaches the fp32 test accuracy within
    2 points (7 of the 360 test images; measured: 98.9% vs 98.3%, seed 0) and its state stays float32."""
    train, test = digits
    acc = {}
    for precision in ("fp32", "bf16"):
        cfg = train_config(dataset="digits", model="cnn", epochs=5, precision=precision, seed=0)
        s = setup(cfg, train=train, test=test)
        assert s.model.dtype == (None if precision == "fp32" else BF16)
        if precision == "bf16":  # the step's loss (exp/log of the softmax) runs in float32; its outputs are float32
            batch = {"image": train.images[:8], "label": train.labels[:8]}
            step = jax.make_jaxpr(train_step)(s.state, batch, jax.random.key(0))
            losses = _op_dtypes(step, {"exp", "log", "log_softmax"})
            assert losses and all(d == {"float32"} for _, d in losses), losses
            assert {str(v.aval.dtype) for v in step.jaxpr.outvars} <= {"float32", "int32"}
        state, summary = train_and_evaluate(cfg, progress=False, setup_=s)
        acc[precision] = summary["test_accuracy"]
        floats = {a.dtype for a in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
                  if jnp.issubdtype(a.dtype, jnp.floating)}
        assert floats == {F32}, (precision, floats)
    assert acc["fp32"] > 0.9, acc  # the reference itself learned
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.02, acc


def test_dtype_names_and_unknown_precision_refused(digits):
    assert make_model("cnn", 10, dtype="bfloat16") == make_model("cnn", 10, dtype=jnp.bfloat16)  # one compiled step
    assert compute_dtype("float32") == F32 and precision_dtype("bf16") == BF16 and precision_dtype("fp32") is None
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; use one of: fp32, bf16"):
        setup(train_config(precision="fp16"), train=digits[0], test=digits[1])
    with pytest.raises(ValueError, match=r"unknown model dtype 'bf16'"):
        make_model("cnn", 10, dtype="bf16")
    with pytest.raises(ValueError, match=r"floating point, got int32"):
        make_model("cnn", 10, dtype="int32")


class _Built(Exception):
    """Raised by the recording model class below: the first model an experiment builds."""


@pytest.mark.parametrize("experiment, section", [("train_baseline", "train"), ("snapshot_ensemble", "train"),
                                                 ("freezeout", "train"), ("merge_networks", "teacher")])
def test_every_experiment_trains_at_its_configured_precision(experiment, section, monkeypatch, tmp_path):
    """``<section>.precision=bf16`` reaches the model each experiment trains (it was once dropped
    by three of them, which trained in fp32): the first model built gets the bf16 compute dtype."""
    from conftest import load_experiment

    from mergejax.config import override
    from mergejax.core import models

    module = load_experiment(experiment)
    config = override(module.get_config("smoke"), [f"{section}.precision=bf16"])
    built = []

    def record(**kwargs):
        built.append(kwargs)
        raise _Built

    monkeypatch.setitem(models.MODELS, config[section].model, record)
    with pytest.raises(_Built):
        module.run(config, str(tmp_path / experiment), progress=False)
    assert built and built[0].get("dtype") == BF16, built
