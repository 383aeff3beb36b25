"""`build_model(config.model)`: the model a config names, with every field checked before anything is traced.

Builds `MultimodalModel` (encoders -> fusion -> head), `TwoTower`, `MatchingModel`, `Captioner` or `CtcModel` from
registered encoders, fusions and heads (importing this module registers all of them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.checks import is_int, is_number

# Importing the module files registers their encoders, fusions and heads.
from mmjax.nn import fusion as _fusion  # noqa: F401
from mmjax.nn import heads as _heads  # noqa: F401
from mmjax.nn.conv import IMPLS as CONV_IMPLS
from mmjax.nn.encoders import audio as _audio  # noqa: F401
from mmjax.nn.encoders import image as _image  # noqa: F401
from mmjax.nn.encoders import recurrent as _recurrent  # noqa: F401
from mmjax.nn.encoders import tabular as _tabular  # noqa: F401
from mmjax.nn.encoders import text as _text  # noqa: F401
from mmjax.nn.models.captioner import build_captioner
from mmjax.nn.models.ctc_head import build_ctc
from mmjax.nn.models.matching import build_matching
from mmjax.nn.models.multimodal import MultimodalModel
from mmjax.nn.models.two_tower import TwoTower
from mmjax.nn.transformer import ATTENTION_IMPLS, REMAT_POLICIES
from mmjax.registry import ENCODERS, FUSIONS, HEADS, Registry, invalid_choice

# Module fields that count something (channels, widths, layers, heads, positions, patch sizes): each must be a
# positive int (or a sequence of them). A zero or negative value otherwise fails deep inside Flax/XLA with a
# message that names no config key, or (zero) builds an empty layer and trains silently.
POSITIVE_FIELDS = frozenset({
    "width", "depth", "num_heads", "mlp_dim", "dim", "hidden", "features", "num_layers", "rank", "patch_size",
    "patch_time", "patch_freq", "stride_time", "stride_freq", "vocab_size", "max_len", "num_bottlenecks",
    "embed_dim", "fusion_dim", "image_size", "num_classes",
})
RATE_FIELDS = frozenset({"dropout", "attention_dropout"})  # Probabilities in [0, 1).
CHOICE_FIELDS = {"remat": REMAT_POLICIES, "attention_impl": ATTENTION_IMPLS, "conv_impl": CONV_IMPLS}



def _sequence_of(test: Any) -> Any:
    """A test for a tuple/list/array whose elements each pass `test`."""
    return lambda v: isinstance(v, (tuple, list, np.ndarray)) and all(test(x) for x in v)


_ANNOTATION_KINDS = {  # A field's annotation (a string: modules use postponed annotations) -> value test.
    "int": is_int,
    "float": is_number,
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "Sequence[int]": _sequence_of(is_int),
    "Sequence[float]": _sequence_of(is_number),
    "tuple[float, ...]": _sequence_of(is_number),
}
_ANNOTATION_WORDS = {"int": "an int", "float": "a number", "bool": "a bool (True/False)", "str": "a string",
                     "None": "None", "Sequence[int]": "a tuple of ints", "Sequence[float]": "a tuple of numbers",
                     "tuple[float, ...]": "a tuple of numbers"}


def _numbers(value: Any) -> list:
    """The numbers in a field value (an int, or a tuple of ints like `features`)."""
    values = list(value) if isinstance(value, (tuple, list, np.ndarray)) else [value]
    return [v for v in values if is_number(v)]


def check_fields(cls: type, kwargs: Mapping[str, Any], where: str) -> None:
    """Checks config values against a module's fields before anything is traced: the type its annotation names
    (`int`, `float`, `Sequence[int]`, ... and unions of them), positive sizes, rates in [0, 1), known choices."""
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in sorted(kwargs.items()):
        annotation = annotations.get(key)
        options = [o.strip() for o in annotation.split("|")] if isinstance(annotation, str) else []
        if options and all(o in _ANNOTATION_KINDS for o in options):
            if not any(_ANNOTATION_KINDS[o](value) for o in options):
                expected = " or ".join(_ANNOTATION_WORDS[o] for o in options)
                raise ValueError(f"config {where}.{key}={value!r} must be {expected}, got {type(value).__name__}")
        if key in POSITIVE_FIELDS and value is not None:
            bad = [v for v in _numbers(value) if v <= 0]
            if bad and isinstance(value, (tuple, list, np.ndarray)):
                raise ValueError(f"config {where}.{key}={value!r} must hold positive integers (sizes); {bad[0]} is not")
            if bad:
                raise ValueError(f"config {where}.{key}={value!r} must be a positive integer (it is a size)")
        if key in RATE_FIELDS and is_number(value) and not 0.0 <= value < 1.0:
            raise ValueError(f"config {where}.{key}={value!r} must be a probability in [0, 1)")
        if key in CHOICE_FIELDS and value not in CHOICE_FIELDS[key]:
            raise ValueError(invalid_choice(f"{where}.{key}", value, CHOICE_FIELDS[key]))


def _compute_dtype(value: Any, where: str) -> jnp.dtype:
    """A floating-point compute dtype from a config string ("bfloat16", "float32", ...)."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"config {where}={value!r} is not a dtype (e.g. bfloat16, float32)") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"config {where}={value!r} must be a floating-point compute dtype (e.g. bfloat16, float32)")
    return dtype


