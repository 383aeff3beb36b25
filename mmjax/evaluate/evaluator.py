"""The evaluator interface (big_vision style): small evaluators chosen by name, each run on a trained state.

`config.eval.evaluators` names them (default: `split_metrics`, plus `zero_shot` and `modality_diagnostics` where
the model and dataset support them); `config.eval.<name>` (a dict, optional) holds an evaluator's options. Every
evaluator returns a dict whose scalar entries are logged as `<split>/<metric>` and whose other entries (curves,
tables) go to results.json.
Evaluators that work on the split's per-example outputs (`uses_outputs`) share one pass of the model over it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import jax
import ml_collections
import numpy as np

from mmjax.data import pipeline
from mmjax.evaluate.outputs import gather_outputs
from mmjax.registry import Registry, closest

EVALUATORS: Registry = Registry("evaluator")
DEFAULT_EVALUATORS = ("split_metrics", "zero_shot", "modality_diagnostics")


class EvalContext(Protocol):
    """What an evaluator reads of a run: its config, dataset, model, task and mesh (`mmjax.train.setup.Setup`)."""

    config: ml_collections.ConfigDict
    dataset: Any
    model: Any
    task: Any
    batch_sharding: jax.sharding.Sharding
    workdir: str | None  # Where evaluators may write files (generated samples); None outside a training run.

    @property
    def eval_keys(self) -> list[str]: ...

    @property
    def eval_step_fn(self) -> Any: ...


class Evaluator(abc.ABC):
    """One evaluation of a state on a split. Subclasses are dataclasses whose fields are the evaluator's options."""

    uses_outputs: ClassVar[bool] = False  # Reads the split's gathered per-example outputs (`gather_outputs`).

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        """Why this evaluator cannot run for `context` (None when it can)."""
        del context
        return None

    @abc.abstractmethod
    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable[Mapping[str, np.ndarray]] | None = None) -> dict:
        """Metrics of `state` on `split` (or on the given host batches, e.g. corrupted ones)."""


def build_evaluator(name: str, options: Mapping[str, Any] | None = None) -> Evaluator:
    """The evaluator registered as `name` with `options` as its fields; errors name the config key."""
    if name not in EVALUATORS:
        raise ValueError(f"config eval.evaluators: {EVALUATORS.unknown_message(name)}")
    cls = EVALUATORS.get(name)
    options = dict(options or {})
    fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"config eval.{name}: unknown option(s) {unknown}; valid: {fields}.{closest(unknown[0], fields)}"
        )
    return cls(**options)


def build_evaluators(context: EvalContext) -> list[Evaluator]:
    """The evaluators of `config.eval.evaluators`, or the defaults that `context` supports; each named one must
    support it (the error says why not)."""
    eval_config = context.config.get("eval") or {}
    names = tuple(eval_config.get("evaluators") or ())
    explicit = bool(names)
    if not explicit:
        names = tuple(n for n in DEFAULT_EVALUATORS if EVALUATORS.get(n).unsupported(context) is None)
    evaluators = []
    for name in names:
        evaluator = build_evaluator(name, eval_config.get(name))
        reason = type(evaluator).unsupported(context)
        if reason is not None:
            raise ValueError(f"config eval.evaluators: {name!r} cannot evaluate this run: {reason}")
        evaluators.append(evaluator)
    return evaluators


def evaluate(context: EvalContext, state: Any, split: str, evaluators: Sequence[Evaluator],
             batches: Iterable[Mapping[str, np.ndarray]] | None = None) -> dict:
    """Runs `evaluators` on `split` of the context's dataset (or on `batches`) and merges their results."""
    outputs = None
    if any(e.uses_outputs for e in evaluators):
        # A fresh pass over the split for the shared outputs; the other evaluators read the split themselves (or
        # the caller's `batches`), since a pass consumes the generator.
        source = batches if batches is not None else pipeline.eval_batches(
            context.dataset, split, global_batch_size=context.config.data.eval_batch_size)
        outputs = gather_outputs(context.eval_step_fn, state, source, context.eval_keys, context.batch_sharding)
    results: dict = {}
    for evaluator in evaluators:
        results.update(evaluator(context, state, split, outputs, batches))
    return results
