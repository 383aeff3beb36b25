"""`Runner`: a jitted per-example function of a trained model over N prepared examples, data-parallel over every
device of every process, in row order.

Global batch g holds rows [g B, (g + 1) B); process p prepares only its rows [g B + p L, g B + (p + 1) L) (L = B /
processes), the batch is assembled as one global array sharded over the mesh's batch axis (as training's), the
step runs once, and every process gathers the outputs (so process 0 can write them). The last batch is padded;
rows that failed to prepare are padding too, with their reasons kept, or (`on_error="stop"`) stop every process
at the first one. A progress bar with ETA runs on process 0.

Steps (`(params, model_state, batch) -> {name: [B, ...]}`): `output_step` (the task's evaluation outputs:
probabilities, scores, values, embeddings, ITM logits; what the evaluators see), `embed_step` (one tower's unit
embeddings, or a fusion model's pooled encoder features of one modality), `itm_step` (a matching model's ITM
logit of (image, text) pairs).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mmjax import reporting
from mmjax.data import pipeline
from mmjax.data.core import VALID_KEY, mask_key
from mmjax.inference.raw_examples import model_kind

Step = Callable[[Any, Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]]


def output_step(model: Any, task: Any) -> Step:
    """The task's per-example evaluation outputs (`Task.eval_outputs`, as the evaluators gather them) without the
    label and loss."""

    def step(params, model_state, batch):
        inputs = {k: v for k, v in batch.items() if k != VALID_KEY}
        return task.eval_outputs(model.apply({"params": params, **model_state}, inputs, train=False))

    return step


def embed_step(model: Any, modality: str, spec: Mapping[str, tuple] | None = None) -> Step:
    """`{"embedding": [B, D]}` of `batch[modality]`: a dual encoder's or matching model's unit embeddings
    (`embed`), or a fusion model's pooled features of that modality's encoder (`encode`; `spec`, the model's
    `{input: (shape, dtype)}`, gives its other inputs, fed as zeros and marked missing by their masks: encoders
    are independent, and a FiLM target's features are then its unconditioned ones)."""
    if model_kind(model) == "towers":
        def step(params, model_state, batch):
            return {"embedding": model.apply({"params": params, **model_state}, modality, batch[modality],
                                             method="embed")}
        return step

    modalities = sorted(getattr(model, "encoders", {}) or {})

    def features(params, model_state, batch):
        rows = batch[modality].shape[0]
        full = {k: jnp.zeros((rows, *shape), dtype) for k, (shape, dtype) in (spec or {}).items() if k != "label"}
        full.update({mask_key(m): jnp.zeros((rows,), jnp.float32) for m in modalities})
        full[modality] = batch[modality]
        full[mask_key(modality)] = jnp.ones((rows,), jnp.float32)
        return {"embedding": model.apply({"params": params, **model_state}, full, method="encode")[modality]}

    return features


def itm_step(model: Any) -> Step:
    """`{"itm_logit": [B]}`: a matching model's cross-attention score of each (image, text) pair of the batch."""

    def step(params, model_state, batch):
        pairs = {"image": batch["image"], "text": batch["text"]}
        return {"itm_logit": model.apply({"params": params, **model_state}, pairs, train=False)["itm_logits"]}

    return step


class Absent(ValueError):  # noqa: N818 - a row without a value, not a failure.
    """Raised by `prepare` for a row that has no input for this step (e.g. an empty optional cell): the row is
    left out of the outputs like a bad row, but it is not an error (never stops a run, never reported)."""


@dataclasses.dataclass
class RunResult:
    """Outputs of every row (`[N, ...]`, zeros where a row failed), which rows succeeded, and the reasons of the
    failed rows this process prepared (`{row index: message}`)."""

    outputs: dict[str, np.ndarray]
    ok: np.ndarray
    errors: dict[int, str]


class Runner:
    """Runs steps of a trained model (`context`: a `Setup`; `state`: its train state) over prepared examples in
    global batches of `batch_size` (default the config's `data.eval_batch_size`), rounded up to a multiple of the
    device count."""

    def __init__(self, context: Any, state: Any, batch_size: int | None = None):
        self.context, self.state = context, state
        devices, processes = jax.device_count(), jax.process_count()
        size = int(batch_size or context.config.data.eval_batch_size)
        if size <= 0:
            raise ValueError(f"batch size {size} must be positive")
        multiple = math.lcm(devices, processes)
        self.batch_size = -(-size // multiple) * multiple
        self.local = self.batch_size // processes
        self._compiled: dict[int, Any] = {}

    def _jit(self, step: Step):
        key = id(step)
        if key not in self._compiled:
            self._compiled[key] = (step, jax.jit(step, out_shardings=self.context.batch_sharding))
        return self._compiled[key][1]

    def run(self, step: Step, count: int, prepare: Callable[[int], Mapping[str, np.ndarray]],
            placeholder: Mapping[str, np.ndarray], *, on_error: str = "skip", progress: str | None = None
            ) -> RunResult:
        """`step` over rows 0..count-1, each prepared by `prepare(row)` (a `ValueError`, e.g. `RowError`, marks
        the row bad; `Absent` leaves it out without an error). `on_error="stop"` raises the first bad row's error
        (the same on every process) before its batch runs; "skip" pads it and records its reason. `progress`: a
        label for the progress bar (None: no bar)."""
        from tqdm import tqdm

        jitted = self._jit(step)
        outputs: dict[str, np.ndarray] = {}
        ok = np.zeros(count, bool)
        failed: dict[int, ValueError] = {}
        process = jax.process_index()
        bar = tqdm(total=count, desc=progress, unit="ex", file=sys.stderr, dynamic_ncols=True,
                   disable=progress is None or not reporting.is_primary())
        try:
            for start in range(0, count, self.batch_size):
                first = start + process * self.local
                local, valid = [], np.zeros(self.local, np.int32)
                for slot, row in enumerate(range(first, first + self.local)):
                    example = None
                    if row < count:
                        try:
                            example = prepare(row)
                            valid[slot] = 1
                        except Absent:  # No input for this row: the placeholder, left out; not an error.
                            example = None
                        except ValueError as error:
                            failed[row] = error
                    local.append(example if example is not None else placeholder)
                if on_error == "stop":
                    self._stop_at_first_error(failed, prepare)
                batch = {k: np.stack([np.asarray(e[k]) for e in local]) for k in placeholder}
                batch[VALID_KEY] = valid
                result = jitted(self.state.params, self.state.model_state,
                                pipeline.to_global(batch, self.context.batch_sharding))
                result = dict(result) | {VALID_KEY: pipeline.to_global({VALID_KEY: valid},
                                                                       self.context.batch_sharding)[VALID_KEY]}
                gathered = multihost_utils.process_allgather(result, tiled=True)
                rows = min(self.batch_size, count - start)
                for key, value in gathered.items():
                    value = np.asarray(value)[:rows]
                    if key == VALID_KEY:
                        ok[start : start + rows] = value.astype(bool)
                        continue
                    if key not in outputs:
                        outputs[key] = np.zeros((count, *value.shape[1:]), value.dtype)
                    outputs[key][start : start + rows] = value
                bar.update(rows)
        finally:
            bar.close()
        for key in outputs:
            outputs[key][~ok] = 0
        return RunResult(outputs, ok, {row: str(error) for row, error in failed.items()})

    @staticmethod
    def _stop_at_first_error(failed: Mapping[int, ValueError], prepare: Callable[[int], Any]) -> None:
        """Every process learns the first bad row of this batch and raises its error (a process that did not
        prepare that row reads it again, to give the same message)."""
        none = np.iinfo(np.int32).max  # JAX gathers 32-bit integers (without x64).
        first = min(failed, default=none)
        if jax.process_count() > 1:
            first = int(np.min(multihost_utils.process_allgather(np.asarray([first], np.int32))))
        if first == none:
            return
        if first in failed:
            raise failed[first]
        prepare(first)  # Raises the row's error here too.
        raise ValueError(f"row index {first} failed to prepare on another process but not on this one")
