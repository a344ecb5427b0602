"""The merge stages: an interrupted gate stage resumes to the same summary (the gate history
recorded by its callback included), and the stages compose into ``merge``."""

import jax
import numpy as np
import pytest

from mergejax.cli.merge import get_config, stage_args
from mergejax.config import replace
from mergejax.core import data as data_lib
from mergejax.merging.concat import concat
from mergejax.merging.pipeline import compress_stage, double_width, evaluate_sampled_gates, evaluate_vars, gate_stage, merge
from mergejax.core.models import init_variables, make_model
from mergejax.core.loop import evaluate
from mergejax.core.optim import make_optimizer
from mergejax.core.train import TrainState, model_apply_fn
from mergejax.core.units import unit_spec, variables_of

MODEL = make_model("mlp", 10, hidden=(16,))
CFG = replace(get_config("tiny"), model="mlp", model_kwargs={"hidden": (16,)}, batch_size=64, gate_epochs=2.0,
              finetune_epochs=1.0, lambda0=5.0, lambda_step=5.0, gate_lr=5.0, log_every=1, checkpoint_every=0)


def _teachers():
    return [variables_of(*init_variables(MODEL, jax.random.key(i), (1, 8, 8, 1))) for i in (0, 1)]


def _big():
    a, b = _teachers()
    return concat(a, b, unit_spec(MODEL, a))


@pytest.fixture(scope="module")
def data(digits):
    train, test = digits
    return data_lib.Split(train.images[:256], train.labels[:256], train.num_classes, "digits256"), test


class Interrupt(Exception):
    pass


def _interrupt_at(step):
    def cb(done, state):
        if done == step:
            raise Interrupt
    return cb


def _no_time(log):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in log]


def test_interrupted_gate_stage_resumes_to_the_same_summary(tmp_path, data):
    train, test = data  # 4 steps per epoch: 8 gate steps, checkpoints every 2
    gate, _ = stage_args(replace(CFG, checkpoint_every=2), len(train))
    kw = dict(key=jax.random.key(3), progress=False, record_every=1, **{**gate, "sampled_eval_log_alpha": 1.0})
    ref_vars, ref_las, ref = gate_stage(double_width(MODEL), _big(), train, test, workdir=str(tmp_path / "a"), **kw)

    with pytest.raises(Interrupt):  # killed after step 5, whose gates were recorded; last checkpoint: step 4
        gate_stage(double_width(MODEL), _big(), train, test, workdir=str(tmp_path / "b"),
                   callbacks=[_interrupt_at(5)], **kw)
    recorded = (tmp_path / "b" / "gate_history.jsonl").read_text().splitlines()
    assert len(recorded) == 6  # steps 0..5
    out_vars, las, got = gate_stage(double_width(MODEL), _big(), train, test, workdir=str(tmp_path / "b"), **kw)

    assert got["gate_history"] == ref["gate_history"]
    assert got["gate_history"]["step"] == list(range(9))
    assert _no_time(got["gate_log"]) == _no_time(ref["gate_log"]) and [r["step"] for r in got["gate_log"]] == list(range(1, 9))
    for k in ("big_start", "big_student_step0", "big_student_step0_sampled", "big_student_after_gates", "gate_binariness",
              "gate_binariness_per_group", "steps"):
        assert got[k] == ref[k], k
    jax.tree.map(np.testing.assert_array_equal, (out_vars, las), (ref_vars, ref_las))


def test_stages_compose_into_merge(data):
    train, test = data
    key = jax.random.key(7)
    gate, finetune = stage_args(CFG, len(train))
    student, summary = merge(*_teachers(), MODEL, train, test, key=key, gate=gate, finetune=finetune, progress=False)
    gate_key, finetune_key = jax.random.split(key)
    big_vars, las, s1 = gate_stage(double_width(MODEL), _big(), train, test, key=gate_key, progress=False, **gate)
    student2, s2 = compress_stage(double_width(MODEL), MODEL, big_vars, las, train, test, key=finetune_key, progress=False,
                                  teacher_units=unit_spec(MODEL, _teachers()[0]).groups, **finetune)
    jax.tree.map(np.testing.assert_array_equal, student, student2)
    assert summary["after_finetune"] == s2["after_finetune"] and summary["gate_history"] == s1["gate_history"]
    assert summary["steps"] == {"gates": 8, "per_epoch": 4, "finetune": 4}
    assert set(summary["kept_from_teacher_a"]) == {"dense0"}
    assert 0.0 <= summary["after_compression_unfolded"]["accuracy"] <= 1.0
    assert "big_student_step0_sampled" not in summary  # measured only when asked (sampled_eval_log_alpha, the VGG-11 row)


def test_sampled_gate_evaluation_at_the_extremes(data):
    """The authors' evaluation (random gates): gates that are always open give the plain big student, gates that
    are always shut leave the head's bias alone, so every example gets the class of its largest entry."""
    _, test = data
    big_model, big = double_width(MODEL), _big()
    n = unit_spec(big_model, big).groups["dense0"]
    is_open = evaluate_sampled_gates(big_model, big, {"dense0": np.full(n, 20.0)}, test, key=jax.random.key(0), batch_size=128)
    assert is_open["accuracy"] == evaluate_vars(big_model, big, test, 128)["accuracy"]
    assert is_open["loss"] == pytest.approx(evaluate_vars(big_model, big, test, 128)["loss"], rel=1e-6)
    shut = evaluate_sampled_gates(big_model, big, {"dense0": np.full(n, -20.0)}, test, key=jax.random.key(0), batch_size=128)
    bias = np.asarray(big["params"]["head"]["dense"]["bias"])
    assert shut["accuracy"] == pytest.approx(float(np.mean(np.asarray(test.labels) == np.argmax(bias))), abs=1e-7)


def test_evaluate_vars_agrees_with_evaluate_of_a_train_state(data):
    _, test = data
    v = _teachers()[0]
    state = TrainState.create(apply_fn=model_apply_fn(MODEL), params=v["params"], batch_stats=v["batch_stats"],
                              tx=make_optimizer("sgd", 0.1))
    assert evaluate_vars(MODEL, v, test, 128) == evaluate(state, test, 128)


def test_merging_depends_only_on_the_core(run_python):
    proc = run_python("""
        import sys
        import mergejax.merging
        loaded = sorted(m for m in sys.modules if m.startswith("mergejax."))
        print(loaded)
        assert not {"mergejax.run", "mergejax.config", "mergejax.experiment"} & set(loaded), loaded
    """)
    assert "mergejax.merging.pipeline" in proc.stdout
