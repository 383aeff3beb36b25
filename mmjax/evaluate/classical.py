"""Classic decision-level (late) fusion baselines: one sklearn classifier per modality, fused by voting or averaging.

For each classifier kind, one classifier is fitted per modality on that modality's feature vectors (e.g. flattened
inputs, or pooled encoder features); each modality's test predictions are scored on their own, and the modalities are
fused by (a) averaging the predicted class probabilities and (b) majority voting over the predicted classes, ties
broken by the summed probability of the tied classes (then by the lowest class id). Everything is seeded, so the same
inputs give the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator
from mmjax.evaluate.features import extract_features
from mmjax.metrics.classification import classification_metrics

CLASSIFIERS = ("svm", "random_forest")


def make_classifier(kind: str, seed: int) -> Any:
    """A fresh, seeded scikit-learn classifier of `kind`: 'svm' (standardised features, RBF SVC with
    sigmoid-calibrated probabilities) or 'random_forest' (200 trees)."""
    # Imported here: scikit-learn's estimators take 2.4 s to import, and every training run imports this module
    # (the evaluator registry) while most never fit a classifier.
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if kind == "svm":
        # Platt-scaled probabilities from 5-fold cross-validation, then an SVC refitted on all the data: what
        # SVC(probability=True) computes, in the form scikit-learn recommends now that it deprecates that flag (1.9).
        # Folds are unshuffled (StratifiedKFold), so the result is deterministic.
        svc = SVC(random_state=seed)
        return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", cv=5, ensemble=False))
    if kind == "random_forest":
        return RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
    raise ValueError(f"unknown classifier {kind!r}; choose from {CLASSIFIERS}")


def _check_labels(labels, name: str, num_classes: int | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must be class ids >= 0, got min {labels.min()}")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise ValueError(f"{name} has class id {labels.max()} >= num_classes {num_classes}")
    return labels


def _check_features(features: Mapping[str, np.ndarray], name: str, num_rows: int, labels_name: str) -> dict:
    if not isinstance(features, Mapping) or not features:
        raise ValueError(f"{name} must be a non-empty mapping modality -> [N, D] array")
    checked = {}
    for modality in sorted(features):
        values = np.asarray(features[modality])
        if values.ndim != 2:
            raise ValueError(
                f"{name}[{modality!r}] must be 2-D [N, D], got shape {values.shape} (flatten or pool it first)"
            )
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
            raise ValueError(f"{name}[{modality!r}] must be real numbers, got dtype {values.dtype}")
        if values.shape[0] != num_rows:
            raise ValueError(
                f"{name}[{modality!r}] has {values.shape[0]} rows (shape {values.shape}) but {labels_name} has "
                f"{num_rows}"
            )
        if values.shape[0] == 0 or values.shape[1] == 0:
            raise ValueError(f"{name}[{modality!r}] is empty (shape {values.shape})")
        bad = ~np.isfinite(values)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise ValueError(
                f"{name}[{modality!r}] (shape {values.shape}) has {int(bad.sum())} NaN/inf value(s), in rows "
                f"{rows[:10].tolist()}{'...' if rows.size > 10 else ''}"
            )
        checked[modality] = values.astype(np.float64)
    return checked


def _full_probabilities(classifier, features: np.ndarray, num_classes: int) -> np.ndarray:
    """`predict_proba` spread over all `num_classes` columns (classes unseen in training get probability 0)."""
    proba = classifier.predict_proba(features)
    full = np.zeros((features.shape[0], num_classes))
    full[:, np.asarray(classifier.classes_, np.int64)] = proba
    return full


def majority_vote(predictions: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per row, the class most modalities predict; ties broken by the tied classes' summed probability, then id.

    `predictions` is `[M, N]` class ids (one row per modality), `probabilities` `[M, N, K]`.
    """
    predictions = np.asarray(predictions, np.int64)
    num_classes = probabilities.shape[-1]
    votes = np.zeros(predictions.shape[1:] + (num_classes,), np.int64)
    for modality_predictions in predictions:
        votes[np.arange(predictions.shape[1]), modality_predictions] += 1
    tied = votes == votes.max(axis=1, keepdims=True)
    summed = np.asarray(probabilities, np.float64).sum(axis=0)
    return np.argmax(np.where(tied, summed, -np.inf), axis=1)  # argmax takes the lowest id among exact ties.


