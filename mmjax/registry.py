"""Named registries: encoders, fusions, heads, datasets, ... are found by the name a config gives.

An unknown name fails with the list of valid names and the closest match, before anything is compiled.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


def closest(value: object, valid: Iterable[str]) -> str:
    """` Did you mean 'x'?` for the valid name closest to `value` (difflib), or "" when none is close."""
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def invalid_choice(key: str, value: object, valid: Sequence[str]) -> str:
    """The message for a config value outside a fixed set: `config KEY='x'; valid: a, b. Did you mean 'a'?`."""
    return f"config {key}={value!r}; valid: {', '.join(valid)}.{closest(value, valid)}"


class Registry(Generic[T]):
    """A name -> object table with helpful errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that records `obj` under `name`; registering a name twice is an error."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        hint = closest(name, self._items)
        return f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


# The project's registries. Modules register themselves when imported; `mmjax.nn.builder` imports the model parts.
ENCODERS: Registry = Registry("encoder")
FUSIONS: Registry = Registry("fusion")
HEADS: Registry = Registry("head")
DATASETS: Registry = Registry("dataset")
PREPROCESS_OPS: Registry = Registry("preprocessing op")  # mmjax.data.ops: the ops of `config.data.preprocess`.
