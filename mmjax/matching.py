"""Image–text matching (ITM) task with in-batch hard negatives plus the ITC (CLIP) loss, as in ALBEF (Li et al.,
"Align before Fuse: Vision and Language Representation Learning with Momentum Distillation", NeurIPS 2021).

Reads the outputs of `mmjax.nn.matching.MatchingModel` (model `name: matching`). Per example i the loss is

    ITM_i + itc_weight * CLIP_i

* training outputs (`itm_logits [B, 3]`, with `negative_text_index`): ITM_i is the MEAN over the example's 3 pairs
  of the sigmoid binary cross-entropy with targets (1, 0, 0): (image i, text i) matched, (image i, its sampled
  hard-negative text) and (its sampled hard-negative image, text i) mismatched. The batch mean is then the mean
  BCE over the 3B pairs, as ALBEF's ITM loss (ALBEF uses a 2-way softmax, which is the same as a sigmoid of the
  logit difference);
* evaluation outputs (`itm_logits [B]` or `[B, K]`, optional `negatives_itm_logits [B, N]`): ITM_i is the mean
  BCE over the example's K true captions (target 1) and its N hard-negative captions (target 0);
* CLIP_i is `mmjax.contrastive.clip_loss` (symmetric InfoNCE over the global batch, first caption) on the unit
  embeddings: it keeps the dual-encoder similarities meaningful, so the hard-negative mining picks hard ones.

All losses are computed in float32. The loss couples the examples of a batch (in-batch negatives, ITC), so it
does not accumulate over micro-batches (`dataset_task = "contrastive"`, as CLIP). Labels are not used.

Evaluation metrics (`metrics`, host numpy): dual-encoder retrieval (`mmjax.evaluate.contrastive`), dual-encoder
binding (`binding_accuracy`, `binding_all`), cross-encoder binding with the ITM logits (`itm_binding_accuracy`,
`itm_binding_all`) and ITM classification accuracy at logit 0 (`itm_accuracy`, `itm_true_accuracy`,
`itm_negative_accuracy`). ITM re-ranking of retrieval candidates (ALBEF's top-k) is not computed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import contrastive  # A module, not its names: it may be mid-import (mmjax.tasks imports us both).
from mmjax.tasks import TASKS

TRAIN_TARGETS = (1.0, 0.0, 0.0)  # (matched pair, image + negative text, negative image + text).


def itm_logits_and_targets(outputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The per-example ITM logits `[B, P]` (float32) and their binary targets `[B, P]`.

    Training outputs (they carry `negative_text_index`): the `[B, 3]` logits, targets (1, 0, 0). Evaluation
    outputs: each image's true captions (`itm_logits [B]` or `[B, K]`, target 1) then its hard negatives
    (`negatives_itm_logits [B, N]` when present, target 0).
    """
    if "itm_logits" not in outputs:
        raise KeyError(f"task itm needs the model's itm_logits (model name 'matching'); outputs: {sorted(outputs)}")
    logits = jnp.asarray(outputs["itm_logits"], jnp.float32)
    if "negative_text_index" in outputs:
        if logits.ndim != 2 or logits.shape[1] != 3:
            raise ValueError(f"task itm: training itm_logits must be [B, 3], got {logits.shape}")
        return logits, jnp.broadcast_to(jnp.asarray(TRAIN_TARGETS, jnp.float32), logits.shape)
    logits = logits[:, None] if logits.ndim == 1 else logits.reshape(logits.shape[0], -1)
    targets = jnp.ones_like(logits)
    if "negatives_itm_logits" in outputs:
        negatives = jnp.asarray(outputs["negatives_itm_logits"], jnp.float32)
        negatives = negatives.reshape(negatives.shape[0], -1)
        logits = jnp.concatenate([logits, negatives], axis=1)
        targets = jnp.concatenate([targets, jnp.zeros_like(negatives)], axis=1)
    return logits, targets


