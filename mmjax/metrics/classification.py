"""Classification, multi-label and regression metrics computed exactly over a whole split (padding rows excluded)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, class_names: Sequence[str] = ()
) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.size == 0:
        raise ValueError("no examples to evaluate")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"labels out of range [0, {num_classes}): {sorted(set(bad.tolist()))[:10]}")
    classes = np.arange(num_classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    names = list(class_names) or [str(c) for c in classes]
    return {
        "num_examples": int(labels.size),
        "accuracy": float(np.mean(labels == predictions)),
        "macro_f1": float(np.mean(f1)),
        "per_class": {
            names[c]: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in classes
        },
        "confusion_matrix": skm.confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def multilabel_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float,
                       class_names: Sequence[str] = ()) -> dict:
    """Subset accuracy, micro/macro-F1 at `threshold`, mAP over the classes with a positive, per-class F1/support."""
    labels = np.asarray(labels) > 0.5
    scores = np.asarray(scores)
    if labels.size == 0:
        raise ValueError("no examples to evaluate")
    num_classes = labels.shape[1]
    predicted = scores >= threshold
    present = labels.any(axis=0)  # Average precision is undefined for a class with no positives.
    names = list(class_names) or [str(c) for c in range(num_classes)]
    per_class_f1 = skm.f1_score(labels, predicted, average=None, zero_division=0)
    return {
        "num_examples": int(labels.shape[0]),
        "subset_accuracy": float(np.mean(np.all(predicted == labels, axis=1))),
        "micro_f1": float(skm.f1_score(labels, predicted, average="micro", zero_division=0)),
        "macro_f1": float(np.mean(per_class_f1)),
        "mAP": float(skm.average_precision_score(labels[:, present], scores[:, present], average="macro")),
        "per_class": {names[c]: {"f1": float(per_class_f1[c]), "support": int(labels[:, c].sum())}
                      for c in range(num_classes)},
    }


def regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """MAE, MSE, RMSE and Pearson correlation (0 when either side is constant) over all outputs."""
    predictions = np.asarray(predictions, np.float64)
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
