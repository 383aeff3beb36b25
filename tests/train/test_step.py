"""The pure train step: frozen parameters, modality dropout, task losses."""

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from mmjax.nn.builder import build_model
from mmjax.tasks import build_task
from mmjax.train.step import check_frozen, init_state, split_params, train_step


def model_config(**extra):
    return ml_collections.ConfigDict(
        dict(
            num_classes=4,
            encoders=dict(
                image=dict(name="small_cnn", features=(4,), width=8),
                audio=dict(name="spectrogram_cnn", features=(4,), width=8),
            ),
            fusion=dict(name="concat"),
            head=dict(name="classifier", hidden=(8,)),
            **extra,
        )
    )


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
        "audio": rng.normal(size=(n, 12, 8)).astype(np.float32),
        "label": rng.integers(0, 4, size=n).astype(np.int32),
    }


def test_frozen_parameters_get_no_update_and_no_optimizer_state():
    model, tx, task = build_model(model_config()), optax.adam(1e-2), build_task(None, 4)
    frozen = ("encoders_image",)
    state = init_state(model, tx, batch(1), jax.random.PRNGKey(0), frozen=frozen)
    adam_state = state.opt_state[0]
    assert "encoders_image" not in adam_state.mu and "encoders_audio" in adam_state.mu
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, task=task, frozen=frozen))(state, batch())
    before, after = state.params, new.params
    jax.tree_util.tree_map(np.testing.assert_array_equal, before["encoders_image"], after["encoders_image"])
    for layer in ("Conv_0", "pool_proj"):  # (token_proj is unused by concatenation, so it has no gradient.)
        assert np.any(before["encoders_audio"][layer]["kernel"] != after["encoders_audio"][layer]["kernel"])
    assert np.isfinite(metrics["loss"])


def test_frozen_patterns_are_checked():
    model, tx = build_model(model_config()), optax.adam(1e-2)
    params = init_state(model, tx, batch(1), jax.random.PRNGKey(0)).params
    with pytest.raises(ValueError, match="'encoders_imag3' matches no parameter.*encoders_image"):
        check_frozen(params, ("encoders_imag3",))
    with pytest.raises(ValueError, match="freezes every parameter"):
        check_frozen(params, (".*",))
    trainable, locked = split_params(params, ("encoders_.*/pool_proj",))
    assert set(locked) == {"encoders_audio", "encoders_image"} and set(locked["encoders_image"]) == {"pool_proj"}
    assert "pool_proj" not in trainable["encoders_image"]


def test_modality_dropout_masks_modalities_in_training_only_and_never_all():
    model = build_model(model_config(modality_dropout=0.5))
    variables = model.init(jax.random.PRNGKey(0), batch(1), train=False)
    captured = []
    fusion_call = type(model.fusion).__call__

    def spy(self, features, *, masks=None, train):
        captured.append(masks)
        return fusion_call(self, features, masks=masks, train=train)

    type(model.fusion).__call__ = spy
    try:
        model.apply(variables, batch(64), train=True, rngs={"dropout": jax.random.PRNGKey(1)})
        model.apply(variables, batch(64), train=False)
    finally:
        type(model.fusion).__call__ = fusion_call
    train_masks, eval_masks = captured
    assert eval_masks is None
    kept = np.stack([np.asarray(train_masks[m]) for m in ("audio", "image")], axis=1)
    assert kept.sum(axis=1).min() >= 1  # Never both dropped.
    assert 0 < (kept == 0).mean() < 0.5  # Some dropped, fewer than half (p=0.5, "all dropped" keeps both).
    with pytest.raises(ValueError, match="modality_dropout=1.0"):
        build_model(model_config(modality_dropout=1.0))


