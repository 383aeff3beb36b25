"""Speech-to-text by Connectionist Temporal Classification (Graves, Fernandez, Gomez, Schmidhuber 2006, ICML).

Reads the outputs of `mmjax.nn.models.ctc_head.CtcModel` (model `name: ctc`): per-frame `ctc_logits [B, T, V + 1]`
(blank = V), the real frames `ctc_mask [B, T]`, and the transcript's `targets [B, N]` / `target_mask [B, N]`. Per
example i with N_i target tokens the loss is

    CTC_i / N_i,   CTC_i = -log p(y_i | x_i) = -log sum_{pi : B(pi) = y_i} prod_t p_t(pi_t | x_i)

(`mmjax.tasks.losses.ctc_loss`: the sum over the alignments pi of one symbol per real frame that B, merge repeats
then drop blanks, maps to y_i; divided by the transcript length as PyTorch's `CTCLoss(reduction="mean")` does, so
long and short utterances weigh alike). An alignment needs N_i frames plus one blank between each pair of equal
neighbours: an example with fewer real frames has no alignment; its loss is 0 instead of optax's 1e5 stand-in for
log 0, and its share is reported as `infeasible_fraction` (the model checks at set-up that the encoder's frame
count can hold every transcript; this catches utterances that are short for their length). Labels are not used.

Metrics (train and split): `blank_fraction` (share of real frames whose most likely symbol is the blank: CTC's
peaky alignments push it towards 1 - words / frames) and `infeasible_fraction`. Transcripts (WER, sequence
accuracy) are the `transcription` evaluator's (`mmjax.evaluate.transcription`), with greedy best-path decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.tasks import losses
from mmjax.tasks.base import TASKS, Task


def feasible(frame_mask: jax.Array, targets: jax.Array, target_mask: jax.Array) -> jax.Array:
    """`[B]` bool: the real frames can hold the transcript (N targets + one blank between equal neighbours)."""
    target_mask = jnp.asarray(target_mask, bool)
    repeats = ((targets[:, 1:] == targets[:, :-1]) & target_mask[:, 1:]).sum(axis=1)
    return jnp.asarray(frame_mask, bool).sum(axis=1) >= target_mask.sum(axis=1) + repeats


@TASKS.register("ctc")
@dataclasses.dataclass(frozen=True)
class Ctc(Task):
    """CTC loss per target token of a CTC head's frames (module docstring)."""

    dataset_task: ClassVar[str] = "contrastive"  # Datasets of (modality, text) pairs, as the caption task's.
    default_best_metric: ClassVar[str] = "loss"
    metric_names: ClassVar[tuple[str, ...] | None] = None  # The transcription evaluator adds WER and accuracy.
    per_example_loss: ClassVar[bool] = True

    @staticmethod
    def _check(outputs: Mapping[str, Any]) -> None:
        if not isinstance(outputs, Mapping) or "ctc_logits" not in outputs:
            given = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise KeyError(f"task ctc needs a CTC head's per-frame logits (model.name='ctc'); the model gave {given}")

    def loss(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        self._check(outputs)
        logits, mask = outputs["ctc_logits"], outputs["ctc_mask"]
        targets, target_mask = outputs["targets"], outputs["target_mask"]
        nll = losses.ctc_loss(logits, mask, targets, target_mask, blank_id=logits.shape[-1] - 1)
        count = jnp.maximum(jnp.asarray(target_mask, jnp.float32).sum(axis=1), 1.0)
        return jnp.where(feasible(mask, targets, target_mask), nll / count, 0.0)

    def _counts(self, outputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits, mask = outputs["ctc_logits"], jnp.asarray(outputs["ctc_mask"], bool)
        blank = (jnp.argmax(logits, axis=-1) == logits.shape[-1] - 1) & mask
        return {"blank_frames": blank.sum(axis=1).astype(jnp.float32),
                "real_frames": mask.sum(axis=1).astype(jnp.float32),
                "feasible": feasible(mask, outputs["targets"], outputs["target_mask"]).astype(jnp.float32)}

    def train_metrics(self, outputs: Mapping[str, jax.Array], labels: jax.Array) -> dict[str, jax.Array]:
        self._check(outputs)
        counts = self._counts(outputs)
        return {"blank_fraction": counts["blank_frames"].sum() / jnp.maximum(counts["real_frames"].sum(), 1.0),
                "infeasible_fraction": 1.0 - counts["feasible"].mean()}

    def eval_outputs(self, outputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Per example: blank and real frame counts, and whether the transcript fits the frames."""
        self._check(outputs)
        return self._counts(outputs)

    def metrics(self, eval_outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
        real = float(np.sum(eval_outputs["real_frames"]))
        return {"blank_fraction": float(np.sum(eval_outputs["blank_frames"])) / max(real, 1.0),
                "infeasible_fraction": 1.0 - float(np.mean(eval_outputs["feasible"])),
                "num_examples": int(len(eval_outputs["feasible"]))}
