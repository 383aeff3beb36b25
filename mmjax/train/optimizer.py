"""Optax optimizers and learning-rate schedules from `config.optimizer`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

from mmjax.checks import check_number
from mmjax.config import base_config
from mmjax.registry import closest, invalid_choice

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
# Keys `build_optimizer` reads; any other key in config.optimizer would be silently ignored.
OPTIMIZER_KEYS = ("name", "lr", "schedule", "warmup_steps", "end_lr_factor", "weight_decay", "b1", "b2",
                  "momentum", "nesterov", "grad_clip_norm")


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
