"""Task losses and exact split metrics: classification, multi-label, regression."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from mmjax.tasks import build_task
from mmjax.tasks.supervised import MultiLabel, Regression


def test_build_task_defaults_to_classification_and_rejects_unknown_names_and_options():
    assert type(build_task(None, 3)).__name__ == "Classification"
    with pytest.raises(ValueError, match="unknown task 'multilable'.*Did you mean 'multilabel'"):
        build_task({"name": "multilable"}, 3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['treshold'\]"):
        build_task({"name": "multilabel", "treshold": 0.3}, 3)
    with pytest.raises(ValueError, match="loss_type='huber'"):
        build_task({"name": "regression", "loss_type": "huber"}, 1)


def test_classification_label_smoothing_changes_the_loss_only_when_set():
    task, smooth = build_task({}, 3), build_task({"label_smoothing": 0.1}, 3)
    logits = jnp.array([[4.0, 0.0, 0.0]])
    labels = jnp.array([0])
    assert float(smooth.loss(logits, labels)[0]) > float(task.loss(logits, labels)[0])


def test_multilabel_loss_and_metrics_match_sklearn():
    task = MultiLabel(num_classes=3)
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], np.float32)
    logits = np.array([[2, -1, 1], [-1, 3, 1], [1, -2, -1], [-3, -1, 2]], np.float32)
    p = 1 / (1 + np.exp(-logits))
    expected_loss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum(-1)
    np.testing.assert_allclose(task.loss(jnp.asarray(logits), jnp.asarray(labels)), expected_loss, rtol=1e-5)
    scores = np.asarray(task.eval_outputs(jnp.asarray(logits))["scores"])
    m = task.metrics({"scores": scores}, labels)
    predicted = p >= 0.5
    assert m["micro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="micro"))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    assert m["mAP"] == pytest.approx(skm.average_precision_score(labels, p, average="macro"))
    assert m["subset_accuracy"] == pytest.approx(np.mean(np.all(predicted == (labels > 0), axis=1)))


def test_regression_losses_and_metrics():
    outputs = jnp.array([[1.0], [2.0], [4.0]])
    labels = jnp.array([1.5, 2.0, 3.0])  # [B] targets against [B, 1] outputs.
    np.testing.assert_allclose(Regression(1).loss(outputs, labels), [0.25, 0.0, 1.0])
    np.testing.assert_allclose(Regression(1, loss_type="mae").loss(outputs, labels), [0.5, 0.0, 1.0])
    m = Regression(1).metrics({"prediction": np.asarray(outputs)}, np.asarray(labels))
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(np.sqrt(1.25 / 3))
    assert m["pearson"] == pytest.approx(np.corrcoef([1, 2, 4], [1.5, 2, 3])[0, 1])
