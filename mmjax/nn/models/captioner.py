"""A causal text decoder over the tokens of any encoders: captioning (CoCa, Yu et al. 2022, "CoCa: Contrastive
Captioners are Image-Text Foundation Models") and prefix-LM generation (PaliGemma, Beyer et al. 2024; the prefix-LM
of T5 / SimVLM), with the optional CoCa contrastive head.

`Captioner` encodes the modalities of `condition` (any registered encoders; several at once), projects each one's
tokens to the decoder width, adds a learned per-modality embedding and concatenates them into the *conditioning
tokens*; their mask combines the encoder's token mask, the per-example modality mask `<modality>_mask [B]` (0 =
the modality is missing for that example, as in `MultimodalModel`) and, for variable-length input padded to one
length (speech), the tokens that cover only padding frames (`<modality>_frame_mask [B, frames]`, mapped to the
encoder's tokens by `frames_to_token_mask`). The decoder (`TransformerBlock`s, pre-LN,
tied input/output token embedding, learned positions over `max_len` prompt + text tokens) then reads them:

* `mode="cross"` (CoCa / captioning style): each layer is a causal self-attention block over the text followed by
  a cross-attention block whose keys and values are the conditioning tokens;
* `mode="prefix"` (PaliGemma style): the sequence is [conditioning tokens, prompt, text]; the conditioning tokens
  and the prompt form a bidirectional prefix, the text attends to the prefix and causally to itself.

An optional text prompt (`prompt [B, P]`, 0 = padding; e.g. a question) precedes the text in both modes (causal in
`cross` mode). Text ids follow the tokenizer's layout [BOS] words [EOS] [PAD]...: `__call__` is teacher-forced
(inputs `text[:, :-1]`, targets `text[:, 1:]`, padding targets masked) and returns float32 `logits [B, L-1, V]`,
`targets`, `target_mask`; with `embed_dim > 0` (CoCa) also the unit embeddings of `contrastive` = (conditioning
modality, text encoder modality) and `logit_scale`, read by the `caption` task's contrastive term. Generation
(greedy, beam, sampling, with or without the key/value cache) is in `mmjax.nn.decoding`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data.core import frame_mask_key
from mmjax.nn.common import Dtype, config_context, frames_to_token_mask
from mmjax.nn.models.two_tower import CLIP_LOGIT_SCALE_INIT, FEATURE_RANKS, l2_normalize
from mmjax.nn.transformer import LAYER_NORM_EPS, TransformerBlock

MODES = ("cross", "prefix")
TEXT_KEY = "text"
PROMPT_KEY = "prompt"


def prefix_lm_mask(query_positions: jax.Array, key_valid: jax.Array, key_prefix: jax.Array) -> jax.Array:
    """`[B, 1, Tq, S]` attention mask of a prefix-LM: query at absolute position q sees key k when k is a real token
    and either belongs to the bidirectional prefix or is not after q (plain causal masking when no key is prefix).

    `query_positions [Tq]`, `key_valid [B, S]`, `key_prefix [B, S]` (booleans).
    """
    keys = jnp.arange(key_valid.shape[1])
    visible = key_prefix[:, None, :] | (keys[None, None, :] <= query_positions[None, :, None])
    return (visible & key_valid[:, None, :])[:, None]


class Captioner(nn.Module):
    """`{modality: [B, ...], "text": [B, (K,) L] (, "prompt": [B, P])}` -> teacher-forced logits (module docstring).

    `condition`: the modalities the decoder reads (each must have an encoder); `contrastive`: (conditioning
    modality, text-encoder modality) for CoCa's contrastive term (`embed_dim > 0`).
    """

    encoders: Mapping[str, nn.Module]
    condition: Sequence[str] = ("image",)
    mode: str = "cross"
    vocab_size: int = 64
    max_len: int = 32
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    pad_id: int = 0
    use_prompt: bool = False  # Read the batch's `prompt` (e.g. a question) before the text.
    embed_dim: int = 0
    contrastive: Sequence[str] = ("image", "text")
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    dtype: Dtype | None = None

    def setup(self):
        if self.mode not in MODES:
            raise ValueError(f"Captioner: unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        missing = [m for m in self.condition if m not in self.encoders]
        if missing or not self.condition:
            raise ValueError(f"Captioner: condition {list(self.condition)} names modalities without an encoder "
                             f"{missing}; encoders: {sorted(self.encoders)}")
        self.projections = {m: nn.Dense(self.width, dtype=self.dtype, name=f"proj_{m}") for m in self.condition}
        self.modality_embedding = self.param("modality_embedding", nn.initializers.normal(0.02),
                                             (len(self.condition), self.width))
        self.ln_context = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype)
        self.token_embedding = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                                        dtype=self.dtype)
        self.position_embedding = self.param("position_embedding", nn.initializers.normal(0.02),
                                             (self.max_len, self.width))

        def block():
            return TransformerBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
                                    dropout=self.dropout, attention_impl="packed", dtype=self.dtype)

        self.self_blocks = [block() for _ in range(self.depth)]
        self.cross_blocks = [block() for _ in range(self.depth)] if self.mode == "cross" else []
        self.ln_final = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype)
        if self.embed_dim:
            self.contrastive_projections = {
                m: nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name=f"embed_{m}")
                for m in self.contrastive}
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Batch keys the model reads besides its encoders' modalities (the train loop feeds them)."""
        return (TEXT_KEY, PROMPT_KEY) if self.use_prompt else (TEXT_KEY,)

    # ------------------------------------------------------------------------------------------ conditioning

    def encode(self, batch: Mapping[str, jax.Array], *, train: bool = False):
        """Conditioning tokens `[B, T, width]`, their `[B, T]` bool mask and each encoder's pooled features."""
        tokens, masks, pooled = [], [], {}
        for i, m in enumerate(self.condition):
            if m not in batch:
                raise KeyError(f"batch is missing modality {m!r} that the decoder conditions on; batch keys "
                               f"{sorted(batch)}")
            with config_context(f"model.encoders.{m}"):
                out = self.encoders[m](batch[m], train=train)
            pooled[m] = out.pooled
            x = self.projections[m](out.tokens) + self.modality_embedding[i].astype(out.tokens.dtype)
            mask = jnp.ones(x.shape[:2], bool) if out.mask is None else jnp.asarray(out.mask, bool)
            if f"{m}_mask" in batch:  # The modality is missing for some examples.
                mask = mask & (jnp.asarray(batch[f"{m}_mask"]) > 0)[:, None]
            if frame_mask_key(m) in batch:  # Variable-length input padded to one length (speech).
                mask = mask & frames_to_token_mask(batch[frame_mask_key(m)], x.shape[1])
            tokens.append(x)
            masks.append(mask)
        return self.ln_context(jnp.concatenate(tokens, axis=1)), jnp.concatenate(masks, axis=1), pooled

    # --------------------------------------------------------------------------------------------- decoder

    def sequence_layout(self, context_mask: jax.Array, prompt_valid: jax.Array, length: int):
        """Key validity and prefix flags `[B, S]` of the decoder sequence: [context (prefix mode), prompt, text of
        `length` tokens]. Text tokens count as valid (later ones are hidden by causality)."""
        b = context_mask.shape[0]
        text = jnp.ones((b, length), bool)
        if self.mode == "prefix":
            valid = jnp.concatenate([context_mask, prompt_valid, text], axis=1)
            prefix = jnp.concatenate([jnp.ones_like(context_mask), jnp.ones_like(prompt_valid),
                                      jnp.zeros_like(text)], axis=1)
        else:
            valid = jnp.concatenate([prompt_valid, text], axis=1)
            prefix = jnp.zeros_like(valid)
        return valid, prefix

    def context_length(self, context: jax.Array) -> int:
        """Decoder positions the conditioning tokens occupy (the prefix in `prefix` mode; none in `cross`)."""
        return context.shape[1] if self.mode == "prefix" else 0

    def decode(self, ids: jax.Array, start: jax.Array | int, context: jax.Array, context_mask: jax.Array,
               key_valid: jax.Array, key_prefix: jax.Array, *, train: bool = False, decode: bool = False,
               with_context: bool = False) -> jax.Array:
        """float32 logits `[B, T, V]` of text/prompt ids `[B, T]` at text positions `start ...` (0 = the first prompt
        token); in prefix mode, `with_context=True` puts the conditioning tokens first (the full sequence, or the
        prefill of the cache). `key_valid` / `key_prefix` `[B, S]` describe every key position (`sequence_layout`):
        the full sequence, or the whole cache with `decode=True` (then the cache holds the earlier positions)."""
        t = ids.shape[1]
        offset = self.context_length(context)
        x = self.token_embedding(ids) + jax.lax.dynamic_slice_in_dim(
            self.position_embedding, start, t).astype(self.dtype or jnp.float32)
        positions = offset + start + jnp.arange(t)
        if with_context and self.mode == "prefix":
            x = jnp.concatenate([context.astype(x.dtype), x], axis=1)
            positions = jnp.concatenate([jnp.arange(offset), positions])
        mask = prefix_lm_mask(positions, key_valid, key_prefix)
        cross_mask = context_mask[:, None, None, :]
        for i, self_block in enumerate(self.self_blocks):
            x = self_block(x, mask, None, not train, decode)
            if self.mode == "cross":
                x = self.cross_blocks[i](x, cross_mask, context, not train)
        x = self.ln_final(x)
        if with_context and self.mode == "prefix":
            x = x[:, offset:]
        return self.token_embedding.attend(x).astype(jnp.float32)

    # ------------------------------------------------------------------------------------------- training

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        if TEXT_KEY not in batch:
            raise KeyError(f"batch has no {TEXT_KEY!r} (the captions the decoder learns); keys {sorted(batch)}")
        text = batch[TEXT_KEY]
        text = text[:, 0] if text.ndim == 3 else text  # Several captions per example at evaluation: the first.
        if text.shape[1] < 2:
            raise ValueError(f"Captioner: text of shape {text.shape} needs at least 2 tokens ([BOS], [EOS])")
        context, context_mask, pooled = self.encode(batch, train=train)
        prompt = batch.get(PROMPT_KEY)
        prompt = jnp.zeros((text.shape[0], 0), text.dtype) if prompt is None else prompt
        if prompt.shape[1] + text.shape[1] - 1 > self.max_len:
            raise ValueError(f"Captioner: prompt ({prompt.shape[1]}) + text ({text.shape[1] - 1}) tokens exceed the "
                             f"decoder's max_len={self.max_len}")
        inputs, targets = text[:, :-1], text[:, 1:]
        ids = jnp.concatenate([prompt, inputs], axis=1)
        key_valid, key_prefix = self.sequence_layout(context_mask, prompt != self.pad_id, inputs.shape[1])
        logits = self.decode(ids, 0, context, context_mask, key_valid, key_prefix, train=train, with_context=True)
        outputs = {"logits": logits[:, prompt.shape[1]:], "targets": targets, "target_mask": targets != self.pad_id}
        if self.embed_dim:
            outputs.update(self._contrastive(batch, pooled, train))
        return outputs

    def _contrastive(self, batch, pooled, train: bool) -> dict[str, jax.Array]:
        """CoCa's contrastive embeddings: the conditioning encoder's pooled features and a text encoder's."""
        first, second = self.contrastive
        embeddings = {}
        for m in (first, second):
            if m in pooled:
                features = pooled[m]
            else:
                x = batch[m]
                x = x[:, 0] if x.ndim == FEATURE_RANKS.get(m, 1) + 2 else x  # The first caption.
                with config_context(f"model.encoders.{m}"):
                    features = self.encoders[m](x, train=train).pooled
            embeddings[m] = l2_normalize(self.contrastive_projections[m](features))
        return {**embeddings, "logit_scale": self.logit_scale}


