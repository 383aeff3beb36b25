"""Small building blocks shared by encoders and heads."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype


class MLP(nn.Module):
    """Dense -> GELU -> dropout, once per hidden width; then an optional output projection."""

    hidden: Sequence[int]
    out: int | None = None
    dropout: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for width in self.hidden:
            x = nn.gelu(nn.Dense(width, dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        if self.out is not None:
            x = nn.Dense(self.out, dtype=self.dtype)(x)
        return x


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 and SAME padding over `[B, H, W, C]`, equal to `nn.max_pool`.

    Written as a reshape + max so that its gradient is an elementwise mask: XLA's select-and-scatter gradient
    of `nn.max_pool` was measured ~4x slower on CPU (49x40x16, batch 64: 24 ms vs 5 ms).
    """
    batch, height, width, channels = x.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(batch, (height + pad_h) // 2, 2, (width + pad_w) // 2, 2, channels).max(axis=(2, 4))
