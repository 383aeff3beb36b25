"""FiLM conditioning of an encoder's intermediate features (Perez, Strub, de Vries, Dumoulin, Courville, "FiLM:
Visual Reasoning with a General Conditioning Layer", AAAI 2018).

FiLM(F_{i,c} | gamma_{i,c}, beta_{i,c}) = gamma_{i,c} F_{i,c} + beta_{i,c}: every channel c of layer i's feature
map is scaled and shifted by values that another input (here another modality) produced for example i.

An encoder that can be conditioned declares `film_channels()` (the channel count of each conditioned layer, in
order) and takes `film=` in its `__call__`: a tuple with one `(gamma [B, C_l], beta [B, C_l])` pair per layer, or
None (the encoder's ordinary forward pass, bit for bit). `mmjax.nn.fusion.FilmFusion` produces the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.conv import Conv
from mmjax.nn.layers import relu_max_pool_2x2

Film = Sequence[tuple[jax.Array, jax.Array]] | None


def check_film(name: str, film: Film, channels: Sequence[int], batch: int) -> None:
    """`film` has one `(gamma, beta)` pair of shape `[batch, C_l]` per conditioned layer (trace-time check)."""
    if film is None:
        return
    if len(film) != len(channels):
        raise ValueError(f"{name}: FiLM needs {len(channels)} (gamma, beta) pairs (one per conditioned layer, "
                         f"channels {tuple(channels)}), got {len(film)}")
    for i, ((gamma, beta), c) in enumerate(zip(film, channels)):
        if tuple(gamma.shape) != (batch, c) or tuple(beta.shape) != (batch, c):
            raise ValueError(f"{name}: FiLM layer {i} needs gamma and beta of shape [B, C] = ({batch}, {c}), got "
                             f"{tuple(gamma.shape)} and {tuple(beta.shape)}")


def film_layer(x: jax.Array, film: Film, index: int) -> jax.Array:
    """`gamma * x + beta` per example and channel for `x [B, ..., C]` (unchanged when `film` is None)."""
    if film is None:
        return x
    gamma, beta = film[index]
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return x * jnp.reshape(gamma, shape).astype(x.dtype) + jnp.reshape(beta, shape).astype(x.dtype)


class FilmConvReluPool(Conv):
    """`Conv` -> FiLM -> ReLU -> 2x2 max-pool: `ConvReluPool` with FiLM before the ReLU. A `Conv` subclass, so its
    parameters (`kernel`, `bias` under its name) are exactly those of the unconditioned layer."""

    @nn.compact
    def __call__(self, inputs: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
        y = film_layer(super().__call__(inputs), ((gamma, beta),), 0)
        return relu_max_pool_2x2(y)
