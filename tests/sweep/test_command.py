"""`python -m mmjax.sweep`: bad sweeps stop before training, a tiny end-to-end sweep, resuming, preemption."""

import csv
import json
import math
import os
import shutil

import pytest

from experiments import av_digits
from mmjax import experiment
from mmjax.sweep import command
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("args, message", [
    (["--grid", "optimizer.lrr=[1e-3]"], "unknown config key 'optimizer.lrr'. Did you mean optimizer.lr"),
    (["--grid", "optimizer.lr=[1e-3,fast]"], "config key 'optimizer.lr' expects float, got 'fast'"),
    (["--grid", "train.num_steps=[10,2.5]"], "config key 'train.num_steps' expects int, got '2.5'"),
    (["--grid", "optimizer.lr=loguniform(1e-4,1e-2)"], "is a distribution: add --random N"),
    (["--grid", "optimizer.lr=1e-3"], "expected optimizer.lr=[v1,v2,...]"),
    (["--grid", "optimizer.lr=[1e-3,(3e-4]"], "unclosed '('"),
    (["--grid", "optimizer.lr=[1e-3,3e-4)]"], "unbalanced ')'"),
    (["--grid", "optimizer.lr=[]"], "no values"),
    (["--grid", "optimizer.lr=[1e-3,0.001]"], "values '1e-3' and '0.001' are the same"),
    (["--grid", "optimizer.lr=loguniform(0,1)", "--random", "2"], "loguniform bounds must be > 0"),
    (["--grid", "train.num_steps=uniform(1,9)", "--random", "2"], "'train.num_steps' is an int; use randint"),
    (["--grid", "optimizer.lr=[1e-3,3e-4]", "--random", "3"], "only 2 distinct combinations"),
    (["--grid", "optimizer.lr=[1e-3]", "--grid", "optimizer.lr=[3e-4]"], "a key has two --grid arguments"),
    (["--grid", "optimizer.lr=[1e-3]", "--config.optimizer.lr=0.1"], "set by both --grid and --config"),
    (["--grid", "optimizer.lr=[1e-3]", "--config.train.num_step=3"], "unknown config key 'train.num_step'"),
    (["--grid", "optimizer.lr=[1e-3]", "--metric", "train/accuracy"], "split 'train' is not evaluated"),
    (["--grid", "optimizer.lr=[1e-3]", "--metric", "accuracy"], "expected SPLIT/NAME"),
    (["--base", "nope", "--grid", "optimizer.lr=[1e-3]"], "no experiment 'nope'; experiments: av_digits, "),
    (["--base", "fusion_benchmark", "--grid", "optimizer.lr=[1e-3]"], "fusion_benchmark: cannot be swept"),
    (["--grid", "optimizer.lr=[1e-3]", "--preset", "gpu"], "unknown preset 'gpu'; valid: none"),
])
def test_bad_sweeps_stop_before_training_and_name_the_problem(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(av_digits, "run", lambda *a: pytest.fail("nothing may train"), raising=False)
    argv = ["--workdir", str(tmp_path / "sweep")] + (["--base", "av_digits"] if "--base" not in args else []) + args
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "sweep")


def test_base_by_path_and_dry_run(tmp_path, capsys):
    result = command.main(["--base", "experiments/av_digits.py", "--workdir", str(tmp_path / "s"), "--dry_run",
                             "--grid", "optimizer.lr=[1e-3,3e-4]", "--grid", "model.fusion.name=[concat,late]"])
    assert len(result["trials"]) == 4
    out = capsys.readouterr().out
    assert "ranked by max validation/accuracy" in out  # The base's checkpoint.best_metric and best_mode.
    assert "trial 3/4: optimizer.lr=0.0003 model.fusion.name=concat  ->  trial_003_lr=0.0003_fusion=concat" in out
    assert not os.path.exists(tmp_path / "s")
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--help"])
    assert exit_info.value.code == 0
    assert "python -m mmjax.sweep --base av_digits --workdir" in capsys.readouterr().out


def _argv(workdir, data_dir, *extra):
    tiny = tiny_overrides(data_dir, **{"variants": "early", "train.num_steps": 2, "train.eval_every_steps": 2})
    return ["--base", "av_digits", "--workdir", str(workdir), "--grid", "optimizer.lr=[0.2,0.002]",
            *extra, *(f"--config.{o}" for o in tiny)]


@pytest.fixture
def counted_runs(monkeypatch):
    """The trial workdirs av_digits' run was called with."""
    calls, original = [], experiment.runner(av_digits)

    def run(config, workdir):
        calls.append(os.path.basename(workdir))
        return original(config, workdir)

    monkeypatch.setattr(av_digits, "run", run, raising=False)
    return calls


