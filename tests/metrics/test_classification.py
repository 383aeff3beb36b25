"""Classification and multi-label metrics: the conventions that keep a broken model from looking good."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from mmjax.metrics.classification import classification_metrics, multilabel_metrics, roc_auc
from mmjax.tasks.supervised import Classification, MultiLabel


def test_macro_f1_averages_over_the_classes_present_as_sklearn_does():
    labels = np.array([0, 1, 0, 1])  # Class 2 of 3 never occurs, and is never predicted.
    m = classification_metrics(labels, labels, num_classes=3)
    assert m["macro_f1"] == 1.0 and m["macro_f1_classes"] == 2  # Was 2/3: class 2 counted as F1 = 0.
    assert m["macro_f1"] == skm.f1_score(labels, labels, average="macro")
    assert m["per_class"]["2"]["f1"] == 0.0 and m["per_class"]["2"]["support"] == 0
    # A class that is predicted but never true is present: its F1 of 0 is averaged in.
    predictions = np.array([0, 1, 2, 1])
    m = classification_metrics(labels, predictions, num_classes=3)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, predictions, average="macro"))
    assert m["macro_f1_classes"] == 3


def test_macro_f1_with_every_class_present_is_the_mean_over_all_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 36)  # AV-Digits' test split has all 10 digits.
    predictions = np.where(rng.random(360) < 0.9, labels, rng.integers(0, 10, 360))
    m = classification_metrics(labels, predictions, num_classes=10)
    f1 = skm.f1_score(labels, predictions, average=None, labels=np.arange(10))
    assert m["macro_f1"] == float(np.mean(f1))  # Bit for bit the old all-classes mean.


def test_roc_auc_binary_and_macro_one_vs_rest_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    p1 = np.clip(labels * 0.3 + rng.random(50) * 0.7, 0, 1)
    probabilities = np.stack([1 - p1, p1], axis=1)
    assert roc_auc(labels, probabilities) == pytest.approx(skm.roc_auc_score(labels, p1))
    labels = rng.integers(0, 4, 80)
    logits = rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = skm.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    m = classification_metrics(labels, probabilities.argmax(1), 4, probabilities=probabilities)
    assert m["roc_auc"] == pytest.approx(expected) and m["undefined"] == []


def test_roc_auc_of_non_finite_scores_is_nan_not_an_error():
    labels = np.array([0, 1, 0, 1])
    probabilities = np.array([[0.9, 0.1], [np.nan, np.nan], [0.6, 0.4], [0.2, 0.8]])
    assert np.isnan(roc_auc(labels, probabilities))
    assert roc_auc(labels, np.nan_to_num(probabilities, nan=0.5)) == pytest.approx(1.0)


def test_roc_auc_is_undefined_not_an_error_when_the_split_has_one_class():
    labels = np.zeros(5, int)
    probabilities = np.full((5, 3), 1 / 3)
    m = classification_metrics(labels, labels, 3, probabilities=probabilities)
    assert m["roc_auc"] == 0.0 and m["undefined"] == ["roc_auc"]
    with pytest.raises(ValueError, match=r"probabilities have shape \(5, 2\), expected \(5, 3\)"):
        classification_metrics(labels, labels, 3, probabilities=probabilities[:, :2])


def test_classification_task_keeps_probabilities_only_for_modest_class_counts():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    outputs = Classification(3).eval_outputs(logits)
    np.testing.assert_allclose(outputs["probabilities"], np.asarray(jnp.exp(logits) / jnp.exp(logits).sum(1,
                                                                                                 keepdims=True)),
                               rtol=1e-6)
    assert "probabilities" not in Classification(3, roc_auc_max_classes=2).eval_outputs(logits)
    labels = np.array([0, 1])
    m = Classification(3).metrics({k: np.asarray(v) for k, v in outputs.items()}, labels)
    assert m["roc_auc"] == 1.0 and m["accuracy"] == 1.0
    with pytest.raises(ValueError, match="roc_auc_max_classes=-1"):
        Classification(3, roc_auc_max_classes=-1)


def test_multilabel_metrics_without_any_positive_label_are_defined_and_named():
    labels = np.zeros((4, 3), np.float32)  # No class of the split has a positive label.
    scores = np.full((4, 3), 0.2, np.float32)
    m = MultiLabel(3).metrics({"scores": scores}, labels)  # scikit-learn alone raises "unknown format".
    assert m["mAP"] == 0.0 and m["undefined"] == ["mAP"]
    assert m["subset_accuracy"] == 1.0 and m["macro_f1_classes"] == 0 and m["macro_f1"] == 0.0
    m = multilabel_metrics(np.array([[1, 0, 0], [0, 0, 0]]), np.array([[0.9, 0.1, 0.1], [0.1, 0.1, 0.1]]), 0.5)
    assert m["mAP"] == 1.0 and m["undefined"] == [] and m["macro_f1"] == 1.0  # Classes 1, 2: absent, not 0.
