"""Two-tower (dual-encoder) model for contrastive training: CLIP (Radford et al. 2021), SigLIP (Zhai et al. 2023).

Each tower is an encoder (any registered one) followed by a bias-free linear projection to `embed_dim` and L2
normalisation; the model also owns the learned temperature, stored as a log-scale (`logit_scale`), and the
SigLIP bias (`logit_bias`; unused by the CLIP loss). The losses live in `mmjax.tasks.losses`.

Inputs may carry extra leading axes, e.g. `text [B, K, L]` (several captions per image at evaluation): they are
flattened for the encoder and restored on the embeddings (`[B, K, D]`). Batch keys in `aliases` are encoded by
another key's tower when present (e.g. hard-negative captions `negatives [B, N, L]` by the text tower).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype, config_context

# Trailing axes that make one example of a modality; leading axes beyond the batch axis are flattened.
FEATURE_RANKS = {"image": 3, "audio": 2, "text": 1, "table": 1}
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07.
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)  # SigLIP: t' = log 10, b = -10.
SIGLIP_LOGIT_BIAS_INIT = -10.0
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature so logits stay <= 100 x cosine.


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTower(nn.Module):
    """`{modality: [B, ...]}` -> `{modality: unit embeddings [B, ..., D], "logit_scale": (), "logit_bias": ()}`."""

    encoders: Mapping[str, nn.Module]
    embed_dim: int = 256
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    logit_bias_init: float = 0.0
    aliases: Mapping[str, str] | None = None  # Extra batch key -> the tower that encodes it.
    dtype: Dtype | None = None

    def setup(self):
        self.projections = {
            m: nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name=f"proj_{m}") for m in self.encoders
        }
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), ())

    def embed(self, modality: str, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Unit-norm float32 embeddings of one tower's inputs (any number of leading axes)."""
        if modality not in self.encoders:
            raise KeyError(f"TwoTower has no {modality!r} tower; towers: {sorted(self.encoders)}")
        rank = FEATURE_RANKS.get(modality)
        if rank is None:
            raise ValueError(f"TwoTower: unknown example rank for modality {modality!r}; known: {FEATURE_RANKS}")
        if x.ndim < rank + 1:
            raise ValueError(f"TwoTower: {modality} input of shape {x.shape} needs a batch axis and {rank} more")
        leading = x.shape[: x.ndim - rank]
        flat = x.reshape((-1, *x.shape[x.ndim - rank:]))
        with config_context(f"model.encoders.{modality}"):
            pooled = self.encoders[modality](flat, train=train).pooled
        return l2_normalize(self.projections[modality](pooled)).reshape((*leading, self.embed_dim))

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        missing = [m for m in sorted(self.encoders) if m not in batch]
        if missing:
            raise KeyError(f"batch is missing modality {missing}; the towers are {sorted(self.encoders)} and the "
                           f"batch has keys {sorted(batch)}")
        outputs = {m: self.embed(m, batch[m], train=train) for m in sorted(self.encoders)}
        for key, tower in sorted((self.aliases or {}).items()):
            if key in batch:
                outputs[key] = self.embed(tower, batch[key], train=train)
        outputs["logit_scale"] = self.logit_scale
        outputs["logit_bias"] = self.logit_bias
        return outputs
