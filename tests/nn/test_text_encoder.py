"""TextTransformer: shapes per pooling, causality, padding invariance, pre/post-LN, grads, bf16, remat, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.encoders.text import MiniLML6, TextTransformer
from mmjax.registry import ENCODERS

TINY = dict(vocab_size=32, max_len=16, width=16, depth=2, num_heads=2, mlp_dim=32)
# Two texts padded (id 0) to length 6: 4 and 2 real tokens.
IDS = np.array([[2, 5, 9, 3, 0, 0], [2, 7, 0, 0, 0, 0]], np.int32)


def encoder(**kw):
    return TextTransformer(**(TINY | kw))


def init_apply(model, ids=IDS):
    params = model.init(jax.random.PRNGKey(0), ids, train=False)
    return params, model.apply(params, ids, train=False)


@pytest.mark.parametrize("pool", ["cls", "mean", "eot"])
def test_shapes_and_pooling(pool):
    _, out = init_apply(encoder(pool=pool, causal=pool == "eot"))
    assert out.tokens.shape == (2, 6, 16) and out.pooled.shape == (2, 16)
    np.testing.assert_array_equal(out.mask, IDS != 0)
    tokens = np.asarray(out.tokens)
    expected = {
        "cls": tokens[:, 0],
        "mean": np.stack([tokens[0, :4].mean(0), tokens[1, :2].mean(0)]),
        "eot": np.stack([tokens[0, 3], tokens[1, 1]]),
    }[pool]
    np.testing.assert_allclose(out.pooled, expected, rtol=1e-5, atol=1e-6)
    assert np.all(tokens[0, 4:] == 0) and np.all(tokens[1, 2:] == 0)  # Padded tokens are zeros.


def test_causal_tokens_do_not_see_later_tokens():
    ids = np.array([[2, 5, 9, 11, 4, 3]], np.int32)
    changed = ids.copy()
    changed[0, 4] = 17
    model = encoder(causal=True, pool="eot")
    params, out = init_apply(model, ids)
    out_changed = model.apply(params, changed, train=False)
    np.testing.assert_array_equal(out.tokens[:, :4], out_changed.tokens[:, :4])
    assert not np.allclose(out.tokens[:, 4:], out_changed.tokens[:, 4:])
    assert not np.allclose(out.pooled, out_changed.pooled)
    # Without causality, every token sees the change.
    bidirectional = encoder(causal=False)
    params = bidirectional.init(jax.random.PRNGKey(0), ids, train=False)
    a, b = bidirectional.apply(params, ids, train=False), bidirectional.apply(params, changed, train=False)
    assert not np.allclose(a.tokens[:, 0], b.tokens[:, 0])


@pytest.mark.parametrize("pool,pre_norm", [("cls", False), ("mean", False), ("mean", True), ("eot", True)])
def test_extra_padding_changes_nothing(pool, pre_norm):
    model = encoder(pool=pool, pre_norm=pre_norm, causal=pool == "eot", type_vocab_size=2)
    longer = np.pad(IDS, ((0, 0), (0, 5)))  # Same texts, 5 more pad tokens.
    params, out = init_apply(model)
    out_longer = model.apply(params, longer, train=False)
    np.testing.assert_allclose(out_longer.tokens[:, :6], out.tokens, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_longer.pooled, out.pooled, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out_longer.tokens[:, 6:]) == 0)


def test_pre_and_post_ln_parameters():
    pre, _ = init_apply(encoder(pre_norm=True))
    post, out = init_apply(encoder(pre_norm=False, type_vocab_size=2, layer_norm_eps=1e-12))
    assert set(pre["params"]) == {"token_embed", "position_embed", "encoder"}
    assert "ln_final" in pre["params"]["encoder"]
    assert set(post["params"]) == {"token_embed", "position_embed", "type_embed", "ln_embed", "encoder"}
    assert "ln_final" not in post["params"]["encoder"]
    assert post["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape == (16, 2, 8)
    # Post-LN: every real token's output is layer-normalised (unit variance up to the LN scale of 1 at init).
    np.testing.assert_allclose(np.asarray(out.tokens[0, :4]).std(-1), 1.0, rtol=1e-3)


def test_gradients_reach_every_parameter():
    model = encoder(pre_norm=False, type_vocab_size=2, pool="mean")
    params = model.init(jax.random.PRNGKey(0), IDS, train=False)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, IDS, train=False).pooled ** 2)))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), path
        if "type_embed" not in jax.tree_util.keystr(path):  # Only type 1's row is unused.
            assert np.any(g != 0), jax.tree_util.keystr(path)
    # Embedding rows of tokens not in the batch get no gradient.
    assert np.all(grads["params"]["token_embed"]["embedding"][20] == 0)


def test_bfloat16_compute_with_float32_params():
    params, out32 = init_apply(encoder(pool="mean"))
    out16 = encoder(pool="mean", dtype=jnp.bfloat16).apply(params, IDS, train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert out16.tokens.dtype == jnp.bfloat16 and out16.pooled.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16.pooled, np.float32), out32.pooled, atol=0.1)


def test_remat_matches_no_remat():
    plain, remat = encoder(pool="mean"), encoder(pool="mean", remat="full")
    params = plain.init(jax.random.PRNGKey(0), IDS, train=False)
    loss = lambda model: lambda p: jnp.sum(model.apply(p, IDS, train=False).pooled ** 2)  # noqa: E731
    np.testing.assert_allclose(loss(remat)(params), loss(plain)(params), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(jax.jit(jax.grad(loss(remat)))(params)),
                    jax.tree_util.tree_leaves(jax.jit(jax.grad(loss(plain)))(params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    model = encoder()
    with pytest.raises(ValueError, match=r"L=17 exceeds max_len=16"):
        model.init(jax.random.PRNGKey(0), np.ones((1, 17), np.int32), train=False)
    with pytest.raises(TypeError, match="integer token ids"):
        model.init(jax.random.PRNGKey(0), np.ones((1, 4), np.float32), train=False)
    with pytest.raises(ValueError, match="rank 2"):
        model.init(jax.random.PRNGKey(0), np.ones((4,), np.int32), train=False)
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        encoder(pool="max").init(jax.random.PRNGKey(0), IDS, train=False)


def test_registered_names_and_minilm_architecture():
    assert ENCODERS.get("text_transformer") is TextTransformer and ENCODERS.get("minilm_l6") is MiniLML6
    assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(TextTransformer) if f.init
               and f.name not in ("parent", "name"))
    shapes = jax.eval_shape(lambda: MiniLML6().init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), train=False))
    leaves = jax.tree_util.tree_leaves(shapes)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 22_565_376  # all-MiniLM-L6-v2 (22,713,216) without its pooler.
    assert shapes["params"]["type_embed"]["embedding"].shape == (2, 384)


@pytest.mark.parametrize("pool", ["cls", "mean", "eot"])
def test_all_padding_row_gives_zeros_not_nans(pool):
    """Eval batches are padded with all-zero examples: they must not produce NaNs."""
    ids = np.concatenate([IDS, np.zeros((1, 6), np.int32)])
    _, out = init_apply(encoder(pool=pool, pre_norm=pool != "cls"), ids)
    assert np.all(np.isfinite(out.tokens)) and np.all(np.isfinite(out.pooled))
    assert np.all(np.asarray(out.pooled[2]) == 0)