def build_module(registry: Registry, cfg: ml_collections.ConfigDict, where: str, dtype: Any = None, **extra: Any):
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
    check_fields(cls, {**kwargs, **extra}, where)
    if dtype and "dtype" in fields and not kwargs.get("dtype"):
        kwargs["dtype"] = dtype
    if isinstance(kwargs.get("dtype"), str):  # "bfloat16" from a config or the command line.
        kwargs["dtype"] = _compute_dtype(kwargs["dtype"], f"{where}.dtype")
    return functools.partial(cls, **kwargs, **extra)


MODEL_KINDS = ("fusion", "two_tower", "matching", "captioner", "ctc")


def _check_dtype(model_config: ml_collections.ConfigDict) -> str | None:
    dtype = model_config.get("dtype") or None
    if dtype is not None:
        _compute_dtype(dtype, "model.dtype")
    return dtype


def build_model(model_config: ml_collections.ConfigDict, *,
                task_heads: Mapping[str, tuple[Mapping[str, Any], int]] | None = None,
                unimodal_scores: bool = False, learned_log_vars: bool = False) -> nn.Module:
    """Builds the model of `config.model`: `name` "fusion" (default; `MultimodalModel`: encoders per modality,
    fusion, head), "two_tower" (`TwoTower` dual encoder for contrastive training) or "matching" (`MatchingModel`:
    dual encoder + image–text matching cross-encoder, config group `model.matching`) or "captioner"
    (`Captioner`: a text decoder over the encoders' tokens, config group `model.decoder`) or "ctc" (`CtcModel`:
    per-frame logits over the vocabulary and a blank on one encoder's tokens, config group `model.ctc`).

    `model.dtype` (e.g. "bfloat16") is the compute dtype of every module that does not set its own; parameters
    stay float32 and losses are computed in float32 (mixed precision).

    Fusion models only: `task_heads` ({task: (head config, outputs)}, from `config.tasks`) gives the model one
    head per task instead of `model.head` (multi-task; a feature-level fusion), with learned per-task
    log-variances when `learned_log_vars`; `model.aux_heads` ({modality: loss weight}) adds a unimodal head (a
    copy of `model.head`) per named modality; `unimodal_scores` makes it output the head's scores with one modality
    at a time (gradient modulation). See `MultimodalModel`.
    """
    kind = model_config.get("name", "fusion")
    if kind not in MODEL_KINDS:
        raise ValueError(invalid_choice("model.name", kind, MODEL_KINDS))
    if not model_config.encoders:
        raise ValueError("config model.encoders is empty: name at least one modality's encoder")
    dtype = _check_dtype(model_config)
    encoders = {
        m: build_module(ENCODERS, model_config.encoders[m], f"model.encoders.{m}", dtype)()
        for m in sorted(model_config.encoders)
    }
    aux = model_config.get("aux_heads") or {}
    if kind in ("two_tower", "matching", "captioner", "ctc") and (task_heads or aux or unimodal_scores):
        raise ValueError(f"config model.name={kind!r}: task heads (config tasks), model.aux_heads and gradient "
                         "modulation need a fusion model (model.name='fusion')")
    if kind == "two_tower":
        return _build_two_tower(model_config, encoders, dtype)
    if kind == "matching":
        return build_matching(model_config, encoders, dtype)
    if kind == "captioner":
        return build_captioner(model_config, encoders, dtype)
    if kind == "ctc":
        return build_ctc(model_config, encoders, dtype)
    if task_heads:
        fusion = build_module(FUSIONS, model_config.fusion, "model.fusion", dtype)
        return _build_multitask(model_config, encoders, fusion, task_heads, dtype, aux, unimodal_scores,
                                learned_log_vars)
    num_classes = model_config.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"config model.num_classes={num_classes!r} must be a positive integer (the head's outputs)")
    head = build_module(HEADS, model_config.head, "model.head", dtype, num_classes=num_classes)
    fusion = build_module(FUSIONS, model_config.fusion, "model.fusion", dtype)
    _check_fusion_modalities(model_config, fusion, encoders)
    dropout = _modality_dropout(model_config)
    extra = {}
    if aux:
        extra["aux_heads"] = {m: head() for m in _aux_modalities(aux, encoders)}
    if unimodal_scores:
        if len(encoders) < 2:
            raise ValueError(f"gradient modulation (config train.modulation) balances two or more modalities; "
                             f"model.encoders has {sorted(encoders)}")
        extra["unimodal_scores"] = True
    if fusion.func.produces_logits:  # Decision-level: the fusion owns one head per modality.
        return MultimodalModel(encoders=encoders, fusion=fusion(head=head), head=None, modality_dropout=dropout,
                               **extra)
    return MultimodalModel(encoders=encoders, fusion=fusion(), head=head(), modality_dropout=dropout, **extra)


