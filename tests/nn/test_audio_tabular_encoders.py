"""AST and spectrogram CNN encoders, the JAX log-mel front end, and the tabular encoder: shapes, gradients,
bf16, remat equivalence and clear errors. Everything is tiny (16 x 12 spectrograms, width 16, depth 2)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.audio_features import log_mel_spectrogram
from mmjax.nn.conv import Conv
from mmjax.nn.encoders.audio import AudioSpectrogramTransformer, LogMelFrontend, SpectrogramCNN, extract_patches
from mmjax.nn.encoders.tabular import TabularMLP, check_categorical, tabular_stats
from mmjax.nn.layers import max_pool_2x2
from mmjax.registry import ENCODERS

REMATS = ("none", "full", "dots")
AST = dict(patch_time=4, patch_freq=4, width=16, depth=2, num_heads=2, mlp_dim=32)


def spectrogram(n=2, frames=16, mels=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, frames, mels)).astype(np.float32)


def table(n=4, seed=0):
    """Columns: 0 numeric, 1 categorical (3 codes), 2 numeric, 3 categorical (5 codes), 4 numeric."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) * 3.0 + 1.0
    x[:, 1] = rng.integers(0, 3, n)
    x[:, 3] = rng.integers(0, 5, n)
    return x.astype(np.float32)


def tabular(categorical=True, **kwargs):
    if categorical:
        config = dict(categorical_columns=(1, 3), cardinalities=(3, 5), numeric_mean=(1.0,) * 3, numeric_std=(3.0,) * 3)
    else:
        config = dict(numeric_mean=(1.0,) * 5, numeric_std=(3.0,) * 5)
    return TabularMLP(**(config | dict(embed_dim=4, width=16, hidden=(8,)) | kwargs))


