"""``mergejax average`` against float64 numpy means; inputs untouched; atomic output."""

import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import cli
from mergejax.core import checkpoint
from mergejax.core.errors import ConfigMismatch, CorruptCheckpoint, UserError
from mergejax.cli.average import average_checkpoints, load_variables
from mergejax.core.checkpoint import resolve
from mergejax.core.models import init_variables, make_model
from mergejax.core.units import take_units, unit_spec, variables_of

SHAPE = (1, 8, 8, 1)


@pytest.fixture(scope="module")
def model():
    return make_model("cnn", 10, channels=(4, 6, 8))


@pytest.fixture(scope="module")
def nets(model):
    init = jax.jit(lambda k: init_variables(model, k, SHAPE))
    out = []
    for s in range(3):
        p, b = init(jax.random.key(s))
        b = jax.tree.map(lambda x: x + s + 0.5, b)
        out.append({"params": p, "batch_stats": b})
    return out


def _write(tmp_path, nets):
    """Three layouts: a checkpoint.save path, a fit-style workdir (latest step), a step dir."""
    a = checkpoint.save(str(tmp_path / "a"), {**nets[0], "opt_state": {"mu": jnp.ones(3)}, "step": jnp.array(3)})
    with checkpoint.Manager(str(tmp_path / "run_b" / "checkpoints")) as m:
        m.save(1, {**nets[2], "step": jnp.array(1)})  # older step: must be ignored
        m.save(7, {**nets[1], "step": jnp.array(7)})
    with checkpoint.Manager(str(tmp_path / "run_c" / "checkpoints")) as m:
        m.save(4, {**nets[2], "step": jnp.array(4)})
    return [a, str(tmp_path / "run_b"), str(tmp_path / "run_c" / "checkpoints" / "4")]


def _digest(root):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(os.path.join(d, f).encode())
            h.update(open(os.path.join(d, f), "rb").read())
    return h.hexdigest()


def _np_mean(trees, w):
    w = np.asarray(w, np.float64) / np.sum(w)
    return jax.tree.map(lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs)), *trees)


def _assert_close(a, b, tol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=tol, atol=tol)