def test_batch_norm_statistics_live_in_the_train_state_and_match_on_1_and_8_devices():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    config = model_config()
    config.encoders.image = dict(name="resnet", stage_sizes=(1,), width=4, stem="cifar")
    config.encoders.image.dtype = "float32"  # A dtype given as a string, as on the command line.
    model, tx, task = build_model(config), optax.sgd(0.1), build_task(None, 4)
    state = init_state(model, tx, batch(1), jax.random.PRNGKey(0))
    assert "batch_stats" in state.model_state
    step = lambda s, b: train_step(s, b, model=model, tx=tx, task=task)  # noqa: E731
    data = batch(16)
    single, _ = jax.jit(step)(state, data)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded_batch = jax.device_put(data, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    multi, _ = jax.jit(step)(replicated, sharded_batch)
    before = jax.tree_util.tree_leaves(state.model_state)
    after_1, after_8 = jax.tree_util.tree_leaves(single.model_state), jax.tree_util.tree_leaves(multi.model_state)
    assert any(np.any(a != b) for a, b in zip(before, after_1))
    for a, b in zip(after_1, after_8):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_l1_and_l2_penalties_act_on_their_parameter_groups_only():
    from mmjax.train.optimizer import build_penalty

    model, task, lr = build_model(model_config()), build_task(None, 4), 0.1
    tx = optax.sgd(lr)
    state = init_state(model, tx, batch(1), jax.random.PRNGKey(0))
    penalty = build_penalty({"l1": 0.01, "l2": 0.02, "l1_params": ("encoders_image/Conv_0/kernel",),
                             "l2_params": ("head/",)})
    step = lambda s, b, **kw: train_step(s, b, model=model, tx=tx, task=task, **kw)  # noqa: E731
    plain, plain_metrics = jax.jit(step)(state, batch())
    penalised, metrics = jax.jit(lambda s, b: step(s, b, penalty=penalty))(state, batch())
    before = state.params
    kernel = before["encoders_image"]["Conv_0"]["kernel"]
    # SGD: the extra step of a penalised parameter is -lr * (l1 sign(w)) or -lr * (2 l2 w).
    np.testing.assert_allclose(penalised.params["encoders_image"]["Conv_0"]["kernel"],
                               plain.params["encoders_image"]["Conv_0"]["kernel"] - lr * 0.01 * np.sign(kernel),
                               atol=1e-6)
    flat = lambda tree: traverse_util.flatten_dict(tree["head"], sep="/")  # noqa: E731
    assert len(flat(before)) == 4  # Hidden and output layers' kernels and biases.
    for name, value in flat(before).items():
        np.testing.assert_allclose(flat(penalised.params)[name], flat(plain.params)[name] - lr * 2 * 0.02 * value,
                                   atol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, penalised.params["encoders_audio"],
                           plain.params["encoders_audio"])
    expected = 0.01 * np.abs(kernel).sum() + 0.02 * sum(np.square(v).sum() for v in jax.tree_util.tree_leaves(
        before["head"]))
    assert float(metrics["penalty"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-6)  # The task's loss.
    assert "penalty" not in plain_metrics
    accumulated, acc_metrics = jax.jit(lambda s, b: step(s, b, penalty=penalty, grad_accum_steps=2))(state, batch())
    np.testing.assert_allclose(accumulated.params["head"]["Dense_0"]["kernel"],
                               penalised.params["head"]["Dense_0"]["kernel"], atol=1e-5)  # Penalised once, not k.
    assert float(acc_metrics["penalty"]) == pytest.approx(float(expected), rel=1e-5)


def test_penalty_defaults_cover_weight_matrices_and_typos_are_errors():
    from mmjax.train.optimizer import build_penalty, check_config

    params = init_state(build_model(model_config()), optax.sgd(0.1), batch(1), jax.random.PRNGKey(0)).params
    groups = build_penalty({"l2": 1e-4}).groups(params)
    assert groups["l2"] and all(not n.endswith("bias") for n in groups["l2"]) and "l1" not in groups
    assert not build_penalty({}).active
    with pytest.raises(ValueError, match="optimizer.l2_params pattern 'encoders_imag3' matches no trainable"):
        build_penalty({"l2": 1e-4, "l2_params": ("encoders_imag3",)}).groups(params)
    with pytest.raises(ValueError, match=r"optimizer.l1=-0.1 must be in \[0, inf\)"):
        check_config({"l1": -0.1})
    with pytest.raises(ValueError, match="optimizer.l1_params pattern '\\(' is not a valid regular expression"):
        check_config({"l1": 0.1, "l1_params": ("(",)})
    with pytest.raises(ValueError, match="optimizer.l2_params='head' must be a tuple of strings"):
        check_config({"l2_params": "head"})
