"""Hyper-parameter sweeps over any experiment: a grid (or a random search), one workdir per trial, a leaderboard.

Command:

    python -m experiments.sweep --base av_digits --workdir /tmp/sweep \\
        --grid 'optimizer.lr=[1e-3,3e-4]' --grid 'model.modality_dropout=[0.0,0.2]' \\
        [--random N [--seed S]] [--metric SPLIT/NAME] [--mode max|min] [--dry_run] [--compile_cache]
        [--preset NAME] [--config.KEY=VALUE ...]

- `--base`: an experiment module name (`av_digits`) or its file (`experiments/av_digits.py`).
- `--grid 'KEY=[v1,v2,...]'` (repeatable): the trials are the Cartesian product of all grids, in the order given
  (the last grid varies fastest). Each value is parsed to the key's type exactly as `--config.KEY=value` is, so an
  unknown key or a wrong value stops before anything trains. Values holding commas go in quotes or brackets:
  `--grid "model.encoders.audio.features=[(16,32),(32,64)]"`, `--grid "variants=['early,late','image']"`; a
  group is replaced whole by dict literals: `--grid "model.encoders.image=[{'name':'small_cnn'},{'name':'vit'}]"`.
  A base experiment's variants may set swept keys themselves (av_digits' variants set `model.fusion`, the
  image/audio ones drop an encoder): the sweep warns, and records in sweep.json, when a run's saved config.json
  holds another value than the trial's.
- `--random N` (with `--seed S`, default 0): N trials sampled instead of the product. A grid may then also be a
  distribution: `loguniform(a,b)` or `uniform(a,b)` (float keys; samples rounded to 4 significant digits),
  `randint(a,b)` (int keys; a and b included). `choice(v1,v2,...)` is the same as `[v1,v2,...]`. With only lists,
  N distinct combinations are drawn. Without `--random` a distribution is an error.
- `--config.KEY=VALUE`: fixed overrides applied to every trial (before the grid's), e.g. shorter runs;
  `--preset NAME`: a named preset of the base experiment (its `PRESETS`), applied before them.
- `--metric SPLIT/NAME`, `--mode max|min`: what ranks the trials. Default: the base config's
  `checkpoint.best_metric` and `checkpoint.best_mode` (`validation/accuracy`, max, for av_digits): choose
  hyper-parameters on validation, not test; the leaderboard shows the test value next to it. Without a default
  mode, names like loss/mae/rmse/mse are minimised and the others maximised.
- `--dry_run`: print the trials and exit.
- `--compile_cache`: JAX's persistent compilation cache in `WORKDIR/jax_cache`. Only the programs that a swept
  value changes (e.g. the train step, for the learning rate) are compiled again: tiny AV-Digits trials took 26, 11
  and 8 s instead of ~20 s each (2 shared CPU cores), with identical results.

Each trial runs, one after the other in this process, through the base experiment's own `run(config, workdir)`
in `WORKDIR/trial_NNN_<key>=<value>...`. Writes:

- `WORKDIR/sweep.json`: the sweep definition (base, grids, random/seed, fixed overrides), each trial's overrides,
  status and result summary (scalar metrics per split for each variant), and the ranked leaderboard;
- `WORKDIR/leaderboard.md` and `leaderboard.csv` (after every trial, and printed at the end): one row per trial x
  variant (a `run` returning `{"variants": {...}}`, like av_digits or text_intents, gives a row per variant; a
  plain loop.run result one row; av_digits_tasks `task/variant` rows), best first: rank, trial, variant, the swept
  values, the metric, the other scalar metrics of its split, the metric on the other splits, step time;
- `WORKDIR/leaderboard.png`: the metric against the swept value when one numeric key is swept (log x for ranges
  spanning 10x or more), otherwise a bar chart of the rows.

Re-running the same command resumes: finished trials are read back from sweep.json (not trained again; delete
a trial's workdir to re-run it), an interrupted trial resumes from its checkpoints, the others run. A different
definition on the same workdir is refused with the differences (nothing is touched); `--metric` and `--mode`
may change, which only re-ranks. SIGTERM/SIGINT during a trial saves its checkpoint and exits with status 75.
fusion_benchmark cannot be swept (its result is a methods x seeds table, not per-split metrics).

Example: a short (100-step) early-fusion run at three learning rates (80 s on 2 shared CPU cores, seed 0, jax
0.10.2; the 600-step results are in the av_digits docstring). It prints and writes this leaderboard.md:

    python -m experiments.sweep --base av_digits --workdir /tmp/sweep --grid 'optimizer.lr=[3e-3,1e-3,3e-4]' \\
        --config.variants=early --config.train.num_steps=100 --config.train.eval_every_steps=100

    | rank | trial | variant | optimizer.lr | validation/accuracy | validation/loss | validation/macro_f1 | test/accuracy | step_time_s |
    |---|---|---|---|---|---|---|---|---|
    | 1 | 1 | early | 0.003 | 0.9385 | 0.1514 | 0.9380 | 0.9500 | 0.0687 |
    | 2 | 2 | early | 0.001 | 0.9330 | 0.2220 | 0.9327 | 0.9472 | 0.0696 |
    | 3 | 3 | early | 0.0003 | 0.8939 | 0.5527 | 0.8939 | 0.8889 | 0.0397 |
    best: trial 1 optimizer.lr=0.003 [early], validation/accuracy 0.9385; its config: python -m experiments.av_digits
    --workdir DIR --config.variants=early --config.train.num_steps=100 --config.train.eval_every_steps=100
    --config.optimizer.lr=3e-3
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib
import itertools
import json
import math
import os
import pkgutil
import re
import shlex
import sys
import time
from types import ModuleType
from typing import Any, Sequence

import ml_collections

import experiments
from mmjax import cli
from mmjax import config as config_lib

SWEEP_FILENAME = "sweep.json"
DISTRIBUTIONS = ("loguniform", "uniform", "randint")
# Experiments whose run() result has no per-split metrics to rank (checked before anything trains).
UNRANKABLE = {
    "fusion_benchmark": "its run() returns a methods x seeds benchmark table ({'rows': [...], 'table': ...}), not "
                        "per-split metrics; sweep av_digits (the same model and training) instead",
    "sweep": "a sweep cannot sweep itself",
}
LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse", "error")
SIGNIFICANT_DIGITS = 4  # Of sampled floats: readable trial names, no loss of search resolution.


class SweepError(ValueError):
    """An invalid sweep (definition, grid, workdir or result); the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# The base experiment.


