"""Input-pipeline benchmark: examples/s of each dataset's training stream next to what its train step consumes.

    python -m mmjax.bench.inputs [--datasets av_digits,intents,shapes_captions,files,files_uncached]
        [--batches 50] [--warmup-batches 5] [--steps 5] [--files-examples 512] [--data-dir DIR]
        [--override NAME:KEY=VALUE ...] [--no-step] [--json PATH]

For every dataset it builds the config of its default experiment (av_digits: experiments.av_digits, variant
early; intents: experiments.text_intents, variant frozen; shapes_captions: experiments.shapes_clip, variant clip;
files: a manifest of generated PNG / WAV files (mmjax.data.build.write_example_folder) built into a temporary
folder and trained with the av_digits experiment's model, with random crops, flips and SpecAugment; files_uncached:
the same without `data.cache_in_memory`, so every example is decoded and transformed every time), then measures

- input: `pipeline.train_dataset` exactly as training builds it (the experiment's batch size, Grain threads and
  workers, in-memory cache when the experiment uses one; the cache is filled before timing and reported as
  `setup_s`), `--warmup-batches` untimed, then `--batches` timed in 5 windows: examples/s of the pipeline alone,
  the median window (the overall rate is in the JSON);
- step: the experiment's jitted train step (`setup(config).train_step_fn()`), compiled, then `--steps`
  steps timed on one batch already on the devices: examples/s the step consumes (median step);
- ratio = input / step. Below 5x the input pipeline risks stalling training when the machine is busy (Grain reads
  ahead in threads, but those threads share the cores with the step); the table marks it.

Run it without the test suite's 8 simulated CPU devices (they share the same cores). On a shared machine the
figures are noisy: compare ratios, not absolute rates across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import config as config_lib
from mmjax import experiment, runtime
from mmjax.bench.train_step import time_steps
from mmjax.data import build, pipeline
from mmjax.data.files import open_built
from mmjax.train.setup import load_dataset, setup

TARGET_RATIO = 5.0

# dataset -> (experiment module, variant whose train step is timed).
EXPERIMENTS = {
    "av_digits": ("av_digits", "early"),
    "intents": ("text_intents", "frozen"),
    "shapes_captions": ("shapes_clip", "clip"),
    "files": ("av_digits", "early"),
    "files_uncached": ("av_digits", "early"),
}
FILES_PREPROCESS = {
    "image": "decode|resize(36)|random_crop(32)|flip_lr|normalize",
    "audio": "crop_or_pad(8000)|log_mel(n_mels=40)|standardize|spec_augment",
}


def experiment_config(name: str, files_dir: str | None, data_dir: str | None,
                      overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """The config training would use for `name` (its experiment's variant), with the given overrides."""
    module_name, variant = EXPERIMENTS[name]
    module = experiment.load(module_name)
    config = module.get_config()
    if name.startswith("files"):
        data = config.data.to_dict()
        data.pop("target", None)
        data.update(name="files", data_dir=files_dir, preprocess=dict(FILES_PREPROCESS),
                    cache_in_memory=name == "files")
        config.data = data
        config.model.num_classes = len(open_built(files_dir).info.features["label"].names)
        config.name = name
    elif data_dir:
        config.data.data_dir = data_dir
    config = config_lib.apply_overrides(config, overrides)
    return module.VARIANTS[variant](ml_collections.ConfigDict(config.to_dict()))


def measure_input(config: ml_collections.ConfigDict, *, batches: int, warmup: int) -> dict[str, Any]:
    """Examples/s of the training stream alone (the in-memory cache, if any, filled first and timed apart)."""
    start = time.perf_counter()
    dataset = load_dataset(config.data)  # The dataset (and cache) `setup` uses, so both share one cache.
    stream = pipeline.train_dataset(
        dataset, config.data.train_split, global_batch_size=config.data.batch_size, seed=config.seed,
        num_threads=config.data.num_threads, num_workers=config.data.num_workers,
    )
    iterator = iter(stream)
    setup_s = time.perf_counter() - start
    for _ in range(warmup):
        next(iterator)
    local = pipeline.local_batch_size(config.data.batch_size)
    windows = []  # Seconds per batch over up to 5 windows: the median resists other jobs' bursts on the cores.
    bounds = np.linspace(0, batches, min(5, batches) + 1).astype(int)
    for size in np.diff(bounds):
        start = time.perf_counter()
        for _ in range(size):
            next(iterator)
        windows.append((time.perf_counter() - start, int(size)))
    seconds = sum(t for t, _ in windows)
    return {"setup_s": setup_s, "input_seconds": seconds,
            "input_examples_per_s": statistics.median(n * local / t for t, n in windows),
            "input_examples_per_s_overall": batches * local / seconds,
            "examples_in_split": dataset.splits[config.data.train_split]}


def measure_step(config: ml_collections.ConfigDict, *, steps: int) -> dict[str, Any]:
    """Examples/s of the jitted train step alone (one batch on the devices, compiled first)."""
    s = setup(config)
    state = s.initial_state()
    host = next(iter(pipeline.train_dataset(s.dataset, config.data.train_split,
                                            global_batch_size=config.data.batch_size, seed=config.seed)))
    batch = pipeline.to_global({k: host[k] for k in s.keys}, s.batch_sharding)
    step_fn = s.train_step_fn()
    state, (compile_s,) = time_steps(step_fn, state, batch, 1)
    state, times = time_steps(step_fn, state, batch, steps)
    step_s = statistics.median(times)
    return {"first_step_s": compile_s, "step_s": step_s, "step_examples_per_s": config.data.batch_size / step_s,
            "devices": jax.device_count()}


def run(names: Sequence[str], *, batches: int = 50, warmup: int = 5, steps: int = 5, files_examples: int = 512,
        data_dir: str | None = None, overrides: dict[str, list[str]] | None = None, step: bool = True,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list[dict[str, Any]]:
    """Measures every dataset in `names` (see the module docstring); returns one dict of figures per dataset."""
    overrides = overrides or {}
    results = []
    with tempfile.TemporaryDirectory(prefix="mmjax_data_bench_") as tmp:
        files_dir = None
        if any(n.startswith("files") for n in names):
            log(f"files: generating {files_examples} PNG/WAV examples and building them")
            manifest = build.write_example_folder(os.path.join(tmp, "raw"), files_examples, num_classes=10)
            files_dir = os.path.join(tmp, "built")
            build.build(manifest, files_dir, progress=False)
        for name in names:
            config = experiment_config(name, files_dir, data_dir, overrides.get(name, []))
            variant = EXPERIMENTS[name][1]
            log(f"{name}: input pipeline ({batches} batches of {config.data.batch_size})")
            row = {"dataset": name, "experiment": f"{EXPERIMENTS[name][0]}:{variant}",
                   "batch_size": config.data.batch_size, "cache_in_memory": bool(config.data.cache_in_memory),
                   "num_threads": config.data.num_threads, "num_workers": config.data.num_workers}
            row.update(measure_input(config, batches=batches, warmup=warmup))
            if step:
                log(f"{name}: train step ({steps} steps)")
                row.update(measure_step(config, steps=steps))
                row["ratio"] = row["input_examples_per_s"] / row["step_examples_per_s"]
            results.append(row)
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    header = ("dataset", "experiment", "batch", "cache", "input ex/s", "step ex/s", "ratio", f">= {TARGET_RATIO:g}x")
    rows = []
    for r in results:
        ratio = r.get("ratio")
        rows.append((
            r["dataset"], r["experiment"], str(r["batch_size"]), "yes" if r["cache_in_memory"] else "no",
            f"{r['input_examples_per_s']:,.0f}",
            f"{r['step_examples_per_s']:,.0f}" if "step_examples_per_s" in r else "-",
            f"{ratio:.1f}x" if ratio is not None else "-",
            "-" if ratio is None else ("yes" if ratio >= TARGET_RATIO else "NO"),
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _overrides(items: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ValueError(f"--override {item!r} must look like DATASET:KEY=VALUE")
        if name not in names:
            raise ValueError(f"--override {item!r}: {name!r} is not among --datasets ({', '.join(names)})")
        out.setdefault(name, []).append(override)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    runtime.prepare_process(reexec=argv is None)  # The set-up every command runs with (mmjax.runtime).
    parser = argparse.ArgumentParser(prog="python -m mmjax.bench.inputs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(EXPERIMENTS), help="comma-separated; valid: "
                        + ", ".join(EXPERIMENTS))
    parser.add_argument("--batches", type=int, default=50, help="timed input batches")
    parser.add_argument("--warmup-batches", type=int, default=5, help="untimed input batches first")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps (after the compiling one)")
    parser.add_argument("--files-examples", type=int, default=512, help="generated examples for files*")
    parser.add_argument("--data-dir", help="TFDS data dir of the embedded datasets (default: the experiments')")
    parser.add_argument("--override", action="append", default=[], metavar="DATASET:KEY=VALUE",
                        help="config override for one dataset's experiment, e.g. files:data.num_threads=2")
    parser.add_argument("--no-step", action="store_true", help="measure the input pipelines only")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        parser.error(f"--datasets: unknown {unknown}; valid: {', '.join(EXPERIMENTS)}")
    for flag in ("batches", "steps", "files_examples"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        overrides = _overrides(args.override, names)
    except ValueError as error:
        parser.error(str(error))
    results = run(names, batches=args.batches, warmup=max(0, args.warmup_batches), steps=args.steps,
                  files_examples=args.files_examples, data_dir=args.data_dir, overrides=overrides,
                  step=not args.no_step)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target_ratio": TARGET_RATIO, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
