"""MultimodalModel composition: shapes, sorted modality order, masks, clear errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.nn.builder import build_model


def model_config(fusion="concat"):
    return ml_collections.ConfigDict(
        dict(
            num_classes=10,
            encoders=dict(
                image=dict(name="small_cnn", features=(4,), width=8),
                audio=dict(name="spectrogram_cnn", features=(4,), width=8),
            ),
            fusion=dict(name=fusion),
            head=dict(name="classifier", hidden=(8,)),
        )
    )


def batch(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
        "audio": rng.normal(size=(n, 49, 40)).astype(np.float32),
    }


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_logits_shape_and_per_modality_encoders(fusion):
    model = build_model(model_config(fusion))
    params = model.init(jax.random.PRNGKey(0), batch(), train=False)["params"]
    assert model.apply({"params": params}, batch(), train=False).shape == (3, 10)
    assert {"encoders_audio", "encoders_image"} <= set(params)
    if fusion == "late":  # Decision-level: one head per modality inside the fusion, none outside.
        assert set(params["fusion"]) == {"head_audio", "head_image"} and "head" not in params
    else:  # Concatenation has no parameters of its own.
        assert set(params) == {"encoders_audio", "encoders_image", "head"}


def test_encoder_order_does_not_depend_on_config_insertion_order():
    forward = model_config()
    backward = model_config()
    backward.encoders = {"image": forward.encoders.image.to_dict(), "audio": forward.encoders.audio.to_dict()}
    a, b = build_model(forward), build_model(backward)
    pa = a.init(jax.random.PRNGKey(0), batch(), train=False)
    pb = b.init(jax.random.PRNGKey(0), batch(), train=False)
    np.testing.assert_array_equal(a.apply(pa, batch(), train=False), b.apply(pb, batch(), train=False))


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_a_masked_modality_contributes_nothing(fusion):
    model = build_model(model_config(fusion))
    params = model.init(jax.random.PRNGKey(0), batch(), train=False)
    x = batch() | {"audio_mask": np.array([1.0, 0.0, 0.0], np.float32)}
    changed = dict(x, audio=x["audio"] * 5.0 + 3.0)
    out, out_changed = model.apply(params, x, train=False), model.apply(params, changed, train=False)
    np.testing.assert_allclose(out[1:], out_changed[1:], rtol=0, atol=0)  # Masked rows ignore the audio.
    assert not np.allclose(out[0], out_changed[0])  # The present row uses it.


def test_late_fusion_is_the_mean_of_per_modality_logits():
    model = build_model(model_config("late"))
    params = model.init(jax.random.PRNGKey(0), batch(), train=False)
    both = model.apply(params, batch(), train=False)
    only_image = model.apply(params, batch() | {"audio_mask": np.zeros(3, np.float32)}, train=False)
    only_audio = model.apply(params, batch() | {"image_mask": np.zeros(3, np.float32)}, train=False)
    np.testing.assert_allclose(both, (only_image + only_audio) / 2, rtol=1e-5, atol=1e-6)


def test_missing_modality_in_batch_is_named():
    model = build_model(model_config())
    params = model.init(jax.random.PRNGKey(0), batch(), train=False)
    with pytest.raises(KeyError, match="batch is missing modality 'audio'"):
        model.apply(params, {"image": batch()["image"]}, train=False)


def test_wrong_input_rank_is_named():
    model = build_model(model_config())
    bad = batch() | {"image": np.zeros((3, 8, 8), np.float32)}
    with pytest.raises(ValueError, match=r"small_cnn expects input of shape \[B, H, W, C\].*\(3, 8, 8\)"):
        model.init(jax.random.PRNGKey(0), bad, train=False)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("encoders.image.name", "small_cnm", "model.encoders.image.name: unknown encoder 'small_cnm'"),
        ("encoders.image.widht", 8, r"model.encoders.image \(small_cnn\): unknown field\(s\) widht"),
        ("fusion.name", "tensor_fusion_x", "model.fusion.name: unknown fusion"),
        ("head.name", "regressor_x", "model.head.name: unknown head"),
    ],
)
def test_bad_model_config_is_named(path, value, message):
    config = model_config()
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        build_model(config)


def test_bf16_compute_keeps_float32_params_and_logits():
    config = model_config()
    config.encoders.image.dtype = "bfloat16"
    config.encoders.audio.dtype = "bfloat16"
    model = build_model(config)
    params = model.init(jax.random.PRNGKey(0), batch(), train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert model.apply(params, batch(), train=False).dtype == jnp.float32


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 49, 40, 4), (1, 5, 7, 2), (3, 1, 1, 1)])
def test_max_pool_2x2_equals_flax_max_pool_and_its_gradient(shape):
    import flax.linen as nn

    from mmjax.nn.layers import max_pool_2x2

    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))  # No ties.
    reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
    grad = lambda f: jax.grad(lambda v: jnp.sum(f(v) * jnp.arange(f(v).size).reshape(f(v).shape)))(x)
    np.testing.assert_array_equal(grad(max_pool_2x2), grad(reference))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 49, 40, 4), (1, 5, 7, 2), (3, 1, 1, 1)])
def test_relu_max_pool_2x2_equals_flax_and_its_gradient(shape):
    import flax.linen as nn

    from mmjax.nn.layers import relu_max_pool_2x2

    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))  # No ties among positives.
    reference = lambda v: nn.max_pool(nn.relu(v), (2, 2), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(jax.jit(relu_max_pool_2x2)(x), reference(x))
    weights = jnp.arange(1.0, 1.0 + reference(x).size).reshape(reference(x).shape)
    grad = lambda f: jax.jit(jax.grad(lambda v: jnp.sum(f(v) * weights)))(x)
    np.testing.assert_array_equal(grad(relu_max_pool_2x2), grad(reference))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 49, 40, 16), (1, 5, 7, 2), (3, 1, 1, 1)])
def test_relu_max_pool_2x2_equals_flax_with_many_ties(shape):
    """Small integers make most windows hold tied maxima: the gradient must go to the first one of each, as
    `nn.max_pool`'s select-and-scatter sends it, also through a bias added before the pooling."""
    import flax.linen as nn

    from mmjax.nn.layers import relu_max_pool_2x2

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-2, 3, size=shape).astype(np.float32))
    bias = jnp.asarray(rng.integers(-1, 2, size=shape[-1:]).astype(np.float32))
    reference = lambda v, b: nn.max_pool(nn.relu(v + b), (2, 2), strides=(2, 2), padding="SAME")
    ours = lambda v, b: relu_max_pool_2x2(v + b)
    np.testing.assert_array_equal(jax.jit(ours)(x, bias), reference(x, bias))
    weights = jnp.asarray(rng.normal(size=reference(x, bias).shape).astype(np.float32))
    grads = lambda f: jax.jit(jax.grad(lambda v, b: jnp.sum(f(v, b) * weights), argnums=(0, 1)))(x, bias)
    (dx, dbias), (dx_ref, dbias_ref) = grads(ours), grads(reference)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-4)  # Summed in another order.


