"""AV-Digits as multi-label and regression tasks: unimodal vs early vs late fusion on each.

- multilabel: each image is paired with another example's speech; the target is the multi-hot set
  {image digit, spoken digit} (sigmoid loss; mAP, micro/macro-F1, subset accuracy). One modality can at best
  find one of the two digits, so fusion is needed to get both.
- regression: the digit's value 0..9 as a real number (MSE loss; MAE, RMSE, Pearson r).

Command (7.5 min on 2 CPU cores shared with other jobs):

    python -m experiments.av_digits_tasks --workdir /tmp/av_tasks

Writes `WORKDIR/<task>/summary.md` per task. Expected test results (seed 0, jax 0.10.2, 2 AMD EPYC cores):

    | multilabel | mAP    | micro_f1 | subset_accuracy |      | regression | mae    | pearson |
    | image      | 0.6124 | 0.5709   | 0.0694          |      | image      | 1.1900 | 0.8093  |
    | audio      | 0.6131 | 0.5489   | 0.0806          |      | audio      | 1.0488 | 0.8490  |
    | early      | 0.9197 | 0.8410   | 0.6000          |      | early      | 0.9044 | 0.8891  |
    | late       | 0.9305 | 0.8603   | 0.6611          |      | late       | 0.9887 | 0.8821  |
"""

from __future__ import annotations

import os

import ml_collections

from experiments import av_digits
from mmjax import compare, experiment

TASKS = {
    # task: (data.target, head, num_classes, best checkpoint metric, mode, table metrics)
    "multilabel": ("digit_pair", "classifier", 10, "validation/mAP", "max",
                   ("mAP", "micro_f1", "macro_f1", "subset_accuracy")),
    "regression": ("value", "regressor", 1, "validation/mae", "min", ("mae", "rmse", "pearson")),
}


def get_config() -> ml_collections.ConfigDict:
    config = av_digits.get_config()
    config.name = "av_digits_tasks"
    config.tasks = ("multilabel", "regression")
    config.train.num_steps = 500
    return config


def task_config(config: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
    """The base config turned into one task's config."""
    if task not in TASKS:
        raise ValueError(f"config tasks: unknown task {task!r}; valid: {', '.join(TASKS)}")
    target, head, num_classes, best, mode, _ = TASKS[task]
    config = ml_collections.ConfigDict(config.to_dict())
    config.name = f"{config.name}/{task}"
    config.data.target = target
    config.model.head.name = head
    config.model.num_classes = num_classes
    config.task = {"name": task}
    config.checkpoint.best_metric, config.checkpoint.best_mode = best, mode
    return config


def run(config: ml_collections.ConfigDict, workdir: str):
    results = {}
    for task in config.tasks:
        results[task] = compare.run_variants(
            task_config(config, task), os.path.join(workdir, task), av_digits.VARIANTS, metrics=TASKS[task][-1]
        )
        if results[task].get("preempted"):
            return results[task]
    return results


if __name__ == "__main__":
    experiment.main(__name__)
