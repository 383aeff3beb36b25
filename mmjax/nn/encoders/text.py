"""Text encoders over token ids `[B, L]` (int; `pad_id` marks padding). Output `EncoderOutput` with the `[B, L]` mask.

`TextTransformer` covers BERT-style encoders (post-LN, embedding LayerNorm, token types, CLS or mean pooling) and
CLIP-style ones (pre-LN, `causal=True`, pooling at the last real token, "eot"). Parameter names (`token_embed`,
`position_embed`, `type_embed`, `ln_embed`, `encoder`) are what `mmjax.nn.pretrained.load_hf_bert` fills.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype, EncoderOutput, check_rank
from mmjax.nn.transformer import LAYER_NORM_EPS, Transformer, masked_mean
from mmjax.registry import ENCODERS

POOLS = ("cls", "mean", "eot")


def last_token_index(token_mask: jax.Array) -> jax.Array:
    """`[B]` index of the last real token of each row (0 for a row with none)."""
    positions = jnp.arange(token_mask.shape[1])
    return jnp.max(jnp.where(token_mask, positions, 0), axis=1)


@ENCODERS.register("text_transformer")
class TextTransformer(nn.Module):
    """Token + learned position (+ optional token-type) embeddings -> shared `Transformer` -> pooling.

    - `pre_norm=True` (default): pre-LN blocks with a final LayerNorm (ViT/CLIP style).
      `pre_norm=False`: BERT style: LayerNorm on the embeddings (`ln_embed`) and post-LN blocks.
    - `type_vocab_size > 0` adds a token-type embedding of type 0 for every token (BERT's single-segment input).
    - `pool`: "cls" (first token), "mean" (mean over real tokens) or "eot" (last real token; with `causal=True`
      it is the only token that has seen the whole text, as in CLIP).
    - Padding is `ids == pad_id`: padded tokens are masked out of attention and pooling, and their output
      tokens are zeros, so extra padding changes nothing.
    """

    vocab_size: int = 30522
    max_len: int = 128
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 1024
    pre_norm: bool = True
    causal: bool = False
    pool: str = "cls"
    pad_id: int = 0
    type_vocab_size: int = 0
    layer_norm_eps: float = LAYER_NORM_EPS
    gelu_approximate: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: str = "none"
    attention_impl: str = "auto"  # "auto": "fused" on GPU in 16-bit, else "packed"; or "flax" (see transformer.py)
    dtype: Dtype | None = None

    def _check(self, ids: jax.Array) -> None:
        name = type(self).__name__
        check_rank(name, ids, 2, "[B, L] token ids")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} expects integer token ids [B, L], got dtype {ids.dtype}")
        if ids.shape[1] > self.max_len:
            raise ValueError(
                f"{name}: sequence length L={ids.shape[1]} exceeds max_len={self.max_len} (the number of "
                "learned positions); truncate the text to max_len when tokenising"
            )
        if self.pool not in POOLS:
            raise ValueError(f"{name}: unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")

    @nn.compact
    def __call__(self, ids: jax.Array, *, train: bool) -> EncoderOutput:
        self._check(ids)
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, self.width, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype, name=name
        )
        mask = ids != self.pad_id
        x = embed(self.vocab_size, "token_embed")(ids)
        x = x + embed(self.max_len, "position_embed")(jnp.arange(ids.shape[1]))[None]
        if self.type_vocab_size > 0:
            x = x + embed(self.type_vocab_size, "type_embed")(jnp.zeros_like(ids))
        if not self.pre_norm:
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="ln_embed")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Transformer(
            num_layers=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            pre_norm=self.pre_norm,
            causal=self.causal,
            layer_norm_eps=self.layer_norm_eps,
            gelu_approximate=self.gelu_approximate,
            remat=self.remat,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name="encoder",
        )(x, mask, train=train)
        tokens = x * mask[..., None].astype(x.dtype)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "mean":
            pooled = masked_mean(tokens, mask)
        else:
            pooled = jnp.take_along_axis(tokens, last_token_index(mask)[:, None, None], axis=1)[:, 0]
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=mask)


@ENCODERS.register("minilm_l6")
class MiniLML6(TextTransformer):
    """The all-MiniLM-L6-v2 architecture (a 6-layer, 384-wide BERT with mean pooling).

    Load its weights with `mmjax.nn.pretrained.load_minilm()`; the sentence embedding of sentence-transformers is
    `pooled` L2-normalised (see `mmjax.nn.pretrained.embed_sentences`).
    """

    vocab_size: int = 30522
    max_len: int = 512
    width: int = 384
    depth: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    pre_norm: bool = False
    pool: str = "mean"
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    gelu_approximate: bool = False
