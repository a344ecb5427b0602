"""Training on every local device (train config key ``devices``): the batch split over a
``data`` mesh with synchronised BatchNorm equals one device on the whole batch.

Simulated devices need their own process (``XLA_FLAGS`` before jax is imported), so the
multi-device runs go through the ``run_python`` fixture; this pytest process keeps its one
CPU device, where ``devices=0`` must be today's single-device path bit for bit.
"""

import json
import os

import jax
import numpy as np
import pytest

from mergejax.config import train_config

SMALL = dict(model="cnn", model_kwargs={"width": 0.25}, batch_size=64, steps=6, lr=0.1, log_every=3, eval_every=3)


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def test_one_device_is_the_plain_fit(digits):
    """On a 1-device process ``devices=0`` resolves to one device and runs plain ``fit``:
    bit-identical to calling ``fit`` without a step_fn (today's path)."""
    from mergejax.core.loop import fit
    from mergejax.run import setup, train_and_evaluate

    assert jax.local_device_count() == 1
    cfg = train_config(**SMALL)
    assert cfg.devices == 0
    state, summary = train_and_evaluate(cfg, progress=False, setup_=setup(cfg, train=digits[0], test=digits[1]))
    assert summary["num_devices_used"] == 1
    s = setup(cfg, train=digits[0], test=digits[1])
    ref, history = fit(s.state, s.train, num_steps=s.num_steps, batch_size=cfg.batch_size, seed=cfg.seed, eval_split=s.test,
                       eval_every=cfg.eval_every, log_every=cfg.log_every, progress=False)
    for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)), jax.tree.leaves((ref.params, ref.batch_stats))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["loss"] for h in summary["history"]] == [h["loss"] for h in history]


_EIGHT = """
import json, sys
import jax, numpy as np
from mergejax.config import train_config
from mergejax.core.errors import UserError
from mergejax.run import setup, train_and_evaluate

out = {"devices": jax.local_device_count()}
small = json.loads(sys.argv[1])
init = setup(train_config(**small)).state
arrays = {}
for name, over in [("one", dict(devices=1)), ("all", dict(devices=0))]:
    state, summary = train_and_evaluate(train_config(**small, **over), progress=False)
    out[name] = {k: summary[k] for k in ("test_accuracy", "test_loss", "num_devices_used")}
    out[name]["history"] = [[h["step"], h["split"], h["loss"]] for h in summary["history"]]
    out[name]["sharding"] = str(jax.tree.leaves(state.params)[0].sharding.device_set)
    arrays[name] = (state.params, state.batch_stats)
    # the returned state trains on one device again (the plain model, not the synchronised one)
    out[name]["plain_model"] = getattr(state.apply_fn, "model").bn_axis_name is None
    out[name]["augment"] = state.augment_fn is not None

def gap(a, b):
    return [float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]

flat = {f"{name}{jax.tree_util.keystr(p)}": np.asarray(x) for name, tree in arrays.items()
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
np.savez(sys.argv[2], **flat)
out["moved"] = max(gap(arrays["one"][0], init.params))
out["stats_moved"] = max(gap(arrays["one"][1], init.batch_stats))
for name, over in [("indivisible", dict(batch_size=60)), ("too_many", dict(devices=9))]:
    try:
        train_and_evaluate(train_config(**{**small, **over}), progress=False)
        out[name] = None
    except UserError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def test_all_devices_equal_one_device(run_python, tmp_path):
    """8 simulated devices, CIFAR augmentation on: ``devices=0`` (all 8) equals ``devices=1``
    (params, batch_stats, losses, test accuracy), so the augmentation too is one device's
    (drawn per device it gives a 3e-2 parameter gap here); bad counts are refused. The CLI
    test below covers a run without augmentation."""
    npz = tmp_path / "states.npz"
    small = json.dumps({**SMALL, "augment": True})
    proc = run_python(f"import sys; sys.argv = ['x', {json.dumps(small)}, {str(npz)!r}]\n" + _EIGHT, env=_env(8))
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    states = np.load(npz)
    assert r["devices"] == 8
    assert [r[k]["num_devices_used"] for k in ("one", "all")] == [1, 8]
    assert all(r[k]["plain_model"] and r[k]["augment"] and r[k]["sharding"].count("CpuDevice") == 1 for k in ("one", "all"))
    leaves = [k[len("one"):] for k in states.files if k.startswith("one[")]
    assert len(leaves) > 10  # params and batch_stats of every layer
    for leaf in leaves:  # observed: |gap| <= 3e-7 (float32 rounding of sums split over shards)
        np.testing.assert_allclose(states["all" + leaf], states["one" + leaf], rtol=1e-4, atol=1e-6, err_msg=leaf)
    one, all_ = r["one"], r["all"]
    assert abs(all_["test_accuracy"] - one["test_accuracy"]) <= 1.0 / 360  # at most one of the 360 test digits flips
    np.testing.assert_allclose(all_["test_loss"], one["test_loss"], rtol=1e-5)
    assert [h[:2] for h in all_["history"]] == [h[:2] for h in one["history"]]  # train and mid-run test records
    np.testing.assert_allclose([h[2] for h in all_["history"]], [h[2] for h in one["history"]], rtol=1e-5)
    assert r["moved"] > 1e-2 and r["stats_moved"] > 1e-2  # training moved the state: the comparison is not vacuous
    assert r["indivisible"] == ("batch_size 60 does not split over 8 devices; set devices to a divisor of 60 "
                                "(devices=1: one device) or a batch_size divisible by 8")
    assert r["too_many"] == "devices=9 but this process sees 8 local device(s); use 0 (all) or 1..8"


_CLI = """
import json, os, shutil, sys
from mergejax import cli

