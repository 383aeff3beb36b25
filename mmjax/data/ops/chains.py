"""Chains of ops: parsing a `|`-joined spec, planning it (split at the first random op, with evaluation
counterparts) and composing every key's chain into a dataset's `preprocess` and `augment` (see mmjax.data.ops)."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.data.core import mask_key
from mmjax.data.ops.op_base import Context, Op, PreprocessError, describe
from mmjax.registry import PREPROCESS_OPS

PRIVATE_PREFIX = "_pre_augment/"  # Value before the first random op, carried from preprocess to augment.


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One parsed op: its name, literal arguments and source text."""

    name: str
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]
    text: str


def parse(spec: str, key: str = "") -> list[OpCall]:
    """`"decode|resize(40)|flip_lr"` -> the ops' names and literal arguments (no name is looked up yet)."""
    where = f"config data.preprocess[{key!r}]" if key else "preprocessing chain"
    if not isinstance(spec, str):
        raise PreprocessError(f"{where} must be a string of ops joined by '|', got {spec!r}")
    text = spec.strip()
    if not text:
        return []
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as error:
        raise PreprocessError(
            f"{where}: cannot parse {spec!r} ({error.msg}, column {error.offset}); expected ops joined by '|', "
            "e.g. 'decode|resize(32)|normalize'"
        ) from None
    nodes: list[ast.AST] = []

    def flatten(node: ast.AST) -> None:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            flatten(node.left)
            flatten(node.right)
        else:
            nodes.append(node)

    flatten(tree)
    calls = []
    for node in nodes:
        source = ast.get_source_segment(text, node) or "?"
        if isinstance(node, ast.Name):
            calls.append(OpCall(node.id, (), (), source))
            continue
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise PreprocessError(f"{where}: {source!r} is not an op; each op is NAME or NAME(arguments)")
        try:
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                raise ValueError("* and ** are not allowed")
            args = tuple(_literal(a, text) for a in node.args)
            kwargs = tuple((k.arg, _literal(k.value, text)) for k in node.keywords)
        except ValueError as error:
            raise PreprocessError(
                f"{where}: op {source!r}: {error}; arguments must be Python literals (numbers, strings in quotes, "
                "tuples, True/False/None)"
            ) from None
        calls.append(OpCall(node.func.id, args, kwargs, source))
    return calls


def _signature(cls: type) -> str:
    """`resize(size, method='bilinear')`: the op's arguments as a config string takes them."""
    parts = [f.name if f.default is dataclasses.MISSING else f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)]
    return f"{cls.name}({', '.join(parts)})"


def _literal(node: ast.AST, text: str):
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{ast.get_source_segment(text, node)!r} is not a literal") from None


def instantiate(call: OpCall, where: str) -> Op:
    """The op object of a parsed call; unknown names and bad arguments raise a PreprocessError."""
    if call.name not in PREPROCESS_OPS:
        raise PreprocessError(f"{where}: {PREPROCESS_OPS.unknown_message(call.name)}")
    cls = PREPROCESS_OPS.get(call.name)
    try:
        return cls(*call.args, **dict(call.kwargs))
    except TypeError as error:
        message = str(error).replace(f"{cls.__name__}.__init__()", call.name).replace(cls.__name__, call.name)
        raise PreprocessError(f"{where}: op {call.text!r}: {message}; signature: {_signature(cls)}") from None
    except ValueError as error:
        raise PreprocessError(f"{where}: op {call.text!r}: {error}") from None


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """One key's chain, split at its first random op (see the module docstring)."""

    key: str
    spec: str
    prefix: tuple[Op, ...]  # Deterministic ops before the first random op: `preprocess`.
    suffix: tuple[Op, ...]  # From the first random op on: `augment` (training stream).
    eval_suffix: tuple[Op, ...]  # `suffix` with random ops replaced by their deterministic counterparts.

    @property
    def private_key(self) -> str | None:
        """Where `preprocess` leaves the value before the random ops, when evaluation changes it."""
        return PRIVATE_PREFIX + self.key if self.suffix and self.eval_suffix else None


