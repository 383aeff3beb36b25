"""`modality_diagnostics`: how much a fused classifier relies on each modality (modality imbalance).

A jointly trained fusion model can lean on the modality that is easiest to fit in training and leave the others
under-used, then generalise worse than its best single modality (Wang, Tran, Feiszli, "What Makes Training
Multi-modal Classification Networks Hard?", CVPR 2020; Peng et al., "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022). Two measures expose it, computed through the modality masks every fusion honours
(a masked modality contributes nothing):

* `only_<m>_accuracy`: the fused model's accuracy with every modality but m masked. A modality the model has not
  learnt to use scores near chance although a model trained on it alone does well.
* `logit_variance_share_<m>`: the share of the fused logits' variance that modality m contributes. With f(x) the
  logits and f(x without m) those with m masked, m's contribution is c_m(x) = f(x) - f(x without m) (for a linear
  head on concatenated features, exactly W_m z_m - the bias it shares), v_m = sum_k Var_x[c_m(x)_k] over the
  split's examples and classes, and share_m = v_m / sum_m' v_m'.

It is a default evaluator of every fused classification model with two or more modalities, so both measures are
logged at each evaluation during training (`<split>/only_<m>_accuracy`, ...) and end in results.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data import pipeline
from mmjax.data.core import VALID_KEY, mask_key
from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator


def mask_patterns(modalities: list[str]) -> list[tuple[int, ...]]:
    """The modality presence patterns to evaluate: all present, each modality alone, each one left out (for two
    modalities "a alone" is "b left out", so each pattern is listed once)."""
    count = len(modalities)
    patterns = [tuple([1] * count)]
    patterns += [tuple(int(i == j) for j in range(count)) for i in range(count)]
    patterns += [tuple(int(i != j) for j in range(count)) for i in range(count)]
    return list(dict.fromkeys(patterns))


def diagnostics_from_logits(logits: Mapping[tuple[int, ...], np.ndarray], labels: np.ndarray,
                            modalities: list[str]) -> dict:
    """The module docstring's measures from the logits `[N, K]` under each presence pattern and the labels `[N]`."""
    count = len(modalities)
    full = np.asarray(logits[tuple([1] * count)], np.float64)
    result: dict[str, Any] = {}
    variances = {}
    for i, m in enumerate(modalities):
        only = np.asarray(logits[tuple(int(i == j) for j in range(count))])
        result[f"only_{m}_accuracy"] = float(np.mean(np.argmax(only, -1) == labels))
        without = np.asarray(logits[tuple(int(i != j) for j in range(count))], np.float64)
        variances[m] = float(np.var(full - without, axis=0).sum())
    total = sum(variances.values())
    for m in modalities:
        result[f"logit_variance_share_{m}"] = variances[m] / total if total > 0 else 0.0
    result["modality_diagnostics"] = {"logit_variance": variances, "examples": int(labels.shape[0])}
    return result


@EVALUATORS.register("modality_diagnostics")
@dataclasses.dataclass(frozen=True)
class ModalityDiagnostics(Evaluator):
    """Per-modality accuracy with the others masked and each modality's share of the fused logits' variance."""

    uses_outputs: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        encoders = getattr(context.model, "encoders", None)
        if not isinstance(encoders, Mapping) or not hasattr(context.model, "fusion"):
            return "it masks the modalities of a fusion model"
        if len(encoders) < 2:
            return f"it compares modalities, and the model has one ({sorted(encoders)})"
        if getattr(context.task, "dataset_task", None) != "classification":
            return f"it scores class predictions, and task {type(context.task).__name__} makes none"
        return None

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable[Mapping[str, np.ndarray]] | None = None) -> dict:
        modalities = sorted(context.model.encoders)
        patterns = mask_patterns(modalities)
        fn = _masked_logits_fn(context, tuple(modalities), tuple(patterns))
        if batches is None:
            batches = pipeline.eval_batches(context.dataset, split,
                                            global_batch_size=context.config.data.eval_batch_size)
        keys = [*context.eval_keys, VALID_KEY]
        gathered: dict[str, list[np.ndarray]] = {"logits": [], "label": [], "valid": []}
        for batch in batches:
            present = [k for k in keys if k in batch]
            result = fn(state.params, state.model_state,
                        pipeline.to_global({k: batch[k] for k in present}, context.batch_sharding))
            for key, value in multihost_utils.process_allgather(result, tiled=True).items():
                gathered[key].append(np.asarray(value))
        valid = np.concatenate(gathered["valid"]).astype(bool)
        stacked = np.concatenate(gathered["logits"], axis=1)[:, valid]  # [P, N, K]
        labels = np.concatenate(gathered["label"])[valid]
        return diagnostics_from_logits(dict(zip(patterns, stacked)), labels, modalities)


_COMPILED: dict[tuple, tuple[Any, Any, Any]] = {}  # (ids of model, task, sharding, patterns) -> (model, task, fn)


def _masked_logits_fn(context: Any, modalities: tuple[str, ...], patterns: tuple[tuple[int, ...], ...]):
    """Jitted `(params, model_state, batch) -> {"logits": [P, B, K], "label", "valid"}`: the fused logits under
    each presence pattern (each modality's own mask, when the data has one, still applies). Compiled once per
    model (the entry keeps the model and task alive, so their ids cannot be reused while it exists)."""
    model, task, sharding = context.model, context.task, context.batch_sharding
    key = (id(model), id(task), id(sharding), modalities, patterns)
    if key in _COMPILED and _COMPILED[key][0] is model and _COMPILED[key][1] is task:
        return _COMPILED[key][2]

    def logits(params, model_state, batch):
        rows = batch[modalities[0]].shape[0]
        base = {m: batch[mask_key(m)] if mask_key(m) in batch else jnp.ones((rows,), jnp.float32)
                for m in modalities}
        stacked = []
        for pattern in patterns:
            masked = dict(batch)
            for m, keep in zip(modalities, pattern):
                masked[mask_key(m)] = base[m] * keep
            out = task.main_outputs(model.apply({"params": params, **model_state}, masked, train=False))
            stacked.append(out.astype(jnp.float32))
        return {"logits": jnp.stack(stacked), "label": batch["label"], "valid": batch[VALID_KEY]}

    stacked = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    fn = jax.jit(logits, out_shardings={"logits": stacked, "label": sharding, "valid": sharding})
    while len(_COMPILED) >= 4:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = (model, task, fn)
    return fn
