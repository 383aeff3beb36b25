"""A sweep's definition, its workdir (sweep.json: refused if another sweep made it, resumed otherwise) and its run:
the trials one after the other through the base experiment's own `run`, the leaderboard updated after each."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import time
from typing import Any

import ml_collections

from mmjax import config as config_lib
from mmjax import experiment
from mmjax.sweep.grid import Grid, SweepError, Trial, make_trials, parse_grid, show, value_at
from mmjax.sweep.leaderboard import (
    default_mode,
    leaderboard_markdown,
    metric_value,
    plot_leaderboard,
    rank,
    result_rows,
    write_csv,
)

PROG = "python -m mmjax.sweep"
SWEEP_FILENAME = "sweep.json"
# Experiments whose run() result has no per-split metrics to rank (checked before anything trains).
UNRANKABLE = {
    "fusion_benchmark": "its run() returns a methods x seeds benchmark table ({'rows': [...], 'table': ...}), not "
                        "per-split metrics; sweep av_digits (the same model and training) instead",
}


def resolve_base(base: str) -> str:
    """The experiment `--base` names (`av_digits`, `experiments.av_digits` or `experiments/av_digits.py`), if it
    can be swept."""
    try:
        name = experiment.resolve(base)
    except experiment.ExperimentError as error:
        raise SweepError(f"--base {base!r}: {error}") from None
    if name in UNRANKABLE:
        raise SweepError(f"--base {name}: cannot be swept: {UNRANKABLE[name]}")
    return name


@dataclasses.dataclass
class Sweep:
    """One sweep, checked: the base experiment and its config, the grids and their trials, what ranks them."""

    base: str  # The experiment's name (experiments.NAME).
    grids: list[Grid]
    random: int | None
    seed: int
    fixed: list[str]  # key=value overrides of every trial.
    preset: str | None  # The base experiment's named preset (its PRESETS), applied before `fixed`.
    metric: str
    mode: str
    config: ml_collections.ConfigDict  # The base config with the fixed overrides.
    trials: list[Trial]

    def definition(self) -> dict:
        """What decides the trials; a re-run on the same workdir must have the same."""
        return {"base": self.base, "grid": [g.text for g in self.grids], "random": self.random,
                "seed": self.seed if self.random is not None else None, "preset": self.preset,
                "fixed": list(self.fixed)}

    def command(self, workdir: str) -> str:
        """The command line that makes (or resumes) this sweep in `workdir`."""
        args = [*PROG.split(), "--base", self.base, "--workdir", workdir]
        for g in self.grids:
            args += ["--grid", g.text]
        if self.random is not None:
            args += ["--random", str(self.random), "--seed", str(self.seed)]
        if self.preset:
            args += ["--preset", self.preset]
        args += [f"--config.{o}" for o in self.fixed]
        return " ".join(shlex.quote(a) for a in args)

    def trial_config(self, trial: Trial) -> ml_collections.ConfigDict:
        """The config the base experiment's `run` gets for `trial` (named after it)."""
        config = config_lib.apply_overrides(self.config, trial.overrides)
        if isinstance(config.get("name"), str):
            config.name = f"{config.name}/{trial.name}"
        return config


def build_sweep(args: argparse.Namespace, fixed: list[str]) -> Sweep:
    """Checks the whole sweep (base, overrides, grids, trials, metric) without training anything."""
    if not args.base:
        raise SweepError(f"--base is required: the experiment to sweep, one of {', '.join(experiment.names())}")
    if not args.grid:
        raise SweepError("give at least one --grid 'KEY=[v1,v2,...]'")
    base = resolve_base(args.base)
    try:
        config = experiment.config(experiment.load(base), args.preset, fixed)
    except config_lib.ConfigError as error:
        raise SweepError(str(error)) from None

    grids = [parse_grid(text, config) for text in args.grid]
    fixed_keys = {o.split("=", 1)[0].strip() for o in fixed}
    for g in grids:
        if g.key in fixed_keys:
            raise SweepError(f"config key {g.key!r} is set by both --grid and --config.{g.key}; keep one")
    if getattr(args, "backend", "serial") == "optuna":
        trials = _optuna_trials(args, grids, config)
    else:
        trials = make_trials(grids, config, args.random, args.seed)
    checkpoint = config.get("checkpoint") or {}
    metric = args.metric or checkpoint.get("best_metric")
    if not metric:
        raise SweepError(f"experiment {base} sets no checkpoint.best_metric: give --metric SPLIT/NAME")
    split, slash, name = metric.partition("/")
    if not (split and slash and name):
        raise SweepError(f"--metric {metric!r}: expected SPLIT/NAME, e.g. validation/accuracy")
    mode = args.mode or (checkpoint.get("best_mode", "max") if metric == checkpoint.get("best_metric")
                         else default_mode(metric))
    for trial in trials or [Trial(1, "", (), {})]:  # Sampled (optuna) trials: the base config's splits.
        splits = (config_lib.apply_overrides(config, trial.overrides).get("eval") or {}).get("splits")
        if splits is not None and split not in splits:
            raise SweepError(f"--metric {metric}: split {split!r} is not evaluated (eval.splits={list(splits)}"
                             f"{' in trial ' + str(trial.index) if len(trials) > 1 else ''})")
    return Sweep(base, grids, args.random, args.seed, fixed, args.preset, metric, mode, config, trials)


