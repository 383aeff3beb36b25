"""CLIP / SigLIP losses: their formulas, and the same loss and gradients on 1 device and on 8 (also chunked)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.nn.builder import build_model
from mmjax.nn.models.two_tower import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT
from mmjax.tasks import build_task, losses

B, D = 16, 8


def _unit(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def test_clip_loss_is_the_symmetric_cross_entropy():
    rng = np.random.default_rng(0)
    x, y = _unit(rng, (B, D)), _unit(rng, (B, D))
    logits = 5.0 * x @ y.T
    expected = -0.5 * (np.diag(_log_softmax(logits, 1)) + np.diag(_log_softmax(logits, 0)))
    got = losses.clip_loss(jnp.asarray(x), jnp.asarray(y), jnp.log(5.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The temperature is clamped at 100.
    clamped = losses.clip_loss(jnp.asarray(x), jnp.asarray(y), jnp.log(1000.0))
    np.testing.assert_allclose(clamped, losses.clip_loss(jnp.asarray(x), jnp.asarray(y), jnp.log(100.0)))
    # Label smoothing: targets (1 - a) on the diagonal + a / B everywhere.
    a = 0.1
    targets = (1 - a) * np.eye(B) + a / B
    smoothed = -0.5 * ((targets * _log_softmax(logits, 1)).sum(1) + (targets * _log_softmax(logits, 0)).sum(0))
    got = losses.clip_loss(jnp.asarray(x), jnp.asarray(y), jnp.log(5.0), label_smoothing=a)
    np.testing.assert_allclose(got, smoothed, rtol=1e-5)


def test_siglip_loss_is_the_pairwise_sigmoid_loss():
    rng = np.random.default_rng(1)
    x, y = _unit(rng, (B, D)), _unit(rng, (B, D))
    logits = 10.0 * x @ y.T - 10.0
    z = 2 * np.eye(B) - 1
    expected = np.log1p(np.exp(-z * logits)).sum(1)
    got = losses.siglip_loss(jnp.asarray(x), jnp.asarray(y), jnp.log(10.0), jnp.asarray(-10.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def _model_config(two_tower):
    return ml_collections.ConfigDict(dict(
        name="two_tower",
        num_classes=3,
        encoders=dict(
            image=dict(name="vit", patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32),
            text=dict(name="text_transformer", vocab_size=20, max_len=6, width=16, depth=1, num_heads=2,
                      mlp_dim=32, causal=True, pool="eot"),
        ),
        two_tower=two_tower,
    ))


def _batch(rng, b=B):
    ids = rng.integers(1, 20, size=(b, 6)).astype(np.int32)
    ids[:, 4:] = 0  # Padding.
    return {"image": rng.normal(size=(b, 8, 8, 3)).astype(np.float32), "text": ids,
            "label": np.zeros(b, np.int32)}


def _loss_and_grads(task, model, params, batch, mesh):
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    replicated = NamedSharding(mesh, PartitionSpec())

    def loss_fn(params, batch):
        outputs = model.apply({"params": params}, batch, train=True)
        return task.loss(outputs, batch["label"]).mean()

    fn = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(replicated, batch_sharding), out_shardings=replicated)
    params = jax.device_put(params, replicated)
    batch = jax.device_put(batch, batch_sharding)
    return jax.device_get(fn(params, batch))


@pytest.mark.parametrize("name, options", [("clip", {}), ("clip", {"label_smoothing": 0.1}), ("siglip", {}),
                                           ("siglip", {"chunked": True})])
def test_global_batch_loss_and_gradients_equal_on_1_and_8_devices(name, options):
    assert jax.device_count() == 8
    two_tower = dict(embed_dim=8)
    if name == "siglip":
        two_tower.update(logit_scale_init=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init=SIGLIP_LOGIT_BIAS_INIT)
    model = build_model(_model_config(two_tower))
    batch = _batch(np.random.default_rng(2))
    params = model.init(jax.random.PRNGKey(0), batch, train=False)["params"]
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    eight = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))  # Batch over both axes.
    results = []
    for mesh in (one, eight):
        task = build_task({"name": name, **options}, 3)
        task = task.with_mesh(mesh) if hasattr(task, "with_mesh") else task
        results.append(_loss_and_grads(task, model, params, batch, mesh))
    (loss1, grads1), (loss8, grads8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads8, grads1)
    assert np.abs(grads1["logit_scale"]) > 0 and np.isfinite(loss1)
    if name == "siglip":
        assert np.abs(grads1["logit_bias"]) > 0


def test_chunked_siglip_equals_siglip_and_never_builds_the_global_matrix():
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(_unit(rng, (B, D))), jnp.asarray(_unit(rng, (B, D)))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
    scale, bias = jnp.log(10.0), jnp.asarray(-10.0)
    plain = losses.siglip_loss(x, y, scale, bias)
    chunked = jax.jit(functools.partial(losses.siglip_loss_chunked, mesh=mesh))(x, y, scale, bias)
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    # Per device, the largest similarity block is [B/8, B/8]: no [B, B] (or [B/8, B]) array in the program.
    hlo = jax.jit(functools.partial(losses.siglip_loss_chunked, mesh=mesh)).lower(x, y, scale, bias)
    text = hlo.compile().as_text()
    assert f"f32[{B},{B}]" not in text and f"f32[{B // 8},{B}]" not in text and f"f32[{B // 8},{B // 8}]" in text


def test_two_tower_embeds_several_captions_and_aliases():
    model = build_model(_model_config(dict(embed_dim=8, aliases={"negatives": "text"})))
    rng = np.random.default_rng(4)
    batch = _batch(rng, 4)
    params = model.init(jax.random.PRNGKey(0), batch, train=False)["params"]
    many = batch | {"text": np.stack([batch["text"]] * 3, axis=1), "negatives": batch["text"][:, None]}
    outputs = model.apply({"params": params}, many, train=False)
    assert outputs["text"].shape == (4, 3, 8) and outputs["negatives"].shape == (4, 1, 8)
    np.testing.assert_allclose(np.linalg.norm(outputs["image"], axis=-1), 1.0, rtol=1e-5)
    single = model.apply({"params": params}, batch, train=False)["text"]
    np.testing.assert_allclose(outputs["text"][:, 1], single, atol=1e-6)
    np.testing.assert_allclose(outputs["negatives"][:, 0], single, atol=1e-6)  # Same tower, same weights.
    assert float(outputs["logit_scale"]) == pytest.approx(np.log(1 / 0.07))


def test_two_tower_config_errors():
    with pytest.raises(ValueError, match="exactly 2 towers"):
        build_model(ml_collections.ConfigDict(dict(name="two_tower", num_classes=1, encoders=dict(
            image=dict(name="small_cnn")))))
    with pytest.raises(ValueError, match=r"model.two_tower: unknown field\(s\) \['embed'\]"):
        build_model(_model_config(dict(embed=8)))
    with pytest.raises(ValueError, match="aliases .* name no tower"):
        build_model(_model_config(dict(aliases={"negatives": "txt"})))
    with pytest.raises(ValueError, match="model.name='twotower'"):
        build_model(ml_collections.ConfigDict(dict(name="twotower", encoders=dict(a=1))))
    with pytest.raises(ValueError, match="model.dtype='bf16' is not a dtype"):
        build_model(ml_collections.ConfigDict({**_model_config({}).to_dict(), "dtype": "bf16"}))
    with pytest.raises(ValueError, match="needs the device mesh"):
        build_task({"name": "siglip", "chunked": True}, 3).loss(
            {"image": jnp.ones((2, 4)), "text": jnp.ones((2, 4)), "logit_scale": 0.0, "logit_bias": 0.0}, None)


def test_mixed_precision_two_tower_is_finite_and_close_to_float32():
    rng = np.random.default_rng(5)
    batch = _batch(rng, 8)
    f32 = build_model(_model_config(dict(embed_dim=8)))
    bf16 = build_model(ml_collections.ConfigDict({**_model_config(dict(embed_dim=8)).to_dict(), "dtype": "bfloat16"}))
    params = f32.init(jax.random.PRNGKey(0), batch, train=False)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(
        bf16.init(jax.random.PRNGKey(0), batch, train=False)["params"]))
    task = build_task({"name": "clip"}, 3)
    losses = [task.loss(m.apply({"params": params}, batch, train=True), None).mean() for m in (f32, bf16)]
    assert losses[1].dtype == jnp.float32 and np.isfinite(losses[1])
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
