"""The pure train step: frozen parameters, modality dropout, task losses."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

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