def test_relu_max_pool_2x2_rejects_bad_shapes():
    from mmjax.nn.layers import relu_max_pool_2x2

    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\].*\(4, 4\)"):
        relu_max_pool_2x2(jnp.zeros((4, 4)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_relu_pool_equals_conv_then_relu_then_flax_max_pool(dtype):
    """Same parameters as a `Conv`, same outputs and gradients as Conv -> ReLU -> nn.max_pool."""
    import flax.linen as nn

    from mmjax.nn.conv import Conv
    from mmjax.nn.layers import ConvReluPool

    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 9, 7, 4)).astype(np.float32))  # Two batch dims.
    layer, plain = ConvReluPool(8, (3, 3), dtype=dtype), Conv(8, (3, 3), dtype=dtype)
    params = layer.init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # A non-zero bias.
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(plain.init(jax.random.PRNGKey(0), x))

    def reference(p, v):
        y = nn.relu(plain.apply(p, v)).reshape(-1, 9, 7, 8)
        return nn.max_pool(y, (2, 2), strides=(2, 2), padding="SAME").reshape(2, 3, 5, 4, 8)

    out = layer.apply(params, x)
    assert out.shape == (2, 3, 5, 4, 8) and out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(reference(params, x), np.float32))
    loss = lambda f: jax.grad(lambda p: jnp.sum(f(p, x).astype(jnp.float32) ** 2))(params)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, want in zip(jax.tree_util.tree_leaves(loss(layer.apply)), jax.tree_util.tree_leaves(loss(reference))):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


def test_relu_max_pool_2x2_gives_a_tied_maximum_gradient_once():
    from mmjax.nn.layers import relu_max_pool_2x2

    x = jnp.array([[3.0, 3.0], [-1.0, 3.0]]).reshape(1, 2, 2, 1)  # Three tied maxima, one window.
    grad = jax.grad(lambda v: relu_max_pool_2x2(v).sum())(x)
    np.testing.assert_array_equal(grad.reshape(2, 2), [[1.0, 0.0], [0.0, 0.0]])
    all_negative = jax.grad(lambda v: relu_max_pool_2x2(v).sum())(-jnp.abs(x))  # ReLU: no gradient.
    np.testing.assert_array_equal(all_negative, jnp.zeros_like(x))


@pytest.mark.parametrize(
    "modality, encoder",
    [
        ("image", {"name": "vit", "patch_size": 2, "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}),
        ("image", {"name": "resnet18", "width": 4, "stem": "cifar"}),
        ("audio", {"name": "ast", "patch_time": 7, "patch_freq": 8, "width": 16, "depth": 1, "num_heads": 2}),
    ],
)
def test_av_digits_experiment_takes_any_encoder_from_the_config(modality, encoder):
    from experiments import av_digits
    from mmjax.config import apply_overrides

    config = apply_overrides(av_digits.get_config(), [f"model.encoders.{modality}={encoder!r}"])
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch(2), train=False))
    assert f"encoders_{modality}" in shapes["params"]
    out = jax.eval_shape(lambda v: model.apply(v, batch(2), train=False, mutable=["batch_stats"]), shapes)[0]
    assert out.shape == (2, 10)
