"""What `loop.run` needs to survive faults: non-finite checks, the wall-clock budget, resumable log windows.

Config keys (all in `config.train`, all optional so older configs keep working):

* `nonfinite` (default "stop"): what a NaN/Inf loss or gradient norm does. "stop" raises `NonFiniteError` naming
  the step, the metric and the last good checkpoint, before anything of that step is logged, evaluated or saved
  (so that checkpoint is kept). "skip" keeps the old parameters, optimizer and model state for that step (inside
  the compiled step, see `step.train_step`), counts it in the `nonfinite_skipped` metric and goes on.
* `time_limit_s` (default 0 = none): wall-clock budget in seconds, counted from the start of the command (the CLI's
  start, so that the variants of a comparison share it; in library use, from the start of each `run()`). The run
  stops, saves and returns `{"preempted": True, ...}` early enough to finish the save: see `TimeBudget`. The CLI
  flag `--time_limit_s` (or `MMJAX_TIME_LIMIT_S`) sets the same budget for a whole command without changing the
  saved config; with both, the earlier deadline wins.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

NONFINITE_MODES = ("stop", "skip")
# Optional `config.train` keys and their defaults (the CLI accepts overrides of them for every experiment);
# `early_stopping_patience`: see `early_stopping`.
OPTIONAL_TRAIN_KEYS = {"nonfinite": "stop", "time_limit_s": 0.0, "early_stopping_patience": 0}
SKIPPED_METRIC = "nonfinite_skipped"  # Per step 0/1 in the compiled step; per logged window, the count.
CHECKED_METRICS = ("loss", "grad_norm")  # A non-finite gradient shows as a non-finite global norm.
TIME_LIMIT_ENV = "MMJAX_TIME_LIMIT_S"
# Until a save / an evaluation has been timed, the budget assumes this long for it.
DEFAULT_SAVE_SECONDS = 5.0
DEFAULT_EVAL_SECONDS = 5.0
SAFETY_FACTOR = 1.5  # Estimates are multiplied by this ...
SLACK_SECONDS = 2.0  # ... and this is added (closing files, results.json, the plot).


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss or gradient with `train.nonfinite="stop"`; nothing after the fault was saved."""


def options(config) -> tuple[str, float]:
    """`(train.nonfinite, train.time_limit_s)` with their defaults, checked (errors name the key)."""
    train = config.train
    mode = train.get("nonfinite", OPTIONAL_TRAIN_KEYS["nonfinite"])
    if mode not in NONFINITE_MODES:
        raise ValueError(f"config train.nonfinite={mode!r}; valid: {', '.join(NONFINITE_MODES)}")
    limit = train.get("time_limit_s", OPTIONAL_TRAIN_KEYS["time_limit_s"])
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
        raise ValueError(f"config train.time_limit_s={limit!r} must be a number of seconds >= 0 (0 = no limit)")
    return mode, float(limit)


# --- Wall-clock budget -------------------------------------------------------------------------------------------

_clock: dict[str, float | None] = {"start": None, "limit": None}


def set_time_limit(seconds: float | None, start: float | None = None) -> None:
    """Sets the command-wide budget (the CLI's `--time_limit_s`): `seconds` from `start` (a `time.time()`)."""
    if seconds is not None and (not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"--time_limit_s={seconds} must be a positive number of seconds")
    _clock["start"] = time.time() if start is None else start
    _clock["limit"] = seconds


def deadline(config_limit_s: float) -> float | None:
    """The earliest of the command's deadline and `config_limit_s` after the budget's start (`time.time()` units),
    or None without either. The budget starts when the CLI started, else (library use) now, at this `run()`."""
    start = time.time() if _clock["start"] is None else _clock["start"]
    limits = [x for x in (_clock["limit"], config_limit_s) if x]
    return start + min(limits) if limits else None


