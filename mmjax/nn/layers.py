"""Small building blocks shared by encoders and heads."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

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
