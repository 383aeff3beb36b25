"""Sweep grids and trials: `--grid KEY=[v1,...]` lists and random-search distributions, parsed and checked against
the base config exactly as `--config.KEY=value` is, and the trials they make (the product, or seeded samples)."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from mmjax import config as config_lib

DISTRIBUTIONS = ("loguniform", "uniform", "randint")
SIGNIFICANT_DIGITS = 4  # Of sampled floats: readable trial names, no loss of search resolution.


class SweepError(ValueError):
    """An invalid sweep (definition, grid, workdir or result); the message says what and how to fix it."""


def _split_items(text: str, what: str) -> list[str]:
    """Splits `a, (b, c), 'd,e'` at the commas outside brackets and quotes."""
    closing = {"(": ")", "[": "]", "{": "}"}
    items, stack, quote, start = [], [], None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in closing:
            stack.append(closing[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                raise SweepError(f"{what}: unbalanced {ch!r}")
        elif ch == "," and not stack:
            items.append(text[start:i])
            start = i + 1
    if quote or stack:
        opening = {v: k for k, v in closing.items()}
        raise SweepError(f"{what}: unclosed {quote or opening[stack[-1]]!r}")
    items = [item.strip() for item in [*items, text[start:]]]
    if items == [""]:
        return []
    if not all(items):
        raise SweepError(f"{what}: empty value between commas")
    return items


def _unquote(item: str) -> str:
    """`'a,b'` -> `a,b`: quotes only protect commas (a string key takes the text as it is otherwise)."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        try:
            value = ast.literal_eval(item)
        except (ValueError, SyntaxError):
            return item
        if isinstance(value, str):
            return value
    return item


def value_at(config: ml_collections.ConfigDict, key: str, what: str = "") -> Any:
    """The value (a dict for a group) at dotted `key`; an unknown key fails with mmjax.config's message."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            try:  # mmjax.config's own unknown-key error (close matches, valid keys).
                config_lib.override(ml_collections.ConfigDict(config.to_dict()), key, "0")
            except config_lib.ConfigError as error:
                raise SweepError(f"{what}: {error}" if what else str(error)) from None
            raise SweepError(f"{what}: unknown config key {key!r}")
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _number(text: str, what: str) -> float | int:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{what}: {text.strip()!r} is not a number")
    return value


def show(value: Any) -> str:
    """A value as the leaderboard and trial names show it."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Grid:
    """One `--grid`: a key with a list of override texts, or (random search only) a distribution."""

    key: str
    text: str  # The argument as given.
    values: tuple[str, ...] = ()  # Override texts of a list grid.
    distribution: str | None = None
    low: float = 0.0
    high: float = 0.0

    def sample(self, rng) -> str:
        """One override text drawn with the numpy Generator `rng`."""
        if self.distribution is None:
            return self.values[int(rng.integers(len(self.values)))]
        if self.distribution == "randint":
            return str(int(rng.integers(self.low, self.high + 1)))
        if self.distribution == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        value = min(max(float(f"{value:.{SIGNIFICANT_DIGITS}g}"), self.low), self.high)
        return repr(float(value))


def parse_grid(text: str, config: ml_collections.ConfigDict) -> Grid:
    """Parses `KEY=[v1,...]`, `KEY=choice(v1,...)` or `KEY=loguniform|uniform|randint(a,b)` against `config`.

    Every list value is checked by applying it to `config` (mmjax.config's parser: the key's type).
    """
    what = f"--grid {text!r}"
    key, sep, body = text.partition("=")
    key, body = key.strip(), body.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise SweepError(f"{what}: expected KEY=[v1,v2,...] (or KEY=loguniform(a,b), uniform(a,b), randint(a,b), "
                         "choice(v1,...) with --random N)")
    current = value_at(config, key, what)
    call = re.fullmatch(r"(\w+)\((.*)\)", body, re.S)
    if body.startswith("[") and body.endswith("]"):
        items = _split_items(body[1:-1], what)
    elif call and call.group(1) == "choice":
        items = _split_items(call.group(2), what)
    elif call and call.group(1) in DISTRIBUTIONS:
        return _distribution(key, text, call.group(1), _split_items(call.group(2), what), current, what)
    else:
        raise SweepError(f"{what}: expected {key}=[v1,v2,...] (or {key}=loguniform(a,b), uniform(a,b), "
                         "randint(a,b), choice(v1,...) with --random N)")
    if not items:
        raise SweepError(f"{what}: no values")
    values, seen = [], {}
    for item in map(_unquote, items):
        try:
            parsed = value_at(config_lib.apply_overrides(config, [f"{key}={item}"]), key)
        except config_lib.ConfigError as error:
            raise SweepError(f"{what}: {error}") from None
        normal = json.dumps(config_lib.normalize(parsed), sort_keys=True)
        if normal in seen:
            raise SweepError(f"{what}: values {seen[normal]!r} and {item!r} are the same")
        seen[normal] = item
        values.append(item)
    return Grid(key, text, tuple(values))