def test_cli_weighted_average_streams_and_leaves_inputs(tmp_path, nets, capsys):
    paths = _write(tmp_path, nets)
    assert resolve(paths[1]).endswith(os.path.join("checkpoints", "7"))
    before = [_digest(p) for p in paths]
    out = str(tmp_path / "avg")
    assert cli.main(["average", *paths, "--out", out, "--weights", "1", "2", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3
    assert [_digest(p) for p in paths] == before
    got = checkpoint.load(os.path.join(out, "checkpoint"))
    assert set(got) == {"params", "batch_stats"}
    _assert_close(got, _np_mean(nets, [1, 2, 5]))
    assert json.load(open(os.path.join(out, "average.json")))["weights"] == [1.0, 2.0, 5.0]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    # The output is itself a valid input; an existing --out is refused without --overwrite.
    _assert_close(load_variables(out), _np_mean(nets, [1, 2, 5]))
    # The same request again returns the stored result; another one is refused with one line.
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["kind"] == "average" and manifest["config"]["weights"] == [1.0, 2.0, 5.0] and len(manifest["inputs"]) == 3
    stamp = os.stat(os.path.join(out, "average.json")).st_mtime_ns
    assert average_checkpoints(paths, out, weights=[1, 2, 5]) == json.load(open(os.path.join(out, "average.json")))
    assert os.stat(os.path.join(out, "average.json")).st_mtime_ns == stamp
    with pytest.raises(ConfigMismatch, match=r"holds a different average: .*--overwrite") as e:
        average_checkpoints(paths[:2], out)
    assert "\n" not in str(e.value)
    average_checkpoints(paths[:2], out, overwrite=True)
    _assert_close(checkpoint.load(os.path.join(out, "checkpoint")), _np_mean(nets[:2], [1, 1]))


def test_mismatch_names_leaf(tmp_path, nets, other_net):
    a = checkpoint.save(str(tmp_path / "a"), nets[0])
    c = checkpoint.save(str(tmp_path / "c"), other_net)
    with pytest.raises(ValueError, match=r"\['batch_stats'\]\['conv1'\]\['bn'\]\['mean'\] of shape \(7,\)"):
        average_checkpoints([a, c], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_align_recovers_permuted_copies(tmp_path, model, nets):
    """Permuted copies of one network, averaged after --align, give that network back."""
    spec = unit_spec(model, variables_of(nets[0]["params"], nets[0]["batch_stats"]))
    rng = np.random.default_rng(0)
    paths = [checkpoint.save(str(tmp_path / "ref"), nets[0])]
    for i in range(2):
        perm = {g: rng.permutation(n) for g, n in spec.groups.items()}
        paths.append(checkpoint.save(str(tmp_path / f"p{i}"), take_units(nets[0], spec, perm)))
    out = str(tmp_path / "aligned")
    average_checkpoints(paths, out, align=paths[0], model="cnn", model_kw={"channels": (4, 6, 8)})
    _assert_close(checkpoint.load(os.path.join(out, "checkpoint")), jax.tree.map(lambda x: np.asarray(x, np.float64), nets[0]), 1e-6)
    # Without alignment the average is far from it.
    naive = str(tmp_path / "naive")
    average_checkpoints(paths, naive)
    k = lambda t: np.asarray(t["params"]["conv1"]["conv"]["kernel"])  # noqa: E731
    assert np.abs(k(checkpoint.load(os.path.join(naive, "checkpoint"))) - k(nets[0])).max() > 1e-2


def test_recompute_bn(tmp_path, model, nets):
    from mergejax.core import data
    from mergejax.ensembles.swa import recompute_batch_stats
    from mergejax.core.train import model_apply_fn

    paths = [checkpoint.save(str(tmp_path / f"n{i}"), nets[i]) for i in range(2)]
    out = str(tmp_path / "bn")
    assert cli.main(["average", *paths, "--out", out, "--model", "cnn", "--model-kw", "channels=(4, 6, 8)",
                     "--recompute-bn", "digits", "--bn-batch-size", "256"]) == 0
    got = checkpoint.load(os.path.join(out, "checkpoint"))
    mean = _np_mean(nets[:2], [1, 1])
    _assert_close(got["params"], mean["params"])
    ref = recompute_batch_stats(model_apply_fn(model), jax.tree.map(jnp.asarray, got["params"]), nets[0]["batch_stats"],
                                data.load("digits", "train"), 256)
    _assert_close(got["batch_stats"], jax.tree.map(np.asarray, ref), 1e-5)
    # The re-estimated statistics are not the averaged ones (those were shifted by +0.5, +1.5).
    assert np.abs(np.asarray(got["batch_stats"]["conv0"]["bn"]["var"]) - mean["batch_stats"]["conv0"]["bn"]["var"]).max() > 0.1


# ---------------------------------------------------------------- inputs are read-only, errors are one line


def test_out_inside_or_around_an_input_is_refused(tmp_path, nets):
    paths = _write(tmp_path, nets)
    before = _digest(tmp_path)
    for out in (paths[0], os.path.join(paths[0], "avg"), str(tmp_path / "run_b" / "avg"),
                str(tmp_path / "run_c" / "checkpoints" / "9"), str(tmp_path)):
        with pytest.raises(UserError, match=r"--out .* (is inside|contains) input") as e:
            average_checkpoints(paths, out, overwrite=True)
        assert "\n" not in str(e.value)
    # through a symlink too (real paths are compared)
    os.symlink(tmp_path / "run_b", tmp_path / "link")
    with pytest.raises(UserError, match="is inside input 2"):
        average_checkpoints(paths, str(tmp_path / "link" / "avg"))
    os.remove(tmp_path / "link")
    assert _digest(tmp_path) == before


@pytest.fixture(scope="module")
def other_net():
    """A network one unit wider in conv1 than ``nets``."""
    p, b = jax.jit(lambda k: init_variables(make_model("cnn", 10, channels=(4, 7, 8)), k, SHAPE))(jax.random.key(0))
    return {"params": p, "batch_stats": b}


def _fit_checkpoint(directory, net):
    """A checkpoint as ``fit`` writes it (``TrainState.arrays()``: step, params, batch_stats
    and an optax state with empty entries, stored as None)."""
    from mergejax.core.optim import make_optimizer

    tx = make_optimizer("sgd", 0.05, momentum=0.9, weight_decay=5e-4)
    with checkpoint.Manager(os.path.join(directory, "checkpoints")) as m:
        m.save(5, {"step": jnp.array(5), **net, "opt_state": tx.init(net["params"])})
    return directory


@pytest.mark.parametrize("with_checksums", [True, False])
def test_mismatch_of_fit_checkpoints_names_leaf_and_both_shapes(tmp_path, nets, other_net, with_checksums):
    a = _fit_checkpoint(str(tmp_path / "run_a"), nets[0])
    b = _fit_checkpoint(str(tmp_path / "run_b"), other_net)
    assert None in jax.tree.leaves(checkpoint.load(os.path.join(a, "checkpoints", "5"))["opt_state"], is_leaf=lambda x: x is None)
    if not with_checksums:  # written by an older mergejax: shapes from orbax's _METADATA (None entries skipped)
        os.remove(os.path.join(b, "checkpoints", "5", "checksums.json"))
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=re.escape(f"checkpoint {b} has leaf ['batch_stats']['conv1']['bn']['mean'] of shape (7,), {a} has (6,)")):
        average_checkpoints([a, b], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_corrupt_input_is_refused_with_the_file_named(tmp_path, nets, capfd):
    paths = _write(tmp_path, nets)
    step = paths[2]
    data = max((os.path.relpath(os.path.join(d, f), step) for d, _, fs in os.walk(step) for f in fs if os.path.basename(d) == "d"),
               key=lambda f: os.path.getsize(os.path.join(step, f)))
    with open(os.path.join(step, data), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(step, data)) // 2)
        f.write(b"\0" * 400)
    before = _digest(tmp_path)
    with pytest.raises(CorruptCheckpoint, match=re.escape(data)) as e:
        average_checkpoints(paths, str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert _digest(tmp_path) == before  # no output, inputs untouched
    # a work directory whose newest step is damaged: the previous step is used, with a warning,
    # and the input is left exactly as it was (not moved aside: inputs are read-only)
    run_b = tmp_path / "run_b" / "checkpoints" / "7"
    victim = max((os.path.join(d, f) for d, _, fs in os.walk(run_b) for f in fs if os.path.basename(d) == "d"), key=os.path.getsize)
    open(victim, "r+b").truncate(os.path.getsize(victim) // 2)
    before = _digest(tmp_path / "run_b")
    capfd.readouterr()
    assert resolve(str(tmp_path / "run_b")) == str(tmp_path / "run_b" / "checkpoints" / "1")
    assert "skipping step 7" in capfd.readouterr().err
    average_checkpoints([paths[0], str(tmp_path / "run_b")], str(tmp_path / "out2"))
    assert _digest(tmp_path / "run_b") == before and sorted(os.listdir(tmp_path / "run_b" / "checkpoints")) == ["1", "7"]
    _assert_close(checkpoint.load(os.path.join(tmp_path / "out2", "checkpoint")), _np_mean([nets[0], nets[2]], [1, 1]))
