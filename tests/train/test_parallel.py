"""Data parallelism: 1 device, 8 devices and 2 processes x 4 devices give the same losses for the same batches;
so does FSDP with parameters split across the 2 processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.train import loop, parallel, preemption
from tests.conftest import REPO_ROOT, cpu_env, tiny_overrides
from tests.train.test_loop import tiny_config


def experiment_command(workdir, data_dir, *extra_args, **overrides):
    overrides.setdefault("variants", "early")
    args = [f"--config.{o}" for o in tiny_overrides(data_dir, **overrides)]
    return [sys.executable, "-m", "experiments.av_digits", "--workdir", workdir, *args, *extra_args]


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def eight_devices(av_digits_dir, tmp_path_factory):
    """The tiny run on this process's 8 devices (fsdp=1): the reference of the other layouts."""
    workdir = str(tmp_path_factory.mktemp("eight"))
    loop.run(tiny_config(av_digits_dir), workdir)
    return workdir


def slurm_env(process_id, port, tasks=2):
    """What `srun --nodes=2 --ntasks-per-node=1` sets (the variables JAX's SLURM detection reads), on one host."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(tasks),
            "SLURM_PROCID": str(process_id), "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1",
            "JAX_COORDINATOR_PORT": str(port)}


def run_two_processes(workdir, data_dir, slurm=False, **overrides):
    """The tiny experiment as 2 processes x 4 devices (gloo collectives), started by flags or (`slurm`) by a
    simulated SLURM environment; returns process 0's output."""
    port = free_port()

    def start(i):
        flags = [] if slurm else [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
        env = {**cpu_env(4), **(slurm_env(i, port) if slurm else {})}
        return subprocess.Popen(experiment_command(workdir, data_dir, *flags, **overrides), env=env, cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [start(i) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "8 device(s) on 2 process(es)" in outputs[0]
    return outputs[0]


def test_one_device_eight_devices_and_two_processes_agree(av_digits_dir, eight_devices, tmp_path):
    eight = eight_devices

    one = str(tmp_path / "one")
    subprocess.run(experiment_command(one, av_digits_dir), env=cpu_env(1), cwd=REPO_ROOT, check=True, timeout=300)

    two = str(tmp_path / "two")
    run_two_processes(two, av_digits_dir)
    slurm = str(tmp_path / "slurm")
    output = run_two_processes(slurm, av_digits_dir, slurm=True)
    assert "multi-process run from SLURM: process 0 of 2, coordinator localhost:" in output

    reference = records(eight, "train")
    for other in (os.path.join(one, "early"), os.path.join(two, "early"), os.path.join(slurm, "early")):
        train = records(other, "train")
        assert [r["step"] for r in train] == [r["step"] for r in reference]
        np.testing.assert_allclose([r["loss"] for r in train], [r["loss"] for r in reference], rtol=1e-4)
        for split in ("validation", "test"):
            np.testing.assert_allclose(
                [r["loss"] for r in records(other, split)], [r["loss"] for r in records(eight, split)], rtol=1e-4
            )
    results = json.load(open(os.path.join(two, "early", "results.json")))
    assert results["processes"] == 2 and results["splits"]["test"]["num_examples"] == 360


@pytest.mark.slow
def test_fsdp_across_two_processes_agrees_with_one_process(av_digits_dir, eight_devices, tmp_path):
    """Parameters and Adam state split over all 8 devices of 2 processes (mesh (1, 8)): same losses as fsdp=1 in
    one process; each process still feeds its contiguous rows of the batch; checkpoints of arrays split across
    processes are written and evaluation runs."""
    two = str(tmp_path / "two")
    run_two_processes(two, av_digits_dir, **{"mesh.fsdp": 8, "mesh.fsdp_min_size": 256})
    assert config_lib.load(os.path.join(two, "early")).mesh.to_dict() == {"fsdp": 8, "fsdp_min_size": 256}
    for split in ("train", "validation", "test"):
        np.testing.assert_allclose(
            [r["loss"] for r in records(os.path.join(two, "early"), split)],
            [r["loss"] for r in records(eight_devices, split)], rtol=1e-4, err_msg=split,
        )
    assert sorted(n for n in os.listdir(os.path.join(two, "early", "checkpoints")) if n.isdigit())


def test_sigterm_saves_a_checkpoint_and_exits_75(av_digits_dir, tmp_path):
    workdir = str(tmp_path)
    command = experiment_command(workdir, av_digits_dir, **{"train.num_steps": 10_000, "checkpoint.every_steps": 1000})
    proc = subprocess.Popen(command, env=cpu_env(1), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = os.path.join(workdir, "early", "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(records(os.path.join(workdir, "early"), "train")) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, output[-3000:]
    assert "received SIGTERM" in output
    steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "early", "checkpoints")) if n.isdigit())
    last_logged = records(os.path.join(workdir, "early"), "train")[-1]["step"]
    assert steps and steps[-1] >= last_logged >= 3


@pytest.mark.parametrize("env, flags, expected", [
    ({}, {}, None),  # No cluster, no flags: one process.
    (slurm_env(1, 5555), {}, ("SLURM", "localhost:5555", 2, 1, None)),
    ({**slurm_env(1, 5555), "SLURM_STEP_TASKS_PER_NODE": "2"}, {}, ("SLURM", "localhost:5555", 2, 1, (0,))),
    (slurm_env(0, 5555, tasks=1), {}, None),  # A one-task job stays a single process.
    (slurm_env(1, 5555), {"num_processes": 1}, None),  # Asked for one process: the cluster is not joined.
    (slurm_env(1, 5555), {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3},
     ("command-line flags", "h:1", 4, 3, None)),  # Flags win over the detected environment.
    ({"MMJAX_COORDINATOR_ADDRESS": "m:2", "MMJAX_NUM_PROCESSES": "3", "MMJAX_PROCESS_ID": "2", **slurm_env(1, 5555)},
     {}, ("MMJAX_* environment variables", "m:2", 3, 2, None)),
])
def test_process_group_from_flags_variables_or_a_detected_cluster(monkeypatch, env, flags, expected):
    for name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "MMJAX_", "JAX_COORDINATOR"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    group = parallel.process_group(**flags)
    if expected is None:
        assert group is None
    else:
        assert (group.source, group.coordinator_address, group.num_processes, group.process_id,
                group.local_device_ids) == expected
        assert f"process {group.process_id} of {group.num_processes}" in group.describe()


def test_incomplete_or_contradictory_flags_are_refused(monkeypatch):
    for name in [n for n in os.environ if n.startswith(("SLURM_", "MMJAX_"))]:
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="needs --num_processes and --process_id with --coordinator_address"):
        parallel.process_group(coordinator_address="h:1")
    with pytest.raises(ValueError, match="needs a coordinator address"):
        parallel.process_group(num_processes=2, process_id=1)
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
        parallel.process_group(coordinator_address="h:1", num_processes=2, process_id=2)
