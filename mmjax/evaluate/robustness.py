"""MultiBench-style robustness evaluation: accuracy under per-modality Gaussian noise and with a modality missing.

Follows the protocol of Liang et al. 2021 ("MultiBench: Multiscale Benchmarks for Multimodal Representation
Learning", NeurIPS Datasets & Benchmarks): a trained model is evaluated on the clean test split, on copies where one
modality at a time is corrupted with increasing amounts of noise, and on copies where one modality is removed.

* Noise is Gaussian with standard deviation `level * scale`, where `scale` is that modality's own standard deviation
  over the valid (non-padding, present) rows of the evaluation split (`modality_scale`). Levels are therefore
  comparable across modalities with very different value ranges (e.g. [0, 1] pixels and dB-scaled filterbanks).
* Noise is a pure function of `(seed, modality, level, batch_index)`, so every method in a comparison sees exactly the
  same corrupted inputs, and a rerun reproduces every number.
* *Relative robustness* (MultiBench) is the area under the accuracy-vs-noise-level curve (trapezoid rule over the
  levels) divided by the level range: the mean accuracy over the noise range. *Effective robustness* here is the
  baseline-free variant `relative_robustness - clean`: the mean accuracy lost to noise, which does not reward a model
  merely for being more accurate on clean data. (MultiBench's own effective robustness regresses each method's curve
  against the other methods'; this per-method version needs no population of methods.)

`evaluate_robustness` is pure numpy (and matplotlib for the plot): `predict` may run any model. The `robustness`
evaluator runs it with a trained classification model (`model_predictor`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data import pipeline
from mmjax.data.core import VALID_KEY, mask_key
from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator
from mmjax.metrics.classification import classification_metrics

LABEL_KEY = "label"
DEFAULT_NOISE_LEVELS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)

Batch = Mapping[str, np.ndarray]


def _valid_rows(batch: Batch) -> np.ndarray:
    """Boolean `[B]`: rows that are real examples (all rows when the batch has no VALID_KEY)."""
    if VALID_KEY in batch:
        return np.asarray(batch[VALID_KEY]).reshape(-1) > 0
    return np.ones(len(np.asarray(batch[LABEL_KEY])), bool)


class _Moments:
    """Streaming count/mean/M2 (Chan et al.'s parallel update), exact and stable in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).reshape(-1)
        n = values.size
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(np.sum((values - mean) ** 2))
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else float("nan")


def _modality_values(batch: Batch, modality: str) -> np.ndarray:
    """The values of `modality` in the valid rows of `batch` where the modality is present."""
    if modality not in batch:
        raise KeyError(f"batch has no modality {modality!r}; keys: {sorted(batch)}")
    rows = _valid_rows(batch)
    if mask_key(modality) in batch:
        rows = rows & (np.asarray(batch[mask_key(modality)]).reshape(-1) > 0)
    return np.asarray(batch[modality])[rows]


def modality_scale(batches: Iterable[Batch], modality: str) -> float:
    """Standard deviation of all values of `modality` over the valid rows of `batches` (the noise unit).

    Padding rows (`_valid == 0`) and rows where the modality is marked missing (`<modality>_mask == 0`) are left out.
    A constant modality (std 0) gets scale 1.0, so noise levels still mean something for it.
    """
    moments = _Moments()
    for batch in batches:
        moments.update(_modality_values(batch, modality))
    if moments.count == 0:
        raise ValueError(f"no valid values of modality {modality!r} to compute its scale from")
    std = moments.std()
    return std if std > 0 else 1.0


def _noise_rng(seed: int, modality: str, level: float, batch_index: int) -> np.random.Generator:
    # zlib.crc32 is stable across processes and runs (Python's hash() of a str is salted per process).
    return np.random.default_rng([int(seed), zlib.crc32(modality.encode("utf-8")), int(round(level * 1000)),
                                  int(batch_index)])


def add_noise(batch: Batch, modality: str, level: float, scale: float, seed: int, batch_index: int) -> dict:
    """A new batch with `level * scale * N(0, 1)` noise added to `modality` only; the input is not modified.

    The noise is a deterministic function of `(seed, modality, level, batch_index)` (and the batch's shape).
    Integer-valued modalities are returned as float32; floating ones keep their dtype. `level == 0` returns an
    unchanged (shallow) copy.
    """
    if modality not in batch:
        raise KeyError(f"batch has no modality {modality!r}; keys: {sorted(batch)}")
    if level < 0 or not math.isfinite(level):
        raise ValueError(f"noise level must be a finite number >= 0, got {level}")
    if seed < 0 or batch_index < 0:
        raise ValueError(f"seed and batch_index must be >= 0, got seed={seed}, batch_index={batch_index}")
    out = dict(batch)
    if level == 0:
        return out
    values = np.asarray(batch[modality])
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.dtype(np.float32)
    noise = _noise_rng(seed, modality, level, batch_index).standard_normal(values.shape)
    out[modality] = (values.astype(np.float64) + (level * scale) * noise).astype(dtype)
    return out


def drop_modality(batch: Batch, modality: str) -> dict:
    """A new batch with `modality` marked missing for every row (`<modality>_mask` = 0, float32 `[B]`).

    The modality's values are also replaced by zeros, so no information can leak into a model that ignores masks
    (such a model then sees an all-zero input rather than the real one). The input is not modified.
    """
    if modality not in batch:
        raise KeyError(f"batch has no modality {modality!r}; keys: {sorted(batch)}")
    values = np.asarray(batch[modality])
    out = dict(batch)
    out[modality] = np.zeros_like(values)
    out[mask_key(modality)] = np.zeros(values.shape[0], np.float32)
    return out


def _score(labels: np.ndarray, predictions: np.ndarray, metric: str | Callable) -> float:
    if callable(metric):
        return float(metric(labels, predictions))
    if metric == "accuracy":
        return float(np.mean(labels == predictions))
    if metric == "macro_f1":
        num_classes = int(max(labels.max(), predictions.max(), 0)) + 1
        return classification_metrics(labels, predictions, num_classes)["macro_f1"]
    raise ValueError(f"unknown metric {metric!r}; use 'accuracy', 'macro_f1' or a callable(labels, predictions)")


def _run_condition(
    predict: Callable[[dict], np.ndarray],
    batches: Iterable[Batch],
    transform: Callable[[Batch, int], dict],
    metric: str | Callable,
    moments: Mapping[str, _Moments] | None = None,
) -> float:
    """The metric of `predict` over the valid rows of the transformed batches (optionally accumulating scales)."""
    labels, predictions = [], []
    for index, batch in enumerate(batches):
        if moments is not None:
            for modality, m in moments.items():
                m.update(_modality_values(batch, modality))
        batch = transform(batch, index)
        rows = _valid_rows(batch)
        preds = np.asarray(predict(batch))
        batch_size = rows.shape[0]
        if preds.shape != (batch_size,):
            raise ValueError(
                f"predict must return class ids of shape ({batch_size},) for a batch of {batch_size} rows, got "
                f"shape {preds.shape} (take the argmax of logits first)"
            )
        labels.append(np.asarray(batch[LABEL_KEY]).reshape(-1)[rows])
        predictions.append(preds[rows])
    if not labels:
        raise ValueError("make_batches() yielded no batches")
    labels, predictions = np.concatenate(labels), np.concatenate(predictions)
    if labels.size == 0:
        raise ValueError("no valid rows (all rows have _valid == 0)")
    return _score(labels, predictions, metric)


def _check_levels(levels: Sequence[float]) -> list[float]:
    levels = [float(level) for level in levels]
    if not levels:
        raise ValueError("at least one noise level is needed")
    if any(level < 0 or not math.isfinite(level) for level in levels):
        raise ValueError(f"noise levels must be finite and >= 0, got {levels}")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"noise levels must be strictly increasing, got {levels}")
    if len({int(round(level * 1000)) for level in levels}) != len(levels):
        raise ValueError(f"noise levels must differ by at least 0.001 (they seed the noise), got {levels}")
    return levels


