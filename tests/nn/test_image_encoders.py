"""Image encoders (ViT, ResNet, small CNN): shapes, registry overrides, gradients, bf16, remat, batch norm.

Tiny sizes throughout (16x16 images, patch 4, width 16, depth 2; ResNet width 8 with stages (1, 1)). XLA's CPU
compiler dominates the run time, so shape checks only trace (`jax.eval_shape`), variables are initialised once
per model, and programs are compiled with fewer backend optimisations (`_run`), ~2-3x faster to compile.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.nn.builder import build_module
from mmjax.nn.encoders import image
from mmjax.registry import ENCODERS

B, H, W, C = 4, 16, 16, 3
VIT = dict(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32)
RESNET = dict(width=8, stage_sizes=(1, 1), stem="cifar")
CASES = {
    "vit": lambda **kw: image.ViT(**VIT, **kw),
    "resnet_basic": lambda **kw: image.ResNet(**RESNET, **kw),
    "resnet_bottleneck": lambda **kw: image.ResNet(block="bottleneck", **RESNET, **kw),
    "small_cnn": lambda **kw: image.SmallCNN(features=(4, 8), width=8, **kw),
}


def _run(fn, *args, opt_level=0, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)(*args)`, compiled at LLVM optimisation level `opt_level` (faster to compile).

    Level 0 changes results by a few float32 ulps between programs that fuse differently (e.g. with and
    without remat), so tight comparisons between such programs use level 1.
    """
    options = {"xla_backend_optimization_level": opt_level}
    return jax.jit(fn, **jit_kwargs).lower(*args).compile(options)(*args)


def _key(seed=0):
    """'rbg' keys compile in milliseconds where threefry takes seconds on CPU."""
    return jax.random.key(seed, impl="rbg")


def _images(n=B, h=H, w=W, seed=0):
    return np.random.default_rng(seed).normal(size=(n, h, w, C)).astype(np.float32)


@functools.cache
def _variables(case):
    """Initial variables of `CASES[case]()` for `_images()` (as numpy arrays), computed once."""
    variables = _run(lambda x: CASES[case]().init(_key(), x, train=False), _images())
    return jax.tree_util.tree_map(np.asarray, variables)


def _build_encoder(name, **fields):
    """As the model builder does from `model.encoders.<modality>`."""
    return build_module(ENCODERS, ml_collections.ConfigDict(dict(name=name, **fields)), "model.encoders.image")()


def _shapes(model, x):
    """(output, variables) shapes of `model.init_with_output`, traced only."""
    x = jax.ShapeDtypeStruct(x.shape, x.dtype)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(_key(), x, train=False), x)
    return out, jax.tree_util.tree_map(lambda s: s.shape, variables)


def _loss_fn(model):
    """Scalar training loss over tokens and pooled output; returns (loss, updated batch_stats or {})."""

    def loss(params, rest, x):
        out, updates = model.apply({"params": params, **rest}, x, train=True, mutable=["batch_stats"])
        value = jnp.mean(out.pooled.astype(jnp.float32) ** 2) + jnp.mean(jnp.sin(out.tokens.astype(jnp.float32)))
        return value, updates

    return loss


def _assert_close(actual, expected, rtol, atol=0.0):
    """Leafwise closeness relative to each leaf's largest magnitude (plus `atol`, for leaves that should be
    zero, such as the gradient of the attention key bias)."""
    leaves = zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True)
    for a, e in leaves:
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        np.testing.assert_allclose(a, e, rtol=0, atol=atol + rtol * (float(np.abs(e).max()) or 1.0))