root = sys.argv[1]
base = ["train", "--set", "steps=6", "--set", "log_every=3", "--set", "checkpoint_every=3",
        "--set", "model_kwargs={'width': 0.25}", "--quiet"]
rc = {}
for name, d in (("all", 0), ("one", 1)):
    rc[name] = cli.main([*base, "--set", f"devices={d}", "--out", os.path.join(root, name)])
first = json.load(open(os.path.join(root, "all", "summary.json")))
# interrupted after step 3: drop the last checkpoint, run the same command again (resumes on 4 devices)
shutil.rmtree(os.path.join(root, "all", "checkpoints", "6"))
rc["resume"] = cli.main([*base, "--set", "devices=0", "--out", os.path.join(root, "all")])
rc["bad"] = cli.main([*base, "--set", "devices=0", "--set", "batch_size=30", "--out", os.path.join(root, "bad")])
print(json.dumps({"rc": rc, "first": first}))
"""


def test_cli_train_on_all_devices_and_resume(run_python, tmp_path):
    """``mergejax train --set devices=0`` on 4 simulated devices: same result as devices=1,
    an interrupted run resumes (restored arrays placed on the mesh) to the same summary, and an
    indivisible batch is one line on stderr with status 2."""
    proc = run_python(f"import sys; sys.argv = ['x', {str(tmp_path)!r}]\n" + _CLI, env=_env(4))
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rc"] == {"all": 0, "one": 0, "resume": 0, "bad": 2}
    first, one = r["first"], json.loads((tmp_path / "one" / "summary.json").read_text())
    resumed = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert first["num_devices_used"] == 4 and one["num_devices_used"] == 1 and first["config"]["devices"] == 0
    np.testing.assert_allclose(first["test_loss"], one["test_loss"], rtol=1e-5)
    assert abs(first["test_accuracy"] - one["test_accuracy"]) <= 1.0 / 360
    assert resumed["test_loss"] == first["test_loss"] and resumed["test_accuracy"] == first["test_accuracy"]
    assert sorted(os.listdir(tmp_path / "all" / "checkpoints")) == ["3", "6"]
    assert "batch_size 30 does not split over 4 devices" in proc.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything was written


_MANY = """
import json, os, shutil, sys
import jax, numpy as np
from mergejax.config import train_config
from mergejax.core import data as data_lib
from mergejax.core.multi import fit_many, spread_devices
from mergejax.run import setup, train_and_evaluate_many

root = sys.argv[1]
cfg = train_config(model="cnn", model_kwargs={"width": 0.25}, batch_size=32, steps=6, lr=0.1, log_every=3, augment=True)
train, test = data_lib.load("digits", "train"), data_lib.load("digits", "test")
seeds = [0, 1, 2, 3]
states = lambda: [setup(cfg, train=train, test=test, seed=s).state for s in seeds]
kw = dict(num_steps=6, batch_size=32, seeds=seeds, log_every=3, progress=False)
one, h1 = fit_many(states(), train, **kw)
spread, h4 = fit_many(states(), train, devices=jax.devices()[:4], **kw)
gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for x, y in zip(one, spread)
          for a, b in zip(jax.tree.leaves(x.arrays()), jax.tree.leaves(y.arrays())))
