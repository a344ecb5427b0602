"""``mergejax merge CKPT_A CKPT_B --out DIR``: loads two checkpoints, writes a loadable student."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import checkpoint
from mergejax.cli import COMMANDS, main
from mergejax.merging.pipeline import evaluate_vars
from mergejax.models import init_variables, make_model
from mergejax.units import variables_of


def test_merge_command_writes_student(tmp_path, digits):
    model = make_model("mlp", 10, hidden=(16,))
    for i, name in enumerate("ab"):
        checkpoint.save(str(tmp_path / name), variables_of(*init_variables(model, jax.random.key(i), (1, 8, 8, 1))))
    assert "merge" in COMMANDS
    out = tmp_path / "merged"
    rc = main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--quiet",
               "--set", "model=mlp", "--set", "model_kwargs={'hidden': (16,)}", "--set", "gate_epochs=0.2",
               "--set", "finetune_epochs=0.2", "--set", "log_every=2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == "mlp" and summary["steps"]["gates"] == 4
    student = checkpoint.load(str(out / "student"))
    assert jax.tree.map(np.shape, student) == jax.tree.map(np.shape, variables_of(*init_variables(model, jax.random.key(0), (1, 8, 8, 1))))
    # The saved student is the one the summary evaluated.
    acc = evaluate_vars(model, jax.tree.map(jnp.asarray, student), digits[1])["accuracy"]
    np.testing.assert_allclose(acc, summary["after_finetune"]["accuracy"], atol=1e-6)
