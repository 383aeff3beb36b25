"""`python -m mmjax.sweep --backend optuna`: workers sharing a study, a killed worker's trial resumed, pruning, and
the bad inputs (conflicting options, an unopenable storage, another search space on the same study)."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from experiments import av_digits
from mmjax.sweep import command
from tests.conftest import REPO_ROOT, cpu_env, tiny_overrides

OPTUNA = ["--backend", "optuna"]


def _argv(workdir, data_dir, *extra, steps=2, every=2):
    tiny = tiny_overrides(data_dir, **{"variants": "early", "train.num_steps": steps,
                                       "train.eval_every_steps": every, "train.log_every_steps": every})
    return ["--base", "av_digits", "--workdir", str(workdir), *extra, *(f"--config.{o}" for o in tiny)]


def _study(workdir):
    return optuna.load_study(study_name=f"mmjax:{os.path.abspath(workdir)}",
                             storage=f"sqlite:///{os.path.join(workdir, 'study.db')}")


def _worker(argv, log):
    return subprocess.Popen([sys.executable, "-m", "mmjax.sweep", *argv], env=cpu_env(2), cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT)


def _train_steps(trial_dir):
    """The steps of the train records in the trial's (early-fusion variant's) metrics.jsonl."""
    with open(os.path.join(trial_dir, "early", "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.parametrize("args, message", [
    (["--sampler", "tpe"], "--sampler tpe needs --trials N"),
    (["--trials", "3"], "--trials is for --sampler random or tpe"),
    (["--random", "2"], "with --backend optuna use --sampler random --trials N"),
    (["--grid", "model.modality_dropout=uniform(0,0.5)"], "the grid sampler needs lists"),
    (["--heartbeat", "0"], "--heartbeat 0"),
    (["--storage", "nosuchdialect://x/y"], "--storage nosuchdialect://x/y: cannot open the study's database"),
])
def test_bad_optuna_sweeps_name_the_problem(args, message, av_digits_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(av_digits, "run", lambda *a: pytest.fail("nothing may train"), raising=False)
    argv = _argv(tmp_path / "sweep", av_digits_dir, "--grid", "optimizer.lr=[1e-3,3e-4]", *OPTUNA, *args)
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_optuna_options_need_the_optuna_backend(av_digits_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        command.main(_argv(tmp_path / "s", av_digits_dir, "--grid", "optimizer.lr=[1e-3]", "--pruner", "median"))
    assert "--pruner need --backend optuna" in capsys.readouterr().err


def test_two_workers_share_a_grid_each_trial_runs_once_and_another_search_space_is_refused(
        av_digits_dir, tmp_path, capsys):
    workdir = tmp_path / "sweep"
    grid = ["--grid", "optimizer.lr=[0.01,0.003,0.001]", "--grid", "model.fusion.name=[concat,sum]"]
    argv = _argv(workdir, av_digits_dir, *grid, *OPTUNA)
    logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]
    workers = [_worker(argv, log) for log in logs]
    for worker, log in zip(workers, logs):
        assert worker.wait(timeout=600) == 0, open(log.name).read()[-3000:]
    study = _study(workdir)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["mmjax_index"] for t in complete) == [1, 2, 3, 4, 5, 6]
    assert len(study.trials) == 6  # No trial beyond the grid, none run twice.
    ran = [[line for line in open(log.name) if "(optuna trial" in line] for log in logs]
    assert all(ran) and sum(map(len, ran)) == 6  # Both workers took trials; six in all.
    record = json.load(open(workdir / "sweep.json"))
    assert record["backend"] == "optuna" and len(record["leaderboard"]) == 6
    for entry in record["trials"]:
        assert entry["status"] == "done"
        assert _train_steps(workdir / entry["name"]) == [2]
    table = open(workdir / "leaderboard.md").read()
    assert table.count("\n| ") == 6 and "model.fusion.name" in table

    # A seventh worker finds nothing to do; a worker with another search space is refused, the study untouched.
    result = command.main(argv)
    assert len(result["leaderboard"]) == 6
    assert "no trial left to run in this study" in capsys.readouterr().out
    other = _argv(workdir, av_digits_dir, "--grid", "optimizer.lr=[0.01,0.02]", *OPTUNA)
    with pytest.raises(SystemExit) as exit_info:
        command.main(other)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was made by another sweep" in err and "grid: study" in err
    assert len(_study(workdir).trials) == 6
    with pytest.raises(SystemExit):  # Nor may the serial backend take the study's workdir over.
        command.main(_argv(workdir, av_digits_dir, *grid))
    assert "holds a sweep on an optuna study" in capsys.readouterr().err


def test_a_killed_workers_trial_is_resumed_by_the_next_worker(av_digits_dir, tmp_path, capsys):
    workdir = tmp_path / "sweep"
    argv = _argv(workdir, av_digits_dir, "--grid", "optimizer.lr=[0.003]", *OPTUNA, "--heartbeat", "1",
                 steps=40, every=20)
    argv += ["--config.checkpoint.every_steps=2", "--config.train.log_every_steps=2"]
    trial_dir = workdir / "trial_001_lr=0.003"
    checkpoint = trial_dir / "early" / "checkpoints" / "4"
    with open(tmp_path / "killed.log", "w") as log:
        worker = _worker(argv, log)
        deadline = time.time() + 300
        while not checkpoint.exists():
            assert worker.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.2)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    time.sleep(4)  # Past the grace period (3 heartbeats): the trial is stale.
    result = command.main(argv)
    out = capsys.readouterr().out
    assert "resumed from step" in out
    states = [t.state.name for t in _study(workdir).trials]
    assert states == ["FAIL", "COMPLETE"]
    steps = _train_steps(trial_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 40  # Resumed, not started over.
    assert [t["status"] for t in result["trials"]] == ["done"]


def test_the_median_pruner_stops_a_hopeless_trial_early(av_digits_dir, tmp_path):
    workdir = tmp_path / "sweep"
    argv = _argv(workdir, av_digits_dir, "--grid", "optimizer.lr=[0.01,0.005,1e-7]", *OPTUNA, "--pruner", "median",
                 "--metric", "validation/loss", "--mode", "min", steps=8, every=2)
    result = command.main(argv)
    by_index = {t["index"]: t for t in result["trials"]}
    assert [by_index[i]["status"] for i in (1, 2, 3)] == ["done", "done", "pruned"]
    assert "pruned by the median pruner at step" in by_index[3]["pruned"]
    assert _train_steps(workdir / by_index[3]["name"])[-1] < 8  # Stopped at an evaluation before the end.
    assert _train_steps(workdir / by_index[1]["name"])[-1] == 8
    assert [r["trial"] for r in result["leaderboard"]] == [1, 2]
    states = [t.state.name for t in _study(workdir).trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]


def test_tpe_and_random_samplers_draw_the_asked_number_of_trials_from_the_distributions(av_digits_dir, tmp_path):
    for sampler in ("random", "tpe"):
        workdir = tmp_path / sampler
        argv = _argv(workdir, av_digits_dir, "--grid", "optimizer.lr=loguniform(1e-3,1e-2)",
                     "--grid", "model.fusion.name=[concat,sum]", *OPTUNA, "--sampler", sampler, "--trials", "3")
        result = command.main(argv)
        assert [t["status"] for t in result["trials"]] == ["done"] * 3
        for entry in result["trials"]:
            lr = entry["values"]["optimizer.lr"]
            assert 1e-3 <= lr <= 1e-2 and entry["values"]["model.fusion.name"] in ("concat", "sum")
            assert entry["name"].startswith(f"trial_{entry['index']:03d}_lr=")
            saved = json.load(open(workdir / entry["name"] / "early" / "config.json"))
            assert saved["optimizer"]["lr"] == lr  # The sampled value is the one the trial trained with.
        assert len(result["leaderboard"]) == 3 and (workdir / "leaderboard.png").exists()
        assert command.main(argv)["leaderboard"] == result["leaderboard"]  # A finished study runs nothing more.
