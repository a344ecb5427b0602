"""Gate-learning step: a golden one-step check in float64, and the pipeline end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.core import data as data_lib
from mergejax.merging import gates as G
from mergejax.cli.merge import get_config, stage_args
from mergejax.config import replace
from mergejax.core.train import STEP_STATIC, train_step
from mergejax.merging.pipeline import merge
from mergejax.merging.train import GateLoss, create_gate_state, gate_optimizer
from mergejax.core.models import init_variables, make_model
from mergejax.core.units import unit_spec, variables_of


def _mlp_forward(P, x, g0, g1):
    """Hand-written MLP(hidden=(6, 5)) with input-side gates; x (B, D), g (B, units)."""
    h = jax.nn.relu(x @ P["dense0"]["dense"]["kernel"] + P["dense0"]["dense"]["bias"]) * g0
    h = jax.nn.relu(h @ P["dense1"]["dense"]["kernel"] + P["dense1"]["dense"]["bias"]) * g1
    return h @ P["head"]["dense"]["kernel"] + P["head"]["dense"]["bias"]


def test_golden_one_step_float64():
    jax.config.update("jax_enable_x64", True)
    try:
        model = make_model("mlp", 3, hidden=(6, 5))
        p, s = init_variables(model, jax.random.key(0), (1, 2, 2, 1))
        v = jax.tree.map(lambda a: a.astype(jnp.float64), variables_of(p, s))
        spec = unit_spec(model, v)
        la = {"dense0": jnp.linspace(-1.0, 2.0, 6), "dense1": jnp.linspace(0.5, 3.0, 5)}
        tx = gate_optimizer(0.1, 0.2, momentum=0.9, weight_decay=1e-4, gate_momentum=0.9)
        state = create_gate_state(model, spec, v, la, tx)
        x = jax.random.normal(jax.random.key(1), (4, 2, 2, 1), jnp.float64)
        batch = {"image": x, "label": jnp.asarray([0, 1, 2, 1]), "mask": jnp.ones(4)}
        rng = jax.random.key(5)
        lam = 0.7
        new, metrics = jax.jit(functools.partial(train_step, loss_fn=GateLoss(lambda step: lam)))(state, batch, rng)

        # Reference: same gate samples (the step's documented key derivation), hand-written
        # forward, closed-form L_half, and one SGD step by hand (first momentum step = grad).
        _, model_rng = jax.random.split(rng)
        gate_rng, _ = jax.random.split(model_rng)
        k0, k1 = jax.random.split(gate_rng, 2)  # sample_gates splits over sorted group names
        def loss(params, gates):
            g0 = G.sample(k0, gates["dense0"], (4,))
            g1 = G.sample(k1, gates["dense1"], (4,))
            logits = _mlp_forward(params, x.reshape(4, -1), g0, g1)
            ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), batch["label"]])
            pr = [1 / (1 + jnp.exp(-(a - (2 / 3) * np.log(0.1 / 1.1)))) for a in (gates["dense0"], gates["dense1"])]
            return ce + lam * sum((0.5 - jnp.mean(q)) ** 2 for q in pr)
        ref_loss, (gw, gg) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(v["params"], la)
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-10)
        want_w = jax.tree.map(lambda w, g: w - 0.1 * (g + 1e-4 * w), v["params"], gw)
        want_g = jax.tree.map(lambda a, g: a - 0.2 * g, la, gg)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), new.params["model"], want_w)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), new.params["gates"], want_g)
        assert float(jnp.abs(gg["dense0"]).max()) > 0  # the gates did get a gradient
        np.testing.assert_allclose(float(metrics["l_half"]), float(G.total_l_half(la)), rtol=1e-10)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_l_half_drives_gates_to_half_open():
    model = make_model("mlp", 3, hidden=(8,))
    p, s = init_variables(model, jax.random.key(0), (1, 4))
    v = variables_of(p, s)
    spec = unit_spec(model, v)
    la = G.init_log_alpha(jax.random.key(1), spec, mean=3.0)
    state = create_gate_state(model, spec, v, la, gate_optimizer(0.0, 1.0))
    step = jax.jit(train_step, static_argnames=STEP_STATIC)
    loss_fn = GateLoss(lambda s: 50.0)
    batch = {"image": jnp.zeros((2, 4)), "label": jnp.zeros(2, jnp.int32)}
    for i in range(300):
        state, m = step(state, batch, jax.random.key(i), loss_fn=loss_fn)
    p_open = float(jnp.mean(G.prob_open(state.params["gates"]["dense0"])))
    assert abs(p_open - 0.5) < 0.05, p_open
    jax.tree.map(np.testing.assert_array_equal, state.params["model"], v["params"])  # lr 0: weights fixed


def test_merge_pipeline_smoke(digits):
    train, test = digits
    train = data_lib.Split(train.images[:256], train.labels[:256], train.num_classes, "digits256")
    model = make_model("mlp", 10, hidden=(16,))
    teachers = [variables_of(*init_variables(model, jax.random.key(i), (1, 8, 8, 1))) for i in (0, 1)]
    cfg = replace(get_config("tiny"), model="mlp", model_kwargs={"hidden": (16,)}, batch_size=64, gate_epochs=2.0,
                  finetune_epochs=1.0, lambda0=5.0, lambda_step=5.0, gate_lr=5.0, log_every=4, checkpoint_every=0)
    gate, finetune = stage_args(cfg, len(train))
    student, summary = merge(teachers[0], teachers[1], model, train, test, key=jax.random.key(cfg.seed), gate=gate,
                             finetune=finetune, progress=False)
    # Deterministic gates start at exactly 1: step 0 is the ensemble.
    assert summary["big_student_step0"] == summary["big_start"]
    assert jax.tree.map(jnp.shape, student) == jax.tree.map(jnp.shape, teachers[0])
    h = summary["gate_history"]
    assert h["step"][0] == 0 and h["step"][-1] == summary["steps"]["gates"] == 8
    assert h["prob_open"]["dense0"][-1] < h["prob_open"]["dense0"][0]
    for k in ("big_student_after_gates", "after_compression", "after_finetune"):
        assert 0.0 <= summary[k]["accuracy"] <= 1.0
