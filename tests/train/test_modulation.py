"""OGM-GE gradient modulation (mmjax.train.modulation) against a hand-computed case, and in the train step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax.nn.builder import build_model
from mmjax.tasks import build_task
from mmjax.tasks.multitask import UnimodalAuxiliary
from mmjax.train.modulation import GradientModulation, build_modulation
from mmjax.train.step import init_state, train_step


def test_ogm_coefficients_by_hand():
    # Two examples, labels (0, 1). audio logits give p(true) = softmax: example 0 -> e^2/(e^2+1), example 1 -> 0.5.
    labels = jnp.asarray([0, 1])
    unimodal = {"audio": jnp.asarray([[2.0, 0.0], [0.0, 0.0]]), "image": jnp.asarray([[0.0, 0.0], [1.0, 0.0]])}
    ogm = GradientModulation(("audio", "image"), alpha=0.5, noise=False)
    s_audio = np.exp(2) / (np.exp(2) + 1) + 0.5
    s_image = 0.5 + 1 / (np.e + 1)
    scores = np.asarray(ogm.scores(unimodal, labels))
    np.testing.assert_allclose(scores, [s_audio, s_image], rtol=1e-6)
    rho = s_audio / s_image  # > 1: audio leads and is slowed down, image is left as it is
    coefficients = np.asarray(ogm.coefficients(jnp.asarray(scores)))
    np.testing.assert_allclose(coefficients, [1 - np.tanh(0.5 * rho), 1.0], rtol=1e-6)

    grads = {"encoders_audio": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
             "encoders_image": {"kernel": jnp.full((2, 3), 2.0)}, "head": {"kernel": jnp.ones((3, 2))}}
    out, metrics = ogm(grads, unimodal, labels, jax.random.PRNGKey(0), jnp.asarray(0))
    np.testing.assert_allclose(np.asarray(out["encoders_audio"]["kernel"]), coefficients[0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["encoders_audio"]["bias"]), 1.0)  # vectors are not modulated
    np.testing.assert_array_equal(np.asarray(out["encoders_image"]["kernel"]), 2.0)
    np.testing.assert_array_equal(np.asarray(out["head"]["kernel"]), 1.0)
    np.testing.assert_allclose(float(metrics["ogm/coef_audio"]), coefficients[0], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ogm/score_image"]), s_image / 2, rtol=1e-6)

    # Outside [start_step, end_step) nothing changes; with GE, noise of the gradient's spread is added.
    late = GradientModulation(("audio", "image"), alpha=0.5, noise=False, start_step=5)
    same, _ = late(grads, unimodal, labels, jax.random.PRNGKey(0), jnp.asarray(4))
    np.testing.assert_array_equal(np.asarray(same["encoders_audio"]["kernel"]), 1.0)
    varied = {**grads, "encoders_audio": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
    ge = GradientModulation(("audio", "image"), alpha=0.5, noise=True)
    noisy, _ = ge(varied, unimodal, labels, jax.random.PRNGKey(0), jnp.asarray(0))
    residual = np.asarray(noisy["encoders_audio"]["kernel"]) - coefficients[0] * np.arange(6.0).reshape(2, 3)
    assert np.all(residual != 0) and np.abs(residual).max() < 10 * np.std(np.arange(6.0))


@pytest.mark.parametrize("options, message", [
    ({"name": "ogm_x"}, "train.modulation.name"),
    ({"name": "ogm_ge", "alpha": 0}, "alpha"),
    ({"name": "ogm_ge", "start_step": -1}, "start_step"),
    ({"name": "ogm_ge", "beta": 1}, "unknown option"),
])
def test_bad_modulation_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        build_modulation(options, ["audio", "image"])
    with pytest.raises(ValueError, match="two or more modalities"):
        build_modulation({"name": "ogm_ge"}, ["audio"])


def test_train_step_slows_the_leading_encoder():
    config = ml_collections.ConfigDict(dict(
        num_classes=4,
        encoders=dict(image=dict(name="small_cnn", features=(4,), width=8),
                      audio=dict(name="spectrogram_cnn", features=(4,), width=8)),
        fusion=dict(name="concat"), head=dict(name="classifier", hidden=(8,))))
    model = build_model(config, unimodal_scores=True)
    task = UnimodalAuxiliary(num_classes=4, task=build_task(None, 4))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
             "audio": rng.normal(size=(8, 12, 8)).astype(np.float32),
             "label": rng.integers(0, 4, size=8).astype(np.int32)}
    tx = optax.sgd(0.1)
    state = init_state(model, tx, {k: v[:1] for k, v in batch.items()}, jax.random.PRNGKey(0))
    ogm = GradientModulation(("audio", "image"), alpha=1.0, noise=False)
    _, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, task=task, modulation=ogm))(state, batch)
    _, plain = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, task=task))(state, batch)
    coefficients = [float(metrics["ogm/coef_audio"]), float(metrics["ogm/coef_image"])]
    assert min(coefficients) < 1.0 and max(coefficients) == 1.0  # exactly one modality leads
    np.testing.assert_allclose(float(metrics["loss"]), float(plain["loss"]), rtol=1e-6)  # loss unchanged
