"""`split_metrics`: the task's exact metrics over every example of a split, and the mean loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator


@EVALUATORS.register("split_metrics")
@dataclasses.dataclass(frozen=True)
class SplitMetrics(Evaluator):
    """`task.metrics` (accuracy and macro-F1, mAP, MAE, retrieval recall@K and binding, ...) plus `loss`
    (`Task.split_metrics`; per task, `<task>/<metric>`, for a multi-task model)."""

    uses_outputs: ClassVar[bool] = True

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable | None = None) -> dict:
        return context.task.split_metrics(outputs)
