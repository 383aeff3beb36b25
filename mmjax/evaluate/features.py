"""Per-example features of a trained model over a split: pooled encoder features, or a dual encoder's embeddings.

For classical baselines, probing, clustering or plots. No caller needs to know parameter names: the model's
`encode` method (fusion models) or `embed` method (two-tower and matching models) is applied to the whole state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from mmjax.data import pipeline
from mmjax.data.core import VALID_KEY
from mmjax.evaluate.evaluator import EvalContext
from mmjax.evaluate.outputs import gather_outputs


def _feature_step(model):
    """`(params, model_state, batch) -> {modality: [B, D]}` plus the label and validity of each row."""
    if hasattr(model, "encode"):
        def features(variables, batch):
            return model.apply(variables, batch, method="encode")
    elif hasattr(model, "embed"):
        def features(variables, batch):
            return {m: model.apply(variables, m, batch[m], method="embed") for m in sorted(model.encoders)}
    else:
        raise ValueError(f"model {type(model).__name__} has neither an encode nor an embed method to give features")

    def step(params, model_state, batch):
        return {**features({"params": params, **model_state}, batch), "label": batch["label"],
                "valid": batch[VALID_KEY]}

    return step


def extract_features(
    context: EvalContext, state: Any, split: str, batches: Iterable[Mapping[str, np.ndarray]] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`({modality: features [N, D]}, labels [N])` over every example of `split` (or of the given host batches)."""
    if batches is None:
        batches = pipeline.eval_batches(context.dataset, split, global_batch_size=context.config.data.eval_batch_size)
    step = jax.jit(_feature_step(context.model), out_shardings=context.batch_sharding)
    outputs = gather_outputs(step, state, batches, context.eval_keys, context.batch_sharding)
    labels = outputs.pop("label")
    return outputs, labels