def _modality_dropout(model_config: ml_collections.ConfigDict) -> float:
    dropout = model_config.get("modality_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"config model.modality_dropout={dropout!r} must be in [0, 1)")
    return dropout


def _aux_modalities(aux: Any, encoders: Mapping[str, Any]) -> list[str]:
    """The modalities of `model.aux_heads` ({modality: loss weight}); each must have an encoder."""
    if not isinstance(aux, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(f"config model.aux_heads={aux!r} must map modalities to loss weights, e.g. "
                         "{'audio': 0.5, 'image': 0.5}")
    for m in aux:
        if m not in encoders:
            raise ValueError(f"config model.aux_heads names modality {m!r}, but the model has no encoder for it; "
                             f"model.encoders: {sorted(encoders)}")
    return sorted(aux)


def _build_multitask(model_config, encoders, fusion, task_heads, dtype, aux, unimodal_scores,
                     learned_log_vars) -> nn.Module:
    """A `MultimodalModel` with one head per task over one feature-level fusion."""
    if fusion.func.produces_logits:
        raise ValueError(f"config model.fusion.name={model_config.fusion.name!r} is decision-level (it owns one "
                         "head per modality); several task heads (config tasks) need a feature-level fusion")
    if aux or unimodal_scores:
        raise ValueError("model.aux_heads and gradient modulation (train.modulation) balance the modalities of one "
                         "task; with several tasks (config tasks) they are not supported")
    _check_fusion_modalities(model_config, fusion, encoders)
    heads = {}
    for name in sorted(task_heads):
        head_config, outputs = task_heads[name]
        heads[name] = build_module(HEADS, ml_collections.ConfigDict(dict(head_config)), f"tasks.{name}.head",
                                   dtype, num_classes=outputs)()
    return MultimodalModel(encoders=encoders, fusion=fusion(), head=None, heads=heads,
                           modality_dropout=_modality_dropout(model_config), learned_log_vars=learned_log_vars)


def _check_fusion_modalities(model_config, fusion, encoders) -> None:
    needed = getattr(fusion.func, "min_modalities", 1)
    if len(encoders) < needed:
        raise ValueError(
            f"config model.fusion.name={model_config.fusion.name!r} needs at least {needed} modalities, but "
            f"model.encoders has {len(encoders)} ({sorted(encoders)}); use 'concat' for a single-modality model"
        )
    if getattr(fusion.func, "conditions_encoders", False):
        fusion.func.check_encoders(fusion.keywords, encoders)


def _build_two_tower(model_config, encoders, dtype) -> nn.Module:
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
