"""Captioning: teacher-forced next-token cross-entropy, optionally with CoCa's contrastive term (Yu et al. 2022).

Reads the outputs of `mmjax.nn.models.captioner.Captioner` (model `name: captioner`): `logits [B, L, V]`,
`targets [B, L]`, `target_mask [B, L]` (padding targets are 0). Per example i the loss is

    caption_weight * CE_i + contrastive_weight * CLIP_i

with CE_i the mean over the example's real target tokens of the cross-entropy against the targets smoothed by
`label_smoothing` (optax's `smooth_labels`: (1 - s) one-hot + s / V), and CLIP_i the symmetric InfoNCE of
`mmjax.tasks.losses.clip_loss` on the model's unit embeddings (`model.decoder.embed_dim > 0`; CoCa uses weights
2 for captioning and 1 for contrastive). Labels are not used. Generation metrics (BLEU, CIDEr, ...) are the
`captioning` evaluator's (`mmjax.evaluate.captioning`); this task's metrics are the teacher-forced ones:
token accuracy and perplexity over every real target token of a split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.tasks import losses
from mmjax.tasks.base import TASKS, Task
from mmjax.tasks.contrastive import in_batch_accuracies, tower_pair


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-example (summed cross-entropy over the real targets `[B]`, number of real targets `[B]`), float32."""
    logits = logits.astype(jnp.float32)
    labels = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    per_token = optax.softmax_cross_entropy(logits, labels)
    mask = mask.astype(jnp.float32)
    return (per_token * mask).sum(axis=1), mask.sum(axis=1)


@TASKS.register("caption")
@dataclasses.dataclass(frozen=True)
class Caption(Task):
    """Next-token cross-entropy (padding masked, optional label smoothing) + optional CoCa contrastive term."""

    label_smoothing: float = 0.0
    caption_weight: float = 1.0
    contrastive_weight: float = 0.0  # Fixed at 0 here; the `coca` task sets it.
    towers: tuple[str, str] = ("image", "text")

    dataset_task: ClassVar[str] = "contrastive"  # Datasets of (modality, caption) pairs.
    default_best_metric: ClassVar[str] = "token_accuracy"
    metric_names: ClassVar[tuple[str, ...] | None] = None  # Evaluators (captioning) add generation metrics.
    per_example_loss: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"config task.label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        for key in ("caption_weight", "contrastive_weight"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"config task.{key}={value!r} must be a non-negative number")
        if not self.caption_weight and not self.contrastive_weight:
            raise ValueError("config task: caption_weight and contrastive_weight are both 0: nothing to learn")
        if self.contrastive_weight and self.per_example_loss:
            raise ValueError("config task.name='caption' has no contrastive term; use task.name='coca' for "
                             "contrastive_weight > 0")

    def _check(self, outputs: Mapping[str, Any]) -> None:
        if "logits" not in outputs:
            raise KeyError(f"task caption needs a text decoder's logits (model.name='captioner'); the model gave "
                           f"{sorted(outputs)}")
        if self.contrastive_weight and "logit_scale" not in outputs:
            raise ValueError("config task.contrastive_weight > 0 needs the CoCa embeddings: set "
                             "model.decoder.embed_dim > 0 and model.decoder.contrastive")

    def caption_loss(self, outputs: Mapping[str, jax.Array]) -> jax.Array:
        total, count = token_cross_entropy(outputs["logits"], outputs["targets"], outputs["target_mask"],
                                           self.label_smoothing)
        return total / jnp.maximum(count, 1.0)

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        self._check(outputs)
        loss = self.caption_weight * self.caption_loss(outputs)
        if self.contrastive_weight:
            x, y = tower_pair(outputs, self.towers, "caption")
            loss = loss + self.contrastive_weight * losses.clip_loss(x, y, outputs["logit_scale"])
        return loss

    def train_metrics(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> dict[str, jax.Array]:
        self._check(outputs)
        mask = outputs["target_mask"].astype(jnp.float32)
        correct = (jnp.argmax(outputs["logits"], -1) == outputs["targets"]) * mask
        metrics = {"token_accuracy": correct.sum() / jnp.maximum(mask.sum(), 1.0),
                   "caption_loss": self.caption_loss(outputs).mean()}
        if "logit_scale" in outputs:
            metrics.update(in_batch_accuracies(*tower_pair(outputs, self.towers, "caption")))
        return metrics

    def eval_outputs(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Per example: summed target cross-entropy (no smoothing), correct argmax tokens and real targets."""
        self._check(outputs)
        total, count = token_cross_entropy(outputs["logits"], outputs["targets"], outputs["target_mask"])
        mask = outputs["target_mask"]
        correct = ((jnp.argmax(outputs["logits"], -1) == outputs["targets"]) & mask).sum(axis=1)
        return {"token_nll": total, "token_count": count, "token_correct": correct.astype(jnp.float32)}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        count = float(np.sum(eval_outputs["token_count"]))
        nll = float(np.sum(eval_outputs["token_nll"], dtype=np.float64)) / max(count, 1.0)
        return {"token_accuracy": float(np.sum(eval_outputs["token_correct"])) / max(count, 1.0),
                "perplexity": float(np.exp(nll)), "num_examples": int(len(eval_outputs["token_count"]))}


@TASKS.register("coca")
@dataclasses.dataclass(frozen=True)
class CoCa(Caption):
    """CoCa (Yu et al. 2022): `caption_weight` x captioning loss + `contrastive_weight` x CLIP loss on the pooled,
    projected embeddings of `towers` (defaults 2 and 1, the paper's). Needs `model.decoder.embed_dim > 0`."""

    caption_weight: float = 2.0
    contrastive_weight: float = 1.0

    per_example_loss: ClassVar[bool] = False  # In-batch negatives couple the examples of a batch.
