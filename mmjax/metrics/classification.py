"""Classification, multi-label and regression metrics computed exactly over a whole split (padding rows excluded).

Conventions (checked against scikit-learn and MMF):

* **Macro-F1** is the mean F1 over the classes *present* in the split, i.e. those with at least one true or
  predicted example (scikit-learn's `f1_score(average="macro")` without `labels=`, and MMF's). A class absent
  from both labels and predictions has no defined F1 and is left out, so perfect predictions always score 1.0
  (averaging over all `num_classes` would give 2/3 for labels [0, 1, 0, 1] with 3 classes). `per_class` still
  lists every class (F1 0 for absent ones), and `macro_f1_classes` says how many classes were averaged.
* **ROC-AUC** (`roc_auc`, from class probabilities): the mean over classes of the one-vs-rest AUC
  (`sklearn.metrics.roc_auc_score` of "class c" against the rest, scored by p(c)); for two classes this is the
  binary AUC of class 1. A class is averaged only when the split has examples both of it and of other classes.
* A metric that the split does not define (mAP when no class has a positive label, ROC-AUC when no class has both
  positives and negatives) is reported as 0.0, which can never flatter a model, and named in the list
  `undefined` of the result; nothing raises, so a training run's evaluation never stops on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def macro_f1_present(f1: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> tuple[float, int]:
    """Mean of per-class `f1` over the classes with a true (`support`) or a predicted example, and their count
    (module docstring); 0.0 when there is none."""
    present = (np.asarray(support) > 0) | (np.asarray(predicted) > 0)
    return (float(np.mean(np.asarray(f1)[present])) if present.any() else 0.0), int(present.sum())


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC-AUC of integer `labels [N]` scored by `probabilities [N, C]` (binary AUC for C = 2),
    over the classes that have both positive and negative examples; None when no class has. Non-finite scores (a
    diverged model) give NaN, as its loss does, rather than stop the evaluation."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, np.float64)
    if not np.isfinite(probabilities).all():
        return float("nan")
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        classes = [1]  # The one-vs-rest AUC of class 0, scored by 1 - p(1), is the same number.
    else:
        classes = range(num_classes)
    scores = []
    for c in classes:
        positive = labels == c
        if positive.any() and not positive.all():
            scores.append(skm.roc_auc_score(positive, probabilities[:, c]))
    return float(np.mean(scores)) if scores else None


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, class_names: Sequence[str] = (),
    probabilities: np.ndarray | None = None,
) -> dict:
    """Accuracy, macro-F1 (over the classes present, module docstring), per-class precision/recall/F1/support,
    the confusion matrix and, given the class `probabilities [N, num_classes]`, ROC-AUC."""
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
    confusion = skm.confusion_matrix(labels, predictions, labels=classes)
    macro_f1, averaged = macro_f1_present(f1, support, confusion.sum(axis=0))
    result = {
        "num_examples": int(labels.size),
        "accuracy": float(np.mean(labels == predictions)),
        "macro_f1": macro_f1,
        "macro_f1_classes": averaged,
        "per_class": {
            names[c]: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in classes
        },
        "confusion_matrix": confusion.tolist(),
        "undefined": [],
    }
    if probabilities is not None:
        probabilities = np.asarray(probabilities)
        if probabilities.shape != (labels.size, num_classes):
            raise ValueError(f"class probabilities have shape {probabilities.shape}, expected "
                             f"({labels.size}, {num_classes}) = (examples, classes)")
        auc = roc_auc(labels, probabilities)
        result["roc_auc"] = 0.0 if auc is None else auc
        if auc is None:
            result["undefined"].append("roc_auc")
    return result


def multilabel_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float,
                       class_names: Sequence[str] = ()) -> dict:
    """Subset accuracy, micro/macro-F1 at `threshold` (macro over the classes with a true or predicted positive),
    mAP over the classes with a positive label, per-class F1/support. With no positive label in the split mAP is
    undefined: 0.0, listed in `undefined` (module docstring)."""
    labels = np.asarray(labels) > 0.5
    scores = np.asarray(scores)
    if labels.size == 0:
        raise ValueError("no examples to evaluate")
    num_classes = labels.shape[1]
    predicted = scores >= threshold
    present = labels.any(axis=0)  # Average precision is undefined for a class with no positives.
    names = list(class_names) or [str(c) for c in range(num_classes)]
    per_class_f1 = skm.f1_score(labels, predicted, average=None, zero_division=0)
    macro_f1, averaged = macro_f1_present(per_class_f1, labels.sum(axis=0), predicted.sum(axis=0))
    undefined = [] if present.any() else ["mAP"]
    average_precision = 0.0
    if present.any():
        average_precision = float(skm.average_precision_score(labels[:, present], scores[:, present], average="macro"))
    return {
        "num_examples": int(labels.shape[0]),
        "subset_accuracy": float(np.mean(np.all(predicted == labels, axis=1))),
        "micro_f1": float(skm.f1_score(labels, predicted, average="micro", zero_division=0)),
        "macro_f1": macro_f1,
        "macro_f1_classes": averaged,
        "mAP": average_precision,
        "undefined": undefined,
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
