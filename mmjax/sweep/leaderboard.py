"""Sweep results: the leaderboard rows of each trial's `run` result, ranked by one metric, written as Markdown, CSV
and a plot (the metric against the swept value, or a bar chart)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Any

from mmjax.sweep.grid import Grid, SweepError, show

LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse", "error")


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
            ax.plot(*zip(*points, strict=True), marker="o", label=variant or None)
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
