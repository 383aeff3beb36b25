"""Train several variants of one config (e.g. unimodal vs fused) and tabulate their test metrics.

Light at import (experiments build their `VARIANTS` from it before JAX starts); the trainer is imported to run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

Variant = Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]  # Changes a copy of the config, returns it.
DEFAULT_METRICS = ("accuracy", "macro_f1")  # Columns of the comparison table.


def unimodal(modality: str) -> Variant:
    """The variant that keeps only `modality`'s encoder (the rest of the model as it is, `concat` fusion)."""

    def variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        config.model.encoders = {modality: config.model.encoders[modality].to_dict()}
        config.model.fusion = {"name": "concat"}
        return config

    return variant


def fusion(name: str, **options: Any) -> Variant:
    """The variant that fuses the modalities with fusion `name` (and its `options`, e.g. `combine="mean"`)."""

    def variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        config.model.fusion = {"name": name, **options}
        return config

    return variant


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
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, Any]:
    """Runs `config.variants` (names of `variants`) one after another, each in `workdir/<name>`.

    Each run resumes on its own; a preempted run stops the sequence (re-running continues it). Writes
    `workdir/summary.json` and `workdir/summary.md` and prints the table.
    """
    from mmjax import reporting  # Here, not at the top: experiments import this module before the CLI's re-exec,
    from mmjax.train import loop  # which must come before JAX is imported (runtime.reexec_with_hugepages).

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
