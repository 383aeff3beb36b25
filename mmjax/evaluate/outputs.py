"""The model's per-example outputs over a whole split: the jitted eval step and the host-side gathering.

Evaluation batches are padded to full size (`VALID_KEY` marks real rows); every process gathers the whole global
batch and the padding rows are dropped, so metrics are exact whatever the device and process count.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data import pipeline
from mmjax.data.core import VALID_KEY
from mmjax.tasks.base import Task


def eval_step(params, model_state, batch: Mapping[str, jax.Array], *, model: nn.Module,
              task: Task) -> dict[str, jax.Array]:
    """Per-example outputs (the task's predictions, label, loss: `Task.eval_arrays`) and validity, gathered on the
    host for exact metrics."""
    outputs = model.apply({"params": params, **model_state}, batch, train=False)
    return {**task.eval_arrays(outputs, batch), "valid": batch[VALID_KEY]}


def jit_eval_step(model: nn.Module, task: Task, state_sharding: Any, batch_sharding: jax.sharding.Sharding):
    """`eval_step` compiled over the mesh: `(params, model_state, global batch) -> per-example outputs`."""
    return jax.jit(
        functools.partial(eval_step, model=model, task=task),
        in_shardings=(state_sharding.params, state_sharding.model_state, batch_sharding),
        out_shardings=batch_sharding,
    )


def gather_outputs(eval_fn, state, batches: Iterable[Mapping[str, np.ndarray]], keys: Sequence[str],
                   sharding: jax.sharding.Sharding) -> dict[str, np.ndarray]:
    """Per-example eval outputs over every valid example of `batches` (host batches; padding rows removed).

    `keys` absent from a batch are skipped (e.g. hard-negative captions that only some datasets provide).
    """
    outputs: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        present = [k for k in keys if k in batch]
        global_batch = pipeline.to_global({k: batch[k] for k in (*present, VALID_KEY)}, sharding)
        result = eval_fn(state.params, state.model_state, global_batch)
        for key, value in multihost_utils.process_allgather(result, tiled=True).items():
            outputs.setdefault(key, []).append(np.asarray(value))
    merged = {k: np.concatenate(v) for k, v in outputs.items()}
    valid = merged.pop("valid").astype(bool)
    return {k: v[valid] for k, v in merged.items()}


def scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The scalar metrics of an evaluation (what is logged), without the example counts (`num_examples`, and a
    multi-task model's `<task>/num_examples`)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "num_examples" and not k.endswith("/num_examples")}
