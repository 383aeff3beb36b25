"""Task types: what the model's outputs mean, their loss, and the metrics computed over a whole split.

`config.task.name` picks one: "classification" (softmax cross-entropy; integer labels `[B]`), "multilabel"
(sigmoid cross-entropy; multi-hot labels `[B, K]`) or "regression" (MSE or MAE loss; float targets `[B]` or
`[B, K]`). `config.model.num_classes` is the number of outputs K (1 for a scalar regression target).
A task is a small object with jnp pieces used inside the jitted steps and a numpy `metrics` run on the host.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics as skm

from mmjax.metrics import classification_metrics
from mmjax.registry import Registry, invalid_choice

TASKS: Registry = Registry("task")


def check_outputs(task, num_classes: int, class_names: Sequence[str]) -> None:
    """The number of outputs is a positive int and the class names (when given) name each of them once."""
    name = type(task).__name__
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes <= 0:
        raise ValueError(f"{name}: num_classes={num_classes!r} must be a positive integer (config model.num_classes)")
    if class_names and len(class_names) != num_classes:
        raise ValueError(
            f"{name}: {len(class_names)} class names {list(class_names)[:12]} for num_classes={num_classes}; "
            "the dataset's label names and config model.num_classes must agree"
        )


@TASKS.register("classification")
@dataclasses.dataclass(frozen=True)
class Classification:
    """Single-label classification: softmax cross-entropy (float32), accuracy, macro-F1, confusion matrix."""

    num_classes: int
    class_names: Sequence[str] = ()
    label_smoothing: float = 0.0

    label_rank: ClassVar[int] = 1  # [B]
    default_best_metric: ClassVar[str] = "accuracy"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")  # Scalars of `metrics` (+ "loss").

    def __post_init__(self):
        check_outputs(self, self.num_classes, self.class_names)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"config task.label_smoothing={self.label_smoothing!r} must be in [0, 1)")

    def loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        """Per-example loss `[B]`."""
        logits = outputs.astype(jnp.float32)
        if self.label_smoothing:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), self.label_smoothing)
            return optax.softmax_cross_entropy(logits, targets)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def train_metrics(self, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        return {"accuracy": jnp.mean(jnp.argmax(outputs, -1) == labels)}

    def eval_outputs(self, outputs: jax.Array) -> dict[str, jax.Array]:
        """What the host needs per example (kept small: the argmax, not the logits)."""
        return {"prediction": jnp.argmax(outputs, -1).astype(jnp.int32)}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        return classification_metrics(labels, eval_outputs["prediction"], self.num_classes, self.class_names)


@TASKS.register("multilabel")
@dataclasses.dataclass(frozen=True)
class MultiLabel:
    """Multi-label classification: independent sigmoids; micro/macro-F1 at `threshold`, mAP, subset accuracy."""

    num_classes: int
    class_names: Sequence[str] = ()
    threshold: float = 0.5

    label_rank: ClassVar[int] = 2  # [B, K] multi-hot
    default_best_metric: ClassVar[str] = "mAP"
    metric_names: ClassVar[tuple[str, ...]] = ("subset_accuracy", "micro_f1", "macro_f1", "mAP")

    def __post_init__(self):
        check_outputs(self, self.num_classes, self.class_names)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"config task.threshold={self.threshold!r} must be in (0, 1)")

    def loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.sigmoid_binary_cross_entropy(outputs.astype(jnp.float32), labels.astype(jnp.float32)).sum(-1)

    def train_metrics(self, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        predicted = jax.nn.sigmoid(outputs.astype(jnp.float32)) >= self.threshold
        return {"subset_accuracy": jnp.mean(jnp.all(predicted == (labels > 0.5), axis=-1))}

    def eval_outputs(self, outputs: jax.Array) -> dict[str, jax.Array]:
        return {"scores": jax.nn.sigmoid(outputs.astype(jnp.float32))}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        labels = np.asarray(labels) > 0.5
        scores = np.asarray(eval_outputs["scores"])
        if labels.size == 0:
            raise ValueError("no examples to evaluate")
        predicted = scores >= self.threshold
        present = labels.any(axis=0)  # Average precision is undefined for a class with no positives.
        names = list(self.class_names) or [str(c) for c in range(self.num_classes)]
        per_class_f1 = skm.f1_score(labels, predicted, average=None, zero_division=0)
        return {
            "num_examples": int(labels.shape[0]),
            "subset_accuracy": float(np.mean(np.all(predicted == labels, axis=1))),
            "micro_f1": float(skm.f1_score(labels, predicted, average="micro", zero_division=0)),
            "macro_f1": float(np.mean(per_class_f1)),
            "mAP": float(skm.average_precision_score(labels[:, present], scores[:, present], average="macro")),
            "per_class": {names[c]: {"f1": float(per_class_f1[c]), "support": int(labels[:, c].sum())}
                          for c in range(self.num_classes)},
        }


@TASKS.register("regression")
@dataclasses.dataclass(frozen=True)
class Regression:
    """Regression: MSE (or MAE) loss; MAE, RMSE and Pearson correlation over the split."""

    num_classes: int  # Number of regression outputs.
    class_names: Sequence[str] = ()
    loss_type: str = "mse"

    label_rank: ClassVar[int] = 1  # [B] (one output) or [B, K]
    default_best_metric: ClassVar[str] = "mae"
    metric_names: ClassVar[tuple[str, ...]] = ("mae", "mse", "rmse", "pearson")

    def __post_init__(self):
        check_outputs(self, self.num_classes, self.class_names)
        if self.loss_type not in ("mse", "mae"):
            raise ValueError(invalid_choice("task.loss_type", self.loss_type, ("mse", "mae")))

    def _match(self, outputs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        outputs = outputs.astype(jnp.float32)
        labels = labels.astype(jnp.float32)
        return outputs, labels.reshape(outputs.shape)

    def loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
        outputs, labels = self._match(outputs, labels)
        error = outputs - labels
        per_output = error**2 if self.loss_type == "mse" else jnp.abs(error)
        return per_output.mean(-1)

    def train_metrics(self, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        outputs, labels = self._match(outputs, labels)
        return {"mae": jnp.mean(jnp.abs(outputs - labels))}

    def eval_outputs(self, outputs: jax.Array) -> dict[str, jax.Array]:
        return {"prediction": outputs.astype(jnp.float32)}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        predictions = np.asarray(eval_outputs["prediction"], np.float64)
        labels = np.asarray(labels, np.float64).reshape(predictions.shape)
        if labels.size == 0:
            raise ValueError("no examples to evaluate")
        error = predictions - labels
        flat_p, flat_l = predictions.reshape(-1), labels.reshape(-1)
        pearson = float(np.corrcoef(flat_p, flat_l)[0, 1]) if flat_p.std() > 0 and flat_l.std() > 0 else 0.0
        return {
            "num_examples": int(labels.shape[0]),
            "mae": float(np.abs(error).mean()),
            "mse": float((error**2).mean()),
            "rmse": float(np.sqrt((error**2).mean())),
            "pearson": pearson,
        }


def dataset_task(task_name: str) -> str:
    """The kind of labels a task trains on (e.g. "contrastive" for clip and siglip): what a dataset must provide."""
    cls = TASKS.get(task_name) if task_name in TASKS else None
    return getattr(cls, "dataset_task", task_name)


def build_task(task_config, num_classes: int, class_names: Sequence[str] = ()):
    """The task named by `config.task.name` (default classification) with its other keys as options."""
    options = dict(task_config or {})
    name = options.pop("name", "classification")
    if name not in TASKS:
        raise ValueError(f"config task.name: {TASKS.unknown_message(name)}")
    cls = TASKS.get(name)
    fields = {f.name for f in dataclasses.fields(cls)} - {"num_classes", "class_names", "mesh"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"config task ({name}): unknown option(s) {unknown}; valid: {sorted(fields)}")
    return cls(num_classes=num_classes, class_names=tuple(class_names), **options)


from mmjax import contrastive as _contrastive  # noqa: E402,F401  (registers "clip" and "siglip")
from mmjax import matching as _matching  # noqa: E402,F401  (registers "itm")
