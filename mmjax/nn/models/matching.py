"""Image–text matching (ITM) model with in-batch hard negatives, as in ALBEF (Li, Selvaraju, Gotmare, Joty, Xiong,
Hoi, "Align before Fuse: Vision and Language Representation Learning with Momentum Distillation", NeurIPS 2021)
and BLIP (Li et al. 2022).

`MatchingModel` has two parts that share the encoders:

* a dual encoder, as `mmjax.nn.models.two_tower.TwoTower`: each tower (`image`, `text`: any registered encoders) is
  followed by a bias-free projection to `embed_dim` (`proj_image`, `proj_text`) and L2 normalisation, with a
  learned log-temperature `logit_scale` (for the ITC / CLIP loss of the `itm` task, `mmjax.tasks.itm`);
* a cross-encoder fusion head (`ITMHead`, `itm_head`): the text tokens projected to `fusion_dim` attend to the
  image tokens projected to `fusion_dim` (the image's pooled summary first, then its tokens, LayerNormed) through
  `num_layers` x (a self-attention block over the text, then a cross-attention block to the image), pre-LN
  `TransformerBlock`s; text padding is masked out of queries and keys, image tokens are all valid (or follow the
  encoder's mask). The first text token ([CLS], `pool="cls"`, as in ALBEF) or the masked mean over the real
  tokens (`pool="mean"`) goes through a final LayerNorm and `Dense(1)`: the ITM logit (matched vs mismatched).

Outputs of `__call__(batch, train=...)`:

* always `image [B, D]`, `text [B, D]` (or `[B, K, D]` for `text [B, K, L]`, several captions per image) unit
  float32 embeddings and `logit_scale ()`;
* `train=True` (ALBEF's hard-negative mining): for each image i a negative text j != i is drawn from the GLOBAL
  batch with probability softmax_j(scale * <x_i, y_j>) over j != i, and for each text i a negative image likewise
  (`sample_negatives`; similarities under stop-gradient; scale = exp(logit_scale) clamped at 100 as in CLIP). The
  draws use `make_rng("dropout")` (the train step's rng), so they are deterministic given that rng and identical on
  any number of devices (inside `jit` the arrays are the global batch). `itm_logits [B, 3]` holds, per example i,
  the logits of (image i, text i), (image i, its negative text), (its negative image, text i), and
  `negative_text_index [B]` / `negative_image_index [B]` the sampled indices. With `text [B, K, L]` the first
  caption is used. Negatives are chosen by INDEX: a text j != i identical to text i (a duplicated caption) or an
  image equal to image i is still taken as a negative (a false negative, as in ALBEF); when every other text is
  identical to text i all j != i are equally likely. The global batch must hold at least 2 examples.
* `train=False`: `itm_logits` scores each image with each of its own captions: `[B]` for `text [B, L]`, `[B, K]`
  for `text [B, K, L]`; when the batch has hard-negative captions `negatives [B, N, L]`, also their embeddings
  `negatives [B, N, D]` (encoded by the text tower, as TwoTower's `aliases`) and `negatives_itm_logits [B, N]`.
  The cross-encoder runs on each (image, caption) pair, repeating the image's projected tokens K (or N) times.
  (`negatives` in a training batch are ignored.)

Each encoder runs once per batch (plus once for `negatives`); the fusion head projects the image tokens once and
reuses them for every pair. `embed(modality, x)` gives one tower's unit embeddings (as `TwoTower.embed`; used for
zero-shot classification by class prompts).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype, EncoderOutput
from mmjax.nn.models.two_tower import CLIP_LOGIT_SCALE_INIT, FEATURE_RANKS, MAX_LOGIT_SCALE, l2_normalize
from mmjax.nn.transformer import LAYER_NORM_EPS, TransformerBlock, attention_mask, masked_mean

POOLS = ("cls", "mean")
TOWERS = ("image", "text")
# `config.model.matching` fields (`MatchingModel` fields besides the encoders and the dtype).
FIELDS = ("embed_dim", "fusion_dim", "num_layers", "num_heads", "mlp_dim", "pool", "dropout", "attention_dropout",
          "logit_scale_init", "attention_impl")


def sample_negatives(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """`[B, B]` logits -> `[B]` int32: for each row i an index j != i drawn with probability
    softmax over j != i of `logits[i, j]` (the diagonal is excluded; no gradient flows through `logits`).

    Plain jnp on the whole matrix: under `jit` it draws the same indices however the batch is sharded.
    """
    b = logits.shape[0]
    if logits.shape != (b, b) or b < 2:
        raise ValueError(f"sample_negatives: needs a square [B, B] matrix with B >= 2, got shape {logits.shape}")
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    logits = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class ITMHead(nn.Module):
    """Cross-encoder: text queries attend to image context; `__call__` -> one float32 ITM logit per pair `[P]`.

    `text_queries` and `image_context` project (once per text / image) to `dim`; `__call__` runs the blocks on
    already paired `[P, L, dim]` queries and `[P, T, dim]` context.
    """

    dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    pool: str = "cls"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype | None = None

    def setup(self):
        if self.pool not in POOLS:
            raise ValueError(f"ITMHead: unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
        self.proj_text = nn.Dense(self.dim, dtype=self.dtype)
        self.proj_image = nn.Dense(self.dim, dtype=self.dtype)
        self.ln_image = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype)

        def block():
            return TransformerBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.dim,
                                    dropout=self.dropout, attention_dropout=self.attention_dropout,
                                    attention_impl=self.attention_impl, dtype=self.dtype)

        self.self_attention = [block() for _ in range(self.num_layers)]
        self.cross_attention = [block() for _ in range(self.num_layers)]
        self.ln_final = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype)
        self.itm = nn.Dense(1, dtype=self.dtype)

    def text_queries(self, tokens: jax.Array) -> jax.Array:
        return self.proj_text(tokens)

    def image_context(self, image: EncoderOutput) -> tuple[jax.Array, jax.Array | None]:
        """`[B, 1 + T, dim]` context (pooled summary, then the tokens) and its `[B, 1 + T]` mask (or None)."""
        tokens = jnp.concatenate([image.pooled[:, None].astype(image.tokens.dtype), image.tokens], axis=1)
        mask = None
        if image.mask is not None:
            mask = jnp.concatenate([jnp.ones(image.mask.shape[:1] + (1,), bool), jnp.asarray(image.mask, bool)], 1)
        return self.ln_image(self.proj_image(tokens)), mask

    def __call__(self, queries: jax.Array, query_mask: jax.Array, context: jax.Array, context_mask: jax.Array | None,
                 *, train: bool) -> jax.Array:
        self_mask = attention_mask(query_mask, query_mask)
        cross_mask = attention_mask(query_mask, context_mask)
        x = queries
        for self_block, cross_block in zip(self.self_attention, self.cross_attention):
            x = self_block(x, self_mask, None, not train)
            x = cross_block(x, cross_mask, context, not train)
        x = self.ln_final(x)
        pooled = x[:, 0] if self.pool == "cls" else masked_mean(x, query_mask)
        return self.itm(pooled)[:, 0].astype(jnp.float32)


class MatchingModel(nn.Module):
    """`{"image": [B, H, W, C], "text": [B, (K,) L] (, "negatives": [B, N, L])}` -> embeddings and ITM logits
    (see the module docstring). `encoders` must be exactly {"image": ..., "text": ...}."""

    encoders: Mapping[str, nn.Module]
    embed_dim: int = 256
    fusion_dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None  # Fusion blocks' MLP width (None = 4 x fusion_dim).
    pool: str = "cls"  # Fusion summary: first text token ("cls") or masked mean ("mean").
    dropout: float = 0.0  # Fusion blocks' dropout rates (the encoders have their own).
    attention_dropout: float = 0.0
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    attention_impl: str = "auto"
    dtype: Dtype | None = None

    # Extra batch keys encoded when present (the train loop feeds them at evaluation, as for TwoTower).
    aliases: ClassVar[Mapping[str, str]] = types.MappingProxyType({"negatives": "text"})

    def setup(self):
        if sorted(self.encoders) != sorted(TOWERS):
            raise ValueError(f"MatchingModel needs exactly the encoders {list(TOWERS)}, got {sorted(self.encoders)}")
        self.proj_image = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
        self.proj_text = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
        self.itm_head = ITMHead(dim=self.fusion_dim, num_layers=self.num_layers, num_heads=self.num_heads,
                                mlp_dim=self.mlp_dim, pool=self.pool, dropout=self.dropout,
                                attention_dropout=self.attention_dropout, attention_impl=self.attention_impl,
                                dtype=self.dtype)

    def _encode(self, modality: str, x: jax.Array, train: bool):
        """(EncoderOutput of the flattened inputs, unit embeddings `[*leading, D]`, leading axes)."""
        rank = FEATURE_RANKS[modality]
        if x.ndim < rank + 1:
            raise ValueError(f"MatchingModel: {modality} input of shape {x.shape} needs a batch axis and {rank} more")
        leading = tuple(x.shape[: x.ndim - rank])
        out = self.encoders[modality](x.reshape((-1, *x.shape[x.ndim - rank:])), train=train)
        projection = self.proj_image if modality == "image" else self.proj_text
        embeddings = l2_normalize(projection(out.pooled)).reshape((*leading, self.embed_dim))
        return out, embeddings, leading

    def embed(self, modality: str, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Unit-norm float32 embeddings of one tower's inputs (any leading axes), as `TwoTower.embed` (the train
        loop's zero-shot evaluation calls it with `method="embed"`)."""
        if modality not in TOWERS:
            raise KeyError(f"MatchingModel has no {modality!r} tower; towers: {list(TOWERS)}")
        return self._encode(modality, x, train)[1]

    def _text_pairs(self, text: EncoderOutput) -> tuple[jax.Array, jax.Array]:
        """Projected text queries `[P, L, F]` and their `[P, L]` token mask (all ones when the encoder has none)."""
        mask = jnp.asarray(text.mask) if text.mask is not None else jnp.ones(text.tokens.shape[:2], bool)
        return self.itm_head.text_queries(text.tokens), mask

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        missing = [m for m in TOWERS if m not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; the matching model needs {list(TOWERS)} and the batch has "
                           f"keys {sorted(batch)}")
        image, x, image_leading = self._encode("image", batch["image"], train)
        if len(image_leading) != 1:
            raise ValueError(f"MatchingModel: image must be [B, H, W, C], got shape {batch['image'].shape}")
        text, y, text_leading = self._encode("text", batch["text"], train)
        b = x.shape[0]
        if text_leading[0] != b:
            raise ValueError(f"MatchingModel: {b} images but text of shape {batch['text'].shape}")
        outputs = {"image": x, "text": y, "logit_scale": self.logit_scale}
        context, context_mask = self.itm_head.image_context(image)  # [B, T, F], projected once.
        queries, query_mask = self._text_pairs(text)  # [B * K, L, F]
        per_image = math.prod(text_leading[1:])
        if train:
            outputs.update(self._train_pairs(x, y.reshape(b, per_image, -1)[:, 0],
                                             queries.reshape(b, per_image, *queries.shape[1:])[:, 0],
                                             query_mask.reshape(b, per_image, -1)[:, 0], context, context_mask))
            return outputs
        outputs["itm_logits"] = self._score(queries, query_mask, context, context_mask, per_image, train=False
                                            ).reshape(text_leading)
        if "negatives" in batch:
            negatives, z, leading = self._encode("text", batch["negatives"], train)
            if leading[0] != b:
                raise ValueError(f"MatchingModel: {b} images but negatives of shape {batch['negatives'].shape}")
            nq, nq_mask = self._text_pairs(negatives)
            outputs["negatives"] = z
            outputs["negatives_itm_logits"] = self._score(nq, nq_mask, context, context_mask,
                                                          math.prod(leading[1:]), train=False).reshape(leading)
        return outputs

    def _score(self, queries, query_mask, context, context_mask, per_image: int, *, train: bool) -> jax.Array:
        """ITM logits `[B * per_image]` of each image's `per_image` consecutive texts (image tokens repeated)."""
        repeat = lambda a: a if a is None or per_image == 1 else jnp.repeat(a, per_image, axis=0)  # noqa: E731
        return self.itm_head(queries, query_mask, repeat(context), repeat(context_mask), train=train)

    def _train_pairs(self, x, y, queries, query_mask, context, context_mask) -> dict[str, jax.Array]:
        """ALBEF's in-batch hard negatives over the global batch: `itm_logits [B, 3]` and the sampled indices."""
        b = x.shape[0]
        if b < 2:
            raise ValueError(f"MatchingModel: training samples in-batch negatives, so the global batch needs at "
                             f"least 2 examples, got {b}")
        if not self.has_rng("dropout"):
            raise ValueError("MatchingModel(train=True) samples in-batch hard negatives with the 'dropout' rng: "
                             "pass rngs={'dropout': key} to apply")
        text_rng, image_rng = jax.random.split(self.make_rng("dropout"))
        scale = jnp.exp(jnp.minimum(self.logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
        logits = scale * (x @ y.T)  # [B images, B texts]
        negative_text = sample_negatives(text_rng, logits)  # For image i.
        negative_image = sample_negatives(image_rng, logits.T)  # For text i.
        pair_queries = jnp.concatenate([queries, queries[negative_text], queries])
        pair_mask = jnp.concatenate([query_mask, query_mask[negative_text], query_mask])
        pair_context = jnp.concatenate([context, context, context[negative_image]])
        pair_context_mask = None
        if context_mask is not None:
            pair_context_mask = jnp.concatenate([context_mask, context_mask, context_mask[negative_image]])
        itm = self.itm_head(pair_queries, pair_mask, pair_context, pair_context_mask, train=True)
        return {"itm_logits": itm.reshape(3, b).T, "negative_text_index": negative_text,
                "negative_image_index": negative_image}


def build_matching(model_config, encoders: Mapping[str, nn.Module], dtype) -> MatchingModel:
    """`MatchingModel` from `config.model` (`encoders.image`, `encoders.text`, `matching = dict(...)`)."""
    if sorted(encoders) != sorted(TOWERS):
        raise ValueError(f"config model.encoders: a matching model needs exactly the encoders {list(TOWERS)}, "
                         f"got {sorted(encoders)}")
    options = dict(model_config.get("matching", None) or {})
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"config model.matching: unknown field(s) {unknown}; valid: {sorted(FIELDS)}")
    for key in ("embed_dim", "fusion_dim", "num_layers", "num_heads"):
        value = options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config model.matching.{key}={value!r} must be a positive integer")
    mlp_dim = options.get("mlp_dim")
    if mlp_dim is not None and (isinstance(mlp_dim, bool) or not isinstance(mlp_dim, int) or mlp_dim <= 0):
        raise ValueError(f"config model.matching.mlp_dim={mlp_dim!r} must be a positive integer (or None)")
    fusion_dim = options.get("fusion_dim", MatchingModel.fusion_dim)
    num_heads = options.get("num_heads", MatchingModel.num_heads)
    if fusion_dim % num_heads:
        raise ValueError(f"config model.matching: fusion_dim={fusion_dim} is not divisible by num_heads={num_heads}")
    if options.get("pool", "cls") not in POOLS:
        raise ValueError(f"config model.matching.pool={options['pool']!r}; valid: {', '.join(POOLS)}")
    for key in ("dropout", "attention_dropout"):
        if not 0.0 <= options.get(key, 0.0) < 1.0:
            raise ValueError(f"config model.matching.{key}={options[key]} must be in [0, 1)")
    return MatchingModel(encoders=dict(encoders), dtype=jnp.dtype(dtype) if dtype else None, **options)
