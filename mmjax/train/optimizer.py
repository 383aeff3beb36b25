"""Optax optimizers and learning-rate schedules from `config.optimizer`."""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


def weight_decay_mask(params):
    """Decay matrices and kernels only: biases and norm scales/offsets (1-D leaves) are excluded."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * end_lr_factor` at `num_steps` (or constant)."""
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
    """Gradient clipping (if `grad_clip_norm` > 0), then AdamW or SGD with momentum, with masked weight decay."""
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
