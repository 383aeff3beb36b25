"""Multi-task loss, masked labels, uncertainty weighting and unimodal auxiliary heads (mmjax.tasks.multitask)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax.nn.builder import build_model
from mmjax.nn.models.multimodal import AUX_OUTPUTS, FUSED_OUTPUTS, LOG_VARS, TASK_OUTPUTS
from mmjax.tasks import build_task
from mmjax.tasks.multitask import MultiTask, UnimodalAuxiliary, gradient_blending_weights, parse_tasks
from mmjax.train.step import init_state, train_step

HEADS = {"digit": ("classification", "digit", 10), "value": ("regression", "value", 1),
         "pair": ("multilabel", "pair", 10)}


def multitask(weights, weighting="fixed"):
    tasks = {n: build_task({"name": kind}, k) for n, (kind, _, k) in HEADS.items()}
    return MultiTask(num_classes=3, tasks=tasks, labels={n: label for n, (_, label, _) in HEADS.items()},
                     weights=weights, weighting=weighting)


def outputs_and_batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    outputs = {TASK_OUTPUTS: {"digit": jnp.asarray(rng.normal(size=(n, 10)), jnp.float32),
                              "value": jnp.asarray(rng.normal(size=(n, 1)), jnp.float32),
                              "pair": jnp.asarray(rng.normal(size=(n, 10)), jnp.float32)}}
    pair = np.zeros((n, 10), np.float32)
    pair[np.arange(n), rng.integers(0, 10, n)] = 1
    batch = {"digit": rng.integers(0, 10, n).astype(np.int32), "value": rng.normal(size=n).astype(np.float32) * 3,
             "pair": pair}
    return outputs, {k: jnp.asarray(v) for k, v in batch.items()}


def single_loss(name, outputs, labels):
    kind, _, k = HEADS[name]
    return float(build_task({"name": kind}, k).loss(outputs, labels).mean())


def test_multitask_loss_is_the_weighted_sum_of_single_task_losses():
    outputs, batch = outputs_and_batch()
    weights = {"digit": 1.0, "value": 0.25, "pair": 2.0}
    objective, logged, metrics = multitask(weights).objective(outputs, batch)
    singles = {n: single_loss(n, outputs[TASK_OUTPUTS][n], batch[HEADS[n][1]]) for n in HEADS}
    expected = sum(weights[n] * singles[n] for n in HEADS)
    np.testing.assert_allclose(float(objective), expected, rtol=1e-6)
    np.testing.assert_allclose(float(logged), expected, rtol=1e-6)
    for n in HEADS:
        np.testing.assert_allclose(float(metrics[f"{n}/loss"]), singles[n], rtol=1e-6)
        assert float(metrics[f"weight/{n}"]) == weights[n]


def test_uncertainty_weighting_follows_kendall_et_al():
    outputs, batch = outputs_and_batch()
    log_vars = jnp.asarray([0.3, -0.5, 1.2], jnp.float32)  # sorted task order: digit, pair, value
    outputs = {**outputs, LOG_VARS: log_vars}
    weights = {"digit": 1.0, "value": 2.0, "pair": 0.5}
    objective, _, metrics = multitask(weights, "uncertainty").objective(outputs, batch)
    expected = 0.0
    for i, n in enumerate(sorted(HEADS)):
        c = 0.5 if HEADS[n][0] == "regression" else 1.0
        s = float(log_vars[i])
        loss = single_loss(n, outputs[TASK_OUTPUTS][n], batch[HEADS[n][1]])
        expected += weights[n] * (c * np.exp(-s) * loss + s / 2)
        np.testing.assert_allclose(float(metrics[f"weight/{n}"]), weights[n] * c * np.exp(-s), rtol=1e-6)
    np.testing.assert_allclose(float(objective), expected, rtol=1e-6)


def test_masked_labels_contribute_exactly_zero_gradient_and_are_never_zero_labels():
    outputs, batch = outputs_and_batch(n=6)
    present = np.array([1, 0, 1, 1, 0, 1], np.float32)
    batch = {**batch, "digit_mask": jnp.asarray(present)}
    poisoned = dict(batch)
    poisoned["digit"] = jnp.where(present > 0, batch["digit"], 7)  # absent rows' placeholder label changes
    task = multitask({"digit": 1.0, "value": 1.0, "pair": 1.0})

    def objective(outs, b):
        return task.objective(outs, b)[0]

    grads = jax.grad(objective)(outputs, batch)
    digit_grad = np.asarray(grads[TASK_OUTPUTS]["digit"])
    assert np.all(digit_grad[present == 0] == 0.0)  # exactly zero, not small
    assert np.all(np.abs(digit_grad[present == 1]).sum(-1) > 0)
    np.testing.assert_array_equal(np.asarray(jax.grad(objective)(outputs, poisoned)[TASK_OUTPUTS]["digit"]),
                                  digit_grad)
    # The digit loss is the mean over the labelled rows only (not a zero label for the others).
    kept = present > 0
    want = single_loss("digit", outputs[TASK_OUTPUTS]["digit"][kept], batch["digit"][kept])
    np.testing.assert_allclose(float(task.objective(outputs, batch)[2]["digit/loss"]), want, rtol=1e-6)
    # NaN placeholders of absent rows cannot leak into the loss or the gradient.
    nan_batch = {**batch, "value_mask": jnp.asarray(present), "value": jnp.where(present > 0, batch["value"], jnp.nan)}
    value, g = jax.value_and_grad(objective)(outputs, nan_batch)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g[TASK_OUTPUTS]["value"])))


def _model_config(**extra):
    return ml_collections.ConfigDict(dict(
        num_classes=4,
        encoders=dict(image=dict(name="small_cnn", features=(4,), width=8),
                      audio=dict(name="spectrogram_cnn", features=(4,), width=8)),
        fusion=dict(name="concat"), head=dict(name="classifier", hidden=(8,)), **extra))


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, size=n).astype(np.int32)
    return {"image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
            "audio": rng.normal(size=(n, 12, 8)).astype(np.float32),
            "label": label, "value": label.astype(np.float32)}


def test_multitask_model_trains_each_head_and_its_log_variances():
    heads = {"cls": ({"name": "classifier", "hidden": (8,)}, 4), "reg": ({"name": "regressor", "hidden": (8,)}, 1)}
    model = build_model(_model_config(), task_heads=heads, learned_log_vars=True)
    tasks = {"cls": build_task({"name": "classification"}, 4), "reg": build_task({"name": "regression"}, 1)}
    task = MultiTask(num_classes=2, tasks=tasks, labels={"cls": "label", "reg": "value"},
                     weights={"cls": 1.0, "reg": 0.5}, weighting="uncertainty")
    tx = optax.adam(1e-2)
    state = init_state(model, tx, _batch(1), jax.random.PRNGKey(0))
    assert set(state.params) >= {"heads_cls", "heads_reg", "task_log_vars"}
    step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, task=task))
    new, metrics = step(state, _batch())
    for key in ("cls/loss", "reg/loss", "weight/cls", "weight/reg", "cls/accuracy", "reg/mae"):
        assert np.isfinite(float(metrics[key])), key
    np.testing.assert_allclose(float(metrics["weight/reg"]), 0.5 * 0.5, rtol=1e-6)  # s = 0 at initialisation
    assert np.any(np.asarray(new.params["task_log_vars"]) != 0)
    for head in ("heads_cls", "heads_reg"):
        before, after = jax.tree_util.tree_leaves(state.params[head]), jax.tree_util.tree_leaves(new.params[head])
        assert any(np.any(a != b) for a, b in zip(before, after))


def test_auxiliary_heads_objective_adds_weighted_unimodal_losses():
    model = build_model(_model_config(aux_heads={"audio": 0.5, "image": 0.25}))
    base = build_task(None, 4)
    task = UnimodalAuxiliary(num_classes=4, task=base, weights={"audio": 0.5, "image": 0.25}, fused_weight=2.0)
    batch = {k: jnp.asarray(v) for k, v in _batch().items() if k != "value"}
    variables = model.init(jax.random.PRNGKey(0), batch, train=False)
    outputs = model.apply(variables, batch, train=False)
    assert set(outputs[AUX_OUTPUTS]) == {"audio", "image"}
    objective, logged, metrics = task.objective(outputs, batch)
    fused = float(base.loss(outputs[FUSED_OUTPUTS], batch["label"]).mean())
    aux = {m: float(base.loss(outputs[AUX_OUTPUTS][m], batch["label"]).mean()) for m in ("audio", "image")}
    np.testing.assert_allclose(float(objective), 2.0 * fused + 0.5 * aux["audio"] + 0.25 * aux["image"], rtol=1e-6)
    np.testing.assert_allclose(float(logged), fused, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["aux_audio/loss"]), aux["audio"], rtol=1e-6)


def test_gradient_blending_weights_by_hand():
    # head a: dG = 1.0 - 0.8 = 0.2, dO = (0.8 - 0.5) - (1.0 - 0.9) = 0.2 -> 0.2 / 0.04 = 5
    # head b: dG = 0.1, dO = (1.1 - 0.6) - (1.2 - 1.0) = 0.3 -> 0.1 / 0.09 = 1.111...
    # head c: validation got worse -> 0
    weights = gradient_blending_weights({"a": (0.9, 0.5), "b": (1.0, 0.6), "c": (1.0, 0.2)},
                                        {"a": (1.0, 0.8), "b": (1.2, 1.1), "c": (1.0, 1.3)})
    raw = {"a": 5.0, "b": 0.1 / 0.09, "c": 0.0}
    total = sum(raw.values())
    for k in raw:
        np.testing.assert_allclose(weights[k], raw[k] / total, rtol=1e-9)


@pytest.mark.parametrize("tasks, message", [
    ({"a": {"name": "classification", "weight": -1.0}}, "is negative"),
    ({"a": {"name": "classification", "weight": 0.0}, "b": {"name": "regression", "weight": 0}}, "all zero"),
    ({"a": {"name": "contrastive"}}, "supervised"),
    ({"a": {"name": "classification", "colour": 1}}, "unknown option"),
    ({"a": {"name": "classification", "num_classes": 0}}, "positive integer"),
])
def test_bad_task_entries_are_named(tasks, message):
    with pytest.raises(ValueError, match=message):
        parse_tasks(ml_collections.ConfigDict(tasks))
