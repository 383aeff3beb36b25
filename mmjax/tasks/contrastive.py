"""Contrastive image–text objectives: CLIP's softmax loss and SigLIP's sigmoid loss (see `mmjax.tasks.losses`).

Both read the outputs of `mmjax.nn.models.two_tower.TwoTower` (unit embeddings per tower, `logit_scale`,
`logit_bias`); SigLIP's `t` starts at log 10 and `b` at -10 (see the model's config). Labels (e.g. a class per
image, for zero-shot evaluation) are not used by the losses. Evaluation texts may hold several captions per
example (`[B, K, D]`): the loss uses the first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.metrics.retrieval import embedding_metrics
from mmjax.tasks import losses
from mmjax.tasks.base import TASKS, Task


def tower_pair(outputs: Mapping[str, jax.Array], towers: Sequence[str], task: str) -> tuple[jax.Array, jax.Array]:
    """The two towers' `[B, D]` float32 embeddings (the first caption when one has `[B, K, D]`)."""
    missing = [t for t in towers if t not in outputs]
    if missing:
        raise KeyError(f"task {task} needs embeddings {list(towers)}; the model gave {sorted(outputs)}")
    x, y = (outputs[t] for t in towers)
    x = x[:, 0] if x.ndim == 3 else x
    y = y[:, 0] if y.ndim == 3 else y
    return x.astype(jnp.float32), y.astype(jnp.float32)


def in_batch_accuracies(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """How often each image's nearest text in the batch is its own (`i2t`), and each text's nearest image."""
    similarity = x @ y.T
    diagonal = jnp.arange(similarity.shape[0])
    return {
        "i2t_accuracy": jnp.mean(jnp.argmax(similarity, axis=1) == diagonal),
        "t2i_accuracy": jnp.mean(jnp.argmax(similarity, axis=0) == diagonal),
    }


@dataclasses.dataclass(frozen=True)
class _Contrastive(Task):
    """What CLIP and SigLIP share: towers, in-batch train metrics, per-example outputs for the evaluators."""

    towers: tuple[str, str] = ("image", "text")

    dataset_task: ClassVar[str] = "contrastive"
    default_best_metric: ClassVar[str] = "i2t_recall@1"
    per_example_loss: ClassVar[bool] = False  # In-batch negatives.

    def pair(self, outputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return tower_pair(outputs, self.towers, "contrastive")

    def train_metrics(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> dict[str, jax.Array]:
        return {**in_batch_accuracies(*self.pair(outputs)), "temperature": jnp.exp(-outputs["logit_scale"])}

    def eval_outputs(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Every embedding the model produced (towers and aliases such as `negatives`), for the evaluators."""
        return {f"{k}_embedding": v for k, v in outputs.items() if k not in ("logit_scale", "logit_bias")}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        return embedding_metrics(eval_outputs, self.towers)


@TASKS.register("clip")
@dataclasses.dataclass(frozen=True)
class Clip(_Contrastive):
    """CLIP softmax contrastive loss over the global batch (model: `two_tower`)."""

    label_smoothing: float = 0.0

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        x, y = self.pair(outputs)
        return losses.clip_loss(x, y, outputs["logit_scale"], self.label_smoothing)


@TASKS.register("siglip")
@dataclasses.dataclass(frozen=True)
class Siglip(_Contrastive):
    """SigLIP sigmoid loss (model: `two_tower` with logit_scale_init=log 10, logit_bias_init=-10).

    `chunked=True` runs the device ring of `losses.siglip_loss_chunked` over `mesh` (set by the trainer).
    """

    chunked: bool = False
    mesh: Any = None

    def with_mesh(self, mesh: jax.sharding.Mesh) -> Siglip:
        return dataclasses.replace(self, mesh=mesh)

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        x, y = self.pair(outputs)
        if self.chunked:
            if self.mesh is None:
                raise ValueError("task siglip with chunked=True needs the device mesh (Siglip.with_mesh)")
            return losses.siglip_loss_chunked(x, y, outputs["logit_scale"], outputs["logit_bias"], self.mesh)
        return losses.siglip_loss(x, y, outputs["logit_scale"], outputs["logit_bias"])
