"""Metrics of dual encoders and matching heads, on unit embeddings or scores gathered over a whole split (numpy).

- `retrieval_metrics`: image->text and text->image recall@1/5/10, mean and median rank, with K captions per image
  (an image is retrieved correctly by any of its captions; each caption has one correct image);
- `zero_shot_metrics`: a classifier from class prompts (the mean of each class's unit prompt embeddings,
  renormalised, as CLIP does), top-1 / top-5 accuracy;
- `binding_metrics`: Winoground/ARO-style attribute binding: how often a true caption scores above a hard negative
  that differs from it by one swapped attribute or relation (chance: 0.5);
- `itm_classification_metrics`: image-text matching accuracy of ITM logits at 0.

Ranks are 1-based. Tied scores are counted as the expected rank under random tie-breaking (as open_clip's and
most peers' argsort-based rankings give on average), never in the model's favour: with g wrong candidates scored
strictly above the best correct one, t wrong candidates tied with it and c correct candidates at that score, the
rank of the first correct candidate is g + 1 + X, where X (the wrong ones placed before the first correct one in a
random order of the tied block) is hypergeometric, so

    E[rank] = g + 1 + t / (c + 1),    P(rank <= k) = 1 - prod_{i=0}^{k-g-1} (t - i) / (t + c - i)   (k > g).

`*_mean_rank` is the mean of E[rank], `*_median_rank` the median of E[rank], `recall@k` the mean of
P(rank <= k). A collapsed model whose embeddings are all identical gets recall@1 = 1/N and mean rank (N + 1) / 2
(one caption per image), and zero-shot top-1 = 1/C: chance, not a perfect score. Scores without exact ties give
the plain ranks (t = 0), so continuous embeddings are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_AT = (1, 5, 10)


def _as_captions(y: np.ndarray) -> np.ndarray:
    return y[:, None] if y.ndim == 2 else y


class TiedRanks:
    """Per-example rank statistics of the first correct candidate under random tie-breaking (module docstring).

    `greater [N]`: wrong candidates scored strictly above the best correct one; `tied [N]`: wrong candidates with
    exactly that score; `correct [N]`: correct candidates with exactly that score (>= 1).
    """

    def __init__(self, greater: np.ndarray, tied: np.ndarray, correct: np.ndarray | int = 1):
        self.greater = np.asarray(greater, np.int64)
        self.tied = np.asarray(tied, np.int64)
        self.correct = np.broadcast_to(np.asarray(correct, np.int64), self.greater.shape)
        if np.any(self.correct < 1) or np.any(self.tied < 0) or np.any(self.greater < 0):
            raise ValueError("TiedRanks: counts must be non-negative, with at least one correct candidate")

    def expected(self) -> np.ndarray:
        """E[rank] = g + 1 + t / (c + 1), float64 `[N]`."""
        return self.greater + 1.0 + self.tied / (self.correct + 1.0)

    def within(self, k: int) -> np.ndarray:
        """P(rank <= k), float64 `[N]`: 0 when g >= k, else one minus the chance that the first k - g positions
        of the tied block all hold wrong candidates."""
        if k < 1:
            raise ValueError(f"rank cut-off k={k} must be >= 1")
        steps = np.arange(k)[None, :]  # i = 0 .. k - 1
        tied, correct = self.tied[:, None], self.correct[:, None]
        wrong_left = tied - steps
        factors = np.where(wrong_left > 0, wrong_left / np.maximum(tied + correct - steps, 1), 0.0)
        all_wrong = np.cumprod(factors, axis=1)  # [N, k]: P(the first i + 1 tied positions are all wrong).
        slots = k - 1 - self.greater  # The last tied position that still lands within the top k.
        p = 1.0 - all_wrong[np.arange(len(slots)), np.clip(slots, 0, k - 1)]
        return np.where(slots < 0, 0.0, p)


def tied_ranks(scores: np.ndarray, correct: np.ndarray) -> TiedRanks:
    """`TiedRanks` of score rows `[N, M]` with a boolean `[N, M]` mask of the correct candidates (>= 1 per row)."""
    scores = np.asarray(scores)
    correct = np.asarray(correct, bool)
    best = np.max(np.where(correct, scores, -np.inf), axis=1, keepdims=True)
    at_best = scores == best
    return TiedRanks(
        greater=np.sum(scores > best, axis=1),
        tied=np.sum(at_best & ~correct, axis=1),
        correct=np.sum(at_best & correct, axis=1),
    )


def _rank_summary(prefix: str, ranks: TiedRanks) -> dict[str, float]:
    result = {f"{prefix}_recall@{k}": float(np.mean(ranks.within(k))) for k in RECALL_AT}
    expected = ranks.expected()
    result[f"{prefix}_mean_rank"] = float(np.mean(expected))
    result[f"{prefix}_median_rank"] = float(np.median(expected))
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
    x_to_y = tied_ranks(scores, owner[None, :] == np.arange(n)[:, None])  # Any own caption is correct.
    y_to_x = tied_ranks(scores.T, owner[:, None] == np.arange(n)[None, :])  # [N*K, N]: each caption's one image.
    a, b = names[0][0], names[1][0]
    return {**_rank_summary(f"{a}2{b}", x_to_y), **_rank_summary(f"{b}2{a}", y_to_x)}


def class_embeddings(prompt_embeddings: np.ndarray) -> np.ndarray:
    """`[C, T, D]` unit embeddings of T prompts per class -> `[C, D]` unit class embeddings (mean, renormalised)."""
    mean = np.asarray(prompt_embeddings, np.float32).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def zero_shot_metrics(x: np.ndarray, classes: np.ndarray, labels: np.ndarray, top_k: int = 5) -> dict[str, float]:
    """Top-1 and top-k accuracy of classifying `x [N, D]` by the nearest of `classes [C, D]`, ties counted as
    expected under random tie-breaking (module docstring).

    The keys are always `zero_shot_top1` and `zero_shot_top{top_k}`, whatever the number of classes C (with
    top_k >= C every example is within the top k, so that accuracy is 1).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"zero-shot top_k={top_k!r} must be a positive integer")
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(x, np.float32) @ np.asarray(classes, np.float32).T
    ranks = tied_ranks(scores, labels[:, None] == np.arange(scores.shape[1])[None, :])
    return {"zero_shot_top1": float(np.mean(ranks.within(1))),
            f"zero_shot_top{top_k}": float(np.mean(ranks.within(int(top_k))))}


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