# ---------------------------------------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("pool,posemb", [("cls", "learned"), ("mean", "learned"), ("mean", "sincos2d")])
def test_vit_shapes_and_param_names(pool, posemb):
    model = _build_encoder("vit", pool=pool, posemb=posemb, **VIT)
    out, variables = _shapes(model, _images().astype(np.uint8))  # Pixels may be uint8.
    n = (H // 4) * (W // 4)
    assert out.tokens.shape == (B, n, 16) and out.pooled.shape == (B, 16) and out.mask is None
    params = variables["params"]
    expected = {"patch_embed", "encoder"} | ({"cls_token"} if pool == "cls" else set())
    assert set(params) == expected | ({"pos_embed"} if posemb == "learned" else set())
    assert params["patch_embed"] == {"kernel": (4 * 4 * C, 16), "bias": (16,)}
    if pool == "cls":
        assert params["cls_token"] == (1, 1, 16)
    if posemb == "learned":
        assert params["pos_embed"] == (1, n + (pool == "cls"), 16)
    assert set(params["encoder"]) == {"layer_0", "layer_1", "ln_final"}
    assert set(params["encoder"]["layer_0"]) == {"ln_attention", "attention", "ln_mlp", "mlp"}


def test_vit_named_sizes_and_config_overrides():
    sizes = lambda cls: (cls.patch_size, cls.width, cls.depth, cls.num_heads, cls.mlp_dim)  # noqa: E731
    assert sizes(image.ViTTi16) == (16, 192, 12, 3, 768)
    assert sizes(image.ViTS16) == (16, 384, 12, 6, 1536)
    assert sizes(image.ViTB16) == (16, 768, 12, 12, 3072)
    model = _build_encoder("vit_ti16", patch_size=[8, 4], width=12, depth=1, num_heads=3, mlp_dim=24, pool="mean")
    assert isinstance(model, image.ViTTi16) and model.patch_size == (8, 4)
    out, variables = _shapes(model, _images())
    assert out.tokens.shape == (B, 2 * 4, 12)
    assert set(variables["params"]["encoder"]) == {"layer_0", "ln_final"}
    assert variables["params"]["patch_embed"]["kernel"] == (8 * 4 * C, 12)


def test_vit_patch_embed_is_a_conv_with_kernel_equal_stride():
    """The documented flattening order: kernel [p_h*p_w*C, D] reshaped to HWIO [p_h, p_w, C, D] is the conv's,
    and patches are in row-major grid order."""
    model = image.ViT(patch_size=(4, 2), width=8, depth=1, num_heads=2, mlp_dim=8)
    x = _images()
    (_, variables) = _run(lambda x: model.init_with_output(_key(), x, train=False, capture_intermediates=True), x)
    (embedded,) = variables["intermediates"]["patch_embed"]["__call__"]
    kernel = variables["params"]["patch_embed"]["kernel"].reshape(4, 2, C, 8)
    conv = lax.conv_general_dilated(x, kernel, (4, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = np.asarray(conv).reshape(B, -1, 8) + variables["params"]["patch_embed"]["bias"]
    np.testing.assert_allclose(embedded, conv, rtol=1e-5, atol=1e-5)


def test_vit_input_shape_errors_name_the_shapes():
    model = image.ViT(**VIT)
    message = r"18 x 16 \(input shape \(4, 18, 16, 3\)\) is not divisible by patch_size 4 x 4"
    with pytest.raises(ValueError, match=message):
        _shapes(model, _images(h=18))
    with pytest.raises(ValueError, match=r"image_size=16 but got images of shape \(4, 8, 8, 3\)"):
        _shapes(image.ViT(image_size=16, **VIT), _images(h=8, w=8))
    params = jax.eval_shape(lambda x: model.init(_key(), x, train=False), _images())
    with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 17, 16\) but 8 x 8 images"):
        jax.eval_shape(lambda p, x: model.apply(p, x, train=False), params, _images(h=8, w=8))
    with pytest.raises(ValueError, match="expects input of shape"):
        _shapes(model, _images()[0])


# ------------------------------------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("block,stem", [("basic", "cifar"), ("bottleneck", "cifar"), ("basic", "imagenet")])
def test_resnet_shapes_and_param_names(block, stem):
    model = _build_encoder("resnet", block=block, **(RESNET | dict(stem=stem)))
    out, variables = _shapes(model, _images())
    side = 8 if stem == "cifar" else 2  # cifar: 16 -> 8 in stage 1; imagenet: /2 conv, /2 pool, /2 stage 1.
    channels = 16 * (4 if block == "bottleneck" else 1)
    assert out.tokens.shape == (B, side * side, channels) and out.pooled.shape == (B, channels)
    assert set(variables) == {"params", "batch_stats"}
    params = variables["params"]
    assert set(params) == {"stem_conv", "stem_bn", "stage0_block0", "stage1_block0"}
    assert params["stem_conv"] == {"kernel": (7, 7, C, 8) if stem == "imagenet" else (3, 3, C, 8)}  # No bias.
    convs = {"conv1", "bn1", "conv2", "bn2"} | ({"conv3", "bn3"} if block == "bottleneck" else set())
    assert set(params["stage1_block0"]) == convs | {"proj_conv", "proj_bn"}
    assert set(params["stage0_block0"]) == convs | ({"proj_conv", "proj_bn"} if block == "bottleneck" else set())
    assert set(variables["batch_stats"]["stem_bn"]) == {"mean", "var"}


def test_resnet_named_sizes_and_overrides():
    assert (image.ResNet18.stage_sizes, image.ResNet18.block, image.ResNet18.width) == ((2, 2, 2, 2), "basic", 64)
    assert (image.ResNet50.stage_sizes, image.ResNet50.block, image.ResNet50.stem) == (
        (3, 4, 6, 3), "bottleneck", "imagenet",
    )
    model = _build_encoder("resnet50", width=4, stage_sizes=[1, 1], stem="cifar")
    assert isinstance(model, image.ResNet50) and model.stage_sizes == (1, 1)
    out, _ = _shapes(model, _images())
    assert out.pooled.shape == (B, 32)
    out, _ = _shapes(_build_encoder("resnet18", width=4), _images(h=64, w=64))
    assert out.tokens.shape == (B, 2 * 2, 32)  # 64 / 32.
    with pytest.raises(ValueError, match="block must be 'basic' or 'bottleneck'"):
        _shapes(image.ResNet(block="wide", **RESNET), _images())
    with pytest.raises(ValueError, match="stem must be 'imagenet' or 'cifar'"):
        _shapes(image.ResNet(**(RESNET | dict(stem="tiny"))), _images())


# -------------------------------------------------------------------------------------------- all the encoders


@pytest.mark.parametrize("case", ["vit", "resnet_bottleneck", "small_cnn"])
def test_gradients_reach_every_parameter_and_remat_changes_nothing(case):
    variables = dict(_variables(case))
    params = variables.pop("params")
    if case.startswith("resnet"):
        # The last BN scale of each residual block starts at zero; with it, nothing reaches the rest of the branch.
        for name in ("stage0_block0", "stage1_block0"):
            assert not np.any(params[name]["bn3"]["scale"]) and np.all(params[name]["bn1"]["scale"] == 1)
        params = jax.tree_util.tree_map_with_path(
            lambda path, p: np.ones_like(p) if "bn3" in jax.tree_util.keystr(path) else p, params
        )
    x = _images()
    grad_fns = {
        policy: jax.value_and_grad(_loss_fn(CASES[case](remat=policy)), has_aux=True)
        for policy in ("none", "full", "dots")
    }
    # One program for the three policies compiles ~2x faster than three.
    results = _run(lambda *args: {p: f(*args) for p, f in grad_fns.items()}, params, variables, x, opt_level=1)
    (loss, stats), grads = results["none"]
    norms = {jax.tree_util.keystr(k): float(np.linalg.norm(g)) for k, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert len(norms) == len(jax.tree_util.tree_leaves(params))
    # The attention key bias cannot change a softmax over keys: its gradient is zero up to rounding.
    zero = {k for k in norms if "['key']['bias']" in k}
    assert all(np.isfinite(v) and (v > 1e-6 or k in zero) for k, v in norms.items()), norms
    assert len(zero) == (VIT["depth"] if case == "vit" else 0)
    for policy in ("full", "dots"):
        (loss_r, stats_r), grads_r = results[policy]
        np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
        _assert_close(grads_r, grads, rtol=1e-6, atol=1e-8)
        _assert_close(stats_r, stats, rtol=1e-6)


def test_remat_is_applied_and_validated():
    x = jax.ShapeDtypeStruct((B, H, W, C), jnp.float32)
    for case in CASES:
        variables = jax.eval_shape(lambda x, case=case: CASES[case]().init(_key(), x, train=False), x)
        params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
        for policy, expected in (("none", False), ("full", True)):
            module = CASES[case](remat=policy)
            grad = jax.grad(lambda *a, module=module: _loss_fn(module)(*a)[0])
            jaxpr = str(jax.make_jaxpr(grad)(params, rest, x))
            assert ("checkpoint" in jaxpr or "remat" in jaxpr) == expected, (case, policy)
        with pytest.raises(ValueError, match="unknown remat policy 'some'"):
            jax.eval_shape(lambda x, case=case: CASES[case](remat="some").init(_key(), x, train=False), x)


def test_small_cnn_param_names_do_not_depend_on_remat():
    shapes = [_shapes(CASES["small_cnn"](remat=policy), _images())[1] for policy in ("none", "full", "dots")]
    assert shapes[0] == shapes[1] == shapes[2]
    assert set(shapes[0]["params"]) == {"Conv_0", "Conv_1", "token_proj", "pool_proj"}


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_compute_float32_params(case):
    model16 = CASES[case](dtype=jnp.bfloat16)
    _, shapes = jax.eval_shape(lambda x: model16.init_with_output(_key(), x, train=False), _images())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))  # Params and statistics.
    out16, out32 = _run(
        lambda v, x: (model16.apply(v, x, train=False), CASES[case]().apply(v, x, train=False)),
        _variables(case),
        _images(),
    )
    for got, want in [(out16.tokens, out32.tokens), (out16.pooled, out32.pooled)]:
        assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(got, np.float32)))
        _assert_close(got, want, rtol=0.05)


