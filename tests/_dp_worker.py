"""Subprocess helper for tests/test_parallel.py (needs its own JAX device configuration).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_dp_worker.py mesh OUT.json

``mesh``: data-parallel step on 8 simulated devices vs single-device references (MLP,
ghost-batch BN, synchronised BN, pmap, local SGD); prints gaps as JSON. The 2-process
(``jax.distributed``) local SGD worker is the library's ``python -m mergejax.averaging.distributed``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _gap(a, b):
    return max([0.0] + [float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])


def _batch(n, seed=0, shape=(8, 8, 1)):
    r = np.random.default_rng(seed)
    return {"image": r.normal(size=(n, *shape)).astype(np.float32), "label": r.integers(0, 10, size=n).astype(np.int32)}


def mesh_mode(out):
    from mergejax.averaging import local_sgd
    from mergejax.averaging import parallel
    from mergejax.core.data import shard_batch
    from mergejax.core.models import make_model
    from mergejax.core.train import create_state, cross_entropy, train_step

    n = jax.device_count()
    assert n == 8, f"expected 8 simulated devices, got {n}"
    mesh = parallel.data_mesh()
    res = {"devices": n}
    rng = jax.random.key(3)

    # 1) No BatchNorm: equals one device on the whole batch. lr 1, no momentum: update == -grad.
    model = make_model("mlp", 10, hidden=(32,))
    s0 = create_state(model, jax.random.key(0), (1, 8, 8, 1), optax.sgd(1.0))
    batch = _batch(64)
    dp = parallel.make_dp_step(mesh)
    s_dp, m_dp = dp(s0, shard_batch(batch, mesh), rng)
    s_1, m_1 = jax.jit(train_step)(s0, batch, rng)
    g_dp = jax.tree.map(lambda a, b: a - b, s0.params, s_dp.params)
    g_1 = jax.tree.map(lambda a, b: a - b, s0.params, s_1.params)
    res["mlp_grad_ratio"] = float(optax.global_norm(g_dp) / optax.global_norm(g_1))
    res["mlp_grad_gap"] = _gap(g_dp, g_1)
    res["mlp_loss_gap"] = abs(float(m_dp["loss"]) - float(m_1["loss"]))
    # Three momentum steps.
    s0m = create_state(model, jax.random.key(0), (1, 8, 8, 1), optax.sgd(0.1, momentum=0.9))
    a, b = s0m, s0m
    for i in range(3):
        bt = _batch(64, seed=10 + i)
        a, _ = dp(a, shard_batch(bt, mesh), rng)
        b, _ = jax.jit(train_step)(b, bt, rng)
    res["mlp_momentum_gap"] = _gap(a.params, b.params)

    # 2) BatchNorm: equals one device running the 8 shards as ghost batches.
    cnn = make_model("cnn", 10, channels=(8, 16, 16))
    c0 = create_state(cnn, jax.random.key(1), (1, 8, 8, 1), optax.sgd(0.5))
    batch = _batch(32, seed=5)
    c_dp, _ = dp(c0, shard_batch(batch, mesh), rng)
    shards = parallel.split_batch(batch, n)

    def ghost_loss(params):
        def one(img, lab):
            logits, bs = c0.apply_fn(params, c0.batch_stats, img, train=True)
            return cross_entropy(logits, lab), bs
        losses, stats = jax.vmap(one)(shards["image"], shards["label"])
        return losses.mean(), jax.tree.map(lambda x: x.mean(0), stats)

    (_, stats), grads = jax.value_and_grad(ghost_loss, has_aux=True)(c0.params)
    upd, _ = c0.tx.update(grads, c0.opt_state, c0.params)
    res["cnn_ghost_param_gap"] = _gap(c_dp.params, optax.apply_updates(c0.params, upd))
    res["cnn_ghost_stats_gap"] = _gap(c_dp.batch_stats, stats)
    # Negative control: the full-batch BN step is a different function.
    c_full, _ = jax.jit(train_step)(c0, batch, rng)
    res["cnn_fullbatch_gap"] = _gap(c_dp.params, c_full.params)

    # 2b) Synchronised BatchNorm (bn_axis_name='data'): the DP step equals one device running
    # the same model without the axis name (c0, already compiled above) on the whole batch.
    sync = cnn.clone(bn_axis_name="data")
    y0 = create_state(sync, jax.random.key(1), (1, 8, 8, 1), optax.sgd(0.5))
    res["sync_same_tree"] = jax.tree.structure((y0.params, y0.batch_stats)) == jax.tree.structure((c0.params, c0.batch_stats))
    res["sync_init_gap"] = _gap(y0.params, c0.params) + _gap(y0.batch_stats, c0.batch_stats)
    y, z = y0.replace(tx=c0.tx), c0  # same optimizer object: the reference step reuses its compilation
    for k in ("param_gap", "stats_gap", "loss_gap", "param_scale"):
        res[f"sync_{k}"] = []
    for i in range(3):
        bt = _batch(32, seed=20 + i)
        y, my = dp(y, shard_batch(bt, mesh), rng)
        z, mz = jax.jit(train_step)(z, bt, rng)
        res["sync_param_gap"].append(_gap(y.params, z.params))
        res["sync_stats_gap"].append(_gap(y.batch_stats, z.batch_stats))
        res["sync_loss_gap"].append(abs(float(my["loss"]) - float(mz["loss"])))
        res["sync_param_scale"].append(max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(z.params)))
    res["sync_moved"] = _gap(z.params, c0.params)
    res["sync_stats_moved"] = _gap(z.batch_stats, c0.batch_stats)
    # pmap (no check_vma; psum transposes to psum) gives the same step.
    bt = _batch(32, seed=20)
    p_out, _ = parallel.make_pmap_step()(parallel.replicate(y0, n), parallel.split_batch(bt, n), rng)
    y1, _ = dp(y0, shard_batch(bt, mesh), rng)
    res["sync_pmap_gap"] = _gap(jax.tree.map(lambda x: x[0], p_out.params), y1.params)
    res["sync_pmap_stats_gap"] = _gap(jax.tree.map(lambda x: x[0], p_out.batch_stats), y1.batch_stats)

    # 3) pmap agrees with shard_map.
    pm = parallel.make_pmap_step()
    for name, st, bt in (("mlp", s0, _batch(64)), ("cnn", c0, batch)):
        p_out, _ = pm(parallel.replicate(st, n), parallel.split_batch(bt, n), rng)
        d_out, _ = dp(st, shard_batch(bt, mesh), rng)
        res[f"pmap_{name}_gap"] = _gap(jax.tree.map(lambda x: x[0], p_out.params), d_out.params)
        res[f"pmap_{name}_stats_gap"] = _gap(jax.tree.map(lambda x: x[0], p_out.batch_stats), d_out.batch_stats)

    # 4) Local SGD: shard_map over 8 devices == vmap simulation on one.
    st = local_sgd.init(create_state(cnn, jax.random.key(2), (1, 8, 8, 1), optax.sgd(0.1, momentum=0.9)), n)
    r = np.random.default_rng(7)
    lb = {"image": r.normal(size=(n, 2, 4, 8, 8, 1)).astype(np.float32), "label": r.integers(0, 10, size=(n, 2, 4)).astype(np.int32)}
    a_state, _ = local_sgd.make_round(n, mesh=mesh, policy="average")(st, lb, rng)
    b_state, _ = local_sgd.make_round(n, policy="average")(st, lb, rng)
    res["local_sgd_mesh_vs_vmap_gap"] = _gap(a_state.params, b_state.params)
    res["local_sgd_mesh_vs_vmap_stats_gap"] = _gap(a_state.workers.batch_stats, b_state.workers.batch_stats)
    with open(out, "w") as f:
        json.dump(res, f)
    print(json.dumps(res))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mesh":
        mesh_mode(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
