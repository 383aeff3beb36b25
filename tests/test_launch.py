"""`python -m mmjax.launch slurm`: the sbatch script, argument checks, and SLURM's pre-emption signal mapped to
mmjax's save-and-exit with a requeue that resumes (submitit's local executor stands in for SLURM)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from mmjax import launch
from tests.conftest import REPO_ROOT
from tests.train.test_parallel import cpu_env, experiment_command


def test_dry_run_prints_the_sbatch_script(capsys):
    launch.main(["slurm", "--nodes", "2", "--gpus-per-node", "8", "--time", "240", "--partition", "gpu",
                 "--signal-delay", "150", "--dry-run", "--", "python", "-m", "experiments.av_digits", "--workdir", "W"])
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=240", "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@150",
                 "/W/slurm/%j_0_log.out"):
        assert line in out, line
    assert "# the job runs: python -m experiments.av_digits --workdir W" in out


@pytest.mark.parametrize("argv, message", [
    (["slurm", "--time", "10"], "give the command to run after --"),
    (["slurm", "--time", "1", "--signal-delay", "60", "--", "true"], "--signal-delay 60 s must be shorter"),
    (["slurm", "--time", "10", "--local", "--nodes", "2", "--", "true"], "--local runs one node"),
    (["slurm", "--time", "0", "--", "true"], "--time must be positive"),
    (["pbs", "--time", "10", "--", "true"], "invalid choice: 'pbs'"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_the_signal_before_the_time_limit_saves_and_the_requeued_job_resumes(av_digits_dir, tmp_path, monkeypatch):
    """submitit calls `checkpoint` on SLURM's signal: the running command gets SIGTERM, saves and exits 75; the
    job handed back for the requeue runs the same command, which resumes from that checkpoint and finishes."""
    for name, value in cpu_env(1).items():
        monkeypatch.setenv(name, value)
    workdir = str(tmp_path / "run")
    command = experiment_command(workdir, av_digits_dir, **{"train.num_steps": 400, "checkpoint.every_steps": 1000,
                                                            "train.eval_every_steps": 400})
    job = launch.TrainJob(command, stop_timeout_s=120)
    failure = []
    thread = threading.Thread(target=lambda: failure.append(pytest.raises(RuntimeError, job)))
    monkeypatch.chdir(REPO_ROOT)
    thread.start()
    run_dir = os.path.join(workdir, "early")
    deadline = time.time() + 240
    while time.time() < deadline and len([r for r in _records(run_dir) if r["split"] == "train"]) < 3:
        time.sleep(0.2)
    requeued = job.checkpoint()
    thread.join(timeout=120)
    assert job._process.returncode == launch.PREEMPTED_EXIT_CODE
    assert "status 75" in str(failure[0].value)  # Without submitit's requeue the job would say so.
    steps = sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())
    assert steps and 3 <= steps[-1] < 400
    assert requeued.function.command == command
    assert requeued.function() == 0  # The requeued job: resumes and finishes.
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["resumed_from_step"] == steps[-1] and results["steps"] == 400


STOPPABLE = """
import os, signal, sys, time
marker = sys.argv[1]
if os.path.exists(marker):
    print("resumed", flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, lambda *a: (open(marker, "w").write("saved"), sys.exit(75)))
print("started", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # ~30 s: two local submitit attempts.
def test_submitit_requeues_a_job_stopped_by_the_time_limit_signal(tmp_path):
    """Through submitit's own local executor: the signal before the time limit reaches the job, which stops its
    command (standing in for mmjax: SIGTERM -> save -> exit 75) and is requeued; the second attempt finishes."""
    submitit = launch.import_submitit()
    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE)
    executor = submitit.LocalExecutor(str(tmp_path / "logs"), max_num_timeout=3)
    executor.update_parameters(timeout_min=16 / 60, signal_delay_s=10)  # The signal comes after 6 s.
    job = executor.submit(launch.TrainJob([sys.executable, str(script), str(tmp_path / "saved")], 5))
    assert job.result() == 0
    log = job.stdout()
    assert "started" in log and "resumed" in log and "Requeued" in log, log[-2000:]
    assert (tmp_path / "saved").read_text() == "saved"


def test_a_local_job_runs_the_command_to_the_end(av_digits_dir, tmp_path):
    """`python -m mmjax.launch slurm --local --wait`: the tiny experiment through submitit, exit status 0."""
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-m", "mmjax.launch", "slurm", "--local", "--time", "20", "--signal-delay", "60",
               "--wait", "--", *experiment_command(workdir, av_digits_dir, **{"train.num_steps": 4})]
    proc = subprocess.run(command, env=cpu_env(1), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted job" in proc.stdout and "finished" in proc.stdout
    assert json.load(open(os.path.join(workdir, "early", "results.json")))["steps"] == 4
    assert os.listdir(os.path.join(workdir, "slurm"))  # submitit's logs go beside the run by default.