def _scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    metrics = classification_metrics(labels, predictions, num_classes)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def classical_late_fusion(
    train_features: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    test_features: Mapping[str, np.ndarray],
    test_labels: np.ndarray,
    classifiers: Sequence[str] = CLASSIFIERS,
    seed: int = 0,
    num_classes: int | None = None,
) -> dict:
    """Per-modality classifiers and their late fusion, scored on the test split.

    `train_features`/`test_features` map each modality to `[N, D]` features (the same modalities and D in both);
    labels are integer class ids `[N]`. `num_classes` defaults to the largest train label + 1.

    Returns a JSON-serialisable dict `{kind: {"per_modality": {modality: {"accuracy", "macro_f1"}}, "average":
    {...}, "vote": {...}}}` for each classifier kind, modalities in sorted order.
    """
    classifiers = list(classifiers)
    if not classifiers:
        raise ValueError(f"no classifiers given; choose from {CLASSIFIERS}")
    for kind in classifiers:
        if kind not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {kind!r}; choose from {CLASSIFIERS}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    train_labels = _check_labels(train_labels, "train_labels", num_classes)
    test_labels = _check_labels(test_labels, "test_labels", num_classes)
    train = _check_features(train_features, "train_features", train_labels.shape[0], "train_labels")
    test = _check_features(test_features, "test_features", test_labels.shape[0], "test_labels")
    missing = sorted(set(train) - set(test))
    extra = sorted(set(test) - set(train))
    if missing or extra:
        raise ValueError(
            f"train and test must have the same modalities: missing in test_features {missing}, "
            f"not in train_features {extra}"
        )
    for modality in train:
        if train[modality].shape[1] != test[modality].shape[1]:
            raise ValueError(
                f"modality {modality!r} has {train[modality].shape[1]} features in train (shape "
                f"{train[modality].shape}) but {test[modality].shape[1]} in test (shape {test[modality].shape})"
            )
    present = np.unique(train_labels)
    if present.size < 2:
        raise ValueError(f"train_labels must contain at least 2 classes, got {present.tolist()}")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
        if test_labels.max() >= num_classes:
            raise ValueError(
                f"test_labels has class id {test_labels.max()} never seen in train_labels (max {num_classes - 1}); "
                "pass num_classes explicitly"
            )

    modalities = sorted(train)
    results = {}
    for kind in classifiers:
        per_modality, predictions, probabilities = {}, [], []
        for modality in modalities:
            classifier = make_classifier(kind, seed)
            classifier.fit(train[modality], train_labels)
            prediction = np.asarray(classifier.predict(test[modality]), np.int64)
            predictions.append(prediction)
            probabilities.append(_full_probabilities(classifier, test[modality], num_classes))
            per_modality[modality] = _scores(test_labels, prediction, num_classes)
        probabilities = np.stack(probabilities)
        average = np.argmax(probabilities.mean(axis=0), axis=1)
        vote = majority_vote(np.stack(predictions), probabilities)
        results[kind] = {
            "per_modality": per_modality,
            "average": _scores(test_labels, average, num_classes),
            "vote": _scores(test_labels, vote, num_classes),
        }
    return results


@EVALUATORS.register("classical")
@dataclasses.dataclass(frozen=True)
class ClassicalBaselines(Evaluator):
    """Classical late fusion on the trained model's own pooled encoder features: one classifier per modality
    fitted on the training split, scored on `split`. Scalars `classical_<kind>_<average|vote>_accuracy`."""

    classifiers: Sequence[str] = CLASSIFIERS
    seed: int = 0

    uses_outputs: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        if context.task.dataset_task != "classification":
            return f"it fits classifiers, and task {type(context.task).__name__} has no class labels"
        return None

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable | None = None) -> dict:
        train_features, train_labels = extract_features(context, state, context.config.data.train_split)
        test_features, test_labels = extract_features(context, state, split, batches)
        result = classical_late_fusion(train_features, train_labels, test_features, test_labels, self.classifiers,
                                       seed=self.seed, num_classes=context.task.num_classes)
        summary = {f"classical_{kind}_{combine}_accuracy": result[kind][combine]["accuracy"]
                   for kind in result for combine in ("average", "vote")}
        return {**summary, "classical": result}
