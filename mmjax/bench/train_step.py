"""Train-step benchmark of any experiment: step time, examples/s, FLOPs, MFU, compile time, memory, input wait.

    python -m mmjax.bench --config experiments/NAME.py[:PRESET] [--variant V] [--config.KEY=VALUE ...]
        [--steps 20] [--warmup 3] [--json PATH]

It builds the experiment's model, data pipeline and jitted train step exactly as `loop.run` does (`setup`), then runs
`--warmup` steps, then times `--steps` steps on one fixed batch and `--steps` more with the real input. It reports:

- the median step time as training runs it (the next batch is read and sent to the devices while the current step
  computes), examples/s, the step time on a fixed on-device batch, and the input wait: the share of the step
  lost to the input pipeline, (step - step without input) / step;
- the FLOPs of one step per device (every matmul and convolution of the step's jaxpr, `mmjax.bench.flops`;
  XLA's cost analysis is reported too but misses GPU library calls), achieved FLOP/s per device
  and MFU = achieved / peak, where the peak is MEASURED in the same run by a large matmul in the step's compute
  dtype on one device (so MFU is relative to what this machine really does, not a datasheet);
- the compile time of the first step (XLA backend compile events) and any compilation after it, which is an error
  (exit status 3): a step that recompiles has a shape or sharding that changes between steps;
- peak device memory (the allocator's peak where the backend reports it, else XLA's memory analysis of the step)
  and the host's peak resident memory.

Run it without the test suite's 8 simulated CPU devices: on CPU they share the same cores, and the FLOP/s of one
of them means nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import cli, experiment, runtime
from mmjax.bench.flops import model_flops
from mmjax.data import pipeline
from mmjax.train.memory import compiled_memory
from mmjax.train.setup import setup
from mmjax.train.state import count_parameters

RECOMPILED_EXIT_CODE = 3


def experiment_config(spec: str, variant: str | None, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """The config one run of experiment `spec` (`NAME[:PRESET]` or `path/NAME.py[:PRESET]`) trains: preset,
    command-line overrides, then the variant, which an experiment with several must be given."""
    target, preset = experiment.split(spec)
    module = experiment.load(target)
    variants = getattr(module, "VARIANTS", None)
    if variant is None and variants:
        raise ValueError(f"{module.__name__} trains several variants; pick one with --variant ({', '.join(variants)})")
    return experiment.config(module, preset, overrides, variant)


def matmul_peak_flops(dtype, n: int | None = None, repeats: int = 20, device=None) -> dict[str, float]:
    """FLOP/s of an n x n x n matmul (median of `repeats`) on one device in `dtype`: the machine's measured peak."""
    device = device or jax.local_devices()[0]
    if n is None:
        n = 2048 if device.platform == "cpu" else 8192
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.float32).astype(dtype), device) for k in keys)
    matmul = jax.jit(lambda a, b: a @ b)
    for _ in range(3):  # Compile, then let clocks ramp up.
        matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"n": n, "dtype": str(jnp.dtype(dtype)), "seconds": seconds, "flops_per_s": 2.0 * n**3 / seconds}


class _CompileCounter:
    """Counts XLA backend compilations (and their seconds) through jax.monitoring events."""

    def __init__(self):
        self.events: list[float] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.events.append(duration)


def _compute_dtype(config: ml_collections.ConfigDict):
    return jnp.dtype(config.model.get("dtype") or "float32")


def time_steps(step_fn, state, batch, steps: int) -> tuple[Any, list[float]]:
    """Runs `steps` train steps on one on-device batch, each waited for; returns the state and each step's seconds."""
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    return state, seconds


