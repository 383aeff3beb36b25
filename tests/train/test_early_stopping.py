"""Early stopping (`train.early_stopping_patience`): the run stops at the evaluation where the patience runs out,
keeps its best checkpoint, says so in results.json and on the console, resumes to the same stop, and is finished."""

import json
import os

import pytest

from experiments import av_digits
from mmjax import cli
from mmjax import config as config_lib
from mmjax.train import early_stopping, loop, preemption
from mmjax.train import setup as setup_lib
from mmjax.train import workdir as workdir_lib
from tests.conftest import tiny_overrides
from tests.train.test_loop import tiny_config

# validation/accuracy at the evaluations of steps 2, 4, ..., 14: better at 4, worse at 6, the best at 8, then
# three evaluations without an improvement: with a patience of 3 the run stops at step 14 of 20, best step 8.
SCRIPT = [0.3, 0.6, 0.5, 0.7, 0.6, 0.65, 0.69]
OVERRIDES = {"train.num_steps": 20, "train.eval_every_steps": 2, "checkpoint.every_steps": 2, "checkpoint.keep": 2,
             "train.early_stopping_patience": 3}
STOPPED = {"step": 14, "best_step": 8, "best": 0.7, "metric": "validation/accuracy", "mode": "max", "patience": 3}


def config(data_dir, **extra):
    """The tiny AV-Digits run with OVERRIDES, as its command line resolves them (the key is optional)."""
    overrides = tiny_overrides(data_dir, **{**OVERRIDES, **extra})
    resolved = config_lib.apply_overrides(cli.with_optional_keys(av_digits.get_config(), overrides), overrides)
    resolved.name = "tiny"
    return resolved


@pytest.fixture
def scripted(monkeypatch):
    """Replaces validation accuracy with SCRIPT, one value per evaluation (deterministic plateau); returns the
    number of validation evaluations so far."""
    real, calls = setup_lib.Setup.evaluate, {"n": 0}

    def evaluate(self, state, split, batches=None):
        metrics = real(self, state, split, batches)
        if split == "validation":
            metrics = dict(metrics, accuracy=SCRIPT[calls["n"]])
            calls["n"] += 1
        return metrics

    monkeypatch.setattr(setup_lib.Setup, "evaluate", evaluate)
    return calls


def test_run_stops_at_the_evaluation_where_patience_runs_out_and_resuming_is_a_no_op(
        av_digits_dir, tmp_path, scripted, capsys):
    workdir = str(tmp_path)
    results = loop.run(config(av_digits_dir), workdir)
    assert results["early_stopped"] == STOPPED and results["steps"] == 14
    assert json.loads(open(os.path.join(workdir, "results.json")).read())["early_stopped"] == STOPPED
    out = capsys.readouterr().out
    assert ("early stopping at step 14: validation/accuracy has not improved for 3 evaluation(s); best 0.7000 at "
            "step 8 (its checkpoint is kept as the best)") in out
    assert "step     15/" not in out and scripted["n"] == 7
    assert workdir_lib.committed_steps(workdir) == [8, 12, 14]  # The last 2, and the best.
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert max(r["step"] for r in records) == 14
    _, best = workdir_lib.load_trained(workdir, step="best")
    assert int(best.step) == 8

    for steps in (20, 40):  # Finished: re-running trains nothing, even with more steps.
        again = loop.run(config(av_digits_dir, **{"train.num_steps": steps}), workdir)
        assert again["resumed_from_step"] == 14 and again["early_stopped"] == STOPPED and again["steps"] == 14
        assert again["splits"] == results["splits"]
        assert "this run is finished, nothing to train" in capsys.readouterr().out
    assert scripted["n"] == 7  # No evaluation either.
    assert [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))] == records
    assert workdir_lib.committed_steps(workdir) == [8, 12, 14]


def test_an_interrupted_run_resumes_its_count_and_stops_at_the_same_evaluation(
        av_digits_dir, tmp_path, scripted, monkeypatch):
    """Stopped at step 11 (after the evaluations at 8: best, and 10: one without improvement): the resumed run must
    count 10 against the patience, so that it stops at 14 like the uninterrupted run (a fresh count would take the
    evaluation at 12 as the best and train on)."""
    calls = {"n": 0}

    def stop_after_eleven_steps(self):
        calls["n"] += 1
        return calls["n"] == 11

    with monkeypatch.context() as patch:
        patch.setattr(preemption.StopRequest, "requested", stop_after_eleven_steps)
        assert loop.run(config(av_digits_dir), str(tmp_path)) == {"preempted": True, "step": 11}
    results = loop.run(config(av_digits_dir), str(tmp_path))
    assert results["resumed_from_step"] == 11 and results["early_stopped"] == STOPPED


def test_patience_counts_ties_as_no_improvement_and_keeps_the_later_tie_as_best():
    stopping = early_stopping.EarlyStopping(2, "validation/loss", "min")
    assert not stopping.update(2, {"validation/loss": 1.0}, last_step=100)
    assert not stopping.update(4, {"validation/loss": 1.0}, last_step=100)  # A plateau: no improvement ...
    assert stopping.best_step == 4  # ... but the later step is the checkpoint Orbax keeps as the best.
    assert stopping.update(6, {"validation/loss": 1.5}, last_step=100)
    assert stopping.stopped == {"step": 6, "best_step": 4, "best": 1.0, "metric": "validation/loss", "mode": "min",
                                "patience": 2}
    last = early_stopping.EarlyStopping(1, "validation/loss", "min", {"best": 1.0, "best_step": 4, "since_best": 0})
    assert not last.update(8, {"validation/loss": 2.0}, last_step=8) and last.stopped is None  # Not early: the end.
    off = early_stopping.EarlyStopping(0, "validation/loss", "min")
    assert not off.update(2, {"validation/loss": 1.0}, last_step=100) and not off.active


@pytest.mark.parametrize("value, best_metric, message", [
    (-1, "validation/accuracy", "config train.early_stopping_patience=-1 must be an int >= 0"),
    ("3", "validation/accuracy", "config train.early_stopping_patience='3' must be an int >= 0"),
    (True, "validation/accuracy", "config train.early_stopping_patience=True must be an int >= 0"),
    (2.0, "validation/accuracy", "config train.early_stopping_patience=2.0 must be an int >= 0"),
    (3, "", "config train.early_stopping_patience=3 needs checkpoint.best_metric ('SPLIT/METRIC'"),
])
def test_bad_patience_is_refused_before_anything_runs(av_digits_dir, tmp_path, value, best_metric, message):
    bad = tiny_config(av_digits_dir, **{"checkpoint.best_metric": best_metric})
    bad.train.early_stopping_patience = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loop.run(bad, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_every_experiment_accepts_the_key_and_older_configs_lack_it(av_digits_dir):
    config = cli.resolve_config(av_digits.get_config, ["train.early_stopping_patience=4"])
    assert config.train.early_stopping_patience == 4
    assert "early_stopping_patience" not in av_digits.get_config().train  # Optional: absent means off.
    assert early_stopping.patience(av_digits.get_config()) == 0
