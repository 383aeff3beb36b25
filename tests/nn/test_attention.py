"""The attention implementations compute what Flax's `MultiHeadDotProductAttention` computes, from the same
parameters: "packed" (mmjax's CPU path: one q/k/v projection, heads-first products) and "fused"
(jax.nn.dot_product_attention), forward and gradients, float32 and bfloat16, with and without masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.encoders.text import TextTransformer
from mmjax.nn.transformer import TransformerBlock, attention_mask, resolve_attention

B, T, S, D, H = 3, 9, 5, 32, 4


def _inputs(rng, with_mask: bool, cross: bool):
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32) if cross else None
    mask = None
    if with_mask:
        keys = np.ones((B, S if cross else T), bool)
        keys[0, 3:] = False
        keys[2, 1:] = False
        queries = np.ones((B, T), bool)
        queries[1, 6:] = False
        mask = attention_mask(jnp.asarray(queries), jnp.asarray(keys), None if cross else T)
    return x, context, mask


@pytest.mark.parametrize("impl", ["packed", "fused"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_implementations_equal_flax(impl, dtype, with_mask, cross):
    x, context, mask = _inputs(np.random.default_rng(0), with_mask, cross)
    make = lambda name: TransformerBlock(num_heads=H, mlp_dim=2 * D, attention_impl=name,  # noqa: E731
                                         dtype=jnp.dtype(dtype) if dtype else None)
    params = make("flax").init(jax.random.PRNGKey(0), x, mask, context, True)
    params_impl = make(impl).init(jax.random.PRNGKey(0), x, mask, context, True)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), params, params_impl))

    def loss(p, name, x, context):
        out = make(name).apply(p, x, mask, context, True).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    grad = jax.grad(loss, argnums=(0, 2, 3) if cross else (0, 2), has_aux=True)
    (want_grads, want), (got_grads, got) = (grad(params, n, x, context) for n in ("flax", impl))
    tol = dict(atol=3e-2, rtol=3e-2) if dtype else dict(atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got, want, **tol)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **{**tol, "atol": tol["atol"] * 10}),
                           got_grads, want_grads)


@pytest.mark.parametrize("causal", [False, True])
def test_text_transformer_with_padding_is_the_same_with_every_implementation(causal):
    ids = np.random.default_rng(0).integers(1, 50, size=(3, 9)).astype(np.int32)
    ids[0, 5:] = 0
    ids[2, 2:] = 0
    make = lambda impl: TextTransformer(vocab_size=50, max_len=9, width=32, depth=2, num_heads=4, mlp_dim=64,  # noqa
                                        causal=causal, pool="eot" if causal else "mean", attention_impl=impl)
    params = make("flax").init(jax.random.PRNGKey(0), ids, train=False)
    expected = make("flax").apply(params, ids, train=False)
    expected_grad = jax.grad(lambda p: make("flax").apply(p, ids, train=False).pooled.sum())(params)
    for impl in ("packed", "fused"):
        out = make(impl).apply(params, ids, train=False)
        grad = jax.grad(lambda p, impl=impl: make(impl).apply(p, ids, train=False).pooled.sum())(params)
        np.testing.assert_allclose(out.tokens, expected.tokens, atol=2e-5)
        np.testing.assert_allclose(out.pooled, expected.pooled, atol=2e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), grad, expected_grad)


def test_attention_dropout_is_applied_in_training_only():
    x, _, _ = _inputs(np.random.default_rng(1), False, False)
    block = TransformerBlock(num_heads=H, mlp_dim=2 * D, attention_dropout=0.5, attention_impl="packed")
    params = block.init(jax.random.PRNGKey(0), x, None, None, True)
    no_attention_dropout = TransformerBlock(num_heads=H, mlp_dim=2 * D, attention_impl="packed")
    evaluated = block.apply(params, x, None, None, True)
    np.testing.assert_array_equal(evaluated, no_attention_dropout.apply(params, x, None, None, True))
    trained = [block.apply(params, x, None, None, False, rngs={"dropout": jax.random.PRNGKey(k)}) for k in (1, 2)]
    assert not np.allclose(trained[0], evaluated) and not np.allclose(trained[0], trained[1])


def test_auto_picks_fused_for_16_bit_gpu_compute_and_packed_otherwise():
    assert resolve_attention("auto", None, 0.0) == "packed"  # Tests run on CPU.
    assert resolve_attention("auto", "bfloat16", 0.0) == ("fused" if jax.default_backend() == "gpu" else "packed")
    assert resolve_attention("fused", None, 0.0) == "fused" and resolve_attention("flax", "bfloat16", 0.0) == "flax"
    with pytest.raises(ValueError, match="unknown attention_impl 'cudnn'"):
        resolve_attention("cudnn", None, 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_the_written_out_attention_gradient_equals_autodiff(dtype, with_mask):
    """`heads_first_attention`'s hand-written backward against XLA's derivative of the same forward."""
    from mmjax.nn.transformer import _attention_forward, heads_first_attention

    rng = np.random.default_rng(3)
    q, k, v, d_out = (jnp.asarray(rng.normal(size=(2, 3, 7, 8)), dtype) for _ in range(4))
    mask = None
    if with_mask:
        keys, queries = np.ones((2, 7), bool), np.ones((2, 7), bool)
        keys[1, 4:] = False
        queries[0, 5:] = False  # Rows with no key to attend to: uniform probabilities, no gradient.
        mask = attention_mask(jnp.asarray(queries), jnp.asarray(keys), 7)
    written = jax.vjp(lambda q, k, v: heads_first_attention(q, k, v, mask), q, k, v)
    automatic = jax.vjp(lambda q, k, v: _attention_forward(q, k, v, mask)[0], q, k, v)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == jnp.bfloat16 else dict(atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(written[0], np.float32), np.asarray(automatic[0], np.float32), **tol)
    for got, want in zip(written[1](d_out), automatic[1](d_out)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
