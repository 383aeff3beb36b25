"""Supervised tasks on a head's outputs: classification, multi-label classification and regression.

`config.model.num_classes` is the number of outputs K (1 for a scalar regression target). Labels: integer class
ids `[B]` (classification), multi-hot `[B, K]` (multilabel), float targets `[B]` or `[B, K]` (regression).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.metrics.classification import classification_metrics, multilabel_metrics, regression_metrics
from mmjax.registry import invalid_choice
from mmjax.tasks import losses
from mmjax.tasks.base import TASKS, Task, check_outputs


@TASKS.register("classification")
@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Single-label classification: softmax cross-entropy (float32), accuracy, macro-F1, confusion matrix and
    ROC-AUC (`mmjax.metrics.classification`).

    ROC-AUC needs scores, not only the argmax: the eval step keeps the softmax probabilities (float32) when there
    are at most `roc_auc_max_classes` classes (default 100, i.e. at most 400 bytes per example gathered on the
    host: 40 B for AV-Digits' 10 classes, 20 MB for a 50,000-example split at the limit); above it only the
    argmax is kept and no ROC-AUC is reported. 0 turns the probabilities (and ROC-AUC) off.
    """

    label_smoothing: float = 0.0
    roc_auc_max_classes: int = 100

    dataset_task: ClassVar[str] = "classification"
    default_best_metric: ClassVar[str] = "accuracy"
    # Scalars of `metrics` (+ "loss"); roc_auc only with probabilities (at most `roc_auc_max_classes` classes).
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "roc_auc")

    def __post_init__(self):
        check_outputs(self, self.num_classes, self.class_names)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"config task.label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        limit = self.roc_auc_max_classes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"config task.roc_auc_max_classes={limit!r} must be an integer >= 0")

    @property
    def keeps_probabilities(self) -> bool:
        return 2 <= self.num_classes <= self.roc_auc_max_classes

    def loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        return losses.softmax_cross_entropy(outputs, labels, self.num_classes, self.label_smoothing)

    def train_metrics(self, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        return {"accuracy": jnp.mean(jnp.argmax(outputs, -1) == labels)}

    def eval_outputs(self, outputs: jax.Array) -> dict[str, jax.Array]:
        result = {"prediction": jnp.argmax(outputs, -1).astype(jnp.int32)}
        if self.keeps_probabilities:
            result["probabilities"] = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
        return result

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        return classification_metrics(labels, eval_outputs["prediction"], self.num_classes, self.class_names,
                                      probabilities=eval_outputs.get("probabilities"))


@TASKS.register("multilabel")
@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
    """Multi-label classification: independent sigmoids; micro/macro-F1 at `threshold`, mAP, subset accuracy."""

    threshold: float = 0.5

    dataset_task: ClassVar[str] = "multilabel"
    label_rank: ClassVar[int] = 2  # [B, K] multi-hot
    default_best_metric: ClassVar[str] = "mAP"
    metric_names: ClassVar[tuple[str, ...]] = ("subset_accuracy", "micro_f1", "macro_f1", "mAP")

    def __post_init__(self):
        check_outputs(self, self.num_classes, self.class_names)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"config task.threshold={self.threshold!r} must be in (0, 1)")

    def loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        return losses.sigmoid_cross_entropy(outputs, labels)

    def train_metrics(self, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        predicted = jax.nn.sigmoid(outputs.astype(jnp.float32)) >= self.threshold
        return {"subset_accuracy": jnp.mean(jnp.all(predicted == (labels > 0.5), axis=-1))}

    def eval_outputs(self, outputs: jax.Array) -> dict[str, jax.Array]:
        return {"scores": jax.nn.sigmoid(outputs.astype(jnp.float32))}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        return multilabel_metrics(labels, eval_outputs["scores"], self.threshold, self.class_names)


REGRESSION_LOSSES = ("mse", "mae")


@TASKS.register("regression")
@dataclasses.dataclass(frozen=True)
class Regression(Task):
    """Regression: MSE (or MAE) loss; MAE, RMSE and Pearson correlation over the split."""

    loss_type: str = "mse"

    dataset_task: ClassVar[str] = "regression"
    default_best_metric: ClassVar[str] = "mae"
    metric_names: ClassVar[tuple[str, ...]] = ("mae", "mse", "rmse", "pearson")

    def __post_init__(self):
        check_outputs(self, self.num_classes, self.class_names)
        if self.loss_type not in REGRESSION_LOSSES:
            raise ValueError(invalid_choice("task.loss_type", self.loss_type, REGRESSION_LOSSES))

    def loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        return losses.regression_loss(outputs, labels, self.loss_type)

    def train_metrics(self, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        outputs = outputs.astype(jnp.float32)
        return {"mae": jnp.mean(jnp.abs(outputs - labels.astype(jnp.float32).reshape(outputs.shape)))}

    def eval_outputs(self, outputs: jax.Array) -> dict[str, jax.Array]:
        return {"prediction": outputs.astype(jnp.float32)}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        return regression_metrics(labels, eval_outputs["prediction"])
