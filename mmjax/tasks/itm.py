"""Image–text matching (ITM) task with in-batch hard negatives plus the ITC (CLIP) loss, as in ALBEF (Li et al.,
"Align before Fuse: Vision and Language Representation Learning with Momentum Distillation", NeurIPS 2021).

Reads the outputs of `mmjax.nn.models.matching.MatchingModel` (model `name: matching`). Per example i the loss is

    ITM_i + itc_weight * CLIP_i

* training outputs (`itm_logits [B, 3]`, with `negative_text_index`): ITM_i is the MEAN over the example's 3 pairs
  of the sigmoid binary cross-entropy with targets (1, 0, 0): (image i, text i) matched, (image i, its sampled
  hard-negative text) and (its sampled hard-negative image, text i) mismatched. The batch mean is then the mean
  BCE over the 3B pairs, as ALBEF's ITM loss (ALBEF uses a 2-way softmax, which is the same as a sigmoid of the
  logit difference);
* evaluation outputs (`itm_logits [B]` or `[B, K]`, optional `negatives_itm_logits [B, N]`): ITM_i is the mean
  BCE over the example's K true captions (target 1) and its N hard-negative captions (target 0);
* CLIP_i is `mmjax.tasks.losses.clip_loss` (symmetric InfoNCE over the global batch, first caption) on the unit
  embeddings: it keeps the dual-encoder similarities meaningful, so the hard-negative mining picks hard ones.

All losses are computed in float32. The loss couples the examples of a batch (in-batch negatives, ITC), so it
does not accumulate over micro-batches (`per_example_loss = False`, as CLIP). Labels are not used.

Evaluation metrics (`metrics`, host numpy): dual-encoder retrieval (`mmjax.metrics.retrieval`), dual-encoder
binding (`binding_accuracy`, `binding_all`), cross-encoder binding with the ITM logits (`itm_binding_accuracy`,
`itm_binding_all`) and ITM classification accuracy at logit 0 (`itm_accuracy`, `itm_true_accuracy`,
`itm_negative_accuracy`). ITM re-ranking of retrieval candidates (ALBEF's top-k) is not computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.metrics.retrieval import embedding_metrics, itm_classification_metrics, score_binding_metrics
from mmjax.tasks import losses
from mmjax.tasks.base import TASKS, Task
from mmjax.tasks.contrastive import in_batch_accuracies, tower_pair


@TASKS.register("itm")
@dataclasses.dataclass(frozen=True)
class Itm(Task):
    """ITM (sigmoid BCE on in-batch hard negatives) + `itc_weight` x CLIP loss (model: `matching`).

    The default best metric, `itm_binding_accuracy`, needs evaluation data with hard-negative captions
    (`negatives`, e.g. Shapes-Captions); set `checkpoint.best_metric` (e.g. "i2t_recall@1") otherwise.
    """

    itc_weight: float = 1.0
    towers: tuple[str, str] = ("image", "text")

    dataset_task: ClassVar[str] = "contrastive"
    default_best_metric: ClassVar[str] = "itm_binding_accuracy"
    per_example_loss: ClassVar[bool] = False  # In-batch negatives and the ITC loss.

    def __post_init__(self):
        if not isinstance(self.itc_weight, (int, float)) or self.itc_weight < 0:
            raise ValueError(f"config task.itc_weight={self.itc_weight!r} must be a non-negative number")
        if len(self.towers) != 2:
            raise ValueError(f"config task.towers={self.towers!r} must name 2 towers")

    def itc_loss(self, outputs: Mapping[str, jax.Array]) -> jax.Array:
        x, y = tower_pair(outputs, self.towers, "itm")
        return losses.clip_loss(x, y, outputs["logit_scale"])

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        """Per-example loss `[B]` (float32): ITM_i + itc_weight * CLIP_i (see the module docstring)."""
        loss = losses.itm_loss(outputs)
        if self.itc_weight:
            loss = loss + self.itc_weight * self.itc_loss(outputs)
        return loss

    def train_metrics(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> dict[str, jax.Array]:
        logits, targets = losses.itm_logits_and_targets(outputs)
        return {
            "itm_accuracy": jnp.mean((logits > 0) == (targets > 0.5)),  # Over the 3B pairs (chance: 2/3 by "no").
            "itm_loss": optax.sigmoid_binary_cross_entropy(logits, targets).mean(),
            "itc_loss": self.itc_loss(outputs).mean(),
            **in_batch_accuracies(*tower_pair(outputs, self.towers, "itm")),
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
        result = embedding_metrics(eval_outputs, self.towers)
        true = np.asarray(eval_outputs["itm_logits"])
        false = eval_outputs.get("negatives_itm_logits")
        if false is not None:
            result.update(score_binding_metrics(true, np.asarray(false), prefix="itm_"))
        result.update(itm_classification_metrics(true, None if false is None else np.asarray(false)))
        return result