# ------------------------------------------------------------------------------------------------- batch norm


def _train_forward(model, mesh, variables, x):
    """Training-mode forward under jit: batch sharded over `mesh`'s data axis, variables replicated. Returns
    (pooled, updated batch_stats, stem_conv output)."""
    batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def forward(variables, x):
        out, state = model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, method: module.name == "stem_conv",
        )
        return out.pooled, state["batch_stats"], state["intermediates"]["stem_conv"]["__call__"][0]

    args = jax.device_put(variables, replicated), jax.device_put(x, batch_sharding)
    assert len(args[1].sharding.device_set) == mesh.size
    return _run(forward, *args, out_shardings=replicated)


def test_batch_norm_statistics_are_over_the_global_sharded_batch():
    assert len(jax.devices()) == 8
    model = CASES["resnet_basic"]()
    variables = _variables("resnet_basic")
    x = np.concatenate([_images(seed=0), _images(seed=1) * 2 + 1, _images(seed=2), _images(seed=3) - 1])  # 16.
    out8, stats8, conv8 = _train_forward(model, Mesh(np.array(jax.devices()), ("data",)), variables, x)
    out1, stats1, _ = _train_forward(model, Mesh(np.array(jax.devices()[:1]), ("data",)), variables, x)
    np.testing.assert_allclose(out8, out1, rtol=1e-5, atol=1e-5)
    _assert_close(stats8, stats1, rtol=1e-5)
    assert jax.tree_util.tree_structure(stats8) == jax.tree_util.tree_structure(variables["batch_stats"])
    # running = 0.9 * initial (0) + 0.1 * mean over the global batch of 16, not over one device's 2 examples.
    global_mean, local_mean = np.mean(conv8, axis=(0, 1, 2)), np.mean(conv8[:2], axis=(0, 1, 2))
    np.testing.assert_allclose(stats8["stem_bn"]["mean"], 0.1 * global_mean, rtol=1e-4, atol=1e-6)
    assert not np.allclose(0.1 * local_mean, 0.1 * global_mean, rtol=1e-2)
    np.testing.assert_allclose(stats8["stem_bn"]["var"], 0.9 + 0.1 * np.var(conv8, axis=(0, 1, 2)), rtol=1e-4)

    # Evaluation uses the running averages: nothing is mutable, an example's output does not depend on the rest
    # of the batch, and it does depend on the stored statistics.
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False).pooled)
    updated = {"params": variables["params"], "batch_stats": stats8}
    other = x.copy()
    other[3:] = other[3:] * 3 - 2
    out_eval, out_other, out_init = (evaluate(v, b) for v, b in ((updated, x), (updated, other), (variables, x)))
    np.testing.assert_allclose(out_other[:3], out_eval[:3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out_init, out_eval, atol=1e-4)
