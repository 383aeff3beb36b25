"""Every experiment module runs end to end, from its command line, in a tiny configuration (no bit rot)."""

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import experiments
from tests.conftest import REPO_ROOT, tiny_overrides


# Per experiment: the overrides that make it tiny. A new experiment without an entry fails the first test.
TINY = {
    "av_digits": lambda data_dir: tiny_overrides(data_dir, **{"train.num_steps": 3, "train.eval_every_steps": 3}),
}


def test_every_experiment_has_a_tiny_configuration():
    modules = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))
    assert modules, "no experiment modules found"
    assert sorted(TINY) == modules


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_runs_from_the_command_line(name, av_digits_dir, tmp_path):
    overrides = [f"--config.{o}" for o in TINY[name](av_digits_dir)]
    command = [sys.executable, "-m", f"experiments.{name}", "--workdir", str(tmp_path), *overrides]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| model (test) | accuracy | macro_f1 |" in result.stdout
    summary = json.load(open(os.path.join(tmp_path, "summary.json")))
    assert set(summary) == {"image", "audio", "early", "late"}
    for splits in summary.values():
        assert splits["test"]["num_examples"] == 360


def test_experiment_help_and_bad_override(tmp_path):
    command = [sys.executable, "-m", "experiments.av_digits", "--help"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--workdir" in result.stdout and "python -m experiments.av_digits" in result.stdout
    command = [sys.executable, "-m", "experiments.av_digits", "--workdir", str(tmp_path), "--config.optimizer.lr=x"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "config key 'optimizer.lr' expects float" in result.stderr