def init_params(model, x, seed=0):
    """Parameters of init's shapes and dtypes, filled with random values without compiling anything (compiling
    init costs seconds on a loaded CPU): LayerNorm scales near 1, everything else normal with std 0.3."""
    shapes = trace_init(model, x)["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    values = []
    for path, leaf in leaves:
        value = rng.normal(size=leaf.shape) * 0.3
        if jax.tree_util.keystr(path).endswith("['scale']"):
            value = 1.0 + value
        values.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


_APPLY = {}


def apply(model, params, x):
    """Compiled `model.apply`, one compilation per module configuration (and input shape)."""
    if model not in _APPLY:
        _APPLY[model] = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    return _APPLY[model](params, x)


def trace_init(model, x):
    """Traces init without compiling: enough for shape checks and trace-time errors."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def loss_fn(module, x, seed=1):
    """A loss that reaches every parameter (random projections of tokens and pooled, not plain sums, which
    would give LayerNorm scales zero gradient)."""

    def loss(params):
        out = module.apply({"params": params}, x, train=False)
        rng = np.random.default_rng(seed)
        wt = rng.normal(size=out.tokens.shape[1:]).astype(np.float32)
        wp = rng.normal(size=out.pooled.shape[1:]).astype(np.float32)
        return jnp.mean(jnp.tanh(out.tokens.astype(jnp.float32) * wt)) + jnp.mean(
            jnp.tanh(out.pooled.astype(jnp.float32) * wp)
        )

    return jax.jit(jax.value_and_grad(loss))


def largest(tree):
    return max(float(np.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(tree))


def assert_trees_close(a, b):
    """Tight: float32 summation-order noise only (relative to the largest gradient entry)."""
    atol = 1e-6 * largest(b)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol), a, b)


def assert_all_grads_nonzero(grads):
    """Every parameter gets a gradient well above float32 noise, except attention key biases: softmax ignores
    a constant added to all logits of a query, so their gradient is zero in exact arithmetic."""
    scale = largest(grads)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        if "'key'" in name and "'bias'" in name:
            continue
        assert np.abs(g).max() > 1e-5 * scale, name


def test_registered_with_defaults_for_every_field():
    for name in ("ast", "spectrogram_cnn", "tabular_mlp"):
        cls = ENCODERS.get(name)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name") and f.default is dataclasses.MISSING
        ]
        assert not missing, (name, missing)


@pytest.mark.parametrize(
    "pool, stride, grid",
    [("cls", None, (4, 3)), ("mean", None, (4, 3)), ("cls", (3, 2), (5, 5))],
)
def test_ast_shapes(pool, stride, grid):
    extra = {} if stride is None else dict(stride_time=stride[0], stride_freq=stride[1])
    model = AudioSpectrogramTransformer(**AST, pool=pool, **extra)
    x = spectrogram()
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    params = variables["params"]
    assert out.tokens.shape == (2, grid[0] * grid[1], 16) and out.pooled.shape == (2, 16) and out.mask is None
    assert params["pos_embed"].shape == (*grid, 16)
    assert params["patch_embed"]["kernel"].shape == (16, 16)
    assert ("cls_token" in params) == (pool == "cls")


@pytest.mark.parametrize("stride, grid", [((4, 4), (4, 3)), ((3, 2), (5, 5))])
def test_ast_patches_are_flattened_time_major(stride, grid):
    """Patch (i, j) holds frames i*st .. i*st+3, mels j*sf .. j*sf+3, element (t, f) at index t * patch_freq + f."""
    x = spectrogram()
    patches = np.asarray(extract_patches(jnp.asarray(x), (4, 4), stride))
    assert patches.shape == (2, *grid, 16)
    for i in range(grid[0]):
        for j in range(grid[1]):
            t, f = i * stride[0], j * stride[1]
            np.testing.assert_array_equal(patches[:, i, j], x[:, t : t + 4, f : f + 4].reshape(2, 16))


@pytest.fixture(scope="module")
def ast_params():
    return init_params(AudioSpectrogramTransformer(**AST), spectrogram())


def test_ast_grads_flow_and_remat_matches(ast_params):
    x = spectrogram()
    results = {remat: loss_fn(AudioSpectrogramTransformer(**AST, remat=remat), x)(ast_params) for remat in REMATS}
    assert_all_grads_nonzero(results["none"][1])
    for remat in ("full", "dots"):
        np.testing.assert_allclose(results[remat][0], results["none"][0], rtol=1e-6)
        assert_trees_close(results[remat][1], results["none"][1])


def test_ast_bf16_has_f32_params_and_is_close_to_f32(ast_params):
    x = spectrogram()
    bf16 = AudioSpectrogramTransformer(**AST, dtype=jnp.bfloat16)
    params = trace_init(bf16, x)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    out, ref = apply(bf16, ast_params, x), apply(AudioSpectrogramTransformer(**AST), ast_params, x)
    assert out.tokens.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out.tokens, np.float32)))
    np.testing.assert_allclose(np.asarray(out.pooled, np.float32), ref.pooled, atol=0.15)
    np.testing.assert_allclose(np.asarray(out.tokens, np.float32), ref.tokens, atol=0.15)


def test_ast_errors():
    model = AudioSpectrogramTransformer(**AST | dict(patch_time=8, patch_freq=16))
    with pytest.raises(ValueError, match=r"shape \(2, 16, 12\).*smaller than one patch.*8 x 16"):
        trace_init(model, spectrogram())
    model = AudioSpectrogramTransformer(**AST)
    variables = trace_init(model, spectrogram())
    with pytest.raises(ValueError, match=r"4 x 3 .*patch grid.*gives 5 x 3"):
        jax.eval_shape(lambda v: model.apply(v, spectrogram(frames=20), train=False), variables)
    with pytest.raises(ValueError, match="pool must be"):
        trace_init(AudioSpectrogramTransformer(**AST, pool="max"), spectrogram())


def test_spectrogram_cnn_keeps_params_and_outputs_and_remat_matches():
    x = spectrogram(frames=12, mels=10)
    model = SpectrogramCNN(features=(4, 8), width=8)
    params = init_params(model, x)
    for remat in REMATS:  # Same parameter tree as before remat existed, whatever the policy.
        tree = trace_init(SpectrogramCNN(features=(4, 8), width=8, remat=remat), x)["params"]
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
    assert set(params) == {"Conv_0", "Conv_1", "token_proj", "pool_proj"}
    assert set(params["Conv_0"]) == {"kernel", "bias"}
    results = {remat: loss_fn(SpectrogramCNN(features=(4, 8), width=8, remat=remat), x)(params) for remat in REMATS}
    assert_all_grads_nonzero(results["none"][1])
    for remat in ("full", "dots"):
        np.testing.assert_allclose(results[remat][0], results["none"][0], rtol=1e-6)
        assert_trees_close(results[remat][1], results["none"][1])

    @jax.jit
    def reference(params, x):  # The computation before remat existed: Conv -> ReLU -> 2x2 max-pool per stage.
        h = x[..., None]
        for i, features in enumerate((4, 8)):
            h = max_pool_2x2(jax.nn.relu(Conv(features, (3, 3)).apply({"params": params[f"Conv_{i}"]}, h)))
        return h.reshape(2, h.shape[1], -1) @ params["token_proj"]["kernel"] + params["token_proj"]["bias"]

    np.testing.assert_allclose(apply(model, params, x).tokens, reference(params, x), rtol=1e-5, atol=1e-6)


def test_spectrogram_cnn_bf16():
    x = spectrogram(frames=12, mels=10)
    model = SpectrogramCNN(features=(4,), width=8, dtype=jnp.bfloat16)
    params = init_params(model, x)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    out, ref = apply(model, params, x), apply(SpectrogramCNN(features=(4,), width=8), params, x)
    assert out.pooled.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.pooled, np.float32), ref.pooled, atol=0.1)


@pytest.mark.parametrize("normalize", [False, True])
def test_log_mel_frontend_matches_numpy(normalize):
    def reference(waveform):
        mel = log_mel_spectrogram(waveform, 8000, n_fft=256, hop_length=100, n_mels=20)
        if normalize:  # As AvDigitsPreprocess does per utterance.
            mel = np.stack([(m - m.mean()) / (m.std() + 1e-5) for m in mel])
        return mel

    rng = np.random.default_rng(0)
    t = np.arange(1200) / 8000.0
    waveform = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.normal(size=(3, 1200))).astype(np.float32)
    if not normalize:  # Silence: every mel bin at the log floor (ill-conditioned to standardise).
        waveform[2] *= 0.0
    frontend = LogMelFrontend(sample_rate=8000, n_fft=256, hop_length=100, n_mels=20, normalize=normalize)
    out = frontend.apply({}, jnp.asarray(waveform))
    assert out.shape == (3, 10, 20) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(waveform), rtol=1e-4, atol=1e-3)
    pcm = (waveform[:2] * 20000).astype(np.int16)  # Integer audio is scaled to [-1, 1) as in the pipeline.
    np.testing.assert_allclose(frontend.apply({}, jnp.asarray(pcm)), reference(pcm), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"shape \(3, 100\) is shorter than one frame \(n_fft=256\)"):
        frontend.apply({}, jnp.zeros((3, 100)))


@pytest.mark.parametrize("categorical", [True, False])
def test_tabular_shapes_token_order_and_grads(categorical):
    model, x = tabular(categorical), table()
    params = init_params(model, x)
    forward = lambda x: apply(model, params, x)  # noqa: E731
    out = forward(x)
    assert out.tokens.shape == (4, 5, 16) and out.pooled.shape == (4, 16)
    if categorical:
        assert params["embedding_0"].shape == (3, 4) and params["embedding_1"].shape == (5, 4)
        assert params["mlp"]["hidden_0"]["kernel"].shape == (3 + 2 * 4, 8)
    else:
        assert not any(k.startswith("embedding") for k in params)
    # One token per column, in column order: changing column 2 (numeric) or 3 changes only that token.
    for column in (2, 3) if categorical else (2,):
        changed = x.copy()
        changed[:, column] = (changed[:, column] + 1) % 5 if column == 3 else changed[:, column] + 1
        diff = np.abs(forward(changed).tokens - out.tokens).max(axis=(0, 2))
        assert diff[column] > 0 and np.all(np.delete(diff, column) == 0), (column, diff)
    x_all_codes = np.concatenate([x, table(16, seed=1)])  # Every embedding row used at least once.
    if categorical:
        x_all_codes[:5, 1], x_all_codes[:5, 3] = [0, 1, 2, 0, 1], [0, 1, 2, 3, 4]
    assert_all_grads_nonzero(loss_fn(model, x_all_codes)(params)[1])


def test_tabular_bf16_and_remat():
    x = table()
    params = init_params(tabular(), x)
    bf16_params = trace_init(tabular(dtype=jnp.bfloat16), x)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
    out, ref = apply(tabular(dtype=jnp.bfloat16), params, x), apply(tabular(), params, x)
    assert out.tokens.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.tokens, np.float32), ref.tokens, rtol=0.02, atol=0.05)
    np.testing.assert_allclose(np.asarray(out.pooled, np.float32), ref.pooled, rtol=0.02, atol=0.05)
    (value, grads), none = loss_fn(tabular(remat="full"), x)(params), loss_fn(tabular(), x)(params)
    np.testing.assert_allclose(value, none[0], rtol=1e-6)
    assert_trees_close(grads, none[1])


def test_tabular_invalid_codes_give_nan_not_clipped():
    model, x = tabular(), table()
    params = init_params(model, x)
    bad = x.copy()
    bad[0, 1], bad[1, 3], bad[2, 1] = 3.0, -1.0, 0.5
    out = apply(model, params, bad)
    assert np.all(np.isnan(out.pooled[:3])) and np.all(np.isfinite(out.pooled[3]))


@pytest.mark.parametrize(
    "kwargs, x_cols, match",
    [
        ({}, 6, r"6 columns, 2 categorical \(1, 3\), so 4 numeric, but numeric_mean / numeric_std have 3"),
        (dict(numeric_std=(1.0, 1.0)), 5, "numeric_mean has 3 entries but numeric_std has 2"),
        (dict(cardinalities=(3,)), 5, r"cardinalities has 1 entries \(3,\) but there are 2 categorical_columns"),
        (dict(categorical_columns=(1, 7)), 5, r"column\(s\) \[7\] outside an input of 5 columns"),
        (dict(numeric_mean=(), numeric_std=()), 5, "numeric_mean / numeric_std are empty; .*tabular_stats"),
        (dict(numeric_std=(1.0, 0.0, 1.0)), 5, "numeric_std must be > 0"),
    ],
)
def test_tabular_config_errors(kwargs, x_cols, match):
    x = np.zeros((2, x_cols), np.float32)
    with pytest.raises(ValueError, match=match):
        trace_init(tabular(**kwargs), x)


def test_check_categorical_and_tabular_stats():
    x = table(8).astype(np.float64)
    check_categorical(x, (1, 3), (3, 5))  # Valid codes pass.
    x[5, 3] = 5.0
    with pytest.raises(ValueError, match=r"column 3 has invalid code 5\.0 \(row 5\).*cardinality 5"):
        check_categorical(x, (1, 3), (3, 5))
    x[5, 3], x[2, 1] = 4.0, 1.5
    with pytest.raises(ValueError, match=r"column 1 has invalid code 1\.5 \(row 2\)"):
        check_categorical(x, (1, 3), (3, 5))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"column 1 has invalid code nan"):
        check_categorical(x, (1, 3), (3, 5))
    with pytest.raises(ValueError, match="cardinalities has 1 entries"):
        check_categorical(x, (1, 3), (3,))

    x = table(8)
    x[:, 4] = 2.0  # Constant column: std 1, only centred.
    stats = tabular_stats(x, (1, 3))
    np.testing.assert_allclose(stats["numeric_mean"], x[:, [0, 2, 4]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["numeric_std"], [x[:, 0].std(), x[:, 2].std(), 1.0], rtol=1e-5)
    assert all(isinstance(v, float) for v in stats["numeric_mean"] + stats["numeric_std"])
    model = TabularMLP(categorical_columns=(1, 3), cardinalities=(3, 5), width=8, hidden=(), **stats)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0])
    assert out.tokens.shape == (8, 5, 8)
