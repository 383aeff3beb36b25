"""`zero_shot`: classify images by the nearest class embedding built from the dataset's class prompts (CLIP).

Each class's prompts ("a circle", "a picture of a circle", ...) are embedded by the text tower, averaged and
renormalised (CLIP's prompt ensembling); an image's class is the most similar one. Needs a dual-encoder model
(`embed`) and a dataset with `class_prompts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator
from mmjax.metrics.retrieval import class_embeddings, zero_shot_metrics


@EVALUATORS.register("zero_shot")
@dataclasses.dataclass(frozen=True)
class ZeroShot(Evaluator):
    """Top-1 and top-k (k = 5, or the number of classes - 1 when fewer) zero-shot accuracy of the images."""

    uses_outputs: ClassVar[bool] = True

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        if context.dataset.class_prompts is None:
            return f"dataset {context.dataset.name!r} has no class prompts"
        if not hasattr(context.model, "embed"):
            return f"model {type(context.model).__name__} has no text tower to embed prompts with"
        return None

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable | None = None) -> dict:
        if "image_embedding" not in outputs:
            return {}
        prompts = np.asarray(context.dataset.class_prompts)
        embed = jax.jit(lambda params, model_state, ids: context.model.apply(
            {"params": params, **model_state}, "text", ids, method="embed"))
        classes = class_embeddings(np.asarray(embed(state.params, state.model_state, prompts)))
        top_k = 5 if len(classes) > 5 else len(classes) - 1
        return zero_shot_metrics(outputs["image_embedding"], classes, outputs["label"], top_k=max(top_k, 1))
