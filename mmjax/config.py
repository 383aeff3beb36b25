"""Configs are `ml_collections.ConfigDict`s from an experiment's `get_config()`; this module holds the defaults every
experiment starts from (`base_config`) and overrides, checks and saves configs.

`--config.a.b=value` overrides any existing key. The value is parsed to the type the key already has, so an
unknown key or a value of the wrong type fails at once with a message that names the key and the valid ones.
A group is replaced whole by a dict literal (`--config.model.encoders.image="{'name': 'vit', 'patch_size': 2}"`);
later overrides then refine it.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
from collections.abc import Iterable
from typing import Any

import ml_collections

CONFIG_FILENAME = "config.json"


class ConfigError(ValueError):
    """A config key or value is invalid; the message names it."""


def base_config() -> ml_collections.ConfigDict:
    """The defaults of every section but `model`: an experiment's `get_config()` starts here and states only what
    differs (its name, data set, model, schedule). The values are those of the default experiment, av_digits."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = dict(
        data_dir="",  # Empty: $TFDS_DATA_DIR or ~/tensorflow_datasets.
        train_split="train",
        batch_size=64,
        eval_batch_size=256,
        num_threads=1,  # Grain threads; measured: one beats two for small in-memory data.
        num_workers=0,
        prefetch=2,  # Batches checked and sent to the devices ahead of the step, by a background thread.
        cache_in_memory=True,  # Preprocess once, not every epoch (small data sets).
    )
    config.task = dict(name="classification")
    config.optimizer = dict(
        name="adamw",  # or "sgd" (momentum, nesterov)
        lr=2e-3,
        schedule="cosine",  # linear warm-up, then cosine decay to lr * end_lr_factor; or "constant"
        warmup_steps=50,
        end_lr_factor=0.01,
        weight_decay=1e-4,  # not applied to biases and norm parameters
        b1=0.9,
        b2=0.999,
        momentum=0.9,
        nesterov=False,
        grad_clip_norm=1.0,  # global norm; 0 disables clipping
        l1=0.0,  # L1 penalty l1 * sum |w| added to the loss (not decoupled); see mmjax/train/optimizer.py
        l2=0.0,  # L2 penalty l2 * sum w^2 added to the loss (not decoupled, unlike weight_decay)
        l1_params=(),  # Regexes of the parameters l1 applies to; empty = every weight matrix/kernel
        l2_params=(),  # Regexes of the parameters l2 applies to; empty = every weight matrix/kernel
    )
    config.train = dict(
        num_steps=600,
        log_every_steps=50,
        eval_every_steps=200,
        frozen=(),  # Regexes of parameter paths to lock (no gradient, no optimizer state), e.g. "encoders_image".
        init_from={},  # Parameter subtree -> pretrained source, e.g. {"encoders_text": "minilm"}; see nn/pretrained.py.
        grad_accum_steps=1,  # Micro-batches per batch (gradients accumulated, one update); batch % (k*devices) == 0.
    )
    config.mesh = dict(
        fsdp=1,  # Devices each large param/optimizer-state leaf is split over (FSDP); 1 = replicated; divides devices.
        fsdp_min_size=4096,  # Leaves with fewer elements stay replicated under FSDP (too small to be worth a gather).
    )
    config.eval = dict(splits=("validation", "test"))
    config.checkpoint = dict(every_steps=200, keep=2, best_metric="validation/accuracy", best_mode="max")
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys of a config as dotted paths, sorted."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return sorted(keys)


def _unknown_key(key: str, config: ml_collections.ConfigDict) -> ConfigError:
    valid = flat_keys(config)
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint}\nValid keys:\n  " + "\n  ".join(valid))


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ConfigError(f"config key {key!r} expects a bool (true/false), got {text!r}")


def _literal_or_text(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


_ELEMENT_KINDS = (  # (name, test) for the elements of a sequence value, most specific first.
    ("a bool", lambda v: isinstance(v, bool)),
    ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    ("a str", lambda v: isinstance(v, str)),
)


def _check_elements(key: str, text: str, value: tuple | list, current: tuple | list) -> None:
    """A sequence whose current elements are all of one kind (ints, numbers, strings) keeps that kind: `(4, x)` for
    `features=(32, 64)` is a typo, not a new type."""
    if not current:
        return
    for kind, test in _ELEMENT_KINDS:
        if all(test(v) for v in current):
            bad = [v for v in value if not test(v)]
            if bad:
                raise ConfigError(
                    f"config key {key!r} expects a sequence whose elements are each {kind}, got {text!r} "
                    f"(element {bad[0]!r} is not; current value {tuple(current)!r})"
                )
            return


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` into the type of `current`, the value the key has now."""
    if isinstance(current, bool):
        return _parse_bool(key, text)
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:  # An unset optional value: take the text as a string.
            return text
        if isinstance(current, (tuple, list)):  # `a,b,c`: a sequence of bare words.
            if text.strip()[:1] in "([{" or text.strip()[-1:] in ")]}":
                raise ConfigError(
                    f"config key {key!r}: {text!r} is not a valid Python literal (unbalanced brackets?); "
                    f"write e.g. {tuple(current)!r} or a,b,c"
                ) from None
            value = type(current)(_literal_or_text(part) for part in text.split(",") if part.strip())
            _check_elements(key, text, value, current)
            return value
        raise ConfigError(
            f"config key {key!r} expects {type(current).__name__}, got {text!r} (not a Python literal)"
        ) from None
    if current is None:
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects int, got {text!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects float, got {text!r}")
        return float(value)
    if isinstance(current, (tuple, list)):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config key {key!r} expects a sequence, got {text!r}")
        _check_elements(key, text, value, current)
        return type(current)(value)
    if isinstance(value, type(current)):
        return value
    raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got {text!r}")


def _parse_group(key: str, text: str) -> dict:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key!r}: {text!r} is not a Python dict literal") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"config key {key!r} is a group: give a dict with string keys, got {text!r}")
    return value


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets the dotted `key` of `config` from its command-line text `text`, in place."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise _unknown_key(key, config)
        node = child
    if leaf not in node:
        raise _unknown_key(key, config)
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        if text.strip().startswith("{"):  # Replace the whole group, e.g. an encoder by another one.
            node[leaf] = ml_collections.ConfigDict(_parse_group(key, text))
            return
        raise ConfigError(
            f"config key {key!r} is a group, not a value; set one of: "
            + ", ".join(f"{key}.{k}" for k in flat_keys(current))
            + f", or replace it whole with a dict literal: --config.{key}=\"{{'name': ...}}\""
        )
    value = parse_value(key, text, current)
    try:
        node[leaf] = value
    except TypeError as e:  # ml_collections' own type check, as a backstop.
        raise ConfigError(f"config key {key!r}: {e}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies `a.b=value` strings to a copy of `config` and returns it."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        override(config, key.strip(), text)
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def save(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config as JSON into `workdir`; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(config) + "\n")
    os.replace(tmp, path)
    return path


def load(path: str) -> ml_collections.ConfigDict:
    """Reads a config saved by `save` (a JSON file or the workdir holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILENAME)
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def normalize(value: Any) -> Any:
    """JSON round-trip, so configs compare equal whether fresh or loaded (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))
