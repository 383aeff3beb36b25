"""The benchmark command's pieces: FLOP counting, the matmul peak, and a tiny end-to-end run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from mmjax.bench.flops import model_flops
from tests.conftest import REPO_ROOT


def test_flops_of_matmuls_convolutions_gradients_and_scans():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    assert model_flops(lambda a, b: a @ b, a, b) == 2 * 8 * 16 * 4
    # Backward of a matmul w.r.t. both operands: two more matmuls of the same size.
    assert model_flops(jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1)), a, b) == 3 * 2 * 8 * 16 * 4
    x, k = jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert model_flops(conv, x, k) == 2 * (2 * 10 * 10 * 5) * 9 * 3
    assert model_flops(lambda a, b: jax.lax.scan(lambda c, _: (c @ jnp.ones((4, 4)), None), a @ b, None,
                                                 length=3)[0], a, b) == 2 * 8 * 16 * 4 + 3 * 2 * 8 * 4 * 4
    batched = model_flops(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), jnp.ones((5, 2, 3)), jnp.ones((5, 3, 7)))
    assert batched == 2 * 5 * 2 * 3 * 7


def test_bench_command_runs_an_experiment_step_and_reports_every_figure(tmp_path, av_digits_dir):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "mmjax.bench", "--config", "experiments/av_digits.py", "--variant", "early",
               "--steps", "2", "--warmup", "1", "--json", str(out), f"--config.data.data_dir={av_digits_dir}",
               "--config.data.batch_size=16", "--config.model.encoders.audio.features=(4,)"]
    env = dict(os.environ, XLA_FLAGS="")  # One CPU device, as the benchmark should be run.
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["devices"] == 1 and figures["recompilations_after_first_step"] == 0
    assert figures["step_time_s"] > 0 and figures["examples_per_s"] > 0 and 0 <= figures["input_wait_fraction"] < 1
    assert figures["flops_per_step_per_device"] > 1e6 and 0 < figures["mfu"] < 1.5
    assert figures["peak_flops_per_s_measured"] > 1e8 and figures["compile_s"] > 0
    assert figures["device_peak_bytes"] > 0 and figures["host_peak_rss_bytes"] > 0
    for label in ("step time (median)", "MFU (vs measured peak)", "input wait", "recompilations after step 1"):
        assert label in result.stdout


def test_bench_command_errors_name_the_problem(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "mmjax.bench", *args], cwd=REPO_ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    result = run("--config", "experiments/av_digits.py")
    assert result.returncode == 2 and "pick one with --variant (image, audio, early, late)" in result.stderr
    result = run("--config", "nonexistent_experiment")
    assert result.returncode == 2 and "no experiment 'nonexistent_experiment'" in result.stderr
    result = run("--config", "experiments/clip_throughput.py:tpu")
    assert result.returncode == 2 and "unknown preset 'tpu'; valid: gpu" in result.stderr
