"""Fusion modules: combine per-modality encoder outputs into one representation (or, decision-level, into logits).

Interface: `fusion(features: Mapping[str, EncoderOutput], *, masks: Mapping[str, Array] | None, train) -> Array`.
Modalities are processed in sorted key order, so results never depend on dict insertion order. `masks[m]` is a
`[B]` array of 1 (present) / 0 (missing); a missing modality contributes nothing to the result.
A fusion whose class sets `produces_logits = True` is decision-level: it owns its per-modality heads.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import EncoderOutput
from mmjax.registry import FUSIONS

Masks = Mapping[str, jax.Array] | None


def _mask(masks: Masks, modality: str, batch: int) -> jax.Array:
    """The `[B]` float presence mask of one modality (all ones when the batch has none)."""
    if masks is None or masks.get(modality) is None:
        return jnp.ones((batch,), jnp.float32)
    return jnp.asarray(masks[modality], jnp.float32)


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """Early (feature-level) fusion: concatenation of the pooled features, missing modalities zeroed.

    The classic baseline of multimodal learning (e.g. Baltrusaitis et al., "Multimodal Machine Learning:
    A Survey and Taxonomy", TPAMI 2019).
    """

    produces_logits: ClassVar[bool] = False

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        parts = []
        for modality in sorted(features):
            pooled = features[modality].pooled
            parts.append(pooled * _mask(masks, modality, pooled.shape[0])[:, None].astype(pooled.dtype))
        return jnp.concatenate(parts, axis=-1)


@FUSIONS.register("late")
class LateFusion(nn.Module):
    """Decision-level fusion: one head per modality, logits averaged over the modalities present.

    `head` builds a fresh head module (a `functools.partial` of a head class); each modality gets its own.
    """

    head: Callable[..., nn.Module]
    produces_logits: ClassVar[bool] = True

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        total, count = 0.0, 0.0
        for modality in sorted(features):
            pooled = features[modality].pooled
            logits = self.head(name=f"head_{modality}")(pooled, train=train)
            present = _mask(masks, modality, pooled.shape[0])[:, None]
            total = total + logits * present
            count = count + present
        return total / jnp.maximum(count, 1.0)
