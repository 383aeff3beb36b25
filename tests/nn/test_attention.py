"""The fused attention path (jax.nn.dot_product_attention) computes what Flax's attention computes."""

import jax
import numpy as np
import pytest

from mmjax.nn.encoders.text import TextTransformer
from mmjax.nn.transformer import use_fused_attention


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_equals_flax_attention_with_padding_masks(causal):
    ids = np.random.default_rng(0).integers(1, 50, size=(3, 9)).astype(np.int32)
    ids[0, 5:] = 0
    ids[2, 2:] = 0
    make = lambda impl: TextTransformer(vocab_size=50, max_len=9, width=32, depth=2, num_heads=4, mlp_dim=64,  # noqa
                                        causal=causal, pool="eot" if causal else "mean", attention_impl=impl)
    params = make("flax").init(jax.random.PRNGKey(0), ids, train=False)
    grads = []
    for impl in ("flax", "fused"):
        out = make(impl).apply(params, ids, train=False)
        grads.append(jax.grad(lambda p, impl=impl: make(impl).apply(p, ids, train=False).pooled.sum())(params))
        if impl == "flax":
            expected = out
    np.testing.assert_allclose(out.tokens, expected.tokens, atol=2e-5)
    np.testing.assert_allclose(out.pooled, expected.pooled, atol=2e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), grads[1], grads[0])


def test_auto_picks_fused_only_for_16_bit_gpu_compute_without_attention_dropout():
    assert not use_fused_attention("auto", None, 0.0)  # Tests run on CPU: always Flax's attention.
    assert use_fused_attention("fused", None, 0.0) and not use_fused_attention("flax", "bfloat16", 0.0)
    with pytest.raises(ValueError, match="unknown attention_impl 'cudnn'"):
        use_fused_attention("cudnn", None, 0.0)
