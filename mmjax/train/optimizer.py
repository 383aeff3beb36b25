"""Optax optimizers and learning-rate schedules from `config.optimizer`, and the L1 / L2 penalties it configures.

Penalties (added to the training loss by `mmjax.train.step`, separate from the optimizer's decoupled weight
decay): `optimizer.l1` and `optimizer.l2` are the coefficients of

    penalty(w) = l1 * sum_{p in L1} |p| + l2 * sum_{p in L2} p^2

(Tibshirani, "Regression Shrinkage and Selection via the Lasso", 1996; Hoerl, Kennard, "Ridge Regression", 1970;
the convention of Keras' `l1` / `l2` regularizers: no factor 1/2, so the L2 gradient is 2 * l2 * p). The
parameter groups are regexes like `train.frozen`'s, matched at the start of "/"-joined parameter paths
(`optimizer.l1_params`, `optimizer.l2_params`); empty (default) = every trainable weight matrix or kernel (the
parameters of 2 or more dimensions, as the weight decay mask: biases and norm parameters excluded). Unlike
AdamW's decoupled decay, the penalty's gradient goes through the optimizer's preconditioning (Loshchilov, Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019, explain the difference). Frozen parameters are never
penalised (they do not train).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from mmjax.checks import check_number, check_strings
from mmjax.config import base_config
from mmjax.registry import closest, invalid_choice

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
# Keys `build_optimizer` reads; any other key in config.optimizer would be silently ignored.
OPTIMIZER_KEYS = ("name", "lr", "schedule", "warmup_steps", "end_lr_factor", "weight_decay", "b1", "b2",
                  "momentum", "nesterov", "grad_clip_norm", "l1", "l2", "l1_params", "l2_params")


def with_defaults(optimizer: Mapping[str, Any]) -> dict[str, Any]:
    """`config.optimizer` with every key it leaves out taken from `mmjax.config.base_config()`."""
    return {**base_config().optimizer.to_dict(), **dict(optimizer)}


def check_config(optimizer: Mapping[str, Any]) -> None:
    """`config.optimizer` has only known keys, a known name and schedule, and values in range (errors name the key)."""
    for key in sorted(optimizer):
        if key not in OPTIMIZER_KEYS:
            raise ValueError(
                f"config optimizer.{key}: unknown key.{closest(key, OPTIMIZER_KEYS)} Valid: {', '.join(OPTIMIZER_KEYS)}"
            )
    optimizer = with_defaults(optimizer)
    if optimizer.get("name") not in OPTIMIZERS:
        raise ValueError(invalid_choice("optimizer.name", optimizer.get("name"), OPTIMIZERS))
    if "schedule" in optimizer and optimizer["schedule"] not in SCHEDULES:
        raise ValueError(invalid_choice("optimizer.schedule", optimizer["schedule"], SCHEDULES))
    check_number(optimizer, "optimizer.lr", low=0.0, low_open=True)
    check_number(optimizer, "optimizer.warmup_steps", low=0, integer=True)
    for key in ("end_lr_factor", "weight_decay", "grad_clip_norm"):
        check_number(optimizer, f"optimizer.{key}", low=0.0)
    for key in ("b1", "b2", "momentum"):
        check_number(optimizer, f"optimizer.{key}", low=0.0, high=1.0)
    if "nesterov" in optimizer and not isinstance(optimizer["nesterov"], bool):
        raise ValueError(f"config optimizer.nesterov={optimizer['nesterov']!r} must be a bool (True/False)")
    build_penalty(optimizer)  # Coefficients and regexes.


@dataclasses.dataclass(frozen=True)
class Penalty:
    """L1 / L2 penalties on parameter groups (module docstring): `penalty(trainable_params) -> scalar`."""

    l1: float = 0.0
    l2: float = 0.0
    l1_params: tuple[str, ...] = ()
    l2_params: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.l1 or self.l2)

    def groups(self, params: Any) -> dict[str, list[str]]:
        """The "/"-joined paths each penalty applies to; a regex that selects no parameter is an error (a typo
        would silently leave the model unregularised)."""
        names = list(traverse_util.flatten_dict(params, sep="/"))
        shapes = traverse_util.flatten_dict(jax.tree_util.tree_map(jnp.shape, params), sep="/")
        groups = {}
        for kind, coefficient, patterns in (("l1", self.l1, self.l1_params), ("l2", self.l2, self.l2_params)):
            if not coefficient:
                continue
            if not patterns:
                groups[kind] = [n for n in names if len(shapes[n]) > 1]
                continue
            for pattern in patterns:
                if not any(re.match(pattern, n) for n in names):
                    tops = sorted({n.split("/")[0] for n in names})
                    raise ValueError(f"config optimizer.{kind}_params pattern {pattern!r} matches no trainable "
                                     f"parameter; top-level names: {tops}")
            groups[kind] = [n for n in names if any(re.match(p, n) for p in patterns)]
        return groups

    def __call__(self, params: Any) -> jax.Array:
        flat = traverse_util.flatten_dict(params, sep="/")
        total = jnp.zeros((), jnp.float32)
        groups = self.groups(params)
        for name in groups.get("l1", ()):
            total = total + self.l1 * jnp.abs(flat[name].astype(jnp.float32)).sum()
        for name in groups.get("l2", ()):
            total = total + self.l2 * jnp.square(flat[name].astype(jnp.float32)).sum()
        return total


def build_penalty(optimizer: Mapping[str, Any]) -> Penalty:
    """The `Penalty` of `config.optimizer` (`l1`, `l2`, `l1_params`, `l2_params`; module docstring)."""
    optimizer = with_defaults(optimizer)
    for key in ("l1", "l2"):
        check_number(optimizer, f"optimizer.{key}", low=0.0)
    patterns = {}
    for key in ("l1_params", "l2_params"):
        patterns[key] = check_strings(optimizer.get(key, ()), f"optimizer.{key}", r"('encoders_image/.*kernel',)")
        for pattern in patterns[key]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"config optimizer.{key} pattern {pattern!r} is not a valid regular expression: "
                                 f"{e}") from None
    return Penalty(float(optimizer.get("l1", 0.0)), float(optimizer.get("l2", 0.0)), **patterns)


def weight_decay_mask(params):
    """Decay matrices and kernels only: biases and norm scales/offsets (1-D leaves) are excluded."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * end_lr_factor` at `num_steps` (or constant)."""
    cfg = ml_collections.ConfigDict(with_defaults(cfg))
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"config optimizer.schedule={cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
    if cfg.schedule == "constant":  # linear_schedule holds `lr` once the warm-up is over.
        return optax.linear_schedule(0.0, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=cfg.lr * cfg.end_lr_factor,
    )


def build_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Gradient clipping (if `grad_clip_norm` > 0), then AdamW or SGD with momentum, with masked weight decay.

    Keys missing from `cfg` take their `base_config()` values."""
    cfg = ml_collections.ConfigDict(with_defaults(cfg))
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"config optimizer.name={cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    schedule = learning_rate_schedule(cfg, num_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    else:
        opt = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask),
            optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
        )
    if cfg.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
    return opt
