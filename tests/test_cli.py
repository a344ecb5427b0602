"""The ``mergejax`` command line: help, unknown commands, and ``mergejax train`` on digits (with resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mergejax import cli
from mergejax.train import read_metrics


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
