"""Recurrent sequence encoders: LSTM / GRU over token ids `[B, L]` or feature frames `[B, T, F]`.

* `rnn`: stacked (optionally bidirectional) LSTM (Hochreiter, Schmidhuber, "Long Short-Term Memory", Neural
  Computation 1997) or GRU (Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for Statistical
  Machine Translation", EMNLP 2014) layers, built from Flax's own cells (`nn.OptimizedLSTMCell`, `nn.GRUCell`)
  scanned over time by `nn.RNN` / `nn.Bidirectional` (`jax.lax.scan` underneath).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype, EncoderOutput, to_dtype
from mmjax.nn.encoders.conditioning import Film, check_film, film_layer
from mmjax.nn.transformer import masked_mean
from mmjax.registry import ENCODERS

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}
RNN_POOLS = ("last", "mean")


@ENCODERS.register("rnn")
class RNNEncoder(nn.Module):
    """LSTM / GRU sequence encoder.

    Input: integer token ids `[B, L]` (embedded by `embed`, an `nn.Embed(vocab_size, embed_dim)`; `pad_id` marks
    padding, which tokenizers put at the end) or float feature frames `[B, T, F]` (e.g. MFCCs; every frame real).

    Each of `num_layers` layers (parameters `layer_{i}`, or `layer_{i}_fwd` and `layer_{i}_bwd`) runs a `cell`
    ("lstm": the LSTM of Hochreiter & Schmidhuber with a forget gate, h_t = o_t * tanh(c_t),
    c_t = f_t * c_{t-1} + i_t * g_t; "gru": h_t = (1 - z_t) * n_t + z_t * h_{t-1}) of `hidden` units forward in
    time, and with `bidirectional=True` another one backward (`_fwd` / `_bwd` cells, outputs concatenated: width
    2 * hidden). Dropout `dropout` is applied between layers and to the
    pooled feature.

    Padding never changes the output: each sequence's length is its number of real tokens (`seq_lengths` of
    `nn.RNN`), the backward direction starts at the last real token, outputs at padded steps are zeroed and the
    mask is returned with the tokens. Pooling (`pool`): "last" = the final state, i.e. the forward output at the
    last real step (concatenated with the backward output at the first step when bidirectional); "mean" = the mean
    of the outputs over real steps. A row with no real token gets zeros.

    FiLM (`film=`, `mmjax.nn.encoders.conditioning`): each layer's outputs are scaled and shifted per channel
    before the next layer and the pooling; `film_channels()` = one entry of `hidden` (x2 bidirectional) per layer.
    """

    cell: str = "lstm"
    hidden: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    pool: str = "last"
    vocab_size: int | None = None
    embed_dim: int = 128
    pad_id: int = 0
    dropout: float = 0.0
    dtype: Dtype | None = None

    def film_channels(self) -> tuple[int, ...]:
        return (self.hidden * (2 if self.bidirectional else 1),) * self.num_layers

    def _check(self, x: jax.Array) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"rnn: cell={self.cell!r}; valid: {', '.join(CELLS)}")
        if self.pool not in RNN_POOLS:
            raise ValueError(f"rnn: pool={self.pool!r}; valid: {', '.join(RNN_POOLS)}")
        if jnp.issubdtype(x.dtype, jnp.integer):
            if x.ndim != 2:
                raise ValueError(f"rnn expects token ids [B, L] or frames [B, T, F], got ids of shape {tuple(x.shape)}")
            if self.vocab_size is None:
                raise ValueError("rnn: token-id input needs vocab_size (the tokenizer's vocabulary size)")
        elif x.ndim != 3:
            raise ValueError(f"rnn expects frames [B, T, F] (float) or token ids [B, L] (int), got shape "
                             f"{tuple(x.shape)} of dtype {x.dtype}")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, film: Film = None) -> EncoderOutput:
        self._check(x)
        check_film("rnn", film, self.film_channels(), x.shape[0])
        if jnp.issubdtype(x.dtype, jnp.integer):
            mask = x != self.pad_id
            x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="embed")(x)
        else:
            mask = None
            x = to_dtype(x, self.dtype)
        batch, steps = x.shape[:2]
        real = jnp.ones((batch, steps), bool) if mask is None else mask
        lengths = real.sum(axis=1).astype(jnp.int32)
        cell = CELLS[self.cell]
        for i in range(self.num_layers):
            if i:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            if self.bidirectional:
                forward = nn.RNN(cell(self.hidden, dtype=self.dtype, name=f"layer_{i}_fwd"))
                backward = nn.RNN(cell(self.hidden, dtype=self.dtype, name=f"layer_{i}_bwd"))
                rnn = nn.Bidirectional(forward, backward)
            else:
                rnn = nn.RNN(cell(self.hidden, dtype=self.dtype, name=f"layer_{i}"))
            x = rnn(x, seq_lengths=lengths)
            x = film_layer(x, film, i)
            x = jnp.where(real[..., None], x, 0)  # Outputs past a sequence's end are not part of it.
        if self.pool == "mean":
            pooled = masked_mean(x, real)
        else:
            last = jnp.clip(lengths - 1, 0, steps - 1)
            pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
            if self.bidirectional:  # The backward direction ends at the first step.
                pooled = jnp.concatenate([pooled[:, : self.hidden], x[:, 0, self.hidden :]], axis=-1)
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return EncoderOutput(tokens=x, pooled=pooled, mask=mask)
