"""MultimodalModel: one encoder per modality -> fusion -> head, built from `config.model`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

# Importing the module files registers their encoders, fusions and heads.
from mmjax.nn import fusion as _fusion  # noqa: F401
from mmjax.nn import heads as _heads  # noqa: F401
from mmjax.nn.encoders import audio as _audio  # noqa: F401
from mmjax.nn.encoders import image as _image  # noqa: F401
from mmjax.nn.encoders import tabular as _tabular  # noqa: F401
from mmjax.nn.encoders import text as _text  # noqa: F401
from mmjax.registry import ENCODERS, FUSIONS, HEADS, Registry


class MultimodalModel(nn.Module):
    """Encodes each modality of a batch, fuses the features and applies the head.

    `batch` is a dict with one array per modality key of `encoders` (leading batch axis) and optional
    `<modality>_mask` arrays of shape `[B]` marking examples where that modality is missing.
    `modality_dropout` (training only) drops each present modality of each example with that probability, as a
    missing modality is dropped (through its mask); an example that would lose all its modalities keeps them.
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
        features = {m: self.encoders[m](batch[m], train=train) for m in sorted(self.encoders)}
        masks = {m: batch[f"{m}_mask"] for m in features if f"{m}_mask" in batch}
        if train and self.modality_dropout > 0 and len(features) > 1:
            masks = self._drop_modalities(masks, features)
        fused = self.fusion(features, masks=masks or None, train=train)
        return fused if self.head is None else self.head(fused, train=train)

    def _drop_modalities(self, masks: dict, features: dict) -> dict:
        modalities = sorted(features)
        batch = features[modalities[0]].pooled.shape[0]
        present = jnp.stack(
            [jnp.asarray(masks[m], jnp.float32) if m in masks else jnp.ones((batch,)) for m in modalities], axis=1
        )
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.modality_dropout, present.shape)
        kept = present * keep
        kept = jnp.where(kept.sum(axis=1, keepdims=True) > 0, kept, present)
        return {m: kept[:, i] for i, m in enumerate(modalities)}


def _build(registry: Registry, cfg: ml_collections.ConfigDict, where: str, **extra: Any):
    """Instantiates `registry[cfg.name]` with the other keys of `cfg` as fields; unknown fields name `where`."""
    if "name" not in cfg:
        raise ValueError(f"config {where} needs a 'name' (one of: {', '.join(registry.names())})")
    if cfg.name not in registry:
        raise ValueError(f"config {where}.name: {registry.unknown_message(cfg.name)}")
    cls = registry.get(cfg.name)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"config {where} ({cfg.name}): unknown field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(fields - set(extra)))}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if isinstance(kwargs.get("dtype"), str):  # "bfloat16" from a config or the command line.
        try:
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
        except TypeError:
            raise ValueError(f"config {where}.dtype={kwargs['dtype']!r} is not a dtype (e.g. bfloat16, float32)")
    return functools.partial(cls, **kwargs, **extra)


def build_model(model_config: ml_collections.ConfigDict) -> MultimodalModel:
    """Builds a MultimodalModel from `config.model` (encoders per modality, fusion, head, num_classes)."""
    if not model_config.encoders:
        raise ValueError("config model.encoders is empty: name at least one modality's encoder")
    encoders = {
        m: _build(ENCODERS, model_config.encoders[m], f"model.encoders.{m}")()
        for m in sorted(model_config.encoders)
    }
    head = _build(HEADS, model_config.head, "model.head", num_classes=model_config.num_classes)
    fusion = _build(FUSIONS, model_config.fusion, "model.fusion")
    dropout = model_config.get("modality_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config model.modality_dropout={dropout} must be in [0, 1)")
    if fusion.func.produces_logits:  # Decision-level: the fusion owns one head per modality.
        return MultimodalModel(encoders=encoders, fusion=fusion(head=head), head=None, modality_dropout=dropout)
    return MultimodalModel(encoders=encoders, fusion=fusion(), head=head(), modality_dropout=dropout)