moved = float(np.max(np.abs(np.asarray(one[0].params["head"]["dense"]["kernel"]) - np.asarray(states()[0].params["head"]["dense"]["kernel"]))))
# a run killed after step 3 (last checkpoint dropped) resumes on 2 devices to the same end
d = os.path.join(root, "many")
fit_many(states(), train, devices=jax.devices()[:4], workdir=d, checkpoint_every=3, **kw)
shutil.rmtree(os.path.join(d, "checkpoints", "6"))
resumed, _ = fit_many(states(), train, devices=jax.devices()[:2], workdir=d, checkpoint_every=3, **kw)
resume_gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for x, y in zip(one, resumed)
                 for a, b in zip(jax.tree.leaves(x.arrays()), jax.tree.leaves(y.arrays())))
try:
    fit_many(states()[:3], train, devices=jax.devices()[:2], **{**kw, "seeds": seeds[:3]})
    bad = None
except ValueError as e:
    bad = str(e)
_, summaries = train_and_evaluate_many(cfg, [0, 1, 2, 3, 4, 5], progress=False)
print(json.dumps({"gap": gap, "moved": moved, "resume_gap": resume_gap, "bad": bad, "losses": [[h["loss"] for h in x] for x in h1],
                  "losses4": [[h["loss"] for h in x] for x in h4], "used": summaries[0]["num_devices_used"],
                  "platform": [d.platform for d in spread[0].params["head"]["dense"]["kernel"].devices()],
                  "spread": [len(spread_devices(n, jax.devices())) for n in (1, 2, 3, 6, 7, 8, 16)]}))
"""


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_models_spread_over_devices_equal_one_device(run_python, tmp_path):
    """``fit_many(..., devices=4 of 8 simulated)``: each device trains whole models, so every
    model equals the one-device stacked run (augmentation on); a run interrupted on 4 devices
    resumes on 2 to the same end; uneven spreads are refused; ``train_and_evaluate_many`` of 6
    seeds on 8 devices uses 6 of them."""
    proc = run_python(f"import sys; sys.argv = ['x', {str(tmp_path)!r}]\n" + _MANY, env=_env(8))
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["moved"] > 1e-2  # trained: the comparison is not vacuous
    assert r["gap"] <= 1e-6 and r["resume_gap"] <= 1e-6, r  # observed: 0 (no model's arithmetic is split)
    np.testing.assert_allclose(r["losses4"], r["losses"], rtol=1e-6)
    assert r["bad"] == "3 models do not spread evenly over 2 devices; use a number of devices that divides 3 (spread_devices picks one)"
    assert r["used"] == 6 and r["platform"] == ["cpu"]  # returned states: one device
    assert r["spread"] == [1, 2, 3, 6, 7, 8, 8]


_SNAPSHOT = """
import json, sys
sys.path.insert(0, "tests")
from conftest import load_experiment
import mergejax.averaging.parallel as par
import mergejax.core.multi as multi
from mergejax.config import override
from mergejax.experiment import run_experiment

calls = {"data_parallel": [], "spread_step": []}  # spies: how many devices each run was given
for module, name in ((par, "data_parallel"), (multi, "spread_step")):
    def spy(state_or_devices, *a, _f=getattr(module, name), _n=name, **k):
        calls[_n].append(len(a[0]) if _n == "data_parallel" else len(state_or_devices))
        return _f(state_or_devices, *a, **k)
    setattr(module, name, spy)
root, mod = sys.argv[1], load_experiment("snapshot_ensemble")
base = override(mod.get_config("smoke"), ["columns=('single','single_cycle','snapshot_a0.2')", "extras=('true_ensemble','swa')",
                                          "models_per_program=2"])
out = {}
for d in (1, 0):
    res = run_experiment(mod, override(base, [f"train.devices={d}"]), f"{root}/d{d}", progress=False)["results"]
    out[d] = {k: [v["error_pct"]["mean"], v["nll"]["mean"]] for k, v in res["summary"].items()}
    out[f"calls{d}"] = {k: list(v) for k, v in calls.items()}
    calls = {k: [] for k in calls}
