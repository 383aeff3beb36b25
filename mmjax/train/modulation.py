"""On-the-fly gradient modulation (OGM-GE), a remedy for modality imbalance in jointly trained fusion models.

Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022. The
fused model learns most from the modality that is easiest to fit, and its other encoders stay under-trained. At
every step OGM measures how well each modality alone explains the batch and slows down the leading one's encoder:

* unimodal score of modality m over the batch: s_m = sum_i softmax(o_m(x_i))[y_i], where o_m is the fused head's
  output with only m present (the paper splits a concatenation head's logits into per-modality parts; masking the
  other modalities does the same for any mask-aware fusion, `MultimodalModel.unimodal_scores`);
* discrepancy ratio rho_m = s_m / s_other, with s_other the mean score of the other modalities (for two modalities,
  the paper's rho_a = s_a / s_v);
* coefficient k_m = 1 - tanh(alpha * rho_m) when rho_m > 1, else 1 (their eq. 9-10);
* the gradient g of every weight matrix / kernel of encoder m becomes k_m g and, with generalisation enhancement
  (GE, their eq. 12), k_m g + h with h ~ N(0, std(g)^2): Gaussian noise with the spread of that gradient, as
  the official implementation (github.com/GeWu-Lab/OGM-GE_CVPR2022) draws it, on every modulated parameter.

`config.train.modulation = {"name": "ogm_ge" | "ogm", "alpha": 0.5, "start_step": 0, "end_step": 0}` (empty: off;
`end_step` 0: until the end). Modulation applies to steps `start_step <= step < end_step`; the coefficients and
scores are logged as `ogm/coef_<m>` and `ogm/score_<m>` (batch means over the devices, like every metric).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.checks import is_int, is_number
from mmjax.registry import invalid_choice

MODULATIONS = ("ogm_ge", "ogm")
OPTIONS = ("name", "alpha", "start_step", "end_step")
_NOISE_STREAM = 0x0C3  # Folded into the step's dropout key: the GE noise never reuses dropout's randomness.


@dataclasses.dataclass(frozen=True)
class GradientModulation:
    """OGM (`noise=False`) or OGM-GE over the encoders of `modalities` (module docstring)."""

    modalities: tuple[str, ...]
    alpha: float = 0.5
    noise: bool = True
    start_step: int = 0
    end_step: int = 0

    def scores(self, unimodal: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
        """`[M]`: s_m = sum over the batch of the probability the modality-m-only output gives the true class."""
        def score(logits):
            probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            return jnp.take_along_axis(probabilities, labels.astype(jnp.int32)[:, None], axis=-1).sum()
        return jnp.stack([score(unimodal[m]) for m in self.modalities])

    def coefficients(self, scores: jax.Array) -> jax.Array:
        """`[M]`: k_m = 1 - tanh(alpha rho_m) where rho_m = s_m / mean_{m' != m} s_m' > 1, else 1."""
        count = scores.shape[0]
        others = (scores.sum() - scores) / (count - 1)
        ratio = scores / jnp.maximum(others, 1e-12)
        return jnp.where(ratio > 1, 1.0 - jnp.tanh(self.alpha * ratio), 1.0)

    def active(self, step: jax.Array) -> jax.Array:
        """Whether step `step` (0-based, the state's counter before the update) is modulated."""
        on = step >= self.start_step
        return on if self.end_step <= 0 else on & (step < self.end_step)

    def apply(self, grads: Mapping[str, Any], coefficients: jax.Array, rng: jax.Array,
              active: jax.Array) -> dict[str, Any]:
        """The gradients with every weight matrix / kernel (ndim >= 2) of `encoders_<m>` scaled by k_m and, with
        GE, N(0, std(g)^2) noise added; other parameters and inactive steps unchanged."""
        grads = dict(grads)
        key = jax.random.fold_in(rng, _NOISE_STREAM)
        for index, m in enumerate(self.modalities):
            name = f"encoders_{m}"
            if name not in grads:
                continue
            k = jnp.where(active, coefficients[index], 1.0)
            leaves, treedef = jax.tree_util.tree_flatten(grads[name])
            keys = jax.random.split(jax.random.fold_in(key, index), max(len(leaves), 1))
            out = []
            for leaf, leaf_key in zip(leaves, keys):
                if leaf.ndim < 2:
                    out.append(leaf)
                    continue
                new = leaf * k.astype(leaf.dtype)
                if self.noise:
                    std = jnp.std(leaf.astype(jnp.float32)) + 1e-8
                    noise = std * jax.random.normal(leaf_key, leaf.shape, jnp.float32)
                    new = new + jnp.where(active, noise, 0.0).astype(leaf.dtype)
                out.append(new)
            grads[name] = jax.tree_util.tree_unflatten(treedef, out)
        return grads

    def __call__(self, grads: Mapping[str, Any], unimodal: Mapping[str, jax.Array], labels: jax.Array,
                 rng: jax.Array, step: jax.Array) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """Modulated gradients of one (micro-)batch and the metrics `ogm/score_<m>`, `ogm/coef_<m>`."""
        scores = self.scores(unimodal, labels)
        coefficients = self.coefficients(scores)
        active = self.active(step)
        grads = self.apply(grads, coefficients, rng, active)
        metrics = {f"ogm/score_{m}": scores[i] / labels.shape[0] for i, m in enumerate(self.modalities)}
        metrics.update({f"ogm/coef_{m}": jnp.where(active, coefficients[i], 1.0)
                        for i, m in enumerate(self.modalities)})
        return grads, metrics


def build_modulation(options: Mapping[str, Any] | None, modalities: Sequence[str],
                     task_kind: str = "classification") -> GradientModulation | None:
    """The modulation of `config.train.modulation` (None when empty), every option checked with the key named."""
    options = dict(options or {})
    if not options:
        return None
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"config train.modulation: unknown option(s) {unknown}; valid: {list(OPTIONS)}")
    name = options.get("name")
    if name not in MODULATIONS:
        raise ValueError(invalid_choice("train.modulation.name", name, MODULATIONS))
    alpha = options.get("alpha", 0.5)
    if not is_number(alpha) or alpha <= 0:
        raise ValueError(f"config train.modulation.alpha={alpha!r} must be a number > 0")
    for key in ("start_step", "end_step"):
        value = options.get(key, 0)
        if not is_int(value) or value < 0:
            raise ValueError(f"config train.modulation.{key}={value!r} must be an integer >= 0")
    if task_kind != "classification":
        raise ValueError(f"config train.modulation ({name}) scores class probabilities; task {task_kind!r} has none")
    if len(modalities) < 2:
        raise ValueError(f"config train.modulation ({name}) balances two or more modalities; the model has "
                         f"{list(modalities)}")
    return GradientModulation(tuple(sorted(modalities)), float(alpha), name == "ogm_ge",
                              int(options.get("start_step", 0)), int(options.get("end_step", 0)))