def experiment_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__)
                  if not m.name.startswith("_") and m.name != "sweep")


def resolve_base(base: str) -> str:
    """The module name of `base`: `av_digits`, `experiments.av_digits` or a path `experiments/av_digits.py`."""
    name = base
    if base.endswith(".py") or os.sep in base or "/" in base:
        path = os.path.abspath(base)
        name = os.path.splitext(os.path.basename(path))[0]
        package_dir = os.path.abspath(experiments.__path__[0])
        elsewhere = os.path.dirname(path) != package_dir and (
            os.path.exists(path) or os.path.basename(os.path.dirname(path)) != "experiments")
        if elsewhere:  # experiments/NAME.py relative to another directory is still taken as that experiment.
            raise SweepError(f"--base {base!r} is not an experiment module in {package_dir}; experiments: "
                             + ", ".join(experiment_names()))
    elif name.startswith("experiments."):
        name = name[len("experiments."):]
    if name in UNRANKABLE:
        raise SweepError(f"--base {name}: cannot be swept: {UNRANKABLE[name]}")
    if name not in experiment_names():
        raise SweepError(f"--base {base!r}: unknown experiment; experiments: {', '.join(experiment_names())}")
    return name


def load_base(name: str) -> ModuleType:
    module = importlib.import_module(f"experiments.{name}")
    if not (callable(getattr(module, "get_config", None)) and callable(getattr(module, "run", None))):
        raise SweepError(f"experiments.{name} has no get_config() and run(config, workdir) to sweep")
    return module


# ---------------------------------------------------------------------------------------------------------------
# Grids and trials.


