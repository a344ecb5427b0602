"""Data-parallel step and multi-process local SGD.

Simulated devices and jax.distributed need their own process; they run tests/_dp_worker.py
and ``python -m mergejax.averaging.distributed`` in subprocesses so this pytest process keeps its
single CPU device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from mergejax.averaging import parallel
from mergejax.core.models import apply_model, init_variables, make_model
from mergejax.core.train import create_state, train_step

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "_dp_worker.py")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def test_dp_step_under_vmap_equals_full_batch():
    """The same step function with the axis simulated by vmap on one device."""
    model = make_model("mlp", 10, hidden=(16,))
    s0 = create_state(model, jax.random.key(0), (1, 8, 8, 1), optax.sgd(0.1, momentum=0.9))
    r = np.random.default_rng(0)
    batch = {"image": r.normal(size=(32, 8, 8, 1)).astype(np.float32), "label": r.integers(0, 10, 32).astype(np.int32),
             "mask": (np.arange(32) < 29).astype(np.float32)}  # padded tail: shards hold 8, 8, 8, 5 real examples
    step = jax.vmap(lambda s, b, k: train_step(s, b, k, axis_name="data", vma=False), in_axes=(None, 0, None), axis_name="data")
    out, m = step(s0, parallel.split_batch(batch, 4), jax.random.key(1))
    ref, mr = train_step(s0, batch, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["loss"][0], mr["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"][0], mr["accuracy"], rtol=1e-6)


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet", dict(depth=8, width=0.25), (8, 8, 3)),  # ConvBNReLU stem, BasicBlocks with proj_bn
    ("wrn", dict(depth=10, widen=1, width=0.5), (8, 8, 3)),  # pre-activation blocks, pre_norm head
    ("vgg11", dict(width=0.0625), (32, 32, 3)),
])
def test_sync_bn_reaches_every_batchnorm(name, kw, shape):
    """bn_axis_name leaves the variable trees unchanged, and with the axis simulated by vmap
    (4 shards) every BatchNorm normalises with the whole batch: logits and batch_stats equal
    the model without the axis name on the full batch (a BN left per-shard would differ).
    SmallCNN is covered end to end by the 8-device test."""
    plain = make_model(name, 10, **kw)
    sync = make_model(name, 10, bn_axis_name="data", **kw)
    tv = jax.eval_shape(lambda: init_variables(plain, jax.random.key(0), (1, *shape)))
    ts = jax.eval_shape(lambda: init_variables(sync, jax.random.key(0), (1, *shape)))
    assert jax.tree.structure(tv) == jax.tree.structure(ts)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(tv)] == [(a.shape, a.dtype) for a in jax.tree.leaves(ts)]
    # Random values in place of a (slow, eager) init: the comparison holds for any weights.
    r = np.random.default_rng(1)
    pv, sv = jax.tree.map(lambda a: (0.5 * r.normal(size=a.shape) + 0.1).astype(np.float32), tv)
    x = r.normal(size=(16, *shape)).astype(np.float32) * 2.0 + 0.5

    @jax.jit
    def run(x):
        ref = apply_model(plain, pv, sv, x, train=True)
        out = jax.vmap(lambda xs: apply_model(sync, pv, sv, xs, train=True), axis_name="data", out_axes=(0, None))(
            x.reshape(4, 4, *shape))
        return ref, out

    (ref_logits, ref_stats), (logits, stats) = run(x)
    np.testing.assert_allclose(logits.reshape(16, -1), ref_logits, rtol=1e-4, atol=1e-4)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(stats)[0], jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # CI time (~60 s); `python -m pytest -q -m slow` runs it; test_devices covers fit on 4-8 devices by default
def test_dp_step_on_8_simulated_devices(tmp_path):
    out = tmp_path / "mesh.json"
    proc = subprocess.run([sys.executable, WORKER, "mesh", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["devices"] == 8
    # The check_vma trap would give a ratio of 8 (or 1/8); it must be exactly the full-batch gradient.
    assert abs(r["mlp_grad_ratio"] - 1.0) < 1e-6
    assert r["mlp_grad_gap"] < 1e-6 and r["mlp_loss_gap"] < 1e-5 and r["mlp_momentum_gap"] < 1e-6
    # BatchNorm (per-device statistics, running stats averaged) == ghost-batch reference...
    assert r["cnn_ghost_param_gap"] < 1e-6 and r["cnn_ghost_stats_gap"] < 1e-5
    # ...which is not full-batch BN (negative control).
    assert r["cnn_fullbatch_gap"] > 1e-3
    # Synchronised BN (bn_axis_name='data') == one device, same model without the axis name,
    # on the whole batch: params, batch_stats and loss after each of 3 SGD steps.
    assert r["sync_same_tree"] and r["sync_init_gap"] == 0.0
    for i in range(3):
        assert r["sync_param_gap"][i] < 1e-5 * max(1.0, r["sync_param_scale"][i]), (i, r["sync_param_gap"])
        assert r["sync_stats_gap"][i] < 1e-5 and r["sync_loss_gap"][i] < 1e-5, (i, r["sync_stats_gap"], r["sync_loss_gap"])
    assert r["sync_moved"] > 1e-2 and r["sync_stats_moved"] > 1e-2  # the comparison is not vacuous
    assert r["sync_pmap_gap"] < 1e-6 and r["sync_pmap_stats_gap"] < 1e-5
    for k in ("pmap_mlp_gap", "pmap_mlp_stats_gap", "pmap_cnn_gap", "pmap_cnn_stats_gap"):
        assert r[k] < 1e-6, k
    assert r["local_sgd_mesh_vs_vmap_gap"] < 1e-6 and r["local_sgd_mesh_vs_vmap_stats_gap"] < 1e-5


def test_two_process_reference_trains():
    """The single-process side of the 2-process check (the slow test below runs the other):
    one batch per worker and local step in every round, and the weights move."""
    from mergejax.averaging import distributed

    state, rounds, ref = distributed.reference()
    assert len(rounds) == distributed.ROUNDS and rounds[0]["image"].shape[:2] == (2, distributed.LOCAL_STEPS)
    init = distributed.flat_params(state.params)
    assert sorted(init) == sorted(ref)
    assert max(np.abs(ref[k] - init[k]).max() for k in ref) > 1e-3


@pytest.mark.slow  # two fresh JAX processes + gloo: ~35 s CPU; `pytest -m slow` (experiment (d) runs it too)
def test_local_sgd_two_processes(tmp_path):
    from mergejax.averaging import distributed

    procs = distributed.launch(str(tmp_path), num_processes=2, timeout=600)
    # Single-process reference: the same 2 workers simulated with vmap.
    state, _, ref = distributed.reference()
    a, b = procs
    assert sorted(a) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(a[k], b[k])  # both processes hold identical parameters
        np.testing.assert_allclose(a[k], ref[k], rtol=1e-5, atol=1e-6)
    init = distributed.flat_params(state.params)
    assert max(np.abs(ref[k] - init[k]).max() for k in ref) > 1e-3  # training did move the weights
    assert not list(tmp_path.iterdir())  # launch removed its npz files


def test_sync_bn_rebuilds_the_model_of_plain_and_gated_states_and_refuses_others():
    """``sync_bn``: a ModelApply state and a gate-learning state (GatedApply) keep their apply_fn type,
    spec and parameters, with the model's BatchNorm synchronised over ``data``; an apply_fn without a
    model (a closure) is refused in one line naming the device count."""
    from mergejax.core.errors import UserError
    from mergejax.core.units import unit_spec
    from mergejax.merging.gates import init_log_alpha
    from mergejax.merging.train import GatedApply, create_gate_state

    model = make_model("cnn", 10, width=0.25)
    state = create_state(model, jax.random.key(0), (1, 8, 8, 1), optax.sgd(0.1))
    synced = parallel.sync_bn(state, [None] * 2)
    assert synced.apply_fn.model == model.clone(bn_axis_name=parallel.AXIS) and state.apply_fn.model.bn_axis_name is None
    assert synced.params is state.params
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    spec = unit_spec(model, variables)
    gated = create_gate_state(model, spec, variables, init_log_alpha(jax.random.key(1), spec, 3.0, 0.01), optax.sgd(0.1))
    g = parallel.sync_bn(gated, [None] * 2).apply_fn
    assert isinstance(g, GatedApply) and g.spec is spec and g.model.bn_axis_name == parallel.AXIS
    with pytest.raises(UserError, match="cannot train on 3 devices; set devices=1"):
        parallel.sync_bn(state.replace(apply_fn=lambda *a, **k: None), [None] * 3)


def test_placed_step_names_its_batch_sharding_and_prefetch_lands_there():
    """``fit`` prefetches batches straight onto a placed step's batch sharding (on accelerators), so
    the step's own ``device_put`` of the batch has nothing to move."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mergejax.core.loop import prefetch_to_device

    mesh = parallel.data_mesh(jax.devices()[:1])
    run = parallel.place_on(mesh, lambda state, batch, rng: (state, batch))
    assert run.batch_sharding == NamedSharding(mesh, P(parallel.AXIS))
    batch = {"image": np.ones((4, 8, 8, 1), np.float32), "label": np.arange(4, dtype=np.int32)}
    (got,) = list(prefetch_to_device(iter([batch]), sharding=run.batch_sharding))
    assert all(x.sharding == run.batch_sharding for x in got.values())
    np.testing.assert_array_equal(np.asarray(got["label"]), batch["label"])
