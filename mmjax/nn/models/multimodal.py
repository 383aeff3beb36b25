"""MultimodalModel: one encoder per modality -> fusion -> head (the model of classification-style tasks).

With no extra heads the model returns its head's output (an array). With several task heads (multi-task), unimodal
auxiliary heads or unimodal scores (gradient modulation) it returns a dict under the keys below, which the
composed tasks (`mmjax.tasks.multitask`) and the train step read.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import config_context

FUSED_OUTPUTS = "outputs"  # The fused head's output (a model with auxiliary heads or unimodal scores).
TASK_OUTPUTS = "tasks"  # {task name: its head's output} (a multi-task model).
AUX_OUTPUTS = "aux"  # {modality: its auxiliary head's output on that modality's pooled features}.
UNIMODAL_OUTPUTS = "unimodal"  # {modality: fused head output with only that modality present} (training only).
LOG_VARS = "log_vars"  # [T] learned log-variances of the tasks, sorted task order (uncertainty weighting).


class MultimodalModel(nn.Module):
    """Encodes each modality of a batch, fuses the features and applies the head.

    `batch` is a dict with one array per modality key of `encoders` (leading batch axis) and optional
    `<modality>_mask` arrays of shape `[B]` marking examples where that modality is missing.
    `modality_dropout` (training only) drops each present modality of each example with that probability, as a
    missing modality is dropped (through its mask); an example that would lose all its modalities keeps them.

    Serial conditioning: when the fusion conditions an encoder (`conditions_encoders`, e.g. FiLM), the other
    modalities are encoded first, the fusion's `generate` turns their features (and the masks, modality dropout
    included) into the FiLM parameters of the target encoder, and the target is encoded with them.

    Extra outputs (all off by default; then the output is the head's array, as always):

    * `heads` ({task: head}, with `head=None`): one head per task on the same fused features; the output is
      `{"tasks": {task: head output}}`, plus `"log_vars"` (`[T]` learned parameters `task_log_vars`, initialised
      to 0) when `learned_log_vars` (uncertainty weighting, `mmjax.tasks.multitask`).
    * `aux_heads` ({modality: head}): a head on each named modality's pooled encoder features (masked like the
      fusion masks it: zero features where the modality is missing); output `{"outputs": fused, "aux": {m: ...}}`.
    * `unimodal_scores` (training only): the fused head's output with only modality m present, for every m,
      computed from the same encoder features with their gradient stopped and the head deterministic; the train
      step's gradient modulation (OGM-GE, `mmjax.train.modulation`) reads it as `"unimodal"`.
    """

    encoders: Mapping[str, nn.Module]
    fusion: nn.Module
    head: nn.Module | None
    modality_dropout: float = 0.0
    heads: Mapping[str, nn.Module] | None = None
    aux_heads: Mapping[str, nn.Module] | None = None
    unimodal_scores: bool = False
    learned_log_vars: bool = False

    @nn.compact
    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
        missing = [m for m in sorted(self.encoders) if m not in batch]
        if missing:
            raise KeyError(
                f"batch is missing modality {', '.join(map(repr, missing))}; the model encodes "
                f"{sorted(self.encoders)} and the batch has keys {sorted(batch)}"
            )
        if getattr(self.fusion, "conditions_encoders", False):
            masks = self._masks(batch)
            if train and self.modality_dropout > 0 and len(self.encoders) > 1:
                masks = self._drop_modalities(masks, self._batch_size(batch))
            features = self._encode_conditioned(batch, masks, train)
        else:
            features = {}
            for m in sorted(self.encoders):
                with config_context(f"model.encoders.{m}"):
                    features[m] = self.encoders[m](batch[m], train=train)
            masks = self._masks(batch)
            if train and self.modality_dropout > 0 and len(features) > 1:
                masks = self._drop_modalities(masks, self._batch_size(batch))
        with config_context("model.fusion"):
            fused = self.fusion(features, masks=masks or None, train=train)
        if self.heads is None and not self.aux_heads and not self.unimodal_scores:
            if self.head is None:
                return fused
            with config_context("model.head"):
                return self.head(fused, train=train)
        return self._extra_outputs(fused, features, masks, batch, train)

    def _extra_outputs(self, fused: jax.Array, features: dict, masks: dict, batch, train: bool) -> dict:
        """The dict output of a model with task heads, auxiliary heads or unimodal scores (class docstring)."""
        outputs: dict = {}
        if self.heads is not None:
            outputs[TASK_OUTPUTS] = {}
            for name in sorted(self.heads):
                with config_context(f"tasks.{name}.head"):
                    outputs[TASK_OUTPUTS][name] = self.heads[name](fused, train=train)
            if self.learned_log_vars:
                outputs[LOG_VARS] = self.param("task_log_vars", nn.initializers.zeros, (len(self.heads),),
                                               jnp.float32)
        elif self.head is None:
            outputs[FUSED_OUTPUTS] = fused
        else:
            with config_context("model.head"):
                outputs[FUSED_OUTPUTS] = self.head(fused, train=train)
        if self.aux_heads:
            outputs[AUX_OUTPUTS] = {}
            for m in sorted(self.aux_heads):
                present = masks.get(m)
                pooled = features[m].pooled
                if present is not None:
                    pooled = jnp.where(jnp.asarray(present)[:, None] > 0, pooled, 0)
                with config_context(f"model.aux_heads.{m}"):
                    outputs[AUX_OUTPUTS][m] = self.aux_heads[m](pooled, train=train)
        if self.unimodal_scores and train:
            outputs[UNIMODAL_OUTPUTS] = self._unimodal(features, masks, self._batch_size(batch))
        return outputs

    def _unimodal(self, features: dict, masks: dict, batch: int) -> dict[str, jax.Array]:
        """The fused head's output with only modality m present (per m), from gradient-stopped features."""
        frozen = jax.tree_util.tree_map(jax.lax.stop_gradient, features)
        result = {}
        for m in sorted(self.encoders):
            only = {}
            for other in sorted(self.encoders):
                present = jnp.asarray(masks[other], jnp.float32) if other in masks else jnp.ones((batch,))
                only[other] = present if other == m else jnp.zeros_like(present)
            out = self.fusion(frozen, masks=only, train=False)
            result[m] = out if self.head is None else self.head(out, train=False)
        return result

    def encode(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
        """Each modality's pooled encoder features `[B, D]` (before fusion), e.g. for classical baselines; with a
        conditioning fusion, the target's features are the conditioned ones."""
        if getattr(self.fusion, "conditions_encoders", False):
            return {m: f.pooled for m, f in self._encode_conditioned(batch, self._masks(batch), train).items()}
        features = {}
        for m in sorted(self.encoders):
            with config_context(f"model.encoders.{m}"):
                features[m] = self.encoders[m](batch[m], train=train).pooled
        return features

    def _masks(self, batch: Mapping[str, jax.Array]) -> dict:
        return {m: batch[f"{m}_mask"] for m in sorted(self.encoders) if f"{m}_mask" in batch}

    def _batch_size(self, batch: Mapping[str, jax.Array]) -> int:
        return batch[sorted(self.encoders)[0]].shape[0]

    def _encode_conditioned(self, batch: Mapping[str, jax.Array], masks: dict, train: bool) -> dict:
        """The conditioning modalities' features, then the target's, encoded with the fusion's FiLM parameters."""
        target = self.fusion.target
        if target not in self.encoders:
            raise ValueError(f"model.fusion: FiLM target {target!r} is not among the encoders {sorted(self.encoders)}")
        features = {}
        for m in sorted(self.encoders):
            if m != target:
                with config_context(f"model.encoders.{m}"):
                    features[m] = self.encoders[m](batch[m], train=train)
        with config_context("model.fusion"):
            film = self.fusion.generate(features, masks=masks or None, channels=self.encoders[target].film_channels())
        with config_context(f"model.encoders.{target}"):
            features[target] = self.encoders[target](batch[target], train=train, film=film)
        return features

    def _drop_modalities(self, masks: dict, batch: int) -> dict:
        modalities = sorted(self.encoders)
        present = jnp.stack(
            [jnp.asarray(masks[m], jnp.float32) if m in masks else jnp.ones((batch,)) for m in modalities], axis=1
        )
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.modality_dropout, present.shape)
        kept = present * keep
        kept = jnp.where(kept.sum(axis=1, keepdims=True) > 0, kept, present)
        return {m: kept[:, i] for i, m in enumerate(modalities)}