def itm_loss(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """Per-example ITM loss `[B]`: mean sigmoid BCE over the example's pairs (see the module docstring)."""
    logits, targets = itm_logits_and_targets(outputs)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=1)


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


@TASKS.register("itm")
@dataclasses.dataclass(frozen=True)
class Itm:
    """ITM (sigmoid BCE on in-batch hard negatives) + `itc_weight` x CLIP loss (model: `matching`).

    The default best metric, `itm_binding_accuracy`, needs evaluation data with hard-negative captions
    (`negatives`, e.g. Shapes-Captions); set `checkpoint.best_metric` (e.g. "i2t_recall@1") otherwise.
    """

    num_classes: int
    class_names: Sequence[str] = ()
    itc_weight: float = 1.0
    towers: tuple[str, str] = ("image", "text")

    label_rank: ClassVar[int] = 1
    dataset_task: ClassVar[str] = "contrastive"
    default_best_metric: ClassVar[str] = "itm_binding_accuracy"

    def __post_init__(self):
        if not isinstance(self.itc_weight, (int, float)) or self.itc_weight < 0:
            raise ValueError(f"config task.itc_weight={self.itc_weight!r} must be a non-negative number")
        if len(self.towers) != 2:
            raise ValueError(f"config task.towers={self.towers!r} must name 2 towers")

    def _pair(self, outputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        missing = [t for t in self.towers if t not in outputs]
        if missing:
            raise KeyError(f"task itm needs embeddings {list(self.towers)}; the model gave {sorted(outputs)}")
        x, y = (outputs[t] for t in self.towers)
        x = x[:, 0] if x.ndim == 3 else x
        y = y[:, 0] if y.ndim == 3 else y
        return x.astype(jnp.float32), y.astype(jnp.float32)

    def itc_loss(self, outputs: Mapping[str, jax.Array]) -> jax.Array:
        x, y = self._pair(outputs)
        return contrastive.clip_loss(x, y, outputs["logit_scale"])

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        """Per-example loss `[B]` (float32): ITM_i + itc_weight * CLIP_i (see the module docstring)."""
        loss = itm_loss(outputs)
        if self.itc_weight:
            loss = loss + self.itc_weight * self.itc_loss(outputs)
        return loss

    def train_metrics(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> dict[str, jax.Array]:
        logits, targets = itm_logits_and_targets(outputs)
        x, y = self._pair(outputs)
        similarity = x @ y.T
        diagonal = jnp.arange(similarity.shape[0])
        return {
            "itm_accuracy": jnp.mean((logits > 0) == (targets > 0.5)),  # Over the 3B pairs (chance: 2/3 by "no").
            "itm_loss": optax.sigmoid_binary_cross_entropy(logits, targets).mean(),
            "itc_loss": self.itc_loss(outputs).mean(),
            "i2t_accuracy": jnp.mean(jnp.argmax(similarity, axis=1) == diagonal),
            "t2i_accuracy": jnp.mean(jnp.argmax(similarity, axis=0) == diagonal),
            "temperature": jnp.exp(-jnp.asarray(outputs["logit_scale"], jnp.float32)),
        }

    def eval_outputs(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Unit embeddings (`image`, `text`, `negatives` when present; as `<key>_embedding`) and the ITM logits."""
        result = {f"{k}_embedding": outputs[k] for k in (*self.towers, "negatives") if k in outputs}
        for key in ("itm_logits", "negatives_itm_logits"):
            if key in outputs:
                result[key] = jnp.asarray(outputs[key], jnp.float32)
        return result

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        from mmjax.evaluate import contrastive as evaluators

        result = evaluators.embedding_metrics(eval_outputs, self.towers)
        true = np.asarray(eval_outputs["itm_logits"])
        false = eval_outputs.get("negatives_itm_logits")
        if false is not None:
            result.update(evaluators.score_binding_metrics(true, np.asarray(false), prefix="itm_"))
        result.update(itm_classification_metrics(true, None if false is None else np.asarray(false)))
        return result
