"""Text ops: tokenize (mmjax.data.tokenization) and pad_or_truncate."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mmjax.data.ops.op_base import Op, describe, positive_arg, register
from mmjax.data.tokenization import encode_texts, tokenizer_path


@register("tokenize")
@dataclasses.dataclass(frozen=True)
class Tokenize(Op):
    """Text (str or UTF-8 bytes; or a list of texts -> `[N, max_len]`) -> int32 token ids `[max_len]`, with the
    tokenizer's begin/end tokens, truncated and right-padded with its pad id. `tokenizer`: "minilm", a
    tokenizer.json path, or None for the dataset's own."""

    max_len: int = 32
    tokenizer: str | None = None

    def __post_init__(self):
        positive_arg("tokenize", "max_len", self.max_len)

    def bind(self, context):
        spec = self.tokenizer or context.tokenizer
        if not spec:
            raise ValueError("tokenize: this dataset has no tokenizer of its own; give one as "
                             "tokenize(tokenizer='minilm') or tokenize(tokenizer='/path/to/tokenizer.json')")
        return dataclasses.replace(self, tokenizer=tokenizer_path(spec)), context

    def __call__(self, value):
        if isinstance(value, (str, bytes, np.bytes_, np.str_)):
            return encode_texts(self.tokenizer, [value], self.max_len)[0]
        texts = list(np.asarray(value, dtype=object).reshape(-1))
        if not all(isinstance(t, (str, bytes, np.bytes_, np.str_)) for t in texts):
            raise ValueError(f"tokenize expects text, got {describe(value)}")
        return encode_texts(self.tokenizer, texts, self.max_len)


@register("pad_or_truncate")
@dataclasses.dataclass(frozen=True)
class PadOrTruncate(Op):
    """A sequence (e.g. token ids) -> exactly `length` items along its first axis: cut at the end, or padded at
    the end with `value`."""

    length: int
    value: Any = 0

    def __post_init__(self):
        positive_arg("pad_or_truncate", "length", self.length)

    def __call__(self, value):
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(f"pad_or_truncate expects a sequence, got {describe(value)}")
        array = array[: self.length]
        missing = self.length - array.shape[0]
        if missing:
            pad = np.full((missing, *array.shape[1:]), self.value, array.dtype)
            array = np.concatenate([array, pad])
        return array