print(json.dumps(out))
"""


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_snapshot_experiment_on_all_devices_equals_one_device(run_python, tmp_path):
    """experiments/snapshot_ensemble.py on 4 simulated devices (train.devices=0): every run's batch is split
    over them with synchronised BN (single model, snapshot ensemble, SWA with its BN re-estimate on the plain
    model) and the vmapped single-cycle members spread over 2 of them; every row equals devices=1 to one
    test image and nll rtol 5e-3 (observed: the single model, SWA and the true ensemble to 2e-7, the
    snapshot ensemble, whose restarts at lr 0.2 amplify rounding, 1.1e-3 and one image)."""
    proc = run_python(f"import sys; sys.argv = ['x', {str(tmp_path)!r}]\n" + _SNAPSHOT, env=_env(4), timeout=600)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, all_ = out["1"], out["0"]
    # devices=1: nothing split; devices=0: the 4 solo runs (single-0, single-1, snapshot, SWA) split over 4, the 2 members over 2
    assert out["calls1"] == {"data_parallel": [], "spread_step": []}
    assert out["calls0"] == {"data_parallel": [4, 4, 4, 4], "spread_step": [2]}, out["calls0"]
    assert set(one) == set(all_) >= {"single", "single_cycle", "snapshot_0.2", "swa", "true_ensemble"}
    for key in one:
        assert abs(one[key][0] - all_[key][0]) <= 100 / 360 + 1e-4, (key, one[key], all_[key])  # % in float32
        np.testing.assert_allclose(all_[key][1], one[key][1], rtol=5e-3, err_msg=key)
    assert len({round(v[1], 6) for v in one.values()}) >= 4  # the rows differ: not one model compared with itself


_PRELUDE = """
import json
import jax, numpy as np
import mergejax.averaging.parallel as par
from mergejax.core import data as data_lib
from mergejax.core.models import make_model, init_variables
from mergejax.core.units import variables_of

calls = []  # spy: the device count of every data-parallel fit
orig = par.data_parallel
par.data_parallel = lambda state, devices, **k: calls.append(len(devices)) or orig(state, devices, **k)
train, test = data_lib.load("digits", "train"), data_lib.load("digits", "test")
model = make_model("cnn", 10, width=0.25)
"""

_FINETUNE = _PRELUDE + """
from mergejax.merging.pipeline import finetune, finetune_tx

start = jax.device_get(variables_of(*init_variables(model, jax.random.key(0), (1, 8, 8, 1))))  # host: fit donates its state
out = {}
for name, devices in (("one", None), ("four", jax.devices()[:4])):
    tx, lr_fn = finetune_tx(8, 0.1)
    v, log = finetune(model, start, train, test, key=jax.random.key(1), tx=tx, lr_fn=lr_fn, num_steps=8, batch_size=32,
                      log_every=4, progress=False, devices=devices)
    out[name] = [np.asarray(x) for x in jax.tree.leaves(v)]
gap = max(float(np.max(np.abs(a - b))) for a, b in zip(out["one"], out["four"]))
moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(out["one"], jax.tree.leaves(start)))
print(json.dumps({"gap": gap, "moved": moved, "calls": calls}))
"""


@pytest.mark.slow  # CI time (the gate stage on four devices covers fit(devices=) in merging); `python -m pytest -q -m slow` runs it
def test_merge_finetune_on_four_devices_equals_one(run_python):
    """The merging pipeline's fine-tuning (``finetune(..., devices=)``, used by experiments/merge_networks.py with
    ``teacher.devices``) on 4 simulated devices: the batch split with synchronised BN equals one device."""
    r = json.loads(run_python(_FINETUNE, env=_env(4)).stdout.strip().splitlines()[-1])
    assert r["calls"] == [4] and r["moved"] > 1e-2, r  # the 4-device run went through the data-parallel step; training moved
    assert r["gap"] <= 1e-5, r  # observed 1.2e-7


_FREEZEOUT = """
import json
import jax, numpy as np
from mergejax import freezeout as fo
from mergejax.core import data as data_lib
from mergejax.core.models import make_model
from mergejax.core.optim import make_optimizer

train, test = data_lib.load("digits", "train"), data_lib.load("digits", "test")
model = make_model("cnn", 10, width=0.25)
out = {}
for name, devices in (("one", None), ("four", jax.devices()[:4])):
    r = fo.train_and_evaluate(model, train, test, make_optimizer("sgd", 1.0, momentum=0.9), total_steps=12, batch_size=32,
                              lr=0.1, t0=0.3, spacing="linear", log_every=4, devices=devices)
    out[name] = {k: r[k] for k in ("test_loss", "test_accuracy", "train_loss", "stage_prefixes", "num_devices_used")}
print(json.dumps(out))
"""


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_freezeout_on_four_devices_equals_one(run_python):
    """FreezeOut's staged steps (experiments/freezeout.py passes ``train.devices``) on 4 simulated devices:
    each stage's batch split with synchronised BN, the frozen prefix held, equals one device."""
    r = json.loads(run_python(_FREEZEOUT, env=_env(4)).stdout.strip().splitlines()[-1])
    one, four = r["one"], r["four"]
    assert one["num_devices_used"] == 1 and four["num_devices_used"] == 4, r
    assert one["stage_prefixes"] == four["stage_prefixes"] and len(one["stage_prefixes"]) >= 3, r  # layers froze
    for key in ("test_loss", "train_loss"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-5, err_msg=key)
    assert abs(four["test_accuracy"] - one["test_accuracy"]) <= 1 / 360 + 1e-6, r


