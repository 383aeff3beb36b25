"""Serial fusion: FiLM conditioning of one encoder by the other modalities (through the model), and the
sequential fusion's formula and order. Both honour the modality masks like the other methods."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.nn.builder import build_model
from mmjax.nn.common import EncoderOutput
from mmjax.nn.encoders.audio import SpectrogramCNN
from mmjax.nn.encoders.image import SmallCNN
from mmjax.nn.fusion import SerialFusion

B = 4


def _config(fusion, image=None):
    return ml_collections.ConfigDict(dict(
        num_classes=3,
        encoders=dict(image=image or dict(name="small_cnn", features=(4, 6), width=8),
                      audio=dict(name="spectrogram_cnn", features=(4,), width=16)),
        fusion=fusion,
        head=dict(name="classifier", hidden=()),
    ))


def _batch(seed=0, **masks):
    rng = np.random.default_rng(seed)
    batch = {"image": rng.normal(size=(B, 8, 8, 1)).astype(np.float32),
             "audio": rng.normal(size=(B, 10, 6)).astype(np.float32)}
    return batch | {f"{m}_mask": np.asarray(v, np.float32) for m, v in masks.items()}


def _random(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: (0.3 * rng.normal(size=p.shape)).astype(p.dtype), params)


@functools.cache
def _film_model(output="film"):
    model = build_model(_config(dict(name="film", target="image", output=output)))
    params = model.init(jax.random.PRNGKey(0), _batch(), train=False)["params"]
    return model, params


def test_film_starts_as_the_identity_and_then_follows_its_formula():
    model, params = _film_model()
    batch = _batch()
    image_encoder = SmallCNN(features=(4, 6), width=8)
    unconditioned = image_encoder.apply({"params": params["encoders_image"]}, batch["image"], train=False).pooled
    features = model.apply({"params": params}, batch, train=False, method="encode")
    np.testing.assert_allclose(features["image"], unconditioned, rtol=1e-6)  # Zero generator: gamma 1, beta 0.
    params = _random(params)
    audio = SpectrogramCNN(features=(4,), width=16).apply({"params": params["encoders_audio"]}, batch["audio"],
                                                         train=False).pooled
    generator = params["fusion"]["generator"]
    out = np.asarray(audio @ generator["kernel"] + generator["bias"])
    film = ((1 + out[:, 0:4], out[:, 4:8]), (1 + out[:, 8:14], out[:, 14:20]))  # Channels (4, 6): dgamma, beta.
    expected = image_encoder.apply({"params": params["encoders_image"]}, batch["image"], train=False, film=film)
    logits = model.apply({"params": params}, batch, train=False)
    head = params["head"]["Dense_0"]
    np.testing.assert_allclose(logits, expected.pooled @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-5)


def test_film_honours_the_masks_and_missing_inputs_get_zero_gradient():
    model, params = _film_model("concat")
    params = _random(params)
    masks = {"audio": [1, 0, 1, 0], "image": [1, 1, 0, 0]}
    batch = _batch(**masks)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False, method="encode"))
    features = forward(params, batch)
    plain = SmallCNN(features=(4, 6), width=8).apply({"params": params["encoders_image"]}, batch["image"],
                                                     train=False).pooled
    np.testing.assert_allclose(features["image"][1], plain[1], rtol=1e-5)  # Audio missing: unconditioned.
    assert not np.allclose(features["image"][0], plain[0], atol=1e-4)  # Audio present: conditioned.
    fuse = lambda m, b, train: m.fusion(m._encode_conditioned(b, m._masks(b), train), masks=m._masks(b),  # noqa
                                        train=train)
    fused = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False, method=fuse))
    out = np.asarray(fused(params, batch))
    assert out.shape == (B, 8 + 16)
    np.testing.assert_array_equal(out[2:, :8], 0)  # Image missing: its features are zero...
    np.testing.assert_array_equal(out[1::2, 8:], 0)  # ... as are the missing audio's.
    changed = dict(batch, audio=np.where(np.array(masks["audio"])[:, None, None] > 0, batch["audio"], 7.0),
                   image=np.where(np.array(masks["image"])[:, None, None, None] > 0, batch["image"], -3.0))
    np.testing.assert_array_equal(model.apply({"params": params}, changed, train=False),
                                  model.apply({"params": params}, batch, train=False))
    loss = lambda inputs: model.apply({"params": params}, dict(batch, **inputs), train=False).sum()  # noqa: E731
    grads = jax.grad(loss)({"audio": batch["audio"], "image": batch["image"]})
    for m, mask in masks.items():
        missing = np.array(mask) == 0
        np.testing.assert_array_equal(np.asarray(grads[m])[missing], 0, err_msg=m)
        assert np.abs(np.asarray(grads[m])[~missing]).sum() > 0, m


def test_film_trains_with_modality_dropout():
    model = build_model(ml_collections.ConfigDict(dict(_config(dict(name="film", target="audio")).to_dict(),
                                                       modality_dropout=0.5)))
    batch = _batch()
    params = model.init(jax.random.PRNGKey(0), batch, train=False)["params"]
    loss = lambda p: model.apply({"params": p}, batch, train=True, rngs={"dropout": jax.random.PRNGKey(3)}).sum()  # noqa
    grads = jax.grad(loss)(params)
    assert set(grads["fusion"]) == {"generator"} and np.any(np.asarray(grads["fusion"]["generator"]["kernel"]) != 0)


@pytest.mark.parametrize("fusion, image, message", [
    (dict(name="film", target="text"), None, r"model.fusion.target='text' is not a modality of model.encoders"),
    (dict(name="film", target="image"), dict(name="vit", patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=8),
     r"conditions model.encoders.image \(ViT\), which has no FiLM layers"),
    (dict(name="film", output="sum"), None, r"fusion 'film': unknown output 'sum'; valid values: film, concat"),
])
def test_film_config_errors_name_the_key(fusion, image, message):
    with pytest.raises(ValueError, match=message):
        build_model(_config(fusion, image))


def test_serial_fusion_follows_its_order_and_formula():
    rng = np.random.default_rng(0)
    pooled = {"audio": rng.normal(size=(B, 3)), "image": rng.normal(size=(B, 5)), "text": rng.normal(size=(B, 2))}
    features = {m: EncoderOutput(jnp.asarray(p[:, None], jnp.float32), jnp.asarray(p, jnp.float32))
                for m, p in pooled.items()}
    masks = {"audio": np.array([1, 0, 1, 1.0]), "image": np.ones(B), "text": np.array([1, 1, 0, 1.0])}
    module = SerialFusion(order=("text", "audio", "image"), dim=4)
    params = _random(module.init(jax.random.PRNGKey(0), features, train=False)["params"])
    assert set(params) == {"proj_audio", "proj_image", "proj_text", "stage_2", "stage_3"}
    out = module.apply({"params": params}, features, masks=masks, train=False)
    u = {m: pooled[m] @ params[f"proj_{m}"]["kernel"] + params[f"proj_{m}"]["bias"] for m in pooled}
    h = np.where(masks["text"][:, None] > 0, np.tanh(u["text"]), 0)
    for k, m in ((2, "audio"), (3, "image")):
        stage = params[f"stage_{k}"]
        new = np.tanh(np.concatenate([h, u[m]], -1) @ stage["kernel"] + stage["bias"])
        h = np.where(masks[m][:, None] > 0, new, h)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"order=\('text', 'audio'\) must name each modality once"):
        SerialFusion(order=("text", "audio")).init(jax.random.PRNGKey(0), features, train=False)