def _split_items(text: str, what: str) -> list[str]:
    """Splits `a, (b, c), 'd,e'` at the commas outside brackets and quotes."""
    closing = {"(": ")", "[": "]", "{": "}"}
    items, stack, quote, start = [], [], None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in closing:
            stack.append(closing[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                raise SweepError(f"{what}: unbalanced {ch!r}")
        elif ch == "," and not stack:
            items.append(text[start:i])
            start = i + 1
    if quote or stack:
        opening = {v: k for k, v in closing.items()}
        raise SweepError(f"{what}: unclosed {quote or opening[stack[-1]]!r}")
    items = [item.strip() for item in [*items, text[start:]]]
    if items == [""]:
        return []
    if not all(items):
        raise SweepError(f"{what}: empty value between commas")
    return items


def _unquote(item: str) -> str:
    """`'a,b'` -> `a,b`: quotes only protect commas (a string key takes the text as it is otherwise)."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        try:
            value = ast.literal_eval(item)
        except (ValueError, SyntaxError):
            return item
        if isinstance(value, str):
            return value
    return item


def _get(config: ml_collections.ConfigDict, key: str, what: str = "") -> Any:
    """The value (a dict for a group) at dotted `key`; an unknown key fails with mmjax.config's message."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            try:  # mmjax.config's own unknown-key error (close matches, valid keys).
                config_lib.override(ml_collections.ConfigDict(config.to_dict()), key, "0")
            except config_lib.ConfigError as error:
                raise SweepError(f"{what}: {error}" if what else str(error)) from None
            raise SweepError(f"{what}: unknown config key {key!r}")
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _number(text: str, what: str) -> float | int:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{what}: {text.strip()!r} is not a number")
    return value


def show(value: Any) -> str:
    """A value as the leaderboard and trial names show it."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Grid:
    """One `--grid`: a key with a list of override texts, or (random search only) a distribution."""

    key: str
    text: str  # The argument as given.
    values: tuple[str, ...] = ()  # Override texts of a list grid.
    distribution: str | None = None
    low: float = 0.0
    high: float = 0.0

    def sample(self, rng) -> str:
        """One override text drawn with the numpy Generator `rng`."""
        if self.distribution is None:
            return self.values[int(rng.integers(len(self.values)))]
        if self.distribution == "randint":
            return str(int(rng.integers(self.low, self.high + 1)))
        if self.distribution == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        value = min(max(float(f"{value:.{SIGNIFICANT_DIGITS}g}"), self.low), self.high)
        return repr(float(value))


def parse_grid(text: str, config: ml_collections.ConfigDict) -> Grid:
    """Parses `KEY=[v1,...]`, `KEY=choice(v1,...)` or `KEY=loguniform|uniform|randint(a,b)` against `config`.

    Every list value is checked by applying it to `config` (mmjax.config's parser: the key's type).
    """
    what = f"--grid {text!r}"
    key, sep, body = text.partition("=")
    key, body = key.strip(), body.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise SweepError(f"{what}: expected KEY=[v1,v2,...] (or KEY=loguniform(a,b), uniform(a,b), randint(a,b), "
                         "choice(v1,...) with --random N)")
    current = _get(config, key, what)
    call = re.fullmatch(r"(\w+)\((.*)\)", body, re.S)
    if body.startswith("[") and body.endswith("]"):
        items = _split_items(body[1:-1], what)
    elif call and call.group(1) == "choice":
        items = _split_items(call.group(2), what)
    elif call and call.group(1) in DISTRIBUTIONS:
        return _distribution(key, text, call.group(1), _split_items(call.group(2), what), current, what)
    else:
        raise SweepError(f"{what}: expected {key}=[v1,v2,...] (or {key}=loguniform(a,b), uniform(a,b), "
                         "randint(a,b), choice(v1,...) with --random N)")
    if not items:
        raise SweepError(f"{what}: no values")
    values, seen = [], {}
    for item in map(_unquote, items):
        try:
            parsed = _get(config_lib.apply_overrides(config, [f"{key}={item}"]), key)
        except config_lib.ConfigError as error:
            raise SweepError(f"{what}: {error}") from None
        normal = json.dumps(config_lib.normalize(parsed), sort_keys=True)
        if normal in seen:
            raise SweepError(f"{what}: values {seen[normal]!r} and {item!r} are the same")
        seen[normal] = item
        values.append(item)
    return Grid(key, text, tuple(values))


def _distribution(key, text, name, args, current, what) -> Grid:
    if len(args) != 2:
        raise SweepError(f"{what}: {name} takes two bounds, {name}(low, high)")
    low, high = (_number(a, what) for a in args)
    if name == "randint":
        if isinstance(current, bool) or not isinstance(current, (int, float)) and current is not None:
            raise SweepError(f"{what}: config key {key!r} is a {type(current).__name__}; randint needs a number")
        if not (isinstance(low, int) and isinstance(high, int)):
            raise SweepError(f"{what}: randint bounds must be integers")
    else:
        if isinstance(current, int) and not isinstance(current, bool):
            raise SweepError(f"{what}: config key {key!r} is an int; use randint(a,b)")
        if current is not None and not isinstance(current, float):
            raise SweepError(f"{what}: config key {key!r} is a {type(current).__name__}; {name} needs a float key")
        if name == "loguniform" and low <= 0:
            raise SweepError(f"{what}: loguniform bounds must be > 0")
    if not low < high:
        raise SweepError(f"{what}: the low bound must be below the high one")
    return Grid(key, text, distribution=name, low=low, high=high)


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int  # 1-based.
    name: str  # Its workdir under the sweep's.
    overrides: tuple[str, ...]  # `key=text` after the fixed overrides.
    values: dict  # key -> parsed value (JSON-normalised).

    def describe(self) -> str:
        return " ".join(f"{k}={show(v)}" for k, v in self.values.items())


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among `keys`, a final `.name` dropped
    (`optimizer.lr` -> `lr`, `model.fusion.name` -> `fusion`)."""
    trimmed = {k: k[: -len(".name")] if k.endswith(".name") else k for k in keys}
    short = {}
    for key, name in trimmed.items():
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(t == suffix or t.endswith("." + suffix) for t in trimmed.values()) == 1:
                short[key] = suffix
                break
        else:
            short[key] = key
    return short


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-")


def trial_name(index: int, values: dict, short: dict[str, str], width: int = 3) -> str:
    slug = "_".join(f"{_slug(short[k])}={_slug(show(v))}" for k, v in values.items())
    return f"trial_{index:0{width}d}" + (f"_{slug[:80].rstrip('_-')}" if slug else "")


def make_trials(grids: Sequence[Grid], config: ml_collections.ConfigDict, random: int | None = None,
                seed: int = 0) -> list[Trial]:
    """The trials: the product of the grids, or `random` samples (seeded); each checked against `config`."""
    import numpy as np

    keys = [g.key for g in grids]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a key has two --grid arguments: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    if random is None:
        continuous = [g.text for g in grids if g.distribution]
        if continuous:
            raise SweepError(f"--grid {continuous[0]!r} is a distribution: add --random N to sample N trials "
                             "(or give a list of values)")
        combos = list(itertools.product(*(g.values for g in grids)))
    else:
        if random < 1:
            raise SweepError(f"--random {random}: give the number of trials (>= 1)")
        rng = np.random.default_rng(seed)
        if all(g.distribution is None for g in grids):
            product = list(itertools.product(*(g.values for g in grids)))
            if random > len(product):
                raise SweepError(f"--random {random}: the grids have only {len(product)} distinct combinations; "
                                 "drop --random to run them all")
            combos = [product[i] for i in rng.choice(len(product), size=random, replace=False)]
        else:
            combos = [tuple(g.sample(rng) for g in grids) for _ in range(random)]
    short = _short_keys(keys)
    width = max(3, len(str(len(combos))))
    trials = []
    for index, combo in enumerate(combos, 1):
        overrides = tuple(f"{k}={v}" for k, v in zip(keys, combo))
        try:
            resolved = config_lib.apply_overrides(config, overrides)
        except config_lib.ConfigError as error:
            raise SweepError(f"trial {index} ({' '.join(overrides)}): {error}") from None
        values = {k: config_lib.normalize(_get(resolved, k)) for k in keys}
        trials.append(Trial(index, trial_name(index, values, short, width), overrides, values))
    return trials


# ---------------------------------------------------------------------------------------------------------------
# Results.


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_examples"}


def _describe(result: Any) -> str:
    if isinstance(result, dict):
        return f"a dict with keys {sorted(result)[:10]}"
    return f"a {type(result).__name__}"


def _rows_of(result: Any, prefix: str) -> list[dict] | None:
    if not isinstance(result, dict):
        return None
    if isinstance(result.get("splits"), dict):
        return [{
            "variant": prefix,
            "workdir": result.get("workdir"),
            "step_time_s": result.get("step_time_s"),
            "num_parameters": result.get("num_parameters"),
            "splits": {s: _scalars(m) for s, m in result["splits"].items() if isinstance(m, dict)},
        }]
    if isinstance(result.get("variants"), dict):
        children = result["variants"]
    elif result and all(isinstance(v, dict) for v in result.values()):
        children = result  # E.g. av_digits_tasks: {task: {"variants": ...}}.
    else:
        return None
    rows = []
    for name, child in children.items():
        child_rows = _rows_of(child, f"{prefix}/{name}" if prefix else str(name))
        if child_rows is None:
            return None
        rows += child_rows
    return rows


def result_rows(result: Any, base: str = "") -> list[dict]:
    """Leaderboard rows of one trial's `run` result: a loop.run result, `{"variants": {name: result}}`, or a dict
    of those; each row is `{"variant", "workdir", "step_time_s", "num_parameters", "splits": {split: scalars}}`."""
    rows = _rows_of(result, "")
    if not rows:
        raise SweepError(
            f"experiment {base or '?'}: run() returned {_describe(result)}; the sweep ranks loop.run results "
            "({'splits': ...}), {'variants': {name: result}} (compare.run_variants) or dicts of those"
        )
    return rows


def metric_value(row: dict, metric: str) -> float | None:
    split, _, name = metric.partition("/")
    value = row["splits"].get(split, {}).get(name)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def default_mode(metric: str) -> str:
    name = metric.partition("/")[2].lower()
    return "min" if any(name == w or name.endswith(w) for w in LOWER_IS_BETTER) else "max"


def rank(trials: Sequence[dict], metric: str, mode: str) -> list[dict]:
    """Leaderboard rows of the finished trials (records of sweep.json), best first; rows without the metric last."""
    rows = []
    for trial in trials:
        if trial.get("status") != "done":
            continue
        for row in trial["rows"]:
            ran = {k: by_variant[row["variant"] or "run"] for k, by_variant in trial.get("overridden", {}).items()
                   if (row["variant"] or "run") in by_variant}
            rows.append({"trial": trial["index"], "trial_name": trial["name"], "values": trial["values"], **row,
                         "ran": ran, "metric": metric_value(row, metric)})
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r["metric"] is None, sign * r["metric"] if r["metric"] is not None else 0))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _columns(rows: list[dict], keys: Sequence[str], metric: str) -> list[tuple[str, Any]]:
    """(header, row -> value) of the leaderboard."""
    split, _, name = metric.partition("/")
    others = sorted({m for r in rows for m in r["splits"].get(split, {})} - {name})
    splits = sorted({s for r in rows for s, m in r["splits"].items() if name in m} - {split})
    columns = [("rank", lambda r: r["rank"]), ("trial", lambda r: r["trial"]), ("variant", lambda r: r["variant"])]
    columns += [(k, lambda r, k=k: show(r["values"][k]) + (f" (ran {show(r['ran'][k])})" if k in r["ran"] else ""))
                for k in keys]  # The value the run used, where the experiment replaced the swept one.
    columns += [(metric, lambda r: r["metric"])]
    columns += [(f"{split}/{m}", lambda r, m=m: r["splits"].get(split, {}).get(m)) for m in others]
    columns += [(f"{s}/{name}", lambda r, s=s: r["splits"][s].get(name)) for s in splits]
    columns += [("step_time_s", lambda r: r.get("step_time_s"))]
    return columns


