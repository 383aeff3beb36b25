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


def _build(registry: Registry, cfg: ml_collections.ConfigDict, where: str, dtype: Any = None, **extra: Any):
    """Instantiates `registry[cfg.name]` with the other keys of `cfg` as fields; unknown fields name `where`.

    `dtype` (the model-wide compute dtype) is given to modules that have a `dtype` field and set none.
    """
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
    if dtype and "dtype" in fields and not kwargs.get("dtype"):
        kwargs["dtype"] = dtype
    if isinstance(kwargs.get("dtype"), str):  # "bfloat16" from a config or the command line.
        try:
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
        except TypeError:
            raise ValueError(f"config {where}.dtype={kwargs['dtype']!r} is not a dtype (e.g. bfloat16, float32)")
    return functools.partial(cls, **kwargs, **extra)


MODEL_KINDS = ("fusion", "two_tower", "matching")


def _check_dtype(model_config: ml_collections.ConfigDict) -> str | None:
    dtype = model_config.get("dtype") or None
    if dtype is not None:
        try:
            jnp.dtype(dtype)
        except TypeError:
            raise ValueError(f"config model.dtype={dtype!r} is not a dtype (e.g. bfloat16, float32)")
    return dtype


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the model of `config.model`: `name` "fusion" (default; `MultimodalModel`: encoders per modality,
    fusion, head), "two_tower" (`TwoTower` dual encoder for contrastive training) or "matching" (`MatchingModel`:
    dual encoder + image–text matching cross-encoder, config group `model.matching`).

    `model.dtype` (e.g. "bfloat16") is the compute dtype of every module that does not set its own; parameters
    stay float32 and losses are computed in float32 (mixed precision).
    """
    kind = model_config.get("name", "fusion")
    if kind not in MODEL_KINDS:
        raise ValueError(f"config model.name={kind!r}; valid: {', '.join(MODEL_KINDS)}")
    if not model_config.encoders:
        raise ValueError("config model.encoders is empty: name at least one modality's encoder")
    dtype = _check_dtype(model_config)
    encoders = {
        m: _build(ENCODERS, model_config.encoders[m], f"model.encoders.{m}", dtype)()
        for m in sorted(model_config.encoders)
    }
    if kind == "two_tower":
        return _build_two_tower(model_config, encoders, dtype)
    if kind == "matching":
        return _build_matching(model_config, encoders, dtype)
    head = _build(HEADS, model_config.head, "model.head", dtype, num_classes=model_config.num_classes)
    fusion = _build(FUSIONS, model_config.fusion, "model.fusion", dtype)
    dropout = model_config.get("modality_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"config model.modality_dropout={dropout} must be in [0, 1)")
    if fusion.func.produces_logits:  # Decision-level: the fusion owns one head per modality.
        return MultimodalModel(encoders=encoders, fusion=fusion(head=head), head=None, modality_dropout=dropout)
    return MultimodalModel(encoders=encoders, fusion=fusion(), head=head(), modality_dropout=dropout)


def _build_two_tower(model_config, encoders, dtype) -> nn.Module:
    from mmjax.nn.contrastive import TwoTower

    if len(encoders) != 2:
        raise ValueError(f"config model.encoders: a two_tower model needs exactly 2 towers, got {sorted(encoders)}")
    options = dict(model_config.get("two_tower", {}))
    fields = {"embed_dim", "logit_scale_init", "logit_bias_init", "aliases"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"config model.two_tower: unknown field(s) {unknown}; valid: {sorted(fields)}")
    if options.get("embed_dim", 1) <= 0:
        raise ValueError(f"config model.two_tower.embed_dim={options['embed_dim']} must be positive")
    if "aliases" in options:
        options["aliases"] = dict(options["aliases"])
        bad = {k: t for k, t in options["aliases"].items() if t not in encoders}
        if bad:
            raise ValueError(f"config model.two_tower.aliases {bad} name no tower; towers: {sorted(encoders)}")
    return TwoTower(encoders=encoders, dtype=jnp.dtype(dtype) if dtype else None, **options)


def _build_matching(model_config, encoders, dtype) -> nn.Module:
    from mmjax.nn.matching import build_matching

    return build_matching(model_config, encoders, dtype)
