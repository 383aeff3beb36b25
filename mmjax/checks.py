"""Small value checks shared by every layer: the messages name the config key and say what it must be."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """An integer or a float (Python or numpy), not a bool."""
    return is_int(value) or isinstance(value, (float, np.floating))


def check_number(section: Mapping[str, Any], key: str, *, low: float, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> None:
    """`section[key]` (when present) is a number (an int with `integer`) in `[low, high)` (`(low, high)` with
    `low_open`); `key` is the dotted config key the error names, its last part the key in `section`."""
    name = key.split(".")[-1]
    if name not in section:
        return
    value = section[name]
    kind = "an integer" if integer else "a number"
    if not (is_int(value) if integer else is_number(value)):
        raise ValueError(f"config {key}={value!r} must be {kind}, got {type(value).__name__}")
    below = value <= low if low_open else value < low
    if below or (high is not None and value >= high):
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g})'}"
        raise ValueError(f"config {key}={value!r} must be in {bounds}")


def check_positive_int(value: Any, key: str) -> None:
    if not is_int(value) or value <= 0:
        raise ValueError(f"config {key}={value!r} must be a positive integer")


def check_strings(value: Any, key: str, example: str) -> tuple[str, ...]:
    """A tuple/list of strings (a bare string would be iterated character by character)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"config {key}={value!r} must be a tuple of strings, e.g. {example}")
    return tuple(value)