def _distribution(key, text, name, args, current, what) -> Grid:
    if len(args) != 2:
        raise SweepError(f"{what}: {name} takes two bounds, {name}(low, high)")
    low, high = (_number(a, what) for a in args)
    if name == "randint":
        if isinstance(current, bool) or not isinstance(current, (int, float)) and current is not None:
            raise SweepError(f"{what}: config key {key!r} is a {type(current).__name__}; randint needs a number")
        if not (isinstance(low, int) and isinstance(high, int)):
            raise SweepError(f"{what}: randint bounds must be integers")
    else:
        if isinstance(current, int) and not isinstance(current, bool):
            raise SweepError(f"{what}: config key {key!r} is an int; use randint(a,b)")
        if current is not None and not isinstance(current, float):
            raise SweepError(f"{what}: config key {key!r} is a {type(current).__name__}; {name} needs a float key")
        if name == "loguniform" and low <= 0:
            raise SweepError(f"{what}: loguniform bounds must be > 0")
    if not low < high:
        raise SweepError(f"{what}: the low bound must be below the high one")
    return Grid(key, text, distribution=name, low=low, high=high)


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int  # 1-based.
    name: str  # Its workdir under the sweep's.
    overrides: tuple[str, ...]  # `key=text` after the fixed overrides.
    values: dict  # key -> parsed value (JSON-normalised).

    def describe(self) -> str:
        return " ".join(f"{k}={show(v)}" for k, v in self.values.items())


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that is unique among `keys`, a final `.name` dropped
    (`optimizer.lr` -> `lr`, `model.fusion.name` -> `fusion`)."""
    trimmed = {k: k[: -len(".name")] if k.endswith(".name") else k for k in keys}
    short = {}
    for key, name in trimmed.items():
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(t == suffix or t.endswith("." + suffix) for t in trimmed.values()) == 1:
                short[key] = suffix
                break
        else:
            short[key] = key
    return short


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-")


def trial_name(index: int, values: dict, short: dict[str, str], width: int = 3) -> str:
    slug = "_".join(f"{_slug(short[k])}={_slug(show(v))}" for k, v in values.items())
    return f"trial_{index:0{width}d}" + (f"_{slug[:80].rstrip('_-')}" if slug else "")


def make_trials(grids: Sequence[Grid], config: ml_collections.ConfigDict, random: int | None = None,
                seed: int = 0) -> list[Trial]:
    """The trials: the product of the grids, or `random` samples (seeded); each checked against `config`."""
    import numpy as np

    keys = [g.key for g in grids]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a key has two --grid arguments: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    if random is None:
        continuous = [g.text for g in grids if g.distribution]
        if continuous:
            raise SweepError(f"--grid {continuous[0]!r} is a distribution: add --random N to sample N trials "
                             "(or give a list of values)")
        combos = list(itertools.product(*(g.values for g in grids)))
    else:
        if random < 1:
            raise SweepError(f"--random {random}: give the number of trials (>= 1)")
        rng = np.random.default_rng(seed)
        if all(g.distribution is None for g in grids):
            product = list(itertools.product(*(g.values for g in grids)))
            if random > len(product):
                raise SweepError(f"--random {random}: the grids have only {len(product)} distinct combinations; "
                                 "drop --random to run them all")
            combos = [product[i] for i in rng.choice(len(product), size=random, replace=False)]
        else:
            combos = [tuple(g.sample(rng) for g in grids) for _ in range(random)]
    width = max(3, len(str(len(combos))))
    return [make_trial(index, keys, combo, config, width) for index, combo in enumerate(combos, 1)]


def make_trial(index: int, keys: Sequence[str], texts: Sequence[str], config: ml_collections.ConfigDict,
               width: int = 3) -> Trial:
    """Trial `index` setting each of `keys` to its override text in `texts`, checked against `config`."""
    overrides = tuple(f"{k}={v}" for k, v in zip(keys, texts, strict=True))
    try:
        resolved = config_lib.apply_overrides(config, overrides)
    except config_lib.ConfigError as error:
        raise SweepError(f"trial {index} ({' '.join(overrides)}): {error}") from None
    values = {k: config_lib.normalize(value_at(resolved, k)) for k in keys}
    return Trial(index, trial_name(index, values, _short_keys(keys), width), overrides, values)
