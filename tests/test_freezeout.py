"""FreezeOut: closed-form per-layer schedules, exact freezing, the FLOP cut of a stage
against a hand count, and equality with an unfrozen run before the first freeze."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mergejax import freezeout as fo
from mergejax.freezeout import sweep
from mergejax.core import loop, optim, train
from mergejax.core.models import make_model


def closed_form_t(L, t0, power):
    """t_i = (t0 + (1 - t0) i / L) ** power, i = 0..L (written out independently)."""
    return np.array([(t0 + (1.0 - t0) * i / L) ** power for i in range(L + 1)], np.float64)


def closed_form_lr(a0, t_frac, T, t):
    """alpha_i(t) = 0.5 a0 (1 + cos(pi t / (t_i T))) while t < t_i T, else 0 (float64)."""
    horizon = t_frac * T
    return np.where(t < horizon - 1e-9, 0.5 * a0 * (1.0 + np.cos(np.pi * t / horizon)), 0.0)


def sgd_tx(lr):
    return optim.make_optimizer("sgd", lr, momentum=0.9, nesterov=True, weight_decay=1e-3)


BASE = sgd_tx(1.0)  # unit-rate optimizer under scale_by_freezeout


def test_fractions_and_freeze_steps():
    # The reference's worked example: cubic t0 = 0.8 freezes the first layer at 0.512.
    t = fo.layer_fractions(5, 0.8, "cubic")
    np.testing.assert_allclose(t, closed_form_t(4, 0.8, 3), rtol=0, atol=1e-15)
    assert t[0] == pytest.approx(0.512) and t[-1] == 1.0
    plan = fo.make_plan(("a", "b", "c", "d", "head"), 100, t0=0.8, spacing="cubic", lr=0.1, scaled=True)
    assert plan.freeze_steps == (52, 62, 73, 86, 100)  # ceil(100 t_i): .8^3, .85^3, .9^3, .95^3 = 51.2, 61.4, 72.9, 85.7
    np.testing.assert_allclose(plan.lr0, 0.1 / closed_form_t(4, 0.8, 3))
    unscaled = fo.make_plan(("a", "head"), 10, t0=0.5, spacing="linear", scaled=False)
    assert unscaled.lr0 == (0.1, 0.1) and unscaled.freeze_steps == (5, 10)
    with pytest.raises(ValueError, match="head"):
        fo.make_plan(("a", "b"), 10)


def test_stages_and_grouping():
    names = ("l0", "l1", "l2", "l3", "head")
    plan = fo.make_plan(names, 20, t0=0.5, spacing="linear")  # t = .5 .625 .75 .875 -> steps 10 13 15 18
    assert plan.freeze_steps == (10, 13, 15, 18, 20)
    assert plan.stages == ((0, 0), (10, 1), (13, 2), (15, 3), (18, 4))
    assert [plan.frozen_at(s) for s in (0, 9, 10, 12, 13, 17, 18, 19)] == [0, 0, 1, 1, 2, 3, 4, 4]
    assert plan.stage_lengths() == [(0, 10), (1, 3), (2, 2), (3, 3), (4, 2)]
    grouped = fo.make_plan(names, 20, t0=0.5, spacing="linear", max_stages=3)  # groups {l0,l1}, {l2,l3}
    assert grouped.stages == ((0, 0), (13, 2), (18, 4))
    assert grouped.freeze_steps == plan.freeze_steps  # schedules are not changed by grouping
    assert fo.make_plan(names, 20, t0=1.0).stages == ((0, 0),)  # t0 = 1: nothing freezes
    assert fo.make_plan(names, 20, t0=0.5, max_stages=1).stages == ((0, 0),)


@pytest.mark.parametrize("spacing,power", [("linear", 1), ("squared", 2), ("cubic", 3)])
@pytest.mark.parametrize("scaled", [True, False])
def test_schedule_matches_closed_form_every_layer_every_step(spacing, power, scaled):
    T, t0, lr, names = 37, 0.6, 0.1, ("l0", "l1", "l2", "head")
    t_frac = closed_form_t(3, t0, power)
    a0 = lr / t_frac if scaled else np.full(4, lr)
    with jax.enable_x64(True):
        plan = fo.make_plan(names, T, t0=t0, spacing=spacing, scaled=scaled, lr=lr)
        steps = np.arange(T + 3)
        for i, (name, sched) in enumerate(plan.schedules().items()):
            got = np.array([float(sched(s)) for s in steps])
            want = np.where(steps < t_frac[i] * T, 0.5 * a0[i] * (1 + np.cos(np.pi * np.minimum(steps, t_frac[i] * T) / (t_frac[i] * T))), 0.0)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"layer {name}")
        # The learning rate each layer really gets from the optax transform: plain SGD on
        # gradients of ones returns -alpha_i(t) for every leaf of layer i at step t.
        params = {n: {"w": jnp.zeros((2, 3), jnp.float64), "b": jnp.zeros((3,), jnp.float64)} for n in names}
        tx = fo.freezeout_tx(plan, optax.sgd(1.0))
        state = tx.init(params)
        ones = jax.tree.map(jnp.ones_like, params)
        update = jax.jit(tx.update)
        for s in range(T + 2):
            upd, state = update(ones, state, params)
            want = closed_form_lr(a0, t_frac, T, np.full(4, s))
            for i, n in enumerate(names):
                for leaf in ("w", "b"):
                    np.testing.assert_allclose(np.asarray(upd[n][leaf]), -want[i], rtol=1e-12, atol=1e-15, err_msg=f"step {s} layer {n}/{leaf}")


def test_momentum_and_weight_decay_cannot_move_a_frozen_layer():
    # optax.chain(freeze, momentum) leaks; scale_by_freezeout after the optimizer must not.
    plan = fo.make_plan(("a", "head"), 6, t0=0.4, spacing="linear")  # layer a frozen from step ceil(2.4) = 3
    params = {"a": jnp.ones(3), "head": jnp.ones(3)}
    tx = fo.freezeout_tx(plan, sgd_tx(1.0))
    st = tx.init(params)
    for s in range(6):
        g = jax.tree.map(jnp.ones_like if s < 2 else jnp.zeros_like, params)
        upd, st = tx.update(g, st, params)
        moved = bool(np.any(np.asarray(upd["a"]) != 0.0))
        assert moved == (s < 3), f"step {s}: layer a (frozen from 3) update {upd['a']}"
        assert np.all(np.asarray(upd["head"]) != 0.0)  # momentum + decay still move the live head


def test_with_plan_swaps_the_schedule_without_recompiling():
    names = ("l0", "l1", "head")
    a = fo.make_plan(names, 10, t0=0.5, spacing="linear", lr=0.1)
    b = fo.make_plan(names, 10, t0=0.8, spacing="cubic", lr=0.2, scaled=False)
    params = {n: jnp.zeros(2) for n in names}
    tx = fo.freezeout_tx(a, optax.sgd(1.0))
    st = fo.with_plan(tx.init(params), b)
    rates = jax.jit(fo.layer_rates)
    for t in range(10):
        fs = fo.freezeout_state(st)._replace(count=jnp.asarray(t, jnp.int32))
        got = rates(fs)
        t_frac = closed_form_t(2, 0.8, 3)
        want = closed_form_lr(np.full(3, 0.2), t_frac, 10, np.full(3, t))
        np.testing.assert_allclose([float(got[n]) for n in names], want, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
    assert rates._cache_size() == 1
    with pytest.raises(ValueError, match="differ"):
        fo.with_plan(st, fo.make_plan(("x", "head"), 10))


def test_equal_plans_give_equal_transforms_and_shared_compiles():
    # value-equal factories: a re-created optimizer is the same static value to jax.jit, so a
    # sweep's cache dict hands back the stage compiled for an earlier, equal state
    model = make_model("mlp", 10, hidden=(8, 8))
    names = model.layer_names()
    a, b = fo.make_plan(names, 20, t0=0.5), fo.make_plan(names, 20, t0=0.5)
    assert fo.freezeout_tx(a, sgd_tx(1.0)) == fo.freezeout_tx(b, sgd_tx(1.0))
    assert hash(fo.freezeout_tx(a, sgd_tx(1.0))) == hash(fo.freezeout_tx(b, sgd_tx(1.0)))
    assert fo.freezeout_tx(a, sgd_tx(1.0)) != fo.freezeout_tx(fo.make_plan(names, 20, t0=0.8), sgd_tx(1.0))
    batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.zeros((4,), jnp.int32)}
    make = lambda: train.create_state(model, jax.random.key(0), (1, 8, 8, 1), fo.freezeout_tx(a, sgd_tx(1.0)))  # noqa: E731
    cache = {}
    first, _ = fo.compile_stages(a, make(), batch, jax.random.key(1), cache)
    other = fo.make_plan(names, 20, t0=0.8, spacing="cubic")  # same stages, another schedule (data)
    second, _ = fo.compile_stages(other, make().replace(opt_state=fo.with_plan(make().opt_state, other)), batch,
                                  jax.random.key(2), cache)
    assert sorted(first) == sorted(second) == [0, 1, 2] and len(cache) == 3
    assert all(second[k] is first[k] for k in first)


def _snapshots(step_fn, state, split, num_steps, batch_size):
    snaps = [jax.device_get((state.params, state.batch_stats))]
    state, _ = loop.fit(state, split, num_steps=num_steps, batch_size=batch_size, step_fn=step_fn, progress=False,
                        log_every=num_steps, callbacks=[lambda step, s: snaps.append(jax.device_get((s.params, s.batch_stats)))])
    return state, snaps


def _tree_bits_equal(a, b):
    return all(np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("max_stages", [pytest.param(None, marks=pytest.mark.slow), 2])
def test_frozen_params_and_batch_stats_never_change(digits, max_stages):
    train_split, _ = digits
    model = make_model("cnn", 10, channels=(8, 8, 8))
    T = 14
    plan = fo.make_plan(model.layer_names(), T, t0=0.4, spacing="linear", max_stages=max_stages)
    tx = fo.freezeout_tx(plan, BASE)
    state = train.create_state(model, jax.random.key(0), (1, 8, 8, 1), tx)
    _, snaps = _snapshots(fo.staged_step_fn(plan), state, train_split, T, 32)
    assert len(snaps) == T + 1
    for name, f in zip(plan.layer_names[:-1], plan.freeze_steps):
        assert f < T, "the test needs every non-head layer to freeze"
        p0, b0 = snaps[0][0][name], snaps[0][1][name]
        pf, bf = snaps[f][0][name], snaps[f][1][name]
        assert not _tree_bits_equal(p0, pf) and not _tree_bits_equal(b0, bf), f"{name} never trained"
        for done in range(f, T + 1):  # snaps[done] = state after `done` steps; step f onward is frozen
            assert _tree_bits_equal(snaps[done][0][name], pf), f"{name} params changed after freeze step {f} (at {done})"
            assert _tree_bits_equal(snaps[done][1][name], bf), f"{name} batch_stats changed after freeze step {f} (at {done})"
    assert not _tree_bits_equal(snaps[T - 1][0]["head"], snaps[T - 2][0]["head"])  # the head keeps training


def test_equal_to_unfrozen_run_before_first_freeze(digits):
    # Reference: no freezing at all, per-layer rates from an independent construction
    # (one optax.partition label per layer, optax.cosine_decay_schedule, rate inside sgd),
    # plain train.train_step with frozen=0.
    train_split, _ = digits
    model = make_model("cnn", 10, channels=(8, 8, 8))
    plan = fo.make_plan(model.layer_names(), 24, t0=0.5, spacing="cubic", scaled=True)
    first = plan.freeze_steps[0]
    assert first == 3  # ceil(0.125 * 24)
    T = plan.total_steps
    ref_tx = optax.partition(
        {n: sgd_tx(optax.cosine_decay_schedule(0.1 / t, t * T)) for n, t in zip(plan.layer_names, closed_form_t(3, 0.5, 3))},
        lambda p: {k: jax.tree.map(lambda _: k, v) for k, v in p.items()})
    make = lambda tx: train.create_state(model, jax.random.key(0), (1, 8, 8, 1), tx)  # fit donates its state
    ref, _ = loop.fit(make(ref_tx), train_split, num_steps=first, batch_size=32, progress=False)
    got, _ = loop.fit(make(fo.freezeout_tx(plan, BASE)), train_split, num_steps=first, batch_size=32, progress=False,
                      step_fn=fo.staged_step_fn(plan))
    close = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), a, b)
    close(got.params, ref.params)
    close(got.batch_stats, ref.batch_stats)
    init = make(BASE).params
    assert not _tree_bits_equal(got.params["conv0"], init["conv0"])  # it did train


def test_stage_flops_drop_by_prefix_backward_hand_count():
    # MLP 64 -> 64 x4 -> 10 on a batch of 256: the matmuls dominate. Freezing the first k layers
    # removes their weight gradients (2 B in out each) and the input gradients of layers
    # 1..k (layer 0 never needs one; stop_gradient sits at layer k-1's output).
    B, hidden = 256, (64, 64, 64)
    dims = [64, *hidden, 10]
    mm = [2 * B * dims[i] * dims[i + 1] for i in range(len(dims) - 1)]
    model = make_model("mlp", 10, hidden=hidden)
    plan = fo.make_plan(model.layer_names(), 20, t0=0.4, spacing="linear")  # t = .4 .6 .8 -> steps 8 12 16
    state = train.create_state(model, jax.random.key(0), (1, 8, 8, 1), fo.freezeout_tx(plan, BASE))
    batch = {"image": jnp.ones((B, 8, 8, 1)), "label": jnp.zeros((B,), jnp.int32), "mask": jnp.ones((B,))}
    _, costs = fo.compile_stages(plan, state, batch, jax.random.key(1))
    assert sorted(costs) == [0, 1, 2, 3]
    for k in range(1, 4):
        hand = sum(mm[:k]) + sum(mm[1 : k + 1])
        drop = costs[0]["flops"] - costs[k]["flops"]
        assert drop == pytest.approx(hand, rel=0.03), f"frozen={k}: cost analysis drop {drop:.4g}, hand count {hand:.4g}"
    pred = fo.predict_saving(plan, costs)
    by_hand = 1 - sum(costs[k]["flops"] * n for k, n in [(0, 8), (1, 4), (2, 4), (3, 4)]) / (20 * costs[0]["flops"])
    assert pred["saving"] == pytest.approx(by_hand, rel=1e-12)
    assert "predicted FLOP saving" in fo.cost_report(plan, costs)


@pytest.mark.parametrize("name,kw,shape", [
    pytest.param("resnet", dict(depth=8, width=0.25), (4, 8, 8, 3), marks=pytest.mark.slow),
    pytest.param("wrn", dict(depth=10, widen=1, width=0.25), (4, 8, 8, 3), marks=pytest.mark.slow),
    pytest.param("vgg11", dict(width=0.0625), (4, 32, 32, 3), marks=pytest.mark.slow),
])
def test_stage_step_on_conv_models(name, kw, shape):
    model = make_model(name, 10, **kw)
    names = model.layer_names()
    plan = fo.make_plan(names, 10, t0=0.3, spacing="linear")
    k = plan.frozen_at(plan.stages[1][0])
    state = train.create_state(model, jax.random.key(0), (1, *shape[1:]), fo.freezeout_tx(plan, BASE))
    start = jnp.asarray(plan.stages[1][0], jnp.int32)  # jump to the first step of stage 1
    opt_state = jax.tree.map(lambda x: x._replace(count=start) if isinstance(x, fo.FreezeOutState) else x, state.opt_state,
                             is_leaf=lambda x: isinstance(x, fo.FreezeOutState))
    state = state.replace(step=start + 0, opt_state=opt_state)  # distinct buffers: the state is donated
    batch = {"image": jax.random.normal(jax.random.key(2), shape), "label": jnp.arange(shape[0]) % 10}
    old = jax.device_get((state.params, state.batch_stats))
    new, metrics = fo.stage_step(k)(state, batch, jax.random.key(3))
    assert int(metrics["frozen_layers"]) == k
    for i, n in enumerate(names):
        same_p = _tree_bits_equal(new.params[n], old[0][n])
        assert same_p == (i < k), f"{name}: layer {n} (index {i}, frozen prefix {k}) params same={same_p}"
        if n in old[1] and i < k:
            assert _tree_bits_equal(new.batch_stats[n], old[1][n]), f"{name}: frozen {n} batch_stats changed"


def test_compare_with_baselines_interpolates_the_neighbouring_baselines():
    # seed 0: baselines at positions 0 and 3, points at 1 and 2, one baseline without a time
    # (a unit resumed after its training had finished); seed 1 has its own baseline.
    runs = [
        {"order": 0, "seed": 0, "base": True, "train_s": 1.0, "cpu_s": 2.0, "compile_s": 0.5},
        {"order": 1, "seed": 0, "base": False, "train_s": 1.2, "cpu_s": 1.0, "compile_s": 1.0},
        {"order": 2, "seed": 0, "base": True, "train_s": None, "cpu_s": None, "compile_s": 0.1},
        {"order": 3, "seed": 0, "base": False, "train_s": 2.0, "cpu_s": 3.0, "compile_s": 0.0},
        {"order": 4, "seed": 0, "base": True, "train_s": 2.5, "cpu_s": 4.0, "compile_s": 1.5},
        {"order": 5, "seed": 1, "base": True, "train_s": 10.0, "cpu_s": 10.0, "compile_s": 0.0},
        {"order": 6, "seed": 1, "base": False, "train_s": 5.0, "cpu_s": None, "compile_s": 0.0},
    ]
    out = sweep.compare_with_baselines(runs, lambda r: r["base"])
    assert [r["order"] for r in out] == list(range(7)) and "measured_saving" not in runs[0]
    # order 1 is a quarter of the way from the baseline at 0 to the one at 4
    assert out[1]["baseline_ref_s"] == pytest.approx(1.0 + 1.5 / 4)
    assert out[1]["measured_saving"] == pytest.approx(1 - 1.2 / 1.375)
    assert out[1]["cpu_saving"] == pytest.approx(1 - 1.0 / 2.5)
    assert out[1]["measured_saving_with_compile"] == pytest.approx(1 - 2.2 / (1.5 + 2.5 / 4))
    assert out[3]["baseline_ref_s"] == pytest.approx(1.0 + 1.5 * 3 / 4)
    assert out[0]["measured_saving"] == 0.0 and out[4]["measured_saving"] == 0.0 and out[5]["cpu_saving"] == 0.0
    assert out[2]["measured_saving"] is None and out[2]["baseline_ref_s"] == pytest.approx(1.75)
    assert out[6]["measured_saving"] == pytest.approx(0.5) and out[6]["cpu_saving"] is None  # only seed 1's baseline


def test_train_and_evaluate_resumes_to_the_same_result(tmp_path, digits):
    import shutil

    # one hidden layer, frozen from step 10 on: the resumed run starts at the second stage
    train_split, test_split = digits
    args = (make_model("mlp", train_split.num_classes, hidden=(16,)), train_split, test_split,
            optim.make_optimizer("sgd", 1.0, momentum=0.9, nesterov=True, weight_decay=1e-4))
    kw = dict(total_steps=20, batch_size=64, lr=0.05, log_every=10, checkpoint_every=10,
              t0=0.5, spacing="linear", scaled=True, manifest={"test": 1})
    first = fo.train_and_evaluate(*args, workdir=str(tmp_path / "a"), repeats=2, **kw)
    assert first["timed_from_step"] == 0 and not first["resumed"] and first["timed_runs"] == 2
    assert first["train_s"] > 0 and first["cpu_s"] > 0 and first["stages"] == len(first["stage_prefixes"]) > 1
    assert first["stage_prefixes"] == [0, 1] and first["freeze_steps"] == [10, 20] and first["total_steps"] == 20
    assert 0 < first["predicted_saving"] < 1
    same = ("test_accuracy", "test_loss", "train_loss", "predicted_saving", "freeze_steps", "stage_prefixes")
    # killed after the checkpoint of step 10: resumes there, ends where the whole run ended
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
    resumed = fo.train_and_evaluate(*args, workdir=str(tmp_path / "b"), **kw)
    assert resumed["resumed"] and resumed["timed_from_step"] == 10 and resumed["train_s"] > 0
    assert {k: resumed[k] for k in same} == {k: first[k] for k in same}
    # killed after the last checkpoint: nothing left to train or time
    done = fo.train_and_evaluate(*args, workdir=str(tmp_path / "a"), **kw)
    assert done["timed_from_step"] == 20 and done["train_s"] is None and done["timed_runs"] == 0
    assert {k: done[k] for k in same} == {k: first[k] for k in same}
