"""Compositions of tasks: several heads over one model (multi-task learning) and unimodal auxiliary heads.

**Multi-task** (`config.tasks = {name: {...}}`; the single `config.task` stays the one-task form). Each entry is
one head with its own task (`name`: classification, multilabel or regression, plus that task's options), the
batch key holding its labels (`label`), its loss weight (`weight`, default 1), optionally its number of outputs
(`num_classes`) and its head (`head`, default the model's `model.head`). `MultiTask` sums the weighted task losses
(module `config.multitask.weighting`):

* `"fixed"`: L = sum_t w_t L_t.
* `"uncertainty"` (Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
  Geometry and Semantics", CVPR 2018): each task has a learned log-variance s_t = log sigma_t^2 (a model
  parameter, `task_log_vars`, initialised to 0) and L = sum_t w_t (c_t exp(-s_t) L_t + s_t / 2), with c_t = 1/2 for
  regression (a Gaussian likelihood: L_t / (2 sigma^2) + log sigma, their eq. 5/7) and c_t = 1 for
  classification and multi-label tasks (a softmax or sigmoid scaled by 1/sigma^2: L_t / sigma^2 + log sigma, their
  eq. 10). The effective weight of task t is w_t c_t exp(-s_t), logged as `weight/<t>` at every step.

An example whose label key carries a presence mask (`<label>_mask` = 0, e.g. an example of a mixture source that
has no such label, `mmjax.data.pipeline.mixture`) is left out of that task's loss: its loss is replaced by an
exact zero before the sum (and its placeholder label by zeros before the loss), so it contributes exactly zero
gradient, and L_t is the mean over the examples that have the label (never a zero label). Metrics are per task,
`<task>/<metric>`, over the examples that have its label; the logged `loss` is sum_t w_t L_t with the fixed
weights.

**Unimodal auxiliary heads** (`UnimodalAuxiliary`, `config.model.aux_heads = {modality: weight}`), the multi-head
form of Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification Networks Hard?",
CVPR 2020): besides the fused head, each named modality gets its own head on its pooled encoder features, and the
objective is L = w_0 L_fused + sum_m w_m L_m (w_0 = `config.model.fused_weight`, default 1). Each unimodal loss
sends its modality's encoder a gradient of its own, however strongly the fused head leans on another modality.
`gradient_blending_weights` gives the paper's weights from measured losses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.checks import is_int, is_number
from mmjax.data.core import mask_key
from mmjax.nn.models.multimodal import AUX_OUTPUTS, FUSED_OUTPUTS, LOG_VARS, TASK_OUTPUTS
from mmjax.registry import closest, invalid_choice
from mmjax.tasks.base import Task, check_outputs, task_class

MAPPINGS = (Mapping, ml_collections.ConfigDict)  # A dict from a config (ConfigDict is no Mapping).
WEIGHTINGS = ("fixed", "uncertainty")
# Keys of a `config.tasks` entry that are not options of the task class.
TASK_ENTRY_KEYS = ("name", "label", "weight", "num_classes", "head")
SUPERVISED = ("classification", "multilabel", "regression")


def check_weights(weights: Any, key: str, *, names: Sequence[str] | None = None) -> dict[str, float]:
    """`weights` maps names to finite numbers >= 0, not all zero; with `names`, exactly those names (an unknown
    one is named with the closest valid one). Errors name the config `key`."""
    if not isinstance(weights, MAPPINGS):
        raise ValueError(f"config {key}={weights!r} must map names to weights, e.g. {{'audio': 0.5, 'image': 0.5}}")
    out = {}
    for name, value in weights.items():
        if names is not None and name not in names:
            raise ValueError(
                f"config {key} names {name!r}, which is not one of {sorted(names)}.{closest(name, names)}"
            )
        if not is_number(value) or not math.isfinite(value):
            raise ValueError(f"config {key}.{name}={value!r} must be a finite number >= 0")
        if value < 0:
            raise ValueError(f"config {key}.{name}={value!r} is negative; weights must be >= 0")
        out[name] = float(value)
    if out and not any(out.values()):
        raise ValueError(f"config {key}={dict(out)} are all zero: nothing would be trained")
    return out


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """One entry of `config.tasks`, checked (before any data is read)."""

    name: str  # The head's name (the key in config.tasks).
    kind: str  # The task class's registered name.
    label: str
    weight: float
    num_classes: int | None
    head: Mapping[str, Any] | None
    options: Mapping[str, Any]

    @property
    def cls(self) -> type[Task]:
        return task_class(self.kind)


def is_multitask(config: Mapping[str, Any]) -> bool:
    """Whether `config.tasks` asks for several heads. A list of names there is not a multi-task config: the
    `av_digits_tasks` experiment keeps its list of task kinds under that key (and its older workdirs saved it in
    every run's config.json); a multi-task config is a mapping."""
    tasks = config.get("tasks")
    if tasks is None or isinstance(tasks, (list, tuple)) and all(isinstance(t, str) for t in tasks):
        return False
    if not isinstance(tasks, MAPPINGS):
        raise ValueError(f"config tasks={tasks!r} must map head names to task configs, e.g. "
                         "{'digit': {'name': 'classification', 'label': 'digit'}}")
    return bool(tasks)


def parse_tasks(tasks: Mapping[str, Any]) -> dict[str, TaskEntry]:
    """The checked entries of `config.tasks`: registered per-example supervised task names, a label key, weights
    >= 0 and not all zero, positive `num_classes`, known task options."""
    entries = {}
    for name in sorted(tasks):
        entry = tasks[name]
        where = f"tasks.{name}"
        if not isinstance(entry, MAPPINGS):
            raise ValueError(f"config {where}={entry!r} must be a dict, e.g. {{'name': 'classification', "
                             "'label': 'label', 'weight': 1.0}")
        kind = entry.get("name", "classification")
        if kind not in SUPERVISED:
            raise ValueError(invalid_choice(f"{where}.name", kind, SUPERVISED)
                             + " (a multi-task model's heads are supervised, per-example tasks)")
        label = entry.get("label", "label")
        if not isinstance(label, str) or not label:
            raise ValueError(f"config {where}.label={label!r} must be a batch key (a non-empty string)")
        num_classes = entry.get("num_classes")
        if num_classes is not None and (not is_int(num_classes) or num_classes <= 0):
            raise ValueError(f"config {where}.num_classes={num_classes!r} must be a positive integer")
        head = entry.get("head")
        if head is not None and (not isinstance(head, MAPPINGS) or "name" not in head):
            raise ValueError(f"config {where}.head={head!r} must be a head config with a 'name'")
        options = {k: v for k, v in entry.items() if k not in TASK_ENTRY_KEYS}
        cls = task_class(kind)
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_classes", "class_names"}
        unknown = sorted(set(options) - fields)
        if unknown:
            valid = sorted(fields | set(TASK_ENTRY_KEYS))
            raise ValueError(f"config {where} ({kind}): unknown option(s) {unknown}; valid: {valid}."
                             f"{closest(unknown[0], valid)}")
        entries[name] = TaskEntry(name, kind, label, 1.0, num_classes, head, options)
    weights = check_weights({n: tasks[n].get("weight", 1.0) for n in entries}, "tasks.<name>.weight")
    return {n: dataclasses.replace(e, weight=weights[n]) for n, e in entries.items()}


def weighting(config: Mapping[str, Any]) -> str:
    """`config.multitask.weighting` ("fixed" when absent), checked."""
    value = (config.get("multitask") or {}).get("weighting", "fixed")
    if value not in WEIGHTINGS:
        raise ValueError(invalid_choice("multitask.weighting", value, WEIGHTINGS))
    return value


def metric_names(entries: Mapping[str, TaskEntry]) -> tuple[str, ...]:
    """Every scalar a multi-task evaluation reports: `<task>/<metric>` for each task's metrics and loss."""
    names = []
    for name, entry in entries.items():
        names += [f"{name}/{m}" for m in (*(entry.cls.metric_names or ()), "loss")]
    return tuple(names)


def _present(batch: Mapping[str, jax.Array], key: str, rows: int) -> jax.Array:
    """`[B]` bool: the examples that have the label `key` (all of them without a `<key>_mask`)."""
    mask = batch.get(mask_key(key))
    return jnp.ones((rows,), bool) if mask is None else jnp.asarray(mask).reshape(rows) > 0


def _masked_losses(task: Task, outputs: jax.Array, labels: jax.Array, present: jax.Array) -> jax.Array:
    """Per-example losses `[B]`, exactly 0 (with exactly zero gradient) where the label is absent. The placeholder
    labels of absent rows are replaced by zeros first, so a NaN placeholder cannot leak through 0 * NaN."""
    keep = present.reshape(present.shape + (1,) * (labels.ndim - 1))
    safe = jnp.where(keep, labels, jnp.zeros_like(labels))
    return jnp.where(present, task.loss(outputs, safe), 0.0)


def _masked_mean(values: jax.Array, present: jax.Array) -> jax.Array:
    count = present.astype(jnp.float32).sum()
    return jnp.where(present, values, 0.0).sum() / jnp.where(count > 0, count, 1.0)


def _per_example_metrics(task: Task, outputs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """`task.train_metrics` of each example alone (`[B]` each): the supervised tasks' metrics are batch means."""
    return jax.vmap(lambda o, y: task.train_metrics(o[None], y[None]))(outputs, labels)


@dataclasses.dataclass(frozen=True)
class MultiTask(Task):
    """Several supervised tasks over one model's heads (module docstring). The model's output is
    `{"tasks": {name: head output}}` (plus `"log_vars": [T]`, sorted task order, with uncertainty weighting).

    `num_classes` is the number of heads; `tasks`, `labels` and `weights` map each head's name to its task, label
    key and loss weight.
    """

    tasks: Mapping[str, Task] = dataclasses.field(default_factory=dict)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    weighting: str = "fixed"

    dataset_task: ClassVar[str] = "multitask"
    default_best_metric: ClassVar[str] = "loss"

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("a multi-task model needs at least one task (config tasks)")
        if set(self.labels) != set(self.tasks) or set(self.weights) != set(self.tasks):
            raise ValueError(f"MultiTask: tasks {sorted(self.tasks)}, labels {sorted(self.labels)} and weights "
                             f"{sorted(self.weights)} must name the same heads")
        check_weights(self.weights, "tasks.<name>.weight")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(invalid_choice("multitask.weighting", self.weighting, WEIGHTINGS))
        if self.num_classes != len(self.tasks):
            raise ValueError(f"MultiTask: num_classes={self.num_classes} must be the number of heads "
                             f"({len(self.tasks)})")

    @property
    def names(self) -> list[str]:
        return sorted(self.tasks)

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = []
        for name in self.names:
            names += [f"{name}/{m}" for m in (*(self.tasks[name].metric_names or ()), "loss")]
        return tuple(names)

    @property
    def label_keys(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.labels.values())))

    def with_mesh(self, mesh: jax.sharding.Mesh) -> MultiTask:
        return dataclasses.replace(self, tasks={n: t.with_mesh(mesh) for n, t in self.tasks.items()})

    def uncertainty_factor(self, name: str) -> float:
        """c_t of Kendall et al.'s loss: 1/2 for a regression (Gaussian) task, 1 otherwise."""
        return 0.5 if self.tasks[name].dataset_task == "regression" else 1.0

    def effective_weights(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Each task's weight on its loss: w_t, or w_t c_t exp(-s_t) with uncertainty weighting."""
        if self.weighting == "fixed":
            return {n: jnp.float32(self.weights[n]) for n in self.names}
        log_vars = outputs[LOG_VARS]
        return {n: self.weights[n] * self.uncertainty_factor(n) * jnp.exp(-log_vars[i])
                for i, n in enumerate(self.names)}

    def _rows(self, outputs: Mapping[str, Any]) -> int:
        return next(iter(outputs[TASK_OUTPUTS].values())).shape[0]

    def normalizer(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The number of examples of the batch that have each task's label (float32)."""
        rows = batch[sorted(batch)[0]].shape[0]
        return {n: _present(batch, self.labels[n], rows).astype(jnp.float32).sum() for n in self.names}

    def task_losses(self, outputs: Mapping[str, Any], batch: Mapping[str, jax.Array],
                    normalizer: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        """L_t: each task's loss summed over the examples with its label, divided by their number (or by
        `normalizer[t]`, see `Task.normalizer`)."""
        rows = self._rows(outputs)
        counts = normalizer if normalizer is not None else self.normalizer(batch)
        result = {}
        for name in self.names:
            key = self.labels[name]
            present = _present(batch, key, rows)
            losses = _masked_losses(self.tasks[name], outputs[TASK_OUTPUTS][name], batch[key], present)
            count = counts[name]
            result[name] = losses.sum() / jnp.where(count > 0, count, 1.0)
        return result

    def objective(self, outputs, batch, normalizer=None):
        losses = self.task_losses(outputs, batch, normalizer)
        weights = self.effective_weights(outputs)
        objective = sum(weights[n] * losses[n] for n in self.names)
        if self.weighting == "uncertainty":
            objective = objective + sum(self.weights[n] * outputs[LOG_VARS][i] / 2 for i, n in enumerate(self.names))
        logged = sum(self.weights[n] * losses[n] for n in self.names)
        metrics = {f"{n}/loss": losses[n] for n in self.names}
        metrics.update({f"weight/{n}": jnp.asarray(weights[n], jnp.float32) for n in self.names})
        return objective, logged, metrics

    def loss(self, outputs: Mapping[str, Any], labels: Mapping[str, jax.Array]) -> jax.Array:
        """Per-example sum_t w_t l_t (fixed weights) over the tasks whose label the example has; `labels` is the
        batch (the labels live under each task's key)."""
        rows = self._rows(outputs)
        total = jnp.zeros((rows,), jnp.float32)
        for name in self.names:
            key = self.labels[name]
            losses = _masked_losses(self.tasks[name], outputs[TASK_OUTPUTS][name], labels[key],
                                    _present(labels, key, rows))
            total = total + self.weights[name] * losses
        return total

    def batch_metrics(self, outputs, batch):
        rows = self._rows(outputs)
        metrics = {}
        for name in self.names:
            key = self.labels[name]
            present = _present(batch, key, rows)
            labels = jnp.where(present.reshape(present.shape + (1,) * (batch[key].ndim - 1)), batch[key],
                               jnp.zeros_like(batch[key]))
            for metric, values in _per_example_metrics(self.tasks[name], outputs[TASK_OUTPUTS][name],
                                                       labels).items():
                metrics[f"{name}/{metric}"] = _masked_mean(values, present)
        return metrics

    def train_metrics(self, outputs: Mapping[str, Any], labels: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Each task's train metrics over the examples with its label; `labels` is the batch."""
        return self.batch_metrics(outputs, labels)

    def eval_outputs(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        return {f"{n}/{k}": v for n in self.names
                for k, v in self.tasks[n].eval_outputs(outputs[TASK_OUTPUTS][n]).items()}

    def eval_arrays(self, outputs, batch):
        rows = self._rows(outputs)
        arrays = self.eval_outputs(outputs)
        for name in self.names:
            key = self.labels[name]
            present = _present(batch, key, rows)
            arrays[f"{name}/label"] = batch[key]
            arrays[f"{name}/present"] = present.astype(jnp.int32)
            arrays[f"{name}/loss"] = _masked_losses(self.tasks[name], outputs[TASK_OUTPUTS][name], batch[key],
                                                    present)
        return arrays

    def split_metrics(self, outputs: Mapping[str, np.ndarray]) -> dict:
        """Each task's metrics over the split's examples that have its label, as `<task>/<metric>`, and `loss` =
        sum_t w_t (mean loss of t). A task with no labelled example in the split reports only
        `<task>/num_examples` = 0."""
        result: dict[str, Any] = {}
        total = 0.0
        for name in self.names:
            rows = np.asarray(outputs[f"{name}/present"]) > 0
            if not rows.any():
                result[f"{name}/num_examples"] = 0
                continue
            prefix = f"{name}/"
            own = {k[len(prefix):]: np.asarray(v)[rows] for k, v in outputs.items() if k.startswith(prefix)}
            metrics = self.tasks[name].metrics(own, own["label"])
            metrics["loss"] = float(own["loss"].mean())
            total += self.weights[name] * metrics["loss"]
            result.update({f"{name}/{k}": v for k, v in metrics.items()})
        result["loss"] = total
        return result

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: Any = None) -> dict:
        """`split_metrics` (the labels are among the gathered `eval_arrays`)."""
        del labels
        return self.split_metrics(eval_outputs)

    def main_outputs(self, outputs: Mapping[str, Any]) -> Any:
        raise ValueError("a multi-task model has one output per task, no single fused prediction; evaluators that "
                         "need one (robustness, modality_diagnostics) do not support it")


def build_multitask(entries: Mapping[str, TaskEntry], num_classes: Mapping[str, int],
                    class_names: Mapping[str, Sequence[str]], weighting_name: str = "fixed") -> MultiTask:
    """The `MultiTask` of checked `config.tasks` entries, with each head's number of outputs (and class names)."""
    tasks = {}
    for name, entry in entries.items():
        tasks[name] = entry.cls(num_classes=num_classes[name], class_names=tuple(class_names.get(name, ())),
                                **entry.options)
    return MultiTask(num_classes=len(tasks), tasks=tasks, labels={n: e.label for n, e in entries.items()},
                     weights={n: e.weight for n, e in entries.items()}, weighting=weighting_name)


@dataclasses.dataclass(frozen=True)
class UnimodalAuxiliary(Task):
    """A task on a model with unimodal auxiliary heads (module docstring, Gradient-Blending): the model's output is
    `{"outputs": fused head output, "aux": {modality: that modality's head output}}` (and, for gradient
    modulation, `"unimodal"`, which the train step reads). The objective is
    L = fused_weight * L_fused + sum_m weights[m] * L_m, each L the wrapped `task`'s mean loss; the logged `loss`,
    the predictions and the metrics are the fused head's, and each auxiliary head's metrics are reported as
    `aux_<modality>/<metric>`.

    With no auxiliary weights it only unwraps the fused output (e.g. for gradient modulation alone).
    """

    task: Task | None = None
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    fused_weight: float = 1.0

    def __post_init__(self):
        if self.task is None:
            raise ValueError("UnimodalAuxiliary needs the task of its heads")
        check_outputs(self, self.num_classes, self.class_names)
        check_weights(self.weights, "model.aux_heads")
        weight = self.fused_weight
        if not is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"config model.fused_weight={weight!r} must be a finite number >= 0")
        if weight == 0 and not any(self.weights.values()):
            raise ValueError("config model.fused_weight=0 with no weighted auxiliary head: nothing would be trained")

    @property
    def dataset_task(self) -> str:
        return self.task.dataset_task

    @property
    def default_best_metric(self) -> str:
        return self.task.default_best_metric

    @property
    def per_example_loss(self) -> bool:
        return self.task.per_example_loss

    @property
    def metric_names(self) -> tuple[str, ...] | None:
        own = self.task.metric_names
        if own is None:
            return None
        return (*own, *(f"aux_{m}/{k}" for m in sorted(self.weights) for k in (*own, "loss")))

    @property
    def keeps_probabilities(self) -> bool:
        return getattr(self.task, "keeps_probabilities", False)

    def with_mesh(self, mesh: jax.sharding.Mesh) -> UnimodalAuxiliary:
        return dataclasses.replace(self, task=self.task.with_mesh(mesh))

    def main_outputs(self, outputs: Mapping[str, Any]) -> Any:
        return outputs[FUSED_OUTPUTS]

    def objective(self, outputs, batch, normalizer=None):
        labels = batch["label"]
        fused = self.task.loss(outputs[FUSED_OUTPUTS], labels).mean()
        objective = fused if self.fused_weight == 1.0 else self.fused_weight * fused
        metrics = {}
        for m in sorted(self.weights):
            aux = self.task.loss(outputs[AUX_OUTPUTS][m], labels).mean()
            objective = objective + self.weights[m] * aux
            metrics[f"aux_{m}/loss"] = aux
        return objective, fused, metrics

    def loss(self, outputs: Mapping[str, Any], labels: jax.Array) -> jax.Array:
        """The fused head's per-example loss (what is logged and evaluated)."""
        return self.task.loss(outputs[FUSED_OUTPUTS], labels)

    def train_metrics(self, outputs: Mapping[str, Any], labels: jax.Array) -> dict[str, jax.Array]:
        metrics = dict(self.task.train_metrics(outputs[FUSED_OUTPUTS], labels))
        for m in sorted(self.weights):
            metrics.update({f"aux_{m}/{k}": v for k, v in self.task.train_metrics(outputs[AUX_OUTPUTS][m],
                                                                                  labels).items()})
        return metrics

    def eval_outputs(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        arrays = dict(self.task.eval_outputs(outputs[FUSED_OUTPUTS]))
        for m in sorted(self.weights):
            arrays.update({f"aux_{m}/{k}": v for k, v in self.task.eval_outputs(outputs[AUX_OUTPUTS][m]).items()})
        return arrays

    def eval_arrays(self, outputs, batch):
        arrays = super().eval_arrays(outputs, batch)
        for m in sorted(self.weights):
            arrays[f"aux_{m}/loss"] = self.task.loss(outputs[AUX_OUTPUTS][m], batch["label"])
        return arrays

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        own = {k: v for k, v in eval_outputs.items() if not k.startswith("aux_")}
        metrics = self.task.metrics(own, labels)
        for m in sorted(self.weights):
            prefix = f"aux_{m}/"
            aux = {k[len(prefix):]: v for k, v in eval_outputs.items() if k.startswith(prefix)}
            scores = self.task.metrics(aux, labels)
            metrics.update({f"{prefix}{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
            if "loss" in aux:
                metrics[f"{prefix}loss"] = float(np.mean(aux["loss"]))
        return metrics


def gradient_blending_weights(train_losses: Mapping[str, Sequence[float]],
                              val_losses: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Offline Gradient-Blending weights (Wang, Tran, Feiszli, CVPR 2020, their eq. 8 and Algorithm 1).

    For each head k (the fused one and each modality's), given its training and validation losses at the start and
    the end of an interval of training, `[L(n), L(n + dn)]`:

        overfitting O = L_val - L_train,   dO_k = O_k(n + dn) - O_k(n),   dG_k = L_val,k(n) - L_val,k(n + dn)
        w_k = (dG_k / dO_k^2) / Z,   Z = sum_k dG_k / dO_k^2

    (the weights that minimise the overfitting-to-generalisation ratio of the blended gradient). A head whose
    validation loss did not improve (dG <= 0) gets weight 0; |dO| is floored at 1e-3 (a head that did not
    overfit at all gets a large, finite weight). Returns weights summing to 1.
    """
    if set(train_losses) != set(val_losses) or not train_losses:
        raise ValueError(f"gradient_blending_weights: train losses for {sorted(train_losses)} but validation "
                         f"losses for {sorted(val_losses)}; give both, for the same heads")
    raw = {}
    for k in sorted(train_losses):
        (t0, t1), (v0, v1) = (tuple(train_losses[k]), tuple(val_losses[k]))
        gain = v0 - v1
        overfit = max(abs((v1 - t1) - (v0 - t0)), 1e-3)
        raw[k] = max(gain, 0.0) / overfit**2
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"gradient_blending_weights: no head's validation loss improved ({val_losses}); "
                         "measure over a longer interval")
    return {k: v / total for k, v in raw.items()}