def area_under_curve(levels: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid-rule area under `values` over `levels`, divided by the level range (the curve's mean value).

    With a single level it is that level's value.
    """
    levels, values = np.asarray(levels, np.float64), np.asarray(values, np.float64)
    if levels.size == 1:
        return float(values[0])
    area = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(levels)))
    return area / float(levels[-1] - levels[0])


def evaluate_robustness(
    predict: Callable[[dict], np.ndarray],
    make_batches: Callable[[], Iterable[Batch]],
    modalities: Sequence[str],
    levels: Sequence[float] = DEFAULT_NOISE_LEVELS,
    seed: int = 0,
    metric: str | Callable = "accuracy",
) -> dict:
    """Clean, noisy (per modality and level) and missing-modality scores of `predict`.

    `predict(batch)` returns predicted class ids `[B]` for a host batch (dict of numpy arrays); `make_batches()` returns
    a fresh iterable of host batches (e.g. `pipeline.eval_batches(...)`) and is called once per condition: once for
    the clean pass (which also measures each modality's scale), once per modality and non-zero level, and once per
    dropped modality. Only valid rows (`_valid == 1`) are scored, against `batch["label"]`. Level 0 reuses the clean
    score (the inputs are identical).

    Returns a JSON-serialisable dict: `levels`, `metric`, `clean`, `scale` {modality: std}, `noise` {modality: [score
    per level]}, `missing` {modality: score with it dropped}, `relative_robustness` {modality: mean score over the
    noise range, see `area_under_curve`} and `effective_robustness` {modality: relative_robustness - clean}.
    """
    modalities = list(modalities)
    if not modalities:
        raise ValueError("no modalities to evaluate")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"duplicate modalities: {modalities}")
    levels = _check_levels(levels)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")

    moments = {m: _Moments() for m in modalities}
    clean = _run_condition(predict, make_batches(), lambda b, i: dict(b), metric, moments)
    scales = {}
    for modality, m in moments.items():
        if m.count == 0:
            raise ValueError(f"no valid values of modality {modality!r} to compute its scale from")
        scales[modality] = m.std() if m.std() > 0 else 1.0

    noise, missing, relative, effective = {}, {}, {}, {}
    for modality in modalities:
        scores = []
        for level in levels:
            if level == 0:
                scores.append(clean)
                continue

            def corrupt(batch, index, modality=modality, level=level):
                return add_noise(batch, modality, level, scales[modality], seed, index)

            scores.append(_run_condition(predict, make_batches(), corrupt, metric))
        noise[modality] = scores
        missing[modality] = _run_condition(
            predict, make_batches(), lambda b, i, modality=modality: drop_modality(b, modality), metric
        )
        relative[modality] = area_under_curve(levels, scores)
        effective[modality] = relative[modality] - clean
    return {
        "levels": levels,
        "metric": metric_name,
        "clean": clean,
        "scale": scales,
        "noise": noise,
        "missing": missing,
        "relative_robustness": relative,
        "effective_robustness": effective,
    }


def _modalities(results_by_method: Mapping[str, Mapping]) -> list[str]:
    """Every modality of any method, in first-seen order."""
    seen: dict[str, None] = {}
    for results in results_by_method.values():
        for modality in results.get("noise", {}):
            seen.setdefault(modality)
        for modality in results.get("missing", {}):
            seen.setdefault(modality)
    return list(seen)


def plot_robustness(results_by_method: Mapping[str, Mapping], path: str, title: str = "") -> None:
    """Writes a PNG: one panel per modality, score against noise level, one line per method.

    A dotted horizontal line in the method's colour marks its score with that modality missing.
    """
    if not results_by_method:
        raise ValueError("no methods to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modalities = _modalities(results_by_method)
    fig, axes = plt.subplots(1, max(1, len(modalities)), figsize=(4.5 * max(1, len(modalities)), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    metric = next(iter(results_by_method.values())).get("metric", "accuracy")
    for ax, modality in zip(axes[0], modalities):
        for i, (method, results) in enumerate(results_by_method.items()):
            color = colors[i % len(colors)]
            if modality in results.get("noise", {}):
                ax.plot(results["levels"], results["noise"][modality], marker="o", color=color, label=method)
            if modality in results.get("missing", {}):
                ax.axhline(results["missing"][modality], color=color, linestyle=":", linewidth=1)
        ax.set_title(f"noise on {modality} (dotted: {modality} missing)", fontsize=9)
        ax.set_xlabel("noise std / modality std")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def robustness_table(results_by_method: Mapping[str, Mapping]) -> str:
    """Markdown table: method | clean | relative robustness (AUC) per modality | score with each modality missing."""
    modalities = _modalities(results_by_method)
    header = ["method", "clean"] + [f"AUC {m}" for m in modalities] + [f"missing {m}" for m in modalities]

    def fmt(value) -> str:
        return "—" if value is None else f"{value:.4f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, results in results_by_method.items():
        cells = [method, fmt(results.get("clean"))]
        cells += [fmt(results.get("relative_robustness", {}).get(m)) for m in modalities]
        cells += [fmt(results.get("missing", {}).get(m)) for m in modalities]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_predictor(context: EvalContext, state: Any) -> Callable[[Batch], np.ndarray]:
    """Host batch -> this process's predicted class ids, through the trained model (masks in the batch honoured)."""

    @functools.partial(jax.jit, out_shardings=context.batch_sharding)
    def predict_fn(params, model_state, batch):
        outputs = context.model.apply({"params": params, **model_state}, batch, train=False)
        return jnp.argmax(context.task.main_outputs(outputs), -1)

    modalities = context.model.encoders

    def predict(batch: Batch) -> np.ndarray:
        keys = [k for k in batch if k in modalities or (k.endswith("_mask") and k[: -len("_mask")] in modalities)]
        out = predict_fn(state.params, state.model_state,
                         pipeline.to_global({k: batch[k] for k in keys}, context.batch_sharding))
        rows = len(batch[LABEL_KEY])  # This process's rows of the global batch (contiguous, see pipeline).
        gathered = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        return gathered[jax.process_index() * rows:(jax.process_index() + 1) * rows]

    return predict


@EVALUATORS.register("robustness")
@dataclasses.dataclass(frozen=True)
class Robustness(Evaluator):
    """MultiBench robustness of a classification model: accuracy under noise on each modality and with each one
    missing. Scalars `robustness_<m>` (relative robustness) and `missing_<m>`; the curves under `robustness`."""

    levels: Sequence[float] = DEFAULT_NOISE_LEVELS
    seed: int = 0
    metric: str = "accuracy"

    uses_outputs: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        if context.task.dataset_task != "classification":
            return f"it scores class predictions, and task {type(context.task).__name__} makes none"
        return None

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable[Batch] | None = None) -> dict:
        def make_batches():
            if batches is not None:
                return batches
            return pipeline.eval_batches(context.dataset, split, global_batch_size=context.config.data.eval_batch_size)

        curve = evaluate_robustness(model_predictor(context, state), make_batches, sorted(context.model.encoders),
                                    levels=tuple(self.levels), seed=self.seed, metric=self.metric)
        summary = {f"robustness_{m}": v for m, v in curve["relative_robustness"].items()}
        summary.update({f"missing_{m}": v for m, v in curve["missing"].items()})
        return {**summary, "robustness": curve}
