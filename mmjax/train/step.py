"""The pure train step: `(state, batch) -> (state, metrics)`, and the train state's initialisation.

It knows nothing of devices (bar an optional batch sharding that pins the micro-batch layout); `setup.py`
compiles it with `jax.jit` over the mesh. The loss and metrics come from the task (`mmjax.tasks`). Parameters
matching `frozen` patterns (LiT-style locked towers) get no gradient and no optimizer state: the gradient is
taken with respect to the trainable subset only. Gradient accumulation (`grad_accum_steps`) splits the batch
into micro-batches inside the step. With `nonfinite="skip"`, a step whose loss or gradient is NaN/Inf leaves the
state unchanged (bar the step counter) and reports `nonfinite_skipped = 1`. A `penalty` (the L1 / L2 penalties of
`config.optimizer`, `mmjax.train.optimizer.Penalty`) is added to the minimised objective and differentiated with it;
the logged `loss` stays the task's loss (comparable with evaluation losses) and `penalty` is logged beside it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.checks import check_strings
from mmjax.nn.models.multimodal import UNIMODAL_OUTPUTS
from mmjax.tasks.base import Task
from mmjax.train.modulation import GradientModulation
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


def check_frozen_patterns(frozen: Any) -> tuple[str, ...]:
    """`train.frozen` is a tuple of valid regular expressions (checked before any parameter exists)."""
    patterns = check_strings(frozen, "train.frozen", "('encoders_text',)")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"config train.frozen pattern {pattern!r} is not a valid regular expression: {e}"
            ) from None
    return patterns


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


def _forward_backward(trainable, locked, model_state, batch, rng, *, model, task, penalty=None, normalizer=None,
                      modulation=None, step=None):
    """Task loss, outputs, new model state, gradient w.r.t. `trainable` of the task's objective plus
    `penalty(trainable)` (when given), the penalty's value and the extra metrics (the objective's, the
    modulation's), for one (micro-)batch.

    The objective is `task.objective` (for a single task: the mean of its per-example loss, see `Task`);
    `normalizer` is the whole batch's (`Task.normalizer`) under gradient accumulation. `modulation` (OGM-GE,
    `mmjax.train.modulation`) rescales the encoders' gradients from the model's unimodal scores at state step
    `step`.
    """
    mutable = list(model_state)

    def loss_fn(trainable):
        variables = {"params": merge_params(trainable, locked), **model_state}
        if mutable:
            outputs, new_model_state = model.apply(variables, batch, train=True, rngs={"dropout": rng}, mutable=mutable)
        else:
            outputs = model.apply(variables, batch, train=True, rngs={"dropout": rng})
            new_model_state = model_state
        objective, loss, metrics = task.objective(outputs, batch, normalizer)
        if penalty is None:  # The objective is exactly the task's (the same program as without penalties).
            return objective, (outputs, new_model_state, loss, jnp.zeros((), jnp.float32), metrics)
        value = penalty(trainable)
        return objective + value, (outputs, new_model_state, loss, value, metrics)

    (_, (outputs, new_model_state, loss, value, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable)
    if modulation is not None:
        grads, modulated = modulation(grads, outputs[UNIMODAL_OUTPUTS], batch["label"], rng, step)
        metrics = {**metrics, **modulated}
    return loss, outputs, dict(new_model_state), grads, value, metrics


def split_micro_batches(batch: Mapping[str, jax.Array], k: int, sharding: NamedSharding | None = None) -> dict:
    """`[B, ...]` -> `[k, B / k, ...]` where micro-batch j holds examples j, j + k, j + 2k, ... (a strided split).

    Why strided, not contiguous blocks: device d holds rows `[d * B / D, (d + 1) * B / D)` of the batch. The
    reshape to `[B / k, k, ...]` keeps those rows on device d as `B / (k * D)` whole groups of k (B is a multiple
    of k * D, see `setup.validate`), and taking `[:, j]` picks `B / (k * D)` rows from every device. So each
    micro-batch is spread evenly over all devices and the split moves no data; a contiguous block j would live
    on D / k devices only. `sharding` (the batch's) pins the layout, `[k, B / k]` split on axis 1 like the batch.
    """

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} examples does not split into {k} equal micro-batches")
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        if sharding is not None:
            spec = sharding.spec[0] if len(sharding.spec) else None
            x = jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, PartitionSpec(None, spec)))
        return x

    return {key: split(value) for key, value in batch.items()}


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    task: Task,
    frozen: Sequence[str] = (),
    grad_accum_steps: int = 1,
    batch_sharding: NamedSharding | None = None,
    nonfinite: str = "stop",
    penalty: Callable[[Any], jax.Array] | None = None,
    modulation: GradientModulation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the (global) batch; gradients are averaged over it, hence over every device.

    With `grad_accum_steps=k > 1` the batch is split into k strided micro-batches (`split_micro_batches`; pass the
    batch's `batch_sharding` to keep each one spread over every device) and a `lax.scan` runs forward and
    backward on each, summing gradients; one update then uses their mean. Loss, gradient and metrics equal those
    of the whole batch (up to float rounding), at 1/k of the activation memory. Differences from one big batch:
    batch-norm statistics are updated micro-batch by micro-batch (as in PyTorch or big_vision accumulation, and
    normalisation uses micro-batch statistics), and micro-batch j draws dropout from `fold_in(step rng, j)`.
    Only per-example losses accumulate exactly (`Task.per_example_loss`). XLA reduces each micro-batch's
    gradient over the devices inside the loop, so gradient communication grows with k.

    `nonfinite="skip"`: when the loss or the gradient norm is NaN/Inf, the new parameters, optimizer state and model
    state are discarded (the old ones are kept, as `optax.apply_if_finite` does) and the metric
    `nonfinite_skipped` is 1; the step counter still advances, so the next step draws fresh randomness. With
    "stop" (the default) the step is unchanged and the loop stops on non-finite metrics (`reliability`).

    `penalty` (e.g. `optimizer.build_penalty(config.optimizer)`; None or inactive: none): a function of the
    trainable parameters added to the objective; its value is the metric `penalty`, and `loss` stays the task's.

    The objective and the logged loss come from `task.objective` (a composed task, `mmjax.tasks.multitask`, adds
    per-task losses and weights to the metrics); under accumulation each micro-batch divides by its share of the
    whole batch's `task.normalizer`, so masked per-task means accumulate exactly too. `modulation` (OGM-GE) rescales
    the encoders' gradients of each (micro-)batch before they are summed; it needs the model's unimodal scores.
    """
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"config train.nonfinite={nonfinite!r}; valid: stop, skip")
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"config train.grad_accum_steps={grad_accum_steps!r} must be a positive integer")
    trainable, locked = split_params(state.params, frozen)
    locked = jax.lax.stop_gradient(locked)
    if penalty is not None and not getattr(penalty, "active", True):
        penalty = None
    compute = functools.partial(_forward_backward, model=model, task=task, penalty=penalty, modulation=modulation,
                                step=state.step)
    rng = step_rng(state)
    if grad_accum_steps == 1:
        loss, outputs, model_state, grads, penalty_value, extra = compute(
            trainable, locked, state.model_state, batch, rng)
        task_metrics = {**task.batch_metrics(outputs, batch), **extra}
    else:
        k = grad_accum_steps
        micro_batches = split_micro_batches(batch, k, batch_sharding)
        whole = task.normalizer(batch)  # Each micro-batch divides its sums by 1/k of the whole batch's normaliser.
        share = None if whole is None else jax.tree_util.tree_map(lambda n: n / k, whole)

        def accumulate(carry, xs):
            model_state, grad_sum = carry
            j, micro_batch = xs
            loss, outputs, model_state, grads, value, extra = compute(
                trainable, locked, model_state, micro_batch, jax.random.fold_in(rng, j), normalizer=share
            )
            grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
            return (model_state, grad_sum), (loss, value, {**task.batch_metrics(outputs, micro_batch), **extra})

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        (model_state, grad_sum), (losses, penalties, metrics) = jax.lax.scan(
            accumulate, (dict(state.model_state), zeros), (jnp.arange(k), micro_batches)
        )
        # Equal-sized micro-batches: the mean of their means is the mean over the whole batch.
        grads = jax.tree_util.tree_map(lambda g: g / k, grad_sum)
        loss, penalty_value = losses.mean(), penalties[0]  # The penalty is the same for every micro-batch.
        task_metrics = jax.tree_util.tree_map(lambda m: m.mean(0), metrics)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = merge_params(optax.apply_updates(trainable, updates), locked)
    metrics = {"loss": loss, **task_metrics, "grad_norm": optax.tree.norm(grads)}
    if penalty is not None:
        metrics["penalty"] = penalty_value
    model_state = dict(model_state)
    if nonfinite == "skip":
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        model_state = keep(model_state, dict(state.model_state))
        metrics["nonfinite_skipped"] = jnp.logical_not(finite).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics
