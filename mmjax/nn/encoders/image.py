"""Image encoders. Input `[B, H, W, C]` (uint8 pixels or floats); output `EncoderOutput`."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype, EncoderOutput, check_rank, to_dtype
from mmjax.nn.conv import Conv
from mmjax.registry import ENCODERS


@ENCODERS.register("small_cnn")
class SmallCNN(nn.Module):
    """LeNet-like CNN for small images (e.g. 8x8 digits): 3x3 convs + ReLU, 2x2 max-pool after each `pool_after`.

    Tokens are the last feature map's positions projected to `width`; the pooled feature is a dense layer over
    the flattened map (position matters for small digits, so it is not a mean of the tokens).
    """

    features: Sequence[int] = (32, 64)
    pool_after: Sequence[int] = (1,)
    width: int = 128
    dropout: float = 0.0
    conv_impl: str = "auto"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> EncoderOutput:
        check_rank("small_cnn", x, 4, "[B, H, W, C]")
        x = to_dtype(x, self.dtype)
        for i, features in enumerate(self.features):
            x = nn.relu(Conv(features, (3, 3), impl=self.conv_impl, dtype=self.dtype)(x))
            if i in self.pool_after:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        batch, height, width, channels = x.shape
        tokens = nn.Dense(self.width, dtype=self.dtype, name="token_proj")(x.reshape(batch, height * width, channels))
        pooled = nn.relu(nn.Dense(self.width, dtype=self.dtype, name="pool_proj")(x.reshape(batch, -1)))
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return EncoderOutput(tokens=tokens, pooled=pooled)