def _optuna_trials(args: argparse.Namespace, grids: list[Grid], config) -> list[Trial]:
    """The grid sampler's trials (the product, as the serial sweep's); none for the sampling ones (optuna draws
    them while the sweep runs), whose grids are checked here."""
    if args.random is not None:
        raise SweepError("--random is the serial sweep's sampling; with --backend optuna use --sampler random "
                         "--trials N (or --sampler tpe)")
    if args.sampler == "grid":
        continuous = [g.text for g in grids if g.distribution]
        if continuous:
            raise SweepError(f"--grid {continuous[0]!r} is a distribution: the grid sampler needs lists; use "
                             "--sampler random or tpe with --trials N")
        return make_trials(grids, config)
    keys = [g.key for g in grids]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a key has two --grid arguments: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    return []


def _load_record(workdir: str) -> dict | None:
    path = os.path.join(workdir, SWEEP_FILENAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_workdir(sweep: Sweep, workdir: str) -> dict | None:
    """The saved record of `workdir`, if any; refuses (touching nothing) one made by another sweep definition."""
    saved = _load_record(workdir)
    if saved is None:
        if os.path.isdir(workdir) and any(n.startswith("trial_") for n in os.listdir(workdir)):
            raise SweepError(f"workdir {workdir} holds trial directories but no {SWEEP_FILENAME}; use a new --workdir")
        return None
    if saved.get("backend") == "optuna":
        raise SweepError(f"workdir {workdir} holds a sweep on an optuna study; join it with:\n  "
                         f"{saved.get('command', '?')}")
    now = config_lib.normalize(sweep.definition())
    before = saved.get("definition", {})
    diffs = [f"{k}: saved {before.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k)]
    if not diffs:
        saved_trials = [(t["name"], t["overrides"]) for t in saved.get("trials", [])]
        now_trials = [(t.name, list(t.overrides)) for t in sweep.trials]
        if saved_trials != now_trials:
            diffs.append(f"trials: saved {saved_trials}, now {now_trials}")
    if diffs:
        raise SweepError(
            f"workdir {workdir} holds a different sweep; nothing was changed there. Differences:\n  "
            + "\n  ".join(diffs)
            + f"\nUse a new --workdir, or resume the saved sweep with:\n  {saved.get('command', '?')}"
        )
    return saved


class Record:
    """sweep.json: definition, trials (overrides, status, result rows) and the leaderboard; process 0 writes."""

    def __init__(self, sweep: Sweep, workdir: str, saved: dict | None):
        self.sweep, self.workdir = sweep, workdir
        previous = {t["name"]: t for t in (saved or {}).get("trials", [])}
        self.trials = []
        for trial in sweep.trials:
            record = {"index": trial.index, "name": trial.name, "overrides": list(trial.overrides),
                      "values": trial.values, "status": "pending"}
            old = previous.get(trial.name, {})
            for key in ("status", "rows", "seconds", "error", "overridden"):
                if key in old:
                    record[key] = old[key]
            self.trials.append(record)

    def leaderboard(self) -> list[dict]:
        return rank(self.trials, self.sweep.metric, self.sweep.mode)

    def save(self, extra: dict | None = None) -> None:
        from mmjax import reporting  # Imports JAX: only once running, after the CLI's re-exec (see cli.start).

        if not reporting.is_primary():
            return
        os.makedirs(self.workdir, exist_ok=True)
        record = {
            "definition": self.sweep.definition(),
            "command": self.sweep.command(self.workdir),
            "metric": self.sweep.metric,
            "mode": self.sweep.mode,
            "config": self.sweep.config.to_dict(),
            "trials": self.trials,
            "leaderboard": self.leaderboard(),
            **(extra or {}),
        }
        path = os.path.join(self.workdir, SWEEP_FILENAME)
        with open(path + ".tmp", "w") as f:
            json.dump(config_lib.normalize(record), f, indent=2)
        os.replace(path + ".tmp", path)

    def write_leaderboard(self, plot: bool = False) -> str:
        from mmjax import reporting

        rows = self.leaderboard()
        keys = [g.key for g in self.sweep.grids]
        table = leaderboard_markdown(rows, keys, self.sweep.metric)
        if reporting.is_primary():
            with open(os.path.join(self.workdir, "leaderboard.md"), "w") as f:
                f.write(table + "\n")
            write_csv(rows, keys, self.sweep.metric, os.path.join(self.workdir, "leaderboard.csv"))
            if plot:
                title = f"{self.sweep.base} sweep ({self.sweep.mode} {self.sweep.metric})"
                plot_leaderboard(rows, self.sweep.grids, self.sweep.metric,
                                 os.path.join(self.workdir, "leaderboard.png"), title)
        return table


    def finish(self) -> dict[str, Any]:
        """Writes and prints the final leaderboard and the best trial's command; `run_sweep`'s result."""
        from mmjax import reporting

        sweep = self.sweep
        table = self.write_leaderboard(plot=True)
        leaderboard = self.leaderboard()
        reporting.console(f"\nsweep of {sweep.base} ({sweep.mode} {sweep.metric}), {self.workdir}/leaderboard.md:"
                          f"\n{table}")
        best = leaderboard[0] if leaderboard and leaderboard[0]["metric"] is not None else None
        if best:
            trial = next(t for t in self.trials if t["index"] == best["trial"])
            values = " ".join(f"{k}={show(v)}" for k, v in trial["values"].items())
            reporting.console(
                f"best: trial {best['trial']} {values}" + (f" [{best['variant']}]" if best["variant"] else "")
                + f", {sweep.metric} {best['metric']:.4f}; its config: "
                + shlex.join(experiment.command(sweep.base, "DIR", [*sweep.fixed, *trial["overrides"]], sweep.preset,
                                                python="python")))
        return {"leaderboard": leaderboard, "trials": self.trials, "best": best}


_ABSENT = "<absent>"


def overridden_values(trial: Trial, rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Swept key -> {variant: value its run's saved config.json holds} where that differs from the trial's value
    (an experiment's variant setting the key itself); runs without a saved config are not checked."""
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        path = os.path.join(row.get("workdir") or "", config_lib.CONFIG_FILENAME)
        if not row.get("workdir") or not os.path.exists(path):
            continue
        saved = config_lib.load(path)
        for key, value in trial.values.items():
            try:
                ran = config_lib.normalize(value_at(saved, key))
            except SweepError:
                ran = _ABSENT
            if ran != value:
                found.setdefault(key, {})[row["variant"] or "run"] = ran
    return found


def _summary(rows: list[dict], metric: str) -> str:
    return ", ".join(
        (f"{r['variant']} " if r["variant"] else "")
        + ("—" if metric_value(r, metric) is None else f"{metric_value(r, metric):.4f}") for r in rows)


def run_sweep(sweep: Sweep, workdir: str, saved: dict | None = None) -> dict[str, Any]:
    """Runs the trials not finished yet, one after the other; returns `{"leaderboard", "trials", "best"}` or, if a
    trial was preempted, that trial's `{"preempted": True, ...}`."""
    from mmjax import reporting

    workdir = os.path.abspath(workdir)
    run = experiment.runner(experiment.load(sweep.base))
    record = Record(sweep, workdir, saved)
    record.save()
    total = len(sweep.trials)
    reporting.console(f"sweep of {sweep.base}: {total} trial(s), ranked by {sweep.mode} {sweep.metric} | {workdir}")
    for trial, entry in zip(sweep.trials, record.trials, strict=True):
        trial_dir = os.path.join(workdir, trial.name)
        reporting.console(f"trial {trial.index}/{total}: {trial.describe()}")
        if entry["status"] == "done" and os.path.isdir(trial_dir):
            reporting.console(f"trial {trial.index}/{total}: finished earlier: {sweep.metric} "
                            f"{_summary(entry['rows'], sweep.metric)}")
            continue
        entry.update(status="running")
        for key in ("rows", "error", "overridden"):
            entry.pop(key, None)
        record.save()
        start = time.perf_counter()
        try:
            result = run(sweep.trial_config(trial), trial_dir)
            if isinstance(result, dict) and result.get("preempted"):
                entry["status"] = "preempted"
                record.save()
                reporting.console(f"trial {trial.index}/{total} preempted; re-run the same command to resume the sweep")
                return result
            rows = result_rows(result, sweep.base)
        except BaseException as error:
            entry.update(status="failed", error=f"{type(error).__name__}: {error}")
            record.save()
            raise
        entry.update(status="done", rows=config_lib.normalize(rows), seconds=round(time.perf_counter() - start, 1))
        overridden = overridden_values(trial, rows)
        if overridden:
            entry["overridden"] = overridden
            shown = "; ".join(f"{key} swept {show(trial.values[key])}, but "
                              + ", ".join(f"{variant} ran {show(value)}" for variant, value in ran.items())
                              for key, ran in overridden.items())
            reporting.console(f"WARNING: trial {trial.index}: the experiment replaced swept values: {shown}")
        record.save()
        record.write_leaderboard()
        reporting.console(f"trial {trial.index}/{total}: {sweep.metric} {_summary(rows, sweep.metric)}")
        if all(metric_value(r, sweep.metric) is None for r in rows):
            split = sweep.metric.partition("/")[0]
            available = sorted({m for r in rows for m in r["splits"].get(split, {})})
            raise SweepError(f"--metric {sweep.metric} is not in trial {trial.index}'s results (split {split!r} has: "
                             f"{', '.join(available) or 'nothing'}; splits: {sorted(rows[0]['splits'])}). Re-run "
                             "with another --metric: finished trials are kept")
    return record.finish()