class TimeBudget:
    """Decides when to stop so that the checkpoint is committed before `deadline`.

    After each step, the run stops if what remains is less than `SAFETY_FACTOR` x (one more step + the evaluation
    that step would run + a save) + `SLACK_SECONDS`. Steps (median of the last 20, after the compiled first one),
    evaluations and saves (until their files are written) are timed as the run goes; until one of each was timed,
    a step counts 0 s and an evaluation or a save `DEFAULT_EVAL_SECONDS` / `DEFAULT_SAVE_SECONDS`.
    """

    def __init__(self, deadline_time: float | None):
        self.deadline = deadline_time
        self.step_seconds: list[float] = []
        self.eval_seconds: list[float] = []

    @property
    def active(self) -> bool:
        return self.deadline is not None

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def needed(self, *, evaluates: bool, save_seconds: Iterable[float] = ()) -> float:
        """Seconds to keep in hand before one more step (and its evaluation), then a save."""
        steps = self.step_seconds[1:]  # The first step's time is mostly compilation: not an estimate of the next.
        step = statistics.median(steps[-20:]) if steps else 0.0
        saves = list(save_seconds)[-5:]
        save = max(saves) if saves else DEFAULT_SAVE_SECONDS
        evaluation = (max(self.eval_seconds[-3:]) if self.eval_seconds else DEFAULT_EVAL_SECONDS) if evaluates else 0.0
        return SAFETY_FACTOR * (step + evaluation + save) + SLACK_SECONDS

    def exhausted(self, *, evaluates: bool, save_seconds: Iterable[float] = ()) -> bool:
        return self.active and self.remaining() < self.needed(evaluates=evaluates, save_seconds=save_seconds)


# --- Non-finite metrics ------------------------------------------------------------------------------------------


def raise_if_nonfinite(steps: list[tuple[int, Mapping[str, Any]]], last_checkpoint: int | None, directory: str) -> None:
    """Raises `NonFiniteError` for the first of `(step, metrics)` whose loss or gradient norm is NaN/Inf."""
    for step, metrics in steps:
        for key in CHECKED_METRICS:
            if key in metrics:
                value = float(np.asarray(metrics[key]))
                if not math.isfinite(value):
                    kept = (
                        f"the last good checkpoint is step {last_checkpoint} in {directory} (kept: nothing was "
                        "saved after the fault; re-running resumes from it)"
                        if last_checkpoint is not None
                        else f"no checkpoint was written before it (in {directory})"
                    )
                    raise NonFiniteError(
                        f"non-finite {key}={value} at step {step} (config train.nonfinite='stop'); stopped before "
                        f"logging, evaluating or saving it: {kept}. Lower optimizer.lr, set optimizer.grad_clip_norm, "
                        "or set train.nonfinite='skip' to skip such updates"
                    )


def average_window(window: list[Mapping[str, Any]], skip_mode: bool) -> dict[str, float]:
    """The logged record of a window of per-step metrics: their means. With skipping, means over the steps that
    were not skipped (their losses are NaN) and the number of skipped steps."""
    values = {k: [np.asarray(m[k]) for m in window] for k in window[0]}
    if not skip_mode or SKIPPED_METRIC not in values:
        return {k: float(np.mean(v)) for k, v in values.items()}
    skipped = [bool(x) for x in values.pop(SKIPPED_METRIC)]
    kept = [i for i, s in enumerate(skipped) if not s] or list(range(len(skipped)))
    averaged = {k: float(np.mean([v[i] for i in kept])) for k, v in values.items()}
    averaged[SKIPPED_METRIC] = sum(skipped)
    return averaged


def window_to_json(window: list[Mapping[str, Any]]) -> dict:
    """Per-step metrics not yet logged, as exact JSON (float32 values are exact as JSON doubles)."""
    if not window:
        return {"keys": [], "dtypes": [], "values": []}
    keys = list(window[0])
    rows = [[np.asarray(m[k]) for k in keys] for m in window]
    return {
        "keys": keys,
        "dtypes": [str(x.dtype) for x in rows[0]],
        "values": [[x.item() for x in row] for row in rows],
    }


def window_from_json(saved: Mapping[str, Any] | None) -> list[dict[str, np.ndarray]]:
    """Inverse of `window_to_json`: 0-d arrays of the saved dtypes, as `jax.device_get` returns them."""
    if not saved or not saved.get("keys"):
        return []
    keys, dtypes = saved["keys"], saved["dtypes"]
    return [{k: np.asarray(v, dtype=d) for k, d, v in zip(keys, dtypes, row)} for row in saved["values"]]


def write_json_atomic(path: str, value: Any, **kwargs) -> None:
    """Writes JSON to `path` via a temporary file and a rename: a kill mid-write never leaves a torn file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, **kwargs)
    os.replace(tmp, path)