@pytest.fixture(scope="module")
def finished_sweep(av_digits_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep") / "sweep"
    result = command.main(_argv(workdir, av_digits_dir))
    return workdir, result


def test_tiny_sweep_writes_a_ranked_leaderboard(finished_sweep):
    workdir, result = finished_sweep
    names = ["trial_001_lr=0.2", "trial_002_lr=0.002"]
    record = json.load(open(workdir / "sweep.json"))
    assert record["definition"]["base"] == "av_digits" and record["metric"] == "validation/accuracy"
    assert [t["name"] for t in record["trials"]] == names and {t["status"] for t in record["trials"]} == {"done"}
    assert record["trials"][0]["overrides"] == ["optimizer.lr=0.2"]
    assert not any("overridden" in t for t in record["trials"])  # The runs used the swept values.
    for name in names:
        assert os.path.exists(workdir / name / "early" / "results.json")
        saved = json.load(open(workdir / name / "early" / "config.json"))
        assert saved["train"]["num_steps"] == 2 and saved["name"] == f"av_digits/{name}/early"
    rows = list(csv.DictReader(open(workdir / "leaderboard.csv")))
    assert [r["rank"] for r in rows] == ["1", "2"] and {r["variant"] for r in rows} == {"early"}
    accuracies = [float(r["validation/accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {r["optimizer.lr"] for r in rows} == {"0.2", "0.002"}
    for column in ("validation/loss", "validation/macro_f1", "test/accuracy", "step_time_s", "workdir"):
        assert column in rows[0], column
    assert [r["trial"] for r in rows] == [str(r["trial"]) for r in record["leaderboard"]]
    assert [r["trial"] for r in rows] == [str(r["trial"]) for r in result["leaderboard"]]
    table = open(workdir / "leaderboard.md").read()
    assert table.startswith("| rank | trial | variant | optimizer.lr | validation/accuracy |")
    assert table.count("\n| 1 | ") == 1 and table.count("\n| 2 | ") == 1
    assert os.path.getsize(workdir / "leaderboard.png") > 1000
    assert math.isclose(result["best"]["metric"], accuracies[0])


def test_resume_skips_finished_trials_and_refuses_another_definition(finished_sweep, av_digits_dir, tmp_path,
                                                                     counted_runs, capsys):
    source, _ = finished_sweep
    workdir = tmp_path / "sweep"
    shutil.copytree(source, workdir)
    first_metrics = (workdir / "trial_001_lr=0.2" / "early" / "metrics.jsonl").read_bytes()
    shutil.rmtree(workdir / "trial_002_lr=0.002")  # As if the sweep had stopped before the second trial.
    capsys.readouterr()

    command.main(_argv(workdir, av_digits_dir))
    assert counted_runs == ["trial_002_lr=0.002"]
    out = capsys.readouterr().out
    assert "trial 1/2: finished earlier: validation/accuracy early " in out and "trial 2/2: optimizer.lr=0.002" in out
    assert (workdir / "trial_001_lr=0.2" / "early" / "metrics.jsonl").read_bytes() == first_metrics
    record = json.load(open(workdir / "sweep.json"))
    assert [t["status"] for t in record["trials"]] == ["done", "done"] and len(record["leaderboard"]) == 2

    # A trial interrupted mid-way (status "running") resumes from its checkpoints: no step is trained again.
    record["trials"][1]["status"] = "running"
    json.dump(record, open(workdir / "sweep.json", "w"))
    counted_runs.clear()
    command.main(_argv(workdir, av_digits_dir))
    assert counted_runs == ["trial_002_lr=0.002"] and "resumed from step 2" in capsys.readouterr().out

    # Another metric only re-ranks (mode inferred: lower loss is better).
    counted_runs.clear()
    result = command.main(_argv(workdir, av_digits_dir, "--metric", "validation/loss"))
    assert counted_runs == []
    losses = [row["metric"] for row in result["leaderboard"]]
    assert losses == sorted(losses) and json.load(open(workdir / "sweep.json"))["mode"] == "min"

    # A different definition is refused, touching nothing.
    before = (workdir / "sweep.json").read_bytes()
    listing = sorted(os.listdir(workdir))
    argv = _argv(workdir, av_digits_dir)
    argv[argv.index("optimizer.lr=[0.2,0.002]")] = "optimizer.lr=[0.2,0.02]"
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds a different sweep; nothing was changed there" in err
    assert "grid: saved ['optimizer.lr=[0.2,0.002]'], now ['optimizer.lr=[0.2,0.02]']" in err
    assert "python -m mmjax.sweep --base av_digits" in err  # The saved command, to resume it.
    assert (workdir / "sweep.json").read_bytes() == before and sorted(os.listdir(workdir)) == listing
    assert counted_runs == []


def test_preempted_trial_stops_the_sweep_with_status_75(finished_sweep, av_digits_dir, tmp_path, monkeypatch):
    source, _ = finished_sweep
    workdir = tmp_path / "sweep"
    shutil.copytree(source, workdir)
    shutil.rmtree(workdir / "trial_002_lr=0.002")
    monkeypatch.setattr(av_digits, "run", lambda config, workdir: {"preempted": True, "step": 1}, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        command.main(_argv(workdir, av_digits_dir))
    assert exit_info.value.code == 75
    assert [t["status"] for t in json.load(open(workdir / "sweep.json"))["trials"]] == ["done", "preempted"]
