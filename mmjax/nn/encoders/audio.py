"""Audio encoders over log-mel spectrograms `[B, frames, mels]` (the pipeline computes them, see mmjax.data.audio)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from einops import rearrange

from mmjax.nn.common import Dtype, EncoderOutput, check_rank, to_dtype
from mmjax.nn.conv import Conv
from mmjax.nn.layers import max_pool_2x2
from mmjax.registry import ENCODERS


@ENCODERS.register("spectrogram_cnn")
class SpectrogramCNN(nn.Module):
    """2-D CNN over time x frequency: 3x3 conv + ReLU + 2x2 max-pool per stage.

    Tokens are the time steps of the last map (frequency folded into channels) projected to `width`; the pooled
    feature is a dense layer over the flattened map.
    """

    features: Sequence[int] = (16, 32, 64)
    width: int = 128
    dropout: float = 0.0
    conv_impl: str = "auto"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> EncoderOutput:
        check_rank("spectrogram_cnn", x, 3, "[B, frames, mels]")
        x = to_dtype(x, self.dtype)[..., None]
        for features in self.features:
            x = nn.relu(Conv(features, (3, 3), impl=self.conv_impl, dtype=self.dtype)(x))
            x = max_pool_2x2(x)
        tokens = nn.Dense(self.width, dtype=self.dtype, name="token_proj")(rearrange(x, "b t f c -> b t (f c)"))
        pooled = nn.relu(nn.Dense(self.width, dtype=self.dtype, name="pool_proj")(rearrange(x, "b t f c -> b (t f c)")))
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return EncoderOutput(tokens=tokens, pooled=pooled)
