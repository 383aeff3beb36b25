"""Run outputs: metrics to JSONL and TensorBoard, progress lines on the console, training-curve plots.

Only process 0 writes; the others keep silent so multi-process runs print and write once.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILENAME = "metrics.jsonl"
MALFORMED_SUFFIX = ".malformed"  # metrics.jsonl.malformed: lines moved aside by `MetricWriter.truncate_after`.


def is_primary() -> bool:
    return jax.process_index() == 0


def console(message: str) -> None:
    """Prints a line from process 0 only, flushed at once (progress must show in logs and pipes)."""
    if is_primary():
        print(message, file=sys.stdout, flush=True)


def _scalar(value: Any) -> float | int:
    value = np.asarray(value)
    return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def _record_step(line: str) -> int | None:
    """The "step" of a metrics.jsonl line, or None when the line is not such a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class MetricWriter:
    """Appends `{"step": s, "split": name, **metrics}` records to metrics.jsonl and TensorBoard event files."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, METRICS_FILENAME)
        self._tb = None
        if is_primary():
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records of steps later than `step`: a resumed run recomputes them identically. A torn last line
        (the process was killed mid-write; always of a step after the last checkpoint) is dropped too.

        A malformed complete line (not a JSON record with an integer "step": an edit, a damaged copy) is moved to
        `metrics.jsonl.malformed` with a warning naming the file and its line numbers; the good records are kept.
        """
        if not is_primary() or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept, malformed = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip() or not line.endswith("\n"):
                continue  # Blank, or torn by a kill (only the last line can be).
            record_step = _record_step(line)
            if record_step is None:
                malformed.append((number, line))
            elif record_step <= step:
                kept.append(line)
        if malformed:
            aside = self.path + MALFORMED_SUFFIX
            with open(aside, "a") as f:
                f.writelines(line for _, line in malformed)
            numbers = ", ".join(str(n) for n, _ in malformed[:10]) + (" ..." if len(malformed) > 10 else "")
            warnings.warn(f"{self.path}: {len(malformed)} malformed line(s) (line {numbers}) moved to {aside}; the "
                          f"{len(kept)} good record(s) up to step {step} are kept", RuntimeWarning, stacklevel=2)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not is_primary():
            return
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(f"{split}/{key}", value, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILENAME)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Console progress: step, loss, examples/s and ETA, measured over the steps since the last report."""

    def __init__(self, total_steps: int, global_batch_size: int, start_step: int):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def report(self, step: int, metrics: Mapping[str, float]) -> float:
        """Prints one line; returns examples/s since the last report."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        seconds_per_step = (now - self._last_time) / steps
        examples_per_s = self.global_batch_size / max(seconds_per_step, 1e-9)
        eta = datetime.timedelta(seconds=round(seconds_per_step * (self.total_steps - step)))
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        console(f"step {step:>6}/{self.total_steps} | {shown} | {examples_per_s:,.0f} ex/s | ETA {eta}")
        self._last_step, self._last_time = step, now
        return examples_per_s


def plot_curves(records: list[dict], path: str, title: str = "") -> None:
    """Writes a PNG with training loss and every evaluated split's accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    splits = sorted({r["split"] for r in records})
    for split in splits:
        rows = [r for r in records if r["split"] == split]
        steps = [r["step"] for r in rows]
        if rows and "loss" in rows[0]:
            ax_loss.plot(steps, [r["loss"] for r in rows], label=split, marker="" if split == "train" else "o")
        if rows and "accuracy" in rows[0]:
            ax_acc.plot(steps, [r["accuracy"] for r in rows], label=split, marker="" if split == "train" else "o")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
