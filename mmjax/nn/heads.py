"""Heads: map fused features to the task's outputs."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype
from mmjax.nn.layers import MLP
from mmjax.registry import HEADS


@HEADS.register("classifier")
class ClassifierHead(nn.Module):
    """An MLP ending in `num_classes` logits (kept in float32 for a stable softmax)."""

    num_classes: int
    hidden: Sequence[int] = ()
    dropout: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = MLP(self.hidden, dropout=self.dropout, dtype=self.dtype)(x, train=train)
        return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


@HEADS.register("regressor")
class RegressorHead(ClassifierHead):
    """An MLP ending in `num_classes` real-valued outputs (the regression targets), in float32."""
