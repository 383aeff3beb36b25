"""The op types of preprocessing chains (`Op`, `RandomOp`), their `Context`, their registration by name, and the
argument checks and error wording every op module shares."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from mmjax.data.core import positive_int
from mmjax.registry import PREPROCESS_OPS


class PreprocessError(ValueError):
    """A preprocessing chain is invalid, or an op failed on an example; the message names the key and the op."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What ops may need to know about their input besides the value: filled in by the dataset.

    `sample_rate` of the audio (updated by `resample` for the ops after it), `num_classes` (labels) and the
    dataset's own `tokenizer` (a tokenizer.json path).
    """

    key: str = ""
    sample_rate: int | None = None
    num_classes: int | None = None
    tokenizer: str | None = None


class Op(abc.ABC):
    """A deterministic op: `op(value) -> value`. Subclasses are frozen dataclasses registered by name."""

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False

    def bind(self, context: Context) -> tuple[Op, Context]:
        """Fills defaults from the context and checks them; returns the bound op and the context after it."""
        return self, context

    @abc.abstractmethod
    def __call__(self, value):
        """The op applied to one example's value."""

    def __str__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.default is dataclasses.MISSING or value != field.default:
                parts.append(f"{field.name}={value!r}")
        return f"{self.name}({', '.join(parts)})"


class RandomOp(Op):
    """A random op: `op(value, rng) -> value`, with `rng` a `numpy.random.Generator`; training stream only."""

    random: ClassVar[bool] = True

    def eval_ops(self) -> tuple[Op, ...]:
        """The deterministic ops evaluation runs in its place (empty: the value is kept)."""
        return ()

    @abc.abstractmethod
    def __call__(self, value, rng: np.random.Generator):
        """The op applied to one example's value, drawing from `rng`."""


def register(name: str) -> Callable[[type], type]:
    """Class decorator: a frozen dataclass op registered in PREPROCESS_OPS under `name`."""

    def decorator(cls: type) -> type:
        cls.name = name
        return PREPROCESS_OPS.register(name)(cls)

    return decorator


def positive_arg(op: str, field: str, value: Any) -> int:
    """An op argument that must be a positive int (the error names the op and the argument)."""
    return positive_int(f"{op}: {field}", value)


def describe(value) -> str:
    """A short description of a value for error messages: its byte count, text, or shape and dtype."""
    if isinstance(value, (bytes, np.bytes_)):
        return f"{len(value)} bytes"
    if isinstance(value, str):
        return f"text {value[:40]!r}"
    array = np.asarray(value)
    return f"array of shape {array.shape} and dtype {array.dtype}"