def benchmark(config: ml_collections.ConfigDict, *, steps: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Times the experiment's train step (see the module docstring); returns every figure as a dict."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps {steps} and --warmup {warmup} must both be >= 1")
    counter = _CompileCounter()
    s = setup(config)
    state = s.initial_state()
    batches = iter(pipeline.train_dataset(
        s.dataset, config.data.train_split, global_batch_size=config.data.batch_size, seed=config.seed,
        num_threads=config.data.num_threads, num_workers=config.data.num_workers,
    ))
    step_fn = s.train_step_fn()

    def next_batch():
        host = next(batches)
        return pipeline.to_global({k: host[k] for k in s.keys}, s.batch_sharding)

    batch = next_batch()
    jax.block_until_ready((state, batch))
    before = len(counter.events)
    state, (first_step_s,) = time_steps(step_fn, state, batch, 1)
    compile_s = sum(counter.events[before:])
    compiles_at_first_step = len(counter.events)

    for _ in range(warmup - 1):
        state, _ = step_fn(state, next_batch())
    jax.block_until_ready(state)
    # Compute alone: the same on-device batch every step.
    state, compute = time_steps(step_fn, state, batch, steps)
    # As training runs: the next batch is read and transferred while the device computes the current step.
    totals, reads = [], []
    batch = next_batch()
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        batch = next_batch()
        reads.append(time.perf_counter() - start)
        jax.block_until_ready(metrics)
        totals.append(time.perf_counter() - start)
    recompiles = len(counter.events) - compiles_at_first_step

    # Matmul and convolution FLOPs of the step's jaxpr (global batch, so divided by the device count); XLA's
    # cost analysis, kept for reference, counts GPU library matmuls as zero.
    flops = model_flops(step_fn, s.abstract_state, batch) / jax.device_count()
    compiled = step_fn.lower(s.abstract_state, batch).compile()  # Once, for XLA's cost and memory analyses.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    step_s = statistics.median(totals)
    compute_s = statistics.median(compute)
    dtype = _compute_dtype(config)
    peak = matmul_peak_flops(dtype)
    device = jax.local_devices()[0]
    device_stats = device.memory_stats() or {}
    analysis = compiled_memory(compiled)
    achieved = flops / step_s if flops else 0.0
    return {
        "experiment": config.get("name", ""),
        "device": f"{device.platform}:{device.device_kind}",
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "batch_size": config.data.batch_size,
        "compute_dtype": str(dtype),
        "parameters": count_parameters(s.abstract_state.params),
        "steps_timed": steps,
        "step_time_s": step_s,
        "step_time_min_s": min(totals),
        "examples_per_s": config.data.batch_size / step_s,
        "step_compute_time_s": compute_s,
        "input_read_time_s": statistics.median(reads),
        # The share of a step lost to input: how much slower steps are with real input than without.
        "input_wait_fraction": max(0.0, (step_s - compute_s) / step_s),
        "flops_per_step_per_device": flops,
        "xla_cost_analysis_flops_per_device": xla_flops,
        "achieved_flops_per_s_per_device": achieved,
        "peak_flops_per_s_measured": peak["flops_per_s"],
        "peak_matmul": peak,
        "mfu": achieved / peak["flops_per_s"] if flops else None,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "recompilations_after_first_step": recompiles,
        "device_peak_bytes": int(device_stats.get("peak_bytes_in_use", analysis.get("peak_bytes", 0))),
        "device_peak_source": "allocator" if "peak_bytes_in_use" in device_stats else "xla_memory_analysis",
        "xla_memory": analysis,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_loss": float(jax.device_get(metrics["loss"])),
    }


def format_table(result: dict[str, Any]) -> str:
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    rows = [
        ("device", f"{result['device']} x {result['devices']} ({result['processes']} process(es))"),
        ("batch / dtype / params", f"{result['batch_size']} / {result['compute_dtype']} / {result['parameters']:,}"),
        ("step time (median)", f"{result['step_time_s'] * 1e3:.1f} ms (min {result['step_time_min_s'] * 1e3:.1f}; "
                               f"{result['step_compute_time_s'] * 1e3:.1f} without input)"),
        ("examples/s", f"{result['examples_per_s']:.1f}"),
        ("input wait", f"{100 * result['input_wait_fraction']:.1f}% of the step"),
        ("FLOPs per step per device", f"{result['flops_per_step_per_device'] / 1e9:.1f} GFLOP (matmuls + convs)"),
        ("achieved per device", f"{result['achieved_flops_per_s_per_device'] / 1e12:.3f} TFLOP/s"),
        ("measured matmul peak", f"{result['peak_flops_per_s_measured'] / 1e12:.3f} TFLOP/s "
                                 f"({result['peak_matmul']['dtype']}, n={result['peak_matmul']['n']})"),
        ("MFU (vs measured peak)", "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"),
        ("compile (first step)", f"{result['compile_s']:.1f} s"),
        ("recompilations after step 1", str(result["recompilations_after_first_step"])),
        ("peak device memory", f"{gb(result['device_peak_bytes'])} ({result['device_peak_source']})"),
        ("peak host memory (RSS)", gb(result["host_peak_rss_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    runtime.prepare_process(reexec=argv is None)  # The set-up every command runs with (mmjax.runtime).
    parser = argparse.ArgumentParser(prog="python -m mmjax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiments/NAME.py[:PRESET] or NAME[:PRESET]")
    parser.add_argument("--variant", help="for experiments that train several variants (e.g. av_digits: early)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one compiles")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args, rest = parser.parse_known_args(argv)
    overrides = cli.split_overrides(rest, parser)
    try:
        config = experiment_config(args.config, args.variant, overrides)
    except ValueError as error:  # Also config.ConfigError and experiment.ExperimentError.
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    result = benchmark(config, steps=args.steps, warmup=args.warmup)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if result["recompilations_after_first_step"]:
        print(f"ERROR: the train step recompiled {result['recompilations_after_first_step']} time(s) after the "
              "first step (a shape, dtype or sharding changes between steps)", file=sys.stderr)
        sys.exit(RECOMPILED_EXIT_CODE)
    return result
