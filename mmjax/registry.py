"""Named registries: encoders, fusions, heads, datasets, ... are found by the name a config gives.

An unknown name fails with the list of valid names and the closest match, before anything is compiled.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


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
        close = difflib.get_close_matches(str(name), self._items, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


# The project's registries. Modules register themselves when imported; `mmjax.nn.model` imports all of them.
ENCODERS: Registry = Registry("encoder")
FUSIONS: Registry = Registry("fusion")
HEADS: Registry = Registry("head")
DATASETS: Registry = Registry("dataset")