def leaderboard_markdown(rows: list[dict], keys: Sequence[str], metric: str) -> str:
    columns = _columns(rows, keys, metric)

    def cell(value):
        if value is None:
            return "—"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(get(r)) for _, get in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], keys: Sequence[str], metric: str, path: str) -> None:
    columns = _columns(rows, keys, metric) + [("workdir", lambda r: r.get("workdir"))]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([h for h, _ in columns])
        for r in rows:
            writer.writerow(["" if get(r) is None else get(r) for _, get in columns])


def plot_leaderboard(rows: list[dict], grids: Sequence[Grid], metric: str, path: str, title: str = "") -> bool:
    """Metric vs the swept value (one numeric key), else a bar chart of the rows; False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["metric"] is not None]
    if not rows:
        return False
    key = grids[0].key if len(grids) == 1 else None
    numeric = key is not None and all(
        isinstance(r["values"][key], (int, float)) and not isinstance(r["values"][key], bool) for r in rows)
    if numeric:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for variant in dict.fromkeys(r["variant"] for r in rows):
            points = sorted((r["values"][key], r["metric"]) for r in rows if r["variant"] == variant)
            ax.plot(*zip(*points), marker="o", label=variant or None)
        xs = [r["values"][key] for r in rows]
        if min(xs) > 0 and (grids[0].distribution == "loguniform" or max(xs) / min(xs) >= 10):
            ax.set_xscale("log")
        best = rows[0]
        ax.plot([best["values"][key]], [best["metric"]], marker="*", markersize=14, color="gold",
                markeredgecolor="black", linestyle="none", label="best")
        ax.set_xlabel(key)
        ax.legend()
    else:
        shown = rows[:40]
        fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.3 * len(shown)))
        labels = [f"{r['trial_name']}" + (f" [{r['variant']}]" if r["variant"] else "") for r in shown]
        ax.barh(range(len(shown)), [r["metric"] for r in shown], color="tab:blue")
        for i, r in enumerate(shown):
            ax.text(r["metric"], i, f" {r['metric']:.4f}", va="center", fontsize=8)
        ax.set_yticks(range(len(shown)), labels, fontsize=8)
        ax.invert_yaxis()  # Best at the top.
        ax.set_xlabel(metric)
        values = [r["metric"] for r in shown]
        if min(values) >= 0:
            ax.set_xlim(0, max(values) * 1.15 or 1)  # Room for the value labels.
    if numeric:
        ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The sweep.


@dataclasses.dataclass
class Sweep:
    base: str  # Module name.
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
        args = ["python", "-m", "experiments.sweep", "--base", self.base, "--workdir", workdir]
        for g in self.grids:
            args += ["--grid", g.text]
        if self.random is not None:
            args += ["--random", str(self.random), "--seed", str(self.seed)]
        if self.preset:
            args += ["--preset", self.preset]
        args += [f"--config.{o}" for o in self.fixed]
        return " ".join(shlex.quote(a) for a in args)

    def trial_config(self, trial: Trial) -> ml_collections.ConfigDict:
        config = config_lib.apply_overrides(self.config, trial.overrides)
        if isinstance(config.get("name"), str):
            config.name = f"{config.name}/{trial.name}"
        return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__, allow_abbrev=False,
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
    cli.add_compile_cache_argument(parser, default=False)
    group = parser.add_argument_group("multi-process (one process per host; or MMJAX_* environment variables)")
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int)
    group.add_argument("--process_id", type=int)
    return parser


def build_sweep(args: argparse.Namespace, fixed: list[str]) -> Sweep:
    """Checks the whole sweep (base, overrides, grids, trials, metric) without training anything."""
    if not args.base:
        raise SweepError(f"--base is required: the experiment to sweep, one of {', '.join(experiment_names())}")
    if not args.grid:
        raise SweepError("give at least one --grid 'KEY=[v1,v2,...]'")
    base = resolve_base(args.base)
    module = load_base(base)
    try:
        preset = cli.preset_overrides(getattr(module, "PRESETS", None), args.preset)
        config = config_lib.apply_overrides(module.get_config(), [*preset, *fixed])
    except config_lib.ConfigError as error:
        raise SweepError(str(error)) from None

    grids = [parse_grid(text, config) for text in args.grid]
    fixed_keys = {o.split("=", 1)[0].strip() for o in fixed}
    for g in grids:
        if g.key in fixed_keys:
            raise SweepError(f"config key {g.key!r} is set by both --grid and --config.{g.key}; keep one")
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
    for trial in trials:
        splits = (config_lib.apply_overrides(config, trial.overrides).get("eval") or {}).get("splits")
        if splits is not None and split not in splits:
            raise SweepError(f"--metric {metric}: split {split!r} is not evaluated (eval.splits={list(splits)}"
                             f"{' in trial ' + str(trial.index) if len(trials) > 1 else ''})")
    return Sweep(base, grids, args.random, args.seed, fixed, args.preset, metric, mode, config, trials)


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


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Sweep, dict | None]:
    """Parses and checks the command line and the workdir; exits with status 2 and a message on bad input."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    fixed = cli._split_overrides(rest, parser)
    try:
        sweep = build_sweep(args, fixed)
        saved = None if args.dry_run else check_workdir(sweep, os.path.abspath(args.workdir))
    except (SweepError, config_lib.ConfigError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args, sweep, saved


class _Record:
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

    def save(self) -> None:
        from mmjax import reporting

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
                ran = config_lib.normalize(_get(saved, key))
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
    module = load_base(sweep.base)
    record = _Record(sweep, workdir, saved)
    record.save()
    total = len(sweep.trials)
    reporting.console(f"sweep of {sweep.base}: {total} trial(s), ranked by {sweep.mode} {sweep.metric} | {workdir}")
    for trial, entry in zip(sweep.trials, record.trials):
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
            result = module.run(sweep.trial_config(trial), trial_dir)
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
    table = record.write_leaderboard(plot=True)
    leaderboard = record.leaderboard()
    reporting.console(f"\nsweep of {sweep.base} ({sweep.mode} {sweep.metric}), {workdir}/leaderboard.md:\n{table}")
    best = leaderboard[0] if leaderboard and leaderboard[0]["metric"] is not None else None
    if best:
        trial = sweep.trials[best["trial"] - 1]
        reporting.console(
            f"best: trial {best['trial']} {trial.describe()}" + (f" [{best['variant']}]" if best["variant"] else "")
            + f", {sweep.metric} {best['metric']:.4f}; its config: "
            + f"python -m experiments.{sweep.base} --workdir DIR "
            + (f"--preset {sweep.preset} " if sweep.preset else "")
            + " ".join(shlex.quote(f"--config.{o}") for o in (*sweep.fixed, *trial.overrides)))
    return {"leaderboard": leaderboard, "trials": record.trials, "best": best}


def main(argv: Sequence[str] | None = None):
    args, sweep, saved = parse(argv)
    if args.dry_run:
        print(f"sweep of {sweep.base}: {len(sweep.trials)} trial(s), ranked by {sweep.mode} {sweep.metric}")
        for trial in sweep.trials:
            print(f"trial {trial.index}/{len(sweep.trials)}: {trial.describe()}  ->  {trial.name}")
        return {"trials": sweep.trials}
    if argv is None:  # Only a real command line can be re-executed.
        cli.reexec_with_hugepages()
    from mmjax.train import parallel
    from mmjax.train.preemption import PREEMPTED_EXIT_CODE

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.compile_cache:
        cli.enable_compile_cache(args.workdir)
    try:
        result = run_sweep(sweep, args.workdir, saved)
    except SweepError as error:
        print(f"python -m experiments.sweep: error: {error}", file=sys.stderr)
        sys.exit(2)
    if result.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)
    return result


if __name__ == "__main__":
    main()
