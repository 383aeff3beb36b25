"""Early stopping: end a run once `checkpoint.best_metric` has not improved for `train.early_stopping_patience`
evaluations.

The key lives in `config.train` (beside `num_steps` and `time_limit_s`, the other rules for when training ends,
and among `reliability.OPTIONAL_TRAIN_KEYS`, so every experiment's command line accepts it and configs saved
before it existed still load); the metric it watches is the one that picks the best checkpoint,
`checkpoint.best_metric` in `checkpoint.best_mode`, so the best step it reports is the checkpoint kept as "best".
0 (the default) turns it off. An improvement is a strictly better value; each evaluation that is not one counts
against the patience (so a metric that plateaus at one value stops the run); an equal value moves the best step
to the later evaluation, the one Orbax keeps as the best checkpoint. Its state (best value and step, evaluations
since) is saved with every checkpoint, so a resumed run stops where an uninterrupted one does; a run that stopped
early is finished, and resuming it trains nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mmjax.checks import is_int

KEY = "early_stopping_patience"

# Rules besides the patience that may end a run at an evaluation: (step, flat SPLIT/METRIC values) -> the reason to
# stop, or None. A sweep's pruner is one (mmjax.sweep.study); runs started inside `stop_rules` use them.
StopRule = Callable[[int, Mapping[str, float]], "str | None"]
_RULES: list[StopRule] = []


@contextlib.contextmanager
def stop_rules(*rules: StopRule) -> Iterator[None]:
    """Runs started inside this block also stop when one of `rules` gives a reason at an evaluation."""
    _RULES.extend(rules)
    try:
        yield
    finally:
        for rule in rules:
            _RULES.remove(rule)


def patience(config) -> int:
    """`train.early_stopping_patience` (0 when absent), checked before anything runs: a non-negative int, and a
    `checkpoint.best_metric` to watch when it is on."""
    value = config.train.get(KEY, 0)
    if not is_int(value) or value < 0:
        raise ValueError(f"config train.{KEY}={value!r} must be an int >= 0: the number of evaluations without an "
                         "improvement of checkpoint.best_metric after which training stops (0 = off)")
    if value and not (config.get("checkpoint") or {}).get("best_metric"):
        raise ValueError(f"config train.{KEY}={value} needs checkpoint.best_metric ('SPLIT/METRIC', e.g. "
                         "'validation/accuracy'): the metric whose improvement it waits for")
    return int(value)


class EarlyStopping:
    """Counts evaluations without an improvement of `metric`; `stopped` is set once `patience` of them ran out."""

    def __init__(self, patience: int, metric: str, mode: str, saved: Mapping[str, Any] | None = None):
        self.patience, self.metric, self.mode = patience, metric, mode
        saved = dict(saved or {})
        self.best: float | None = saved.get("best")
        self.best_step: int | None = saved.get("best_step")
        self.since_best = int(saved.get("since_best", 0))
        self.stopped: dict[str, Any] | None = saved.get("stopped")
        self.rules = tuple(_RULES)

    @property
    def active(self) -> bool:
        return self.patience > 0 or bool(self.rules)

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def update(self, step: int, metrics: Mapping[str, float], last_step: int) -> bool:
        """Takes the evaluation of `step` (flat `SPLIT/METRIC` values); True when the run should stop here, before
        `last_step` (patience exhausted)."""
        if step < last_step:
            for rule in self.rules:
                reason = rule(step, metrics)
                if reason:
                    self.stopped = {"step": step, "reason": reason}
                    return True
        if not self.patience or self.metric not in metrics:
            return False
        value = float(metrics[self.metric])
        if self._improves(value):
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            if value == self.best:  # A tie is no improvement, but its (later) step is the checkpoint kept as best.
                self.best_step = step
            self.since_best += 1
        if self.since_best >= self.patience and step < last_step:
            self.stopped = {"step": step, "best_step": self.best_step, "best": self.best, "metric": self.metric,
                            "mode": self.mode, "patience": self.patience}
            return True
        return False

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint carries for a resumed run to continue the count (and know the run is finished)."""
        state = {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}
        return {**state, "stopped": self.stopped} if self.stopped else state

    def message(self) -> str:
        s = self.stopped
        if "reason" in s:
            return f"stopped at step {s['step']}: {s['reason']}"
        return (f"early stopping at step {s['step']}: {s['metric']} has not improved for {s['patience']} "
                f"evaluation(s); best {s['best']:.4f} at step {s['best_step']} (its checkpoint is kept as the best)")
