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
    """Top-1 and top-`top_k` zero-shot accuracy of the images (`config.eval.zero_shot.top_k`, default 5).

    The metric names are `zero_shot_top1` and `zero_shot_top{top_k}` whatever the number of classes, so a
    best-checkpoint metric or a table column never changes name between datasets (with `top_k` >= the number of
    classes the top-k accuracy is 1). Ties between class scores count as expected under random tie-breaking
    (`mmjax.metrics.retrieval`), so a collapsed image tower scores chance, 1 / classes.
    """

    top_k: int = 5

    uses_outputs: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"config eval.zero_shot.top_k={self.top_k!r} must be a positive integer")

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
        return zero_shot_metrics(outputs["image_embedding"], classes, outputs["label"], top_k=self.top_k)
