"""MultimodalModel: one encoder per modality -> fusion -> head (the model of classification-style tasks)."""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import config_context


class MultimodalModel(nn.Module):
    """Encodes each modality of a batch, fuses the features and applies the head.

    `batch` is a dict with one array per modality key of `encoders` (leading batch axis) and optional
    `<modality>_mask` arrays of shape `[B]` marking examples where that modality is missing.
    `modality_dropout` (training only) drops each present modality of each example with that probability, as a
    missing modality is dropped (through its mask); an example that would lose all its modalities keeps them.

    Serial conditioning: when the fusion conditions an encoder (`conditions_encoders`, e.g. FiLM), the other
    modalities are encoded first, the fusion's `generate` turns their features (and the masks, modality dropout
    included) into the FiLM parameters of the target encoder, and the target is encoded with them.
    """

    encoders: Mapping[str, nn.Module]
    fusion: nn.Module
    head: nn.Module | None
    modality_dropout: float = 0.0

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
        if self.head is None:
            return fused
        with config_context("model.head"):
            return self.head(fused, train=train)

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
