"""The ``mergejax`` command line: help, unknown commands, and ``mergejax train`` on digits (with resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mergejax import cli
from mergejax.core.loop import read_metrics


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: mergejax COMMAND" in out
    for name, (target, doc) in cli.COMMANDS.items():
        assert name in out and doc in out
        module, func = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), target


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).parent / "mergejax"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mergejax.cli"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout
    proc = subprocess.run([*cmd, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--set KEY=VALUE" in proc.stdout and "--out" in proc.stdout


def test_train_on_digits_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--set", "steps=30", "--set", "log_every=10", "--set", "checkpoint_every=10",
            "--set", "model_kwargs={'width': 0.5}", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert printed["steps"] == summary["steps"] == 30
    assert summary["config"]["dataset"] == "digits" and summary["config"]["model_kwargs"] == {"width": 0.5}
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_accuracy"] > 0.3  # well above chance (0.1)
    assert sorted(d for d in os.listdir(out / "checkpoints") if d.isdigit()) == ["20", "30"]
    assert [r["step"] for r in read_metrics(str(out)) if r["split"] == "train"] == [10, 20, 30]
    # the same command again resumes from step 30: no new steps, same result
    assert cli.main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test_accuracy"] == printed["test_accuracy"] and again["test_loss"] == printed["test_loss"]
    assert [r["step"] for r in read_metrics(str(out)) if r["split"] == "train"] == [10, 20, 30]


def test_help_imports_no_jax(run_python):
    # `mergejax --help` must answer in well under a second: nothing heavy is imported for it
    proc = run_python("import sys; from mergejax import cli; cli.main(['--help']); "
                      "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'numpy') if m in sys.modules))")
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _mergejax(*args, timeout=300):
    script = Path(sys.executable).parent / "mergejax"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mergejax.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    cases = [
        (["train", "--set", "nope=1", "--out", str(tmp_path / "a")], "unknown config key 'nope'"),
        (["train", "--set", "dataset=cifar11", "--out", str(tmp_path / "b")], "unknown dataset 'cifar11'"),
        (["train", "--set", "model=resnet9", "--out", str(tmp_path / "c")], "resnet9"),
        (["train", "--set", "lr=fast", "--out", str(tmp_path / "d")], "expects float"),
    ]
    for args, needle in cases:
        proc = _mergejax(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, proc.stderr)
    proc = _mergejax("train", "--set", "nope=1", "--out", str(tmp_path / "a"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_train_refuses_another_config_in_the_same_out(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--set", "steps=6", "--set", "log_every=3", "--set", "model=mlp", "--out", out, "--quiet"]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main([*base, "--set", "seed=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "seed=0 (asked: 5)" in err and "--overwrite" in err and "\n" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["seed"] == 0  # the old run's summary is intact
    assert cli.main([*base, "--set", "seed=5", "--overwrite"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["seed"] == 5


def test_list_config_prints_every_key_and_survives_a_closed_pipe():
    exe = Path(sys.executable).parent / "mergejax"
    full = subprocess.run([str(exe), "train", "--list-config", "--set", "lr=0.3"], capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr
    assert "lr                 = 0.3  (float)" in full.stdout and len(full.stdout.splitlines()) == 28
    # `| head -0`: the reader is gone before anything is written; no traceback, status 0 (as Unix tools do)
    proc = subprocess.Popen([str(exe), "train", "--list-config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