_GATES = _PRELUDE + """
from mergejax.core.units import unit_spec
from mergejax.merging.concat import concat
from mergejax.merging.gates import lambda_schedule
from mergejax.merging.pipeline import double_width, gate_stage, gate_tx

a, b = (jax.device_get(variables_of(*init_variables(model, jax.random.key(s), (1, 8, 8, 1)))) for s in (0, 1))
big_vars = jax.device_get(concat(a, b, unit_spec(model, a)))  # host arrays: each stage donates its device copy
out = {}
for name, devices in (("one", None), ("four", jax.devices()[:4])):
    tx, lr_fn = gate_tx(8, lr=0.05)
    # log-alphas 30: every sampled gate is exactly 1 (stretched past 1, clipped), whatever the device's key
    v, las, s = gate_stage(double_width(model), big_vars, train, test, key=jax.random.key(3), tx=tx, lr_fn=lr_fn, num_steps=8,
                           lambda_fn=lambda_schedule(0.05, 0.05, 4, 2), batch_size=32, log_every=4, log_alpha_mean=30.0,
                           log_alpha_std=0.0, progress=False, devices=devices)
    out[name] = [np.asarray(x) for x in jax.tree.leaves((v, las))]
    out[name + "_loss"] = s["big_student_after_gates"]["loss"]
gap = max(float(np.max(np.abs(x - y))) for x, y in zip(out["one"], out["four"]))
moved = max(float(np.max(np.abs(x - np.asarray(y)))) for x, y in zip(out["one"], jax.tree.leaves(big_vars)))
print(json.dumps({"gap": gap, "moved": moved, "loss": [out["one_loss"], out["four_loss"]], "calls": calls}))
"""


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_gate_stage_on_four_devices_equals_one(run_python):
    """The merging gate stage (``gate_stage(..., devices=)``, experiments/merge_networks.py passes
    ``teacher.devices``) on 4 simulated devices: the gated big student's batch split with synchronised BN and
    the GateLoss shares summed equals one device. The gates are held exactly open (log-alpha 30), so each
    device's own gate samples equal one device's."""
    r = json.loads(run_python(_GATES, env=_env(4)).stdout.strip().splitlines()[-1])
    assert r["calls"] == [4] and r["moved"] > 1e-2, r  # the 4-device run went through the data-parallel step; training moved
    assert r["gap"] <= 1e-5, r
    np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=1e-5)


_AVERAGING = """
import json, sys
sys.path.insert(0, "tests")
from conftest import load_experiment
import mergejax.averaging.parallel as par
from mergejax.config import override
from mergejax.experiment import run_experiment

calls = []  # spy: the device count of every data-parallel fit
orig = par.data_parallel
par.data_parallel = lambda state, devices, **k: calls.append(len(devices)) or orig(state, devices, **k)
root, mod = sys.argv[1], load_experiment("averaging")
out = {}
for d in (1, 0):
    res = run_experiment(mod, override(mod.get_config("smoke"), [f"devices={d}", "two_process=False", "models_per_program=1"]),
                         f"{root}/d{d}", progress=False)["results"]
    out[d] = {"soups": res["soups"], "interpolation": [{k: v for k, v in r.items() if k != "match_time_s"}
                                                      for r in res["interpolation"]], "calls": list(calls)}
print(json.dumps(out))
"""


@pytest.mark.slow  # CI time; `python -m pytest -q -m slow` runs it
def test_averaging_experiment_on_four_devices_equals_one(run_python, tmp_path):
    """experiments/averaging.py's single-network fits (the interpolation pair, the soup's pretrain and
    fine-tunes) split each batch over ``devices``: on 4 simulated devices the soups and both interpolation
    paths equal ``devices=1`` (MLPs, no BatchNorm: the same sums in another order)."""
    proc = run_python(f"import sys; sys.argv = ['x', {str(tmp_path)!r}]\n" + _AVERAGING, env=_env(4), timeout=600)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["0"]
    assert one["calls"] == [] and len(four["calls"]) >= 4 and set(four["calls"]) == {4}, four["calls"]  # pair, pretrain, fine-tunes

    def numbers(x):
        return [v for k in sorted(x) for v in numbers(x[k])] if isinstance(x, dict) else \
            [v for y in x for v in numbers(y)] if isinstance(x, list) else [float(x)]
    for key in ("soups", "interpolation"):
        a, b = numbers(one[key]), numbers(four[key])
        assert len(a) == len(b) > 10, key
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=key)  # accuracies: whole images of 360
