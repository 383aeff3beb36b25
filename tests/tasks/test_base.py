"""The task interface: every registered task states what the trainer needs, and a new task plugs in by name."""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.registry import Registry
from mmjax.tasks import TASKS, Task, build_task, task_class


def test_every_task_declares_its_labels_best_metric_and_coupling():
    for name in TASKS.names():
        cls = TASKS.get(name)
        assert issubclass(cls, Task), name
        assert cls.dataset_task in ("classification", "multilabel", "regression", "contrastive"), name
        assert isinstance(cls.default_best_metric, str) and cls.default_best_metric, name
        assert cls.metric_names is None or cls.default_best_metric in cls.metric_names, name
    assert [n for n in TASKS.names() if not TASKS.get(n).per_example_loss] == ["clip", "coca", "itm", "siglip"]


def test_a_task_missing_part_of_the_interface_cannot_be_built():
    @dataclasses.dataclass(frozen=True)
    class NoMetrics(Task):
        dataset_task: ClassVar[str] = "regression"
        default_best_metric: ClassVar[str] = "loss"

        def loss(self, outputs, labels):
            return jnp.zeros(labels.shape[0])

        def train_metrics(self, outputs, labels):
            return {}

        def eval_outputs(self, outputs):
            return {}

    with pytest.raises(TypeError, match="abstract method 'metrics'|abstract method metrics"):
        NoMetrics(num_classes=1)


def test_a_new_task_registers_and_builds_by_name(monkeypatch):
    registry = Registry("task")
    monkeypatch.setattr("mmjax.tasks.base.TASKS", registry)

    @registry.register("absolute")
    @dataclasses.dataclass(frozen=True)
    class Absolute(Task):
        scale: float = 1.0
        dataset_task: ClassVar[str] = "regression"
        default_best_metric: ClassVar[str] = "mae"

        def loss(self, outputs, labels):
            return self.scale * jnp.abs(outputs[:, 0] - labels)

        def train_metrics(self, outputs, labels):
            return {}

        def eval_outputs(self, outputs):
            return {"prediction": outputs[:, 0]}

        def metrics(self, eval_outputs, labels):
            return {"mae": float(np.abs(eval_outputs["prediction"] - labels).mean())}

    task = build_task({"name": "absolute", "scale": 2.0}, 1)
    assert task_class("absolute") is Absolute and task.scale == 2.0
    assert float(task.loss(jnp.ones((2, 1)), jnp.zeros(2)).sum()) == 4.0
    with pytest.raises(ValueError,
                       match=r"config task \(absolute\): unknown option\(s\) \['scal'\]; valid: \['scale'\]"):
        build_task({"name": "absolute", "scal": 2.0}, 1)
    with pytest.raises(ValueError, match="config task.name: unknown task 'classification'"):
        build_task({"name": "classification"}, 1)
