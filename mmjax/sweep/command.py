"""The sweep's command line, `python -m mmjax.sweep --base NAME --workdir DIR --grid 'KEY=[...]' ...` (see
`mmjax.sweep`): checks everything before training, then runs or resumes the sweep."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import mmjax.sweep
from mmjax import cli
from mmjax import config as config_lib
from mmjax.sweep.engine import PROG, Record, Sweep, build_sweep, check_workdir, run_sweep
from mmjax.sweep.grid import SweepError
from mmjax.sweep.study import PRUNERS, SAMPLERS, StudyOptions, StudySweep, check_study_workdir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=mmjax.sweep.__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the sweep's directory: sweep.json, leaderboard.*, trials")
    parser.add_argument("--base", help="experiment to sweep: a module name (av_digits) or experiments/NAME.py")
    parser.add_argument("--grid", action="append", default=[], metavar="'KEY=[v1,v2,...]'",
                        help="values of one config key (repeatable; the trials are the product of all grids)")
    parser.add_argument("--random", type=int, metavar="N", help="sample N trials instead of the full product")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    parser.add_argument("--metric", help="SPLIT/NAME ranking the trials (default: the base's checkpoint.best_metric)")
    parser.add_argument("--mode", choices=("max", "min"), help="whether a higher or lower metric is better")
    parser.add_argument("--preset", help="a named preset of the base experiment (its PRESETS), before --config")
    parser.add_argument("--dry_run", action="store_true", help="print the trials and exit (nothing is written)")
    optuna = parser.add_argument_group("parallel sweeps on an optuna study (mmjax.sweep.study)")
    optuna.add_argument("--backend", choices=("serial", "optuna"), default="serial",
                        help="serial: the trials one after the other in this process (default); optuna: this "
                             "process is one of any number of workers pulling trials from a study")
    optuna.add_argument("--storage", help="the study's SQLAlchemy URL (default sqlite:///WORKDIR/study.db)")
    optuna.add_argument("--sampler", choices=SAMPLERS, default="grid", help="grid (default), random or tpe")
    optuna.add_argument("--trials", type=int, help="number of trials of the random and tpe samplers")
    optuna.add_argument("--pruner", choices=PRUNERS, default="none",
                        help="stop hopeless trials at an evaluation: median or halving (default none)")
    optuna.add_argument("--heartbeat", type=int, default=30, metavar="S",
                        help="seconds between a worker's heartbeats; a trial silent 3x as long is run again")
    cli.add_compile_cache_argument(parser, default=False)
    cli.add_multiprocess_arguments(parser)
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Sweep, dict | None]:
    """Parses and checks the command line and the workdir; exits with status 2 and a message on bad input."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    fixed = cli.split_overrides(rest, parser)
    try:
        if args.backend == "serial":
            given = [f"--{name}" for name in ("storage", "trials") if getattr(args, name) is not None]
            given += [f"--{name}" for name, default in (("sampler", "grid"), ("pruner", "none"), ("heartbeat", 30))
                      if getattr(args, name) != default]
            if given:
                raise SweepError(f"{', '.join(given)} need --backend optuna")
        else:
            study_options(args).check()
        sweep = build_sweep(args, fixed)
        saved = None  # A dry run reads no workdir.
        if not args.dry_run and args.backend == "serial":
            saved = check_workdir(sweep, os.path.abspath(args.workdir))
        elif not args.dry_run:
            check_study_workdir(os.path.abspath(args.workdir))
    except (SweepError, config_lib.ConfigError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args, sweep, saved


def study_options(args: argparse.Namespace) -> StudyOptions:
    return StudyOptions(args.storage, args.sampler, args.trials, args.pruner, args.heartbeat)


def main(argv: Sequence[str] | None = None):
    """Runs the command line `argv` (None: the process's, which may then re-execute itself, see `cli.start`).
    Exits with status 2 for a bad sweep, 75 when a trial was preempted (run the same command again)."""
    args, sweep, saved = parse(argv)
    if args.dry_run:
        if args.backend == "optuna" and args.sampler != "grid":
            print(f"sweep of {sweep.base}: {args.trials} trial(s) sampled by optuna's {args.sampler} sampler from "
                  f"{', '.join(g.text for g in sweep.grids)}, ranked by {sweep.mode} {sweep.metric}")
            return {"trials": []}
        print(f"sweep of {sweep.base}: {len(sweep.trials)} trial(s), ranked by {sweep.mode} {sweep.metric}")
        for trial in sweep.trials:
            print(f"trial {trial.index}/{len(sweep.trials)}: {trial.describe()}  ->  {trial.name}")
        return {"trials": sweep.trials}
    cli.start(args, argv)
    from mmjax.train.preemption import PREEMPTED_EXIT_CODE

    try:
        if args.backend == "optuna":
            result = StudySweep(sweep, study_options(args), args.workdir).run(Record)
        else:
            result = run_sweep(sweep, args.workdir, saved)
    except SweepError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(2)
    if result.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)
    return result