# `config.model.decoder` fields (`Captioner` fields besides the encoders and the dtype).
FIELDS = ("condition", "mode", "vocab_size", "max_len", "width", "depth", "num_heads", "mlp_dim", "dropout", "pad_id",
          "use_prompt", "embed_dim", "contrastive", "logit_scale_init")


def build_captioner(model_config, encoders: Mapping[str, nn.Module], dtype) -> Captioner:
    """`Captioner` from `config.model` (`encoders`, `decoder = dict(...)`), every field checked before tracing."""
    options = dict(model_config.get("decoder", None) or {})
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"config model.decoder: unknown field(s) {unknown}; valid: {sorted(FIELDS)}")
    for key in ("condition", "contrastive"):
        if key in options:
            value = options[key]
            options[key] = (value,) if isinstance(value, str) else tuple(value)
    condition = options.get("condition", Captioner.condition)
    missing = [m for m in condition if m not in encoders]
    if not condition or missing:
        raise ValueError(f"config model.decoder.condition={list(condition)}: the decoder conditions on "
                         f"{missing or 'nothing'}, but the model has no encoder for it; model.encoders has "
                         f"{sorted(encoders)}")
    if len(set(condition)) != len(condition):
        raise ValueError(f"config model.decoder.condition={list(condition)} names a modality twice")
    if options.get("mode", Captioner.mode) not in MODES:
        raise ValueError(f"config model.decoder.mode={options['mode']!r}; valid: {', '.join(MODES)}")
    for key in ("vocab_size", "max_len", "width", "depth", "num_heads"):
        value = options.get(key, getattr(Captioner, key))
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config model.decoder.{key}={value!r} must be a positive integer")
    for key in ("mlp_dim", "embed_dim"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"config model.decoder.{key}={value!r} must be a non-negative integer")
    width, heads = options.get("width", Captioner.width), options.get("num_heads", Captioner.num_heads)
    if width % heads:
        raise ValueError(f"config model.decoder: width={width} is not divisible by num_heads={heads}")
    if not 0.0 <= options.get("dropout", 0.0) < 1.0:
        raise ValueError(f"config model.decoder.dropout={options['dropout']} must be in [0, 1)")
    if not 0 <= options.get("pad_id", 0) < options.get("vocab_size", Captioner.vocab_size):
        raise ValueError(f"config model.decoder.pad_id={options['pad_id']} is not in the vocabulary")
    if options.get("embed_dim"):
        towers = options.get("contrastive", Captioner.contrastive)
        bad = [m for m in towers if m not in encoders]
        if len(towers) != 2 or bad:
            raise ValueError(f"config model.decoder.contrastive={list(towers)} must name 2 modalities with encoders "
                             f"(CoCa's contrastive pair); model.encoders has {sorted(encoders)}")
    return Captioner(encoders=dict(encoders), dtype=jnp.dtype(dtype) if dtype else None, **options)