def plan(spec: str, context: Context | None = None) -> KeyPlan:
    """Parses, looks up, instantiates and binds one key's chain (all errors happen here, before any data)."""
    context = context or Context()
    where = f"config data.preprocess[{context.key!r}]" if context.key else "preprocessing chain"
    prefix: list[Op] = []
    suffix: list[Op] = []
    eval_suffix: list[Op] = []
    for call in parse(spec, context.key):
        op = instantiate(call, where)
        try:
            bound, after = op.bind(context)
            if op.random or suffix:
                suffix.append(bound)
                if op.random:
                    for counterpart in bound.eval_ops():
                        eval_suffix.append(counterpart.bind(context)[0])
                else:
                    eval_suffix.append(bound)
            else:
                prefix.append(bound)
        except (ValueError, OSError) as error:  # OSError: e.g. a tokenizer file that is not there.
            raise PreprocessError(f"{where}: op {call.text!r}: {error}") from None
        context = after
    return KeyPlan(context.key, spec, tuple(prefix), tuple(suffix), tuple(eval_suffix))


def _run(ops: Sequence[Op], value, key: str, rng: np.random.Generator | None = None):
    for op in ops:
        try:
            value = op(value, rng) if op.random else op(value)
        except PreprocessError:
            raise
        except Exception as error:  # Name the key, the op and the input; keep the original as the cause.
            raise PreprocessError(
                f"preprocess[{key!r}]: op {op} failed on {describe(value)}: {type(error).__name__}: {error}"
            ) from error
    return value


def _absent(example: Mapping[str, Any], key: str) -> bool:
    """True when the example marks `key` missing (`<key>_mask` == 0)."""
    mask = example.get(mask_key(key))
    return mask is not None and float(np.asarray(mask)) == 0.0


def _zeros_like(value) -> np.ndarray:
    return np.zeros_like(np.asarray(value))


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The deterministic part of every key's chain (`Dataset.preprocess`): the evaluation value under the key,
    and the value before the random ops under `_pre_augment/<key>` when `augment` needs it.

    Keys without a chain are passed through: all of them (`keep=None`) or only those in `keep`.
    """

    plans: tuple[KeyPlan, ...]
    keep: tuple[str, ...] | None = None

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        names = example.keys() if self.keep is None else [k for k in self.keep if k in example]
        out = {k: example[k] for k in names}
        for p in self.plans:
            if p.key not in example:
                raise PreprocessError(f"preprocess[{p.key!r}]: the example has no key {p.key!r} "
                                      f"(keys: {sorted(example)})")
            value = _run(p.prefix, example[p.key], p.key)
            absent = _absent(example, p.key)
            if p.private_key:
                out[p.private_key] = value
            result = _run(p.eval_suffix, value, p.key)
            out[p.key] = _zeros_like(result) if absent else result
        return out


@dataclasses.dataclass(frozen=True)
class Augment:
    """The random part of every key's chain (`Dataset.augment`, training stream), in sorted key order."""

    plans: tuple[KeyPlan, ...]

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = dict(example)
        for p in self.plans:
            value = out.pop(p.private_key) if p.private_key else out[p.key]
            result = _run(p.suffix, value, p.key, rng)
            out[p.key] = _zeros_like(result) if _absent(example, p.key) else result
        return out


def compose(
    preprocess: Mapping[str, str],
    context: Mapping[str, Context] | Context | None = None,
    keep: Sequence[str] | None = None,
) -> tuple[Preprocess, Augment | None]:
    """Per-key chains -> (`preprocess`, `augment` or None when no chain has a random op), for a `Dataset`.

    `context`: one Context for every key or one per key (its `key` is set here). `keep`: keys without a chain
    that `preprocess` passes through (None: all).
    """
    plans = []
    for key in sorted(preprocess):
        base = context.get(key, Context()) if isinstance(context, Mapping) else (context or Context())
        plans.append(plan(preprocess[key], dataclasses.replace(base, key=key)))
    random_plans = tuple(p for p in plans if p.suffix)
    return (Preprocess(tuple(plans), None if keep is None else tuple(keep)),
            Augment(random_plans) if random_plans else None)
