"""Pure train and eval steps: `(state, batch) -> (state, metrics)` and `(params, model_state, batch) -> outputs`.

They know nothing of devices; `loop.py` compiles them with `jax.jit` over the mesh. The loss and metrics come
from the task (`mmjax.tasks`). Parameters matching `frozen` patterns (LiT-style locked towers) get no gradient
and no optimizer state: the gradient is taken with respect to the trainable subset only.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mmjax.data.pipeline import VALID_KEY
from mmjax.train.state import TrainState, step_rng


def split_params(params: Any, frozen: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; `frozen` holds regexes matched at the start of "/"-joined param paths."""
    if not frozen:
        return params, {}
    flat = traverse_util.flatten_dict(params, sep="/")
    patterns = [re.compile(p) for p in frozen]
    is_frozen = {k: any(p.match(k) for p in patterns) for k in flat}
    unflatten = lambda keep: traverse_util.unflatten_dict(  # noqa: E731
        {k: v for k, v in flat.items() if is_frozen[k] == keep}, sep="/"
    )
    return unflatten(False), unflatten(True)


def merge_params(trainable: dict, frozen: dict) -> dict:
    if not frozen:
        return trainable
    flat = {**traverse_util.flatten_dict(trainable, sep="/"), **traverse_util.flatten_dict(frozen, sep="/")}
    return traverse_util.unflatten_dict(flat, sep="/")


def check_frozen(params: Any, frozen: Sequence[str]) -> None:
    """Every frozen pattern must match some parameter (a typo would silently train everything)."""
    names = list(traverse_util.flatten_dict(params, sep="/"))
    for pattern in frozen:
        if not any(re.match(pattern, n) for n in names):
            tops = sorted({n.split("/")[0] for n in names})
            raise ValueError(f"config train.frozen pattern {pattern!r} matches no parameter; top-level names: {tops}")
    trainable, _ = split_params(params, frozen)
    if not trainable:
        raise ValueError(f"config train.frozen={list(frozen)} freezes every parameter: nothing would train")


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, example_batch, rng: jax.Array, frozen: Sequence[str] = ()
) -> TrainState:
    """Initialises variables from an example batch (shapes only matter) and the optimizer state."""
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, example_batch, train=False)
    params = variables["params"]
    # Sown values (`intermediates`, e.g. fusion weights for analysis) are outputs, not state: never carried.
    model_state = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
    trainable, _ = split_params(params, frozen)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(trainable),
        rng=state_rng,
    )


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    task,
    frozen: Sequence[str] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the (global) batch; gradients are averaged over it, hence over every device."""
    dropout_rng = step_rng(state)
    trainable, locked = split_params(state.params, frozen)
    locked = jax.lax.stop_gradient(locked)
    mutable = list(state.model_state)

    def loss_fn(trainable):
        variables = {"params": merge_params(trainable, locked), **state.model_state}
        if mutable:
            outputs, new_model_state = model.apply(
                variables, batch, train=True, rngs={"dropout": dropout_rng}, mutable=mutable
            )
        else:
            outputs = model.apply(variables, batch, train=True, rngs={"dropout": dropout_rng})
            new_model_state = state.model_state
        return task.loss(outputs, batch["label"]).mean(), (outputs, new_model_state)

    (loss, (outputs, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = merge_params(optax.apply_updates(trainable, updates), locked)
    metrics = {"loss": loss, **task.train_metrics(outputs, batch["label"]), "grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(
        step=state.step + 1, params=params, model_state=dict(model_state), opt_state=opt_state
    )
    return new_state, metrics


def eval_step(params, model_state, batch: Mapping[str, jax.Array], *, model: nn.Module, task) -> dict[str, jax.Array]:
    """Per-example outputs (the task's predictions, label, validity, loss), gathered on the host for exact metrics."""
    outputs = model.apply({"params": params, **model_state}, batch, train=False)
    return {
        **task.eval_outputs(outputs),
        "label": batch["label"],
        "valid": batch[VALID_KEY],
        "loss": task.loss(outputs, batch["label"]),
    }
