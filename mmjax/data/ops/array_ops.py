"""Ops for any key: standardize and cast."""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.audio_features import standardize
from mmjax.data.ops.op_base import Op, register


@register("standardize")
@dataclasses.dataclass(frozen=True)
class Standardize(Op):
    """float32 `(x - mean(x)) / (std(x) + eps)` over the whole value (e.g. a per-utterance normalised log-mel)."""

    eps: float = 1e-5

    def __call__(self, value):
        return standardize(value, self.eps)


@register("cast")
@dataclasses.dataclass(frozen=True)
class Cast(Op):
    """The value as a numpy array of `dtype` (e.g. `cast("int32")` for class ids)."""

    dtype: str

    def __post_init__(self):
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"cast: {self.dtype!r} is not a numpy dtype") from None

    def __call__(self, value):
        return np.asarray(value).astype(self.dtype)
