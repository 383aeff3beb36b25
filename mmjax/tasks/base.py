"""The task interface and its registry: what a model's outputs mean, their loss, and their metrics over a split.

A task is a small frozen dataclass chosen by `config.task.name`; its other keys are its fields. Inside the jitted
steps it gives the per-example loss and the train metrics (jnp); on the host it turns the per-example outputs
gathered over a whole split into exact metrics (numpy, `mmjax.metrics`). This module is a leaf: the task modules
import it and register themselves.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from mmjax.checks import is_int
from mmjax.registry import Registry

TASKS: Registry = Registry("task")


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """One objective: `loss` and `train_metrics` run in the train step, `eval_outputs` in the eval step, `metrics`
    on the host over every example of a split.

    Class attributes say what the trainer must know before anything runs: the labels a dataset must provide
    (`dataset_task`), their rank, the metric a best checkpoint is chosen by, the metric names (None when they
    depend on the data) and whether the loss of example i depends on example i alone (`per_example_loss`, which
    gradient accumulation needs: in-batch negatives couple the examples of a batch).
    """

    num_classes: int
    class_names: Sequence[str] = ()

    dataset_task: ClassVar[str]
    default_best_metric: ClassVar[str]
    label_rank: ClassVar[int] = 1
    metric_names: ClassVar[tuple[str, ...] | None] = None
    per_example_loss: ClassVar[bool] = True

    def with_mesh(self, mesh: jax.sharding.Mesh) -> Task:
        """The task for a device mesh (tasks with collectives of their own, e.g. chunked SigLIP, keep it)."""
        del mesh
        return self

    @abc.abstractmethod
    def loss(self, outputs: Any, labels: jax.Array) -> jax.Array:
        """Per-example loss `[B]` (float32); the train step minimises its mean."""

    @abc.abstractmethod
    def train_metrics(self, outputs: Any, labels: jax.Array) -> dict[str, jax.Array]:
        """Scalars logged during training (batch means)."""

    @abc.abstractmethod
    def eval_outputs(self, outputs: Any) -> dict[str, jax.Array]:
        """The per-example arrays the host needs for `metrics` (kept small: e.g. the argmax, not the logits)."""

    @abc.abstractmethod
    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        """Exact metrics over a whole split from the gathered `eval_outputs` (padding rows already removed)."""

    # The batch-level interface the train and eval steps call. A task's defaults read its labels from
    # `batch["label"]`; compositions (`mmjax.tasks.multitask`: several heads, auxiliary heads) override them.

    label_keys: ClassVar[tuple[str, ...]] = ("label",)  # The batch keys holding this task's labels.

    def normalizer(self, batch: Mapping[str, jax.Array]) -> Any:
        """What `objective` divides its sums by, computed from a whole batch (None: the batch's own size).

        Gradient accumulation computes it once from the whole batch and gives each of the k micro-batches 1/k of
        it, so that a loss averaged over a varying number of examples (masked labels) still accumulates exactly.
        """
        del batch
        return None

    def objective(self, outputs: Any, batch: Mapping[str, jax.Array],
                  normalizer: Any = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """`(objective, loss, metrics)` of a (micro-)batch: the scalar the train step differentiates, the loss it
        logs (comparable with evaluation losses) and extra scalars to log. By default both are the mean of
        `loss` over the batch (exactly the program a single task has always compiled to)."""
        del normalizer
        loss = self.loss(outputs, batch["label"]).mean()
        return loss, loss, {}

    def batch_metrics(self, outputs: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """`train_metrics` of a batch."""
        return self.train_metrics(outputs, batch["label"])

    def eval_arrays(self, outputs: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The per-example arrays the eval step gathers: `eval_outputs`, the label and the per-example loss."""
        return {**self.eval_outputs(outputs), "label": batch["label"], "loss": self.loss(outputs, batch["label"])}

    def split_metrics(self, outputs: Mapping[str, np.ndarray]) -> dict:
        """`metrics` over a split's gathered `eval_arrays`, plus the mean loss."""
        metrics = self.metrics(outputs, outputs["label"])
        metrics["loss"] = float(outputs["loss"].mean())
        return metrics

    def main_outputs(self, outputs: Any) -> Any:
        """The fused model output the task's predictions come from (the model's whole output by default)."""
        return outputs


def check_outputs(task: Task, num_classes: Any, class_names: Sequence[str]) -> None:
    """The number of outputs is a positive int and the class names (when given) name each of them once."""
    name = type(task).__name__
    if not is_int(num_classes) or num_classes <= 0:
        raise ValueError(f"{name}: num_classes={num_classes!r} must be a positive integer (config model.num_classes)")
    if class_names and len(class_names) != num_classes:
        raise ValueError(
            f"{name}: {len(class_names)} class names {list(class_names)[:12]} for num_classes={num_classes}; "
            "the dataset's label names and config model.num_classes must agree"
        )


def task_class(name: str) -> type[Task]:
    """The registered task class of `config.task.name`; the error lists the valid names."""
    if name not in TASKS:
        raise ValueError(f"config task.name: {TASKS.unknown_message(name)}")
    return TASKS.get(name)


def task_name(task_config: Mapping[str, Any] | None) -> str:
    """`config.task.name`, "classification" when the config has no task."""
    return (task_config or {}).get("name", "classification")


def build_task(task_config: Mapping[str, Any] | None, num_classes: int, class_names: Sequence[str] = ()) -> Task:
    """The task named by `config.task.name` (default classification) with its other keys as options."""
    options = dict(task_config or {})
    cls = task_class(options.pop("name", "classification"))
    fields = {f.name for f in dataclasses.fields(cls)} - {"num_classes", "class_names", "mesh"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"config task ({task_name(task_config)}): unknown option(s) {unknown}; valid: {sorted(fields)}"
        )
    return cls(num_classes=num_classes, class_names=tuple(class_names), **options)
