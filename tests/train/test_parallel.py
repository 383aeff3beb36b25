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
from mmjax import runtime
from mmjax.train import loop, preemption
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.train.test_loop import tiny_config


def experiment_command(workdir, data_dir, *extra_args, **overrides):
    overrides.setdefault("variants", "early")
    args = [f"--config.{o}" for o in tiny_overrides(data_dir, **overrides)]
    return [sys.executable, "-m", "experiments.av_digits", "--workdir", workdir, *args, *extra_args]


def cpu_env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = runtime.xla_flags(f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    return env


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


def run_two_processes(workdir, data_dir, **overrides):
    """The tiny experiment as 2 processes x 4 devices (gloo collectives); returns process 0's output."""
    port = free_port()
    procs = [
        subprocess.Popen(
            experiment_command(workdir, data_dir, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}", **overrides),
            env=cpu_env(4), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
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

    reference = records(eight, "train")
    for other in (os.path.join(one, "early"), os.path.join(two, "early")):
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
