"""Losses as pure functions of outputs and targets; each returns a per-example loss `[B]` in float32.

- `softmax_cross_entropy`: single-label classification, optional label smoothing;
- `sigmoid_cross_entropy`: multi-label (independent sigmoids, summed over classes);
- `regression_loss`: mean squared or absolute error over the outputs;
- `clip_loss` (Radford et al. 2021): symmetric cross-entropy over image->text and text->image logits
  `exp(t) <x_i, y_j>`, with the log-scale `t` clamped at log(100);
- `siglip_loss` (Zhai et al. 2023): `-sum_j log sigmoid(z_ij (exp(t) <x_i, y_j> + b))`, `z_ii = 1`, else -1
  (row sums; their mean is SigLIP's loss), and `siglip_loss_chunked`, the same as the paper's device ring;
- `itm_loss` (ALBEF, Li et al. 2021): the mean sigmoid cross-entropy over an example's image-text pairs;
- `ctc_loss` (Graves et al. 2006): `-log p(y | x)`, summed over every frame alignment of the transcript (optax).

Contrastive losses see the GLOBAL batch inside the jitted step (XLA gathers the embeddings), so 1 device and N
devices or hosts compute the same loss on the same batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from mmjax.nn.models.two_tower import MAX_LOGIT_SCALE

ITM_TRAIN_TARGETS = (1.0, 0.0, 0.0)  # (matched pair, image + negative text, negative image + text).


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy of integer `labels [B]` under `logits [B, K]` (float32)."""
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of multi-hot `labels [B, K]`, summed over the K classes."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32)).sum(-1)


def regression_loss(outputs: jax.Array, targets: jax.Array, loss_type: str = "mse") -> jax.Array:
    """Mean over the outputs of the squared ("mse") or absolute ("mae") error; targets are reshaped to outputs."""
    outputs = outputs.astype(jnp.float32)
    error = outputs - targets.astype(jnp.float32).reshape(outputs.shape)
    per_output = error**2 if loss_type == "mse" else jnp.abs(error)
    return per_output.mean(-1)


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
    block it holds (its own first: the positives), then passes that block to device d+1 (`ppermute`), so no
    device ever holds more than a `[B/N, B/N]` block of the similarity matrix. Autodiff sends the text gradients
    back around the ring.
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
        return logits, jnp.broadcast_to(jnp.asarray(ITM_TRAIN_TARGETS, jnp.float32), logits.shape)
    logits = logits[:, None] if logits.ndim == 1 else logits.reshape(logits.shape[0], -1)
    targets = jnp.ones_like(logits)
    if "negatives_itm_logits" in outputs:
        negatives = jnp.asarray(outputs["negatives_itm_logits"], jnp.float32)
        negatives = negatives.reshape(negatives.shape[0], -1)
        logits = jnp.concatenate([logits, negatives], axis=1)
        targets = jnp.concatenate([targets, jnp.zeros_like(negatives)], axis=1)
    return logits, targets


def itm_loss(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """Per-example ITM loss `[B]`: mean sigmoid BCE over the example's pairs (see `mmjax.tasks.itm`)."""
    logits, targets = itm_logits_and_targets(outputs)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=1)


def ctc_loss(logits: jax.Array, logit_mask: jax.Array, targets: jax.Array, target_mask: jax.Array,
             blank_id: int) -> jax.Array:
    """Connectionist Temporal Classification (Graves, Fernandez, Gomez, Schmidhuber 2006): per example,
    -log p(y | x) = -log sum_{pi : B(pi) = y} prod_t softmax(logits_t)[pi_t], the sum over every alignment pi of one
    symbol (a label or the blank) per real frame that B (merge repeats, then drop blanks) maps to the transcript y.
    Computed by optax's forward (alpha) recursion over the blank-extended transcript (`optax.ctc_loss`).

    `logits [B, T, K]` (blank = `blank_id`), `logit_mask [B, T]` (real frames first), `targets [B, N]` and
    `target_mask [B, N]` (real targets first). Returns float32 `[B]`; a transcript that no alignment of the real
    frames reaches (too few frames) gets a loss near -optax's log_epsilon (1e5)."""
    return optax.ctc_loss(logits.astype(jnp.float32), 1.0 - jnp.asarray(logit_mask, jnp.float32), targets,
                          1.0 - jnp.asarray(target_mask, jnp.float32), blank_id=blank_id)
