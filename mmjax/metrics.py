"""Classification metrics computed exactly over a whole split (padding rows excluded)."""

from __future__ import annotations

from typing import Sequence

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
