"""Types and small helpers shared by layers, encoders, fusion modules, heads and models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


@flax.struct.dataclass
class EncoderOutput:
    """What every encoder returns: token features `[B, T, D]`, a pooled summary `[B, D]` and, when some tokens are
    padding (text), their `[B, T]` mask (1 = real token; None = all real)."""

    tokens: jax.Array
    pooled: jax.Array
    mask: jax.Array | None = None


def check_rank(name: str, x: jax.Array, rank: int, layout: str) -> None:
    """Raises (at trace time, before compilation) when `x` does not have the expected rank."""
    if x.ndim != rank:
        raise ValueError(f"{name} expects input of shape {layout} (rank {rank}), got shape {tuple(x.shape)}")


def int_pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    """`(height, width)` from an int or a pair of positive ints (kernel sizes, strides, patch and image sizes)."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a (height, width) pair of them; got {value!r}")
    return int(pair[0]), int(pair[1])


def to_dtype(x: jax.Array, dtype: Dtype | None) -> jax.Array:
    """Casts integer inputs (e.g. uint8 pixels) and others to the compute dtype (default float32)."""
    return jnp.asarray(x, dtype or jnp.float32)


@contextlib.contextmanager
def config_context(where: str) -> Iterator[None]:
    """Prefixes a ValueError/TypeError raised inside (e.g. an encoder's shape check at trace time) with the config
    key of the module that raised it (`model.encoders.text: ...`), so the message says which part to fix."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if type(e) not in (ValueError, TypeError) or str(e).startswith(where):
            raise
        raise type(e)(f"{where}: {e}") from e


def frames_to_token_mask(frame_mask: jax.Array, num_tokens: int) -> jax.Array:
    """`[B, T]` frame mask (1 = a real frame; the real frames come first) -> `[B, num_tokens]` bool token mask of an
    encoder that maps the T frames to `num_tokens` tokens in time order with a uniform stride (pooling, strided
    convolutions, time patches): token t covers the frames from floor(t * T / num_tokens) on and is real when that
    first frame is, i.e. when t * T < length * num_tokens with `length` the number of real frames."""
    frames = frame_mask.shape[1]
    lengths = jnp.sum(jnp.asarray(frame_mask) > 0, axis=1).astype(jnp.int32)
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    return tokens[None, :] * frames < lengths[:, None] * num_tokens
