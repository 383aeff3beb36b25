"""Command line shared by every experiment (`python -m experiments.NAME --workdir DIR --config.a.b=value ...`) and
the commands built on experiments (`python -m mmjax.sweep`, `python -m mmjax.bench`): config overrides and presets,
the multi-process flags, and start-up (malloc re-exec, `jax.distributed`, compile cache).

Exit status: 0 when done; `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL) when the run stopped early after saving a
checkpoint (SIGTERM, SIGINT, or `--time_limit_s` / `train.time_limit_s` about to run out): run the same command
again to continue; 2 for a bad command line or config; 1 for any other error (e.g. a NaN loss, a failed write).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from mmjax import config as config_lib
from mmjax import runtime


def split_overrides(rest: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Collects `--config.key=value` and `--config.key value` arguments as `key=value` strings."""
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            parser.error(f"unrecognised argument {arg!r} (config values are set with --config.KEY=VALUE)")
        body = arg[len("--config."):]
        if "=" not in body:
            if i + 1 >= len(rest):
                parser.error(f"{arg} needs a value")
            body, i = f"{body}={rest[i + 1]}", i + 1
        overrides.append(body)
        i += 1
    return overrides


TIME_LIMIT_ENV = "MMJAX_TIME_LIMIT_S"  # = reliability.TIME_LIMIT_ENV: default of --time_limit_s.


COMPILE_CACHE_DIR = "jax_cache"


def enable_compile_cache(workdir: str) -> str:
    """Turns on JAX's persistent compilation cache in `WORKDIR/jax_cache` and returns its path.

    A program compiled before, by an earlier run in this workdir or earlier in this run (another seed of the same
    model: seeds, data order and dropout keys are inputs, not constants), is then loaded instead of compiled; the
    results are the same. Every program is cached, however short its compile (eval steps take ~0.5 s each on
    CPU). Process-wide: call it before anything compiles.
    """
    import jax

    path = os.path.join(os.path.abspath(workdir), COMPILE_CACHE_DIR)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def add_compile_cache_argument(parser: argparse.ArgumentParser, default: bool) -> None:
    """`--compile_cache` / `--no-compile_cache` (see `enable_compile_cache`), shared by every command."""
    parser.add_argument(
        "--compile_cache", action=argparse.BooleanOptionalAction, default=default,
        help=f"keep XLA's compiled programs in WORKDIR/{COMPILE_CACHE_DIR} and load them where a program repeats "
        f"(re-runs, further seeds of a model, sweep trials) instead of compiling again (default: "
        f"{'on' if default else 'off'} here)",
    )


def _time_limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def with_optional_keys(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Adds the optional `train` keys every experiment accepts (`reliability.OPTIONAL_TRAIN_KEYS`: `nonfinite`,
    `time_limit_s`) with their defaults when an override sets one that the experiment's config lacks, so that
    `--config.train.nonfinite=skip` works everywhere while configs that do not use them stay unchanged."""
    from mmjax.train.reliability import OPTIONAL_TRAIN_KEYS  # numpy only: safe before the re-exec.

    named = {o.split("=", 1)[0].strip() for o in overrides}
    train = config.get("train")
    for key, default in OPTIONAL_TRAIN_KEYS.items():
        if f"train.{key}" in named and isinstance(train, ml_collections.ConfigDict) and key not in train:
            train[key] = default
    return config


def preset_overrides(presets: Mapping[str, Sequence[str]] | None, name: str | None) -> list[str]:
    """The `KEY=VALUE` overrides of a named preset (an experiment's `PRESETS`); clear error for an unknown one."""
    if not name:
        return []
    if name not in (presets or {}):
        valid = ", ".join(sorted(presets or {})) or "none (this experiment defines no presets)"
        raise config_lib.ConfigError(f"unknown preset {name!r}; valid: {valid}")
    return list(presets[name])


def resolve_config(
    get_config: Callable[[], ml_collections.ConfigDict],
    overrides: Sequence[str] = (),
    presets: Mapping[str, Sequence[str]] | None = None,
    preset: str | None = None,
) -> ml_collections.ConfigDict:
    """`get_config()` with the named preset's overrides, then `overrides`: the config a command line trains."""
    overrides = preset_overrides(presets, preset) + list(overrides)
    return config_lib.apply_overrides(with_optional_keys(get_config(), overrides), overrides)


def add_multiprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """`--coordinator_address`, `--num_processes`, `--process_id` (see `start`), shared by every command."""
    group = parser.add_argument_group("multi-process (one process per host; or MMJAX_* environment variables)")
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int)
    group.add_argument("--process_id", type=int)


def start(args: argparse.Namespace, argv: Sequence[str] | None, start_time: float | None = None) -> None:
    """Start-up once the command line is parsed: re-exec with huge pages (a real command line only, `argv` None),
    join the multi-process job, and turn on the compile cache if `args.compile_cache`."""
    runtime.prepare_process(start_time, reexec=argv is None)  # Only a real command line can be re-executed.
    from mmjax.train import parallel

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.compile_cache:
        enable_compile_cache(args.workdir)


def parse(
    get_config: Callable[[], ml_collections.ConfigDict],
    argv: Sequence[str] | None = None,
    description: str = "",
    presets: Mapping[str, Sequence[str]] | None = None,
    compile_cache: bool = False,
) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
    """Parses the common flags and config overrides; exits with status 2 and a clear message on bad input.

    `--preset NAME` applies the experiment's preset overrides first, then the command line's. `compile_cache` is
    the default of `--compile_cache` / `--no-compile_cache`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and results go (resumes)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="a named set of overrides of this experiment")
    parser.add_argument(
        "--time_limit_s", type=_time_limit, default=os.environ.get(TIME_LIMIT_ENV) or None, metavar="SECONDS",
        help="wall-clock budget of this command (or $MMJAX_TIME_LIMIT_S): stop, save a checkpoint and exit with "
        "status 75 early enough to finish the save before it runs out",
    )
    add_compile_cache_argument(parser, compile_cache)
    add_multiprocess_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        config = resolve_config(get_config, split_overrides(rest, parser), presets, getattr(args, "preset", None))
    except config_lib.ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return config, args


def main(
    get_config: Callable[[], ml_collections.ConfigDict],
    run: Callable[[ml_collections.ConfigDict, str], Any],
    argv: Sequence[str] | None = None,
    description: str = "",
    presets: Mapping[str, Sequence[str]] | None = None,
    compile_cache: bool = False,
) -> Any:
    """Parses the command line, starts multi-process JAX if asked, and calls `run(config, workdir)`.

    `compile_cache`: whether `--compile_cache` is on by default (for experiments that train the same model
    several times, e.g. once per seed). Exits with `PREEMPTED_EXIT_CODE` when the run stopped early (signal or
    time limit) after saving a checkpoint.
    """
    start_time = float(os.environ.pop(runtime.START_TIME_ENV, "") or time.time())
    config, args = parse(get_config, argv, description, presets, compile_cache)
    if args.print_config:
        print(config_lib.to_json(config))
        return None
    start(args, argv, start_time)
    from mmjax.train import reliability
    from mmjax.train.preemption import PREEMPTED_EXIT_CODE

    reliability.set_time_limit(args.time_limit_s, start=start_time)
    result = run(config, args.workdir)
    if isinstance(result, dict) and result.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)
    return result
