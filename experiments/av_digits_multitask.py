"""AV-Digits multi-task: digit classification, value regression and the digit_pair multi-label task trained together
in one model, from a mixture of two datasets, against each task trained alone.

One model (the av_digits early-fusion encoders and `concat` fusion) gets three heads: `digit` (10-way softmax),
`value` (the digit as a real number, MSE) and `digit_pair` (multi-hot {image digit, spoken digit}, sigmoid). Their
labels come from two sources mixed 50/50 in every batch: `matched` (AV-Digits as it is, each image with speech of
the same digit; labels `digit` and `value`) and `paired` (each image with another example's speech; label
`digit_pair`). An example is masked out of the loss of every task whose label its source lacks, so each head
trains on half of every batch. Variants:

- `digit`, `value`, `digit_pair`: each task alone, the single-task form (`config.task`) on its own data, with a
  whole batch per step;
- `fixed`: the three heads, L = L_digit + 0.1 L_value + L_digit_pair (the value MSE starts near 30, the two
  cross-entropies near 2 and 7, hence its smaller weight);
- `uncertainty`: the three heads with learned uncertainty weights (Kendall et al. 2018, `mmjax.tasks.multitask`),
  every fixed weight 1.

Command (three seeds, 600 steps of batch 64 per model; see README "Multi-task learning" for the machine and time):

    python -m experiments.av_digits_multitask --workdir /tmp/av_multitask

Writes WORKDIR/summary.md (the table, test split: mean ± std over the seeds) and summary.json. Expected (seeds 0-2,
jax 0.10.2, 2 shared CPU cores, 19 min):

    | model (test) | digit accuracy | value mae | value pearson | digit_pair mAP | digit_pair subset_accuracy |
    |---|---|---|---|---|---|
    | digit | 0.9676 ± 0.0035 | — | — | — | — |
    | value | — | 0.8726 ± 0.0165 | 0.9027 ± 0.0067 | — | — |
    | digit_pair | — | — | — | 0.9257 ± 0.0031 | 0.6241 ± 0.0092 |
    | fixed | 0.9731 ± 0.0013 | 0.8092 ± 0.0140 | 0.9268 ± 0.0044 | 0.9326 ± 0.0015 | 0.6519 ± 0.0073 |
    | uncertainty | 0.9694 ± 0.0045 | 0.7867 ± 0.0234 | 0.9236 ± 0.0036 | 0.9260 ± 0.0039 | 0.6176 ± 0.0065 |
"""

from __future__ import annotations

import json
import os

import ml_collections

from experiments import av_digits
from mmjax import compare, experiment

COMPILE_CACHE = True  # Every variant trains once per seed with the same programs.
TASKS = {  # head: (task type, label key, loss weight in `fixed`, best-checkpoint metric and mode, table metric)
    "digit": ("classification", "digit", 1.0, "accuracy", "max"),
    "value": ("regression", "value", 0.1, "mae", "min"),
    "digit_pair": ("multilabel", "digit_pair", 1.0, "mAP", "max"),
}
COLUMNS = (("digit", "accuracy"), ("value", "mae"), ("value", "pearson"), ("digit_pair", "mAP"),
           ("digit_pair", "subset_accuracy"))


def get_config() -> ml_collections.ConfigDict:
    config = av_digits.get_config()
    config.name = "av_digits_multitask"
    config.variants = ("digit", "value", "digit_pair", "fixed", "uncertainty")
    config.seeds = (0, 1, 2)
    config.data.sources = {"matched": {"target": ("digit", "value")}, "paired": {"target": ("digit_pair",)}}
    config.data.mixture = {"matched": 0.5, "paired": 0.5}
    config.tasks = {name: {"name": kind, "label": label, "weight": weight}
                    for name, (kind, label, weight, _, _) in TASKS.items()}
    config.tasks.digit.num_classes = 10
    config.multitask = {"weighting": "fixed"}
    config.checkpoint.best_metric = "validation/loss"
    config.checkpoint.best_mode = "min"
    return config


def alone(task: str) -> compare.Variant:
    """Task `task` alone: the single-task form on the data it was labelled for."""
    kind, label, _, metric, mode = TASKS[task]

    def variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        for key in ("sources", "mixture"):
            del config.data[key]
        for key in ("tasks", "multitask"):
            del config[key]
        config.data.target = label
        config.task = {"name": kind}
        config.model.num_classes = 1 if kind == "regression" else 10
        config.model.head.name = "regressor" if kind == "regression" else "classifier"
        config.checkpoint.best_metric, config.checkpoint.best_mode = f"validation/{metric}", mode
        return config

    return variant


def together(weighting: str) -> compare.Variant:
    """The three heads together; with uncertainty weighting every fixed weight is 1 (the learned ones balance)."""

    def variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        config.multitask.weighting = weighting
        if weighting == "uncertainty":
            for name in config.tasks:
                config.tasks[name].weight = 1.0
        return config

    return variant


VARIANTS = {"digit": alone("digit"), "value": alone("value"), "digit_pair": alone("digit_pair"),
            "fixed": together("fixed"), "uncertainty": together("uncertainty")}


def _value(result: dict, variant: str, task: str, metric: str) -> float | None:
    """The test metric of `task` in a variant's results (None when the variant does not train that task)."""
    test = result["splits"]["test"]
    if variant in TASKS:
        return test.get(metric) if variant == task else None
    return test.get(f"{task}/{metric}")


def summary_table(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per variant, mean ± std over seeds of each task's test metric."""
    import numpy as np

    header = ["model (test)"] + [f"{task} {metric}" for task, metric in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, runs in results.items():
        cells = [variant]
        for task, metric in COLUMNS:
            values = [_value(r, variant, task, metric) for r in runs]
            cells.append("—" if values[0] is None else f"{np.mean(values):.4f} ± {np.std(values):.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str):
    from mmjax import reporting
    from mmjax.train import loop

    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants or not config.seeds:
        raise ValueError(f"config variants {list(config.variants)} (valid: {', '.join(VARIANTS)}) and seeds "
                         f"{list(config.seeds)} must be non-empty and known")
    results: dict[str, list[dict]] = {}
    for name in config.variants:
        for seed in config.seeds:
            run_config = ml_collections.ConfigDict(config.to_dict())
            del run_config["variants"], run_config["seeds"]
            run_config = VARIANTS[name](run_config)
            run_config.seed = seed
            run_config.name = f"{config.name}/{name}/seed_{seed}"
            reporting.console(f"=== {run_config.name} ===")
            result = loop.run(run_config, os.path.join(workdir, name, f"seed_{seed}"))
            if result.get("preempted"):
                return result
            results.setdefault(name, []).append(result)
    table = summary_table(results)
    reporting.console("\n" + table)
    if reporting.is_primary():
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({name: [r["splits"] for r in runs] for name, runs in results.items()}, f, indent=2)
    return {"variants": results, "table": table}


if __name__ == "__main__":
    experiment.main(__name__)
