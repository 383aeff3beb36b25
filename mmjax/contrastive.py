"""Contrastive image–text objectives as tasks: CLIP's softmax loss and SigLIP's sigmoid loss.

Both read the outputs of `mmjax.nn.contrastive.TwoTower` (unit embeddings per tower, `logit_scale`,
`logit_bias`) and return a per-example loss `[B]` whose mean is the paper's loss over the GLOBAL batch: inside
the jitted step the similarity matrix spans every device's examples (XLA gathers the embeddings), so 1 device
and N devices or hosts compute the same loss and gradients on the same global batch.

- CLIP (Radford et al. 2021): symmetric cross-entropy over image->text and text->image logits
  `exp(t) * <x_i, y_j>`, with `t` the learned log-scale clamped at log(100); optional label smoothing.
- SigLIP (Zhai et al. 2023): `-1/B sum_ij log sigmoid(z_ij (exp(t) <x_i, y_j> + b))`, `z_ii = 1`, else -1;
  `t` starts at log 10 and `b` at -10 (see the model's config). `chunked=True` computes it as the paper's ring:
  each device keeps its images and passes its text embeddings around the devices (`ppermute`), so no device
  ever holds more than a `[B/N, B/N]` block of the similarity matrix.

Labels (e.g. a class per image, for zero-shot evaluation) are not used by the losses. Evaluation texts may hold
several captions per example (`[B, K, D]`): the loss uses the first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from mmjax.tasks import TASKS

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so logits stay <= 100 x cosine.


def _pair(outputs: Mapping[str, jax.Array], towers: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """The two towers' `[B, D]` embeddings (the first caption when the second has `[B, K, D]`)."""
    missing = [t for t in towers if t not in outputs]
    if missing:
        raise KeyError(f"contrastive task needs embeddings {list(towers)}; the model gave {sorted(outputs)}")
    x, y = (outputs[t] for t in towers)
    x = x[:, 0] if x.ndim == 3 else x
    y = y[:, 0] if y.ndim == 3 else y
    return x.astype(jnp.float32), y.astype(jnp.float32)


def clip_loss(x: jax.Array, y: jax.Array, log_scale: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example symmetric InfoNCE `[B]`: (CE over row i + CE over column i) / 2."""
    scale = jnp.exp(jnp.minimum(log_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
    logits = scale * x @ y.T
    n = logits.shape[0]
    targets = optax.smooth_labels(jnp.eye(n), label_smoothing) if label_smoothing else jnp.eye(n)
    return 0.5 * (optax.softmax_cross_entropy(logits, targets) + optax.softmax_cross_entropy(logits.T, targets))


def siglip_loss(x: jax.Array, y: jax.Array, log_scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Per-example sigmoid loss `[B]` (row sums; their mean is SigLIP's loss)."""
    logits = jnp.exp(log_scale.astype(jnp.float32)) * x @ y.T + bias.astype(jnp.float32)
    signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    return -jax.nn.log_sigmoid(signs * logits).sum(axis=1)


def siglip_loss_chunked(x, y, log_scale, bias, mesh: jax.sharding.Mesh) -> jax.Array:
    """`siglip_loss` as a ring over the devices of `mesh` (batch sharded over all its axes): same values.

    Device d holds images and texts of its B/N examples; in N rounds it scores its images against the text
    block it holds (its own first: the positives), then passes that block to device d+1. Autodiff sends the
    text gradients back around the ring.
    """
    axes = tuple(mesh.axis_names)
    n = mesh.size
    ring = [(i, (i + 1) % n) for i in range(n)]

    def local(x, y, log_scale, bias):
        scale = jnp.exp(log_scale)

        def block(texts, positives: bool):
            logits = scale * x @ texts.T + bias
            signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0 if positives else -jnp.ones_like(logits)
            return -jax.nn.log_sigmoid(signs * logits).sum(axis=1)

        def round_(carry, _):
            texts, loss = carry
            texts = jax.lax.ppermute(texts, axes, ring)
            return (texts, loss + block(texts, False)), None

        (_, loss), _ = jax.lax.scan(round_, (y, block(y, True)), None, length=n - 1)
        return loss

    batch, scalar = PartitionSpec(axes), PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, scalar, scalar), out_specs=batch)(
        x, y, log_scale.astype(jnp.float32), bias.astype(jnp.float32)
    )


@dataclasses.dataclass(frozen=True)
class _Contrastive:
    """What CLIP and SigLIP share: towers, in-batch train metrics, per-example outputs for the evaluators."""

    num_classes: int
    class_names: Sequence[str] = ()
    towers: tuple[str, str] = ("image", "text")

    label_rank: ClassVar[int] = 1
    dataset_task: ClassVar[str] = "contrastive"
    default_best_metric: ClassVar[str] = "i2t_recall@1"

    def train_metrics(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> dict[str, jax.Array]:
        x, y = _pair(outputs, self.towers)
        similarity = x @ y.T
        diagonal = jnp.arange(similarity.shape[0])
        return {
            "i2t_accuracy": jnp.mean(jnp.argmax(similarity, axis=1) == diagonal),
            "t2i_accuracy": jnp.mean(jnp.argmax(similarity, axis=0) == diagonal),
            "temperature": jnp.exp(-outputs["logit_scale"]),
        }

    def eval_outputs(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Every embedding the model produced (towers and aliases such as `negatives`), for the evaluators."""
        return {f"{k}_embedding": v for k, v in outputs.items() if k not in ("logit_scale", "logit_bias")}

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        from mmjax.evaluate import contrastive as evaluators

        return evaluators.embedding_metrics(eval_outputs, self.towers)


@TASKS.register("clip")
@dataclasses.dataclass(frozen=True)
class Clip(_Contrastive):
    """CLIP softmax contrastive loss over the global batch (model: `two_tower`)."""

    label_smoothing: float = 0.0

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        x, y = _pair(outputs, self.towers)
        return clip_loss(x, y, outputs["logit_scale"], self.label_smoothing)


@TASKS.register("siglip")
@dataclasses.dataclass(frozen=True)
class Siglip(_Contrastive):
    """SigLIP sigmoid loss (model: `two_tower` with logit_scale_init=log 10, logit_bias_init=-10).

    `chunked=True` runs the device ring of `siglip_loss_chunked` over `mesh` (set by the trainer).
    """

    chunked: bool = False
    mesh: Any = None

    def with_mesh(self, mesh) -> "Siglip":
        return dataclasses.replace(self, mesh=mesh)

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        x, y = _pair(outputs, self.towers)
        if self.chunked:
            if self.mesh is None:
                raise ValueError("task siglip with chunked=True needs the device mesh (Siglip.with_mesh)")
            return siglip_loss_chunked(x, y, outputs["logit_scale"], outputs["logit_bias"], self.mesh)
        return siglip_loss(x, y, outputs["logit_scale"], outputs["logit_bias"])
