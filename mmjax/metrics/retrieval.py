"""Metrics of dual encoders and matching heads, on unit embeddings or scores gathered over a whole split (numpy).

- `retrieval_metrics`: image->text and text->image recall@1/5/10, mean and median rank, with K captions per image
  (an image is retrieved correctly by any of its captions; each caption has one correct image);
- `zero_shot_metrics`: a classifier from class prompts (the mean of each class's unit prompt embeddings,
  renormalised, as CLIP does), top-1 / top-5 accuracy;
- `binding_metrics`: Winoground/ARO-style attribute binding: how often a true caption scores above a hard negative
  that differs from it by one swapped attribute or relation (chance: 0.5);
- `itm_classification_metrics`: image-text matching accuracy of ITM logits at 0.

Ranks are 1-based and count only strictly better candidates, so ties are resolved in the model's favour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_AT = (1, 5, 10)


def _as_captions(y: np.ndarray) -> np.ndarray:
    return y[:, None] if y.ndim == 2 else y


def _rank_summary(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    result = {f"{prefix}_recall@{k}": float(np.mean(ranks <= k)) for k in RECALL_AT}
    result[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    result[f"{prefix}_median_rank"] = float(np.median(ranks))
    return result


def retrieval_metrics(x: np.ndarray, y: np.ndarray, names: Sequence[str] = ("image", "text")) -> dict[str, float]:
    """Retrieval between `x [N, D]` (e.g. images) and `y [N, D]` or `[N, K, D]` (K captions per example).

    Keys are `i2t_*` / `t2i_*` for image/text towers, else `<x>2<y>_*` from the tower names' initials.
    """
    captions = _as_captions(np.asarray(y, np.float32))
    n, k, d = captions.shape
    x = np.asarray(x, np.float32)
    if x.shape != (n, d):
        raise ValueError(f"retrieval: x has shape {x.shape}, expected ({n}, {d}) to match y {captions.shape}")
    flat = captions.reshape(n * k, d)
    owner = np.repeat(np.arange(n), k)
    scores = x @ flat.T  # [N, N*K]
    own = scores.reshape(n, n, k)[np.arange(n), np.arange(n)]  # [N, K]: each image vs its own captions.
    best_own = own.max(axis=1)
    x_to_y = 1 + np.sum(scores > best_own[:, None], axis=1)
    column = scores.T  # [N*K, N]: each caption vs every image.
    y_to_x = 1 + np.sum(column > column[np.arange(n * k), owner][:, None], axis=1)
    a, b = names[0][0], names[1][0]
    return {**_rank_summary(f"{a}2{b}", x_to_y), **_rank_summary(f"{b}2{a}", y_to_x)}


def class_embeddings(prompt_embeddings: np.ndarray) -> np.ndarray:
    """`[C, T, D]` unit embeddings of T prompts per class -> `[C, D]` unit class embeddings (mean, renormalised)."""
    mean = np.asarray(prompt_embeddings, np.float32).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def zero_shot_metrics(x: np.ndarray, classes: np.ndarray, labels: np.ndarray, top_k: int = 5) -> dict[str, float]:
    """Top-1 and top-k accuracy of classifying `x [N, D]` by the nearest of `classes [C, D]`."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(x, np.float32) @ np.asarray(classes, np.float32).T
    rank = 1 + np.sum(scores > scores[np.arange(len(labels)), labels][:, None], axis=1)
    top_k = min(top_k, classes.shape[0])
    return {"zero_shot_top1": float(np.mean(rank <= 1)), f"zero_shot_top{top_k}": float(np.mean(rank <= top_k))}


def score_binding_metrics(true: np.ndarray, false: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Binding from any scores (cosines, ITM logits): `true [N, K]` for each example's true captions, `false
    [N, M]` for its hard negatives. `{prefix}binding_accuracy`: P(true score > negative score) over the N x K x M
    pairs; `{prefix}binding_all`: fraction of examples whose worst true caption beats their best negative (a tie
    is a failure)."""
    true = np.asarray(true, np.float32).reshape(len(true), -1)
    false = np.asarray(false, np.float32).reshape(len(false), -1)
    if len(true) != len(false):
        raise ValueError(f"binding: {len(true)} examples of true-caption scores but {len(false)} of negatives")
    pairs = true[:, :, None] > false[:, None, :]
    return {
        f"{prefix}binding_accuracy": float(pairs.mean()),
        f"{prefix}binding_all": float(np.mean(true.min(axis=1) > false.max(axis=1))),
    }


def binding_metrics(x: np.ndarray, y: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
    """`score_binding_metrics` of the cosine scores of images `x [N, D]` with their true captions `y [N, (K,) D]`
    and hard negatives `[N, M, D]`."""
    captions = _as_captions(np.asarray(y, np.float32))
    x = np.asarray(x, np.float32)
    true = np.einsum("nd,nkd->nk", x, captions)
    false = np.einsum("nd,njd->nj", x, np.asarray(negatives, np.float32))
    return score_binding_metrics(true, false)


def embedding_metrics(eval_outputs, towers: Sequence[str] = ("image", "text")) -> dict:
    """Retrieval (and binding, when hard-negative embeddings are there) from a split's `<tower>_embedding`s."""
    x, y = (np.asarray(eval_outputs[f"{t}_embedding"]) for t in towers)
    if len(x) == 0:
        raise ValueError("no examples to evaluate")
    result = {"num_examples": int(len(x)), **retrieval_metrics(x, y, names=towers)}
    if "negatives_embedding" in eval_outputs:
        result.update(binding_metrics(x, y, np.asarray(eval_outputs["negatives_embedding"])))
    return result


def _as_columns(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a[:, None] if a.ndim == 1 else a.reshape(a.shape[0], -1)


def itm_classification_metrics(true: np.ndarray, false: np.ndarray | None = None) -> dict[str, float]:
    """ITM accuracy at logit 0: true captions should score > 0 and hard negatives < 0 (equal to 0 counts as
    wrong). `itm_accuracy` is over every pair (K true + M negatives per example); `itm_true_accuracy` and
    `itm_negative_accuracy` over each kind."""
    true = _as_columns(true)
    correct = [(true > 0).reshape(-1)]
    result = {"itm_true_accuracy": float(correct[0].mean())}
    if false is not None:
        correct.append((_as_columns(false) < 0).reshape(-1))
        result["itm_negative_accuracy"] = float(correct[1].mean())
    result["itm_accuracy"] = float(np.concatenate(correct).mean())
    return result
