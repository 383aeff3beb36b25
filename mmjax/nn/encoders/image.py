"""Image encoders. Input `[B, H, W, C]` (uint8 pixels or floats); output `EncoderOutput`."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
from einops import rearrange

from mmjax.nn.common import Dtype, EncoderOutput, check_rank, to_dtype
from mmjax.nn.conv import Conv
from mmjax.nn.layers import max_pool_2x2
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
                x = max_pool_2x2(x)
        tokens = nn.Dense(self.width, dtype=self.dtype, name="token_proj")(rearrange(x, "b h w c -> b (h w) c"))
        pooled = nn.relu(nn.Dense(self.width, dtype=self.dtype, name="pool_proj")(rearrange(x, "b h w c -> b (h w c)")))
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return EncoderOutput(tokens=tokens, pooled=pooled)
