"""Train several variants of one config (e.g. unimodal vs fused) and tabulate their test metrics."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from mmjax import reporting
from mmjax.train import loop

Variant = Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]


def comparison_table(results: Mapping[str, dict], split: str, metrics: Sequence[str]) -> str:
    """A Markdown table: one row per variant, one column per metric of `split`."""
    header = f"| model ({split}) | " + " | ".join(metrics) + " |"
    rule = "|" + "---|" * (len(metrics) + 1)
    rows = [
        f"| {name} | " + " | ".join(f"{result['splits'][split][m]:.4f}" for m in metrics) + " |"
        for name, result in results.items()
    ]
    return "\n".join([header, rule, *rows])


def run_variants(
    config: ml_collections.ConfigDict,
    workdir: str,
    variants: Mapping[str, Variant],
    *,
    split: str = "test",
    metrics: Sequence[str] = ("accuracy", "macro_f1"),
) -> dict[str, Any]:
    """Runs `config.variants` (names of `variants`) one after another, each in `workdir/<name>`.

    Each run resumes on its own; a preempted run stops the sequence (re-running continues it). Writes
    `workdir/summary.json` and `workdir/summary.md` and prints the table.
    """
    unknown = [v for v in config.variants if v not in variants]
    if unknown:
        raise ValueError(f"config variants: unknown {unknown}; valid: {', '.join(variants)}")
    if not config.variants:
        raise ValueError(f"config variants is empty; valid: {', '.join(variants)}")
    results = {}
    for name in config.variants:
        variant = variants[name](ml_collections.ConfigDict(config.to_dict()))
        variant.name = f"{config.get('name', 'run')}/{name}"
        reporting.console(f"=== {variant.name} ===")
        result = loop.run(variant, os.path.join(workdir, name))
        if result.get("preempted"):
            return result
        results[name] = result
    table = comparison_table(results, split, metrics)
    reporting.console("\n" + table)
    if reporting.is_primary():
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({name: r["splits"] for name, r in results.items()}, f, indent=2)
    return {"variants": results, "table": table}
