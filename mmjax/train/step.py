"""Pure train and eval steps: `(state, batch) -> (state, metrics)` and `(params, batch) -> outputs`.

They know nothing of devices; `loop.py` compiles them with `jax.jit` over the mesh.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax.data.pipeline import VALID_KEY
from mmjax.train.state import TrainState, step_rng


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def init_state(model: nn.Module, tx: optax.GradientTransformation, example_batch, rng: jax.Array) -> TrainState:
    """Initialises parameters from an example batch (shapes only matter) and the optimizer state."""
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, example_batch, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module, tx: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the (global) batch; gradients are averaged over it, hence over every device."""
    dropout_rng = step_rng(state)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch, train=True, rngs={"dropout": dropout_rng})
        return classification_loss(logits, batch["label"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.tree.norm(grads),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Mapping[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
    """Per-example outputs (prediction, label, validity, loss), gathered on the host for exact metrics."""
    logits = model.apply({"params": params}, batch, train=False)
    labels = batch["label"]
    return {
        "prediction": jnp.argmax(logits, -1).astype(jnp.int32),
        "label": labels,
        "valid": batch[VALID_KEY],
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels),
    }
