"""The classic encoders: VGG-11/13/16 and the LSTM / GRU sequence encoder, and FiLM hooks in conv encoders."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.encoders.audio import SpectrogramCNN
from mmjax.nn.encoders.image import VGG, SmallCNN
from mmjax.nn.encoders.recurrent import RNNEncoder
from mmjax.nn.pretrained import flatten


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("depth,expected", [(11, 9_220_480), (13, 9_404_992), (16, 14_714_688)])
def test_vgg_configurations_have_the_papers_convolution_parameters(depth, expected):
    """torchvision's vgg11/13/16 `features` (the conv layers of configurations A, B, D) have these counts."""
    model = VGG(depth=depth)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert _count(shapes["params"]) == expected
    assert len(model.film_channels()) == depth - 3  # Three of the paper's weight layers are fully connected.


def test_vgg_takes_small_and_odd_images_with_batch_norm_and_a_classifier_mlp():
    model = VGG(depth=13, width=4, batch_norm=True, hidden=(12, 6), dropout=0.5)
    for shape in ((2, 8, 8, 1), (2, 7, 5, 3)):
        x = jax.random.normal(jax.random.PRNGKey(1), shape)
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        out = model.apply(variables, x, train=False)
        assert out.pooled.shape == (2, 6) and out.tokens.shape == (2, 1, 32)
        assert "batch_stats" in variables and "bias" not in variables["params"]["stage0_conv0"]["conv"]
        _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.PRNGKey(2)})
        assert not np.allclose(flatten(updated["batch_stats"])["stage0_conv0/bn/mean"], 0)
    with pytest.raises(ValueError, match="vgg: depth=12; valid: 11, 13, 16"):
        VGG(depth=12).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)


def test_vgg_remat_changes_nothing_but_memory():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    plain, remat = VGG(width=4), VGG(width=4, remat="full")
    variables = plain.init(jax.random.PRNGKey(0), x, train=False)
    loss = lambda m: lambda p: m.apply({"params": p}, x, train=False).pooled.sum()  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss(plain))(variables["params"])["stage4_conv1"]["conv"]["kernel"],
                               jax.grad(loss(remat))(variables["params"])["stage4_conv1"]["conv"]["kernel"], rtol=1e-6)


def _manual_scan(cell, params, frames):
    """The cell stepped over one unpadded sequence by hand: the reference the encoder must match."""
    carry = cell.initialize_carry(jax.random.PRNGKey(0), frames[:1, 0].shape)
    outputs = []
    for t in range(frames.shape[1]):
        carry, y = cell.apply({"params": params}, carry, frames[:1, t])
        outputs.append(y)
    return jnp.stack(outputs, axis=1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_matches_its_cell_stepped_by_hand_and_ignores_padding(cell):
    model = RNNEncoder(cell=cell, hidden=6, vocab_size=30, embed_dim=5, bidirectional=True)
    ids = jnp.array([[2, 7, 9, 4, 3, 0, 0], [2, 5, 3, 0, 0, 0, 0]])
    variables = model.init(jax.random.PRNGKey(0), ids, train=False)
    out = model.apply(variables, ids, train=False)
    params = variables["params"]
    cell_cls = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[cell]
    embedded = params["embed"]["embedding"][ids[:1, :5]]
    forward = _manual_scan(cell_cls(6), params["layer_0_fwd"], embedded)
    backward = _manual_scan(cell_cls(6), params["layer_0_bwd"], embedded[:, ::-1])[:, ::-1]
    np.testing.assert_allclose(out.tokens[:1, :5], jnp.concatenate([forward, backward], -1), atol=1e-5)
    np.testing.assert_allclose(out.pooled[0], jnp.concatenate([forward[0, -1], backward[0, 0]]), atol=1e-5)
    assert np.all(np.asarray(out.tokens[0, 5:]) == 0) and out.mask.tolist()[1] == [True] * 3 + [False] * 4
    longer = model.apply(variables, jnp.pad(ids, ((0, 0), (0, 5))), train=False)  # More padding: same output.
    np.testing.assert_array_equal(longer.pooled, out.pooled)
    mean = RNNEncoder(cell=cell, hidden=6, vocab_size=30, embed_dim=5, bidirectional=True, pool="mean")
    pooled = mean.apply(variables, ids, train=False).pooled
    np.testing.assert_allclose(pooled[1], out.tokens[1, :3].mean(0), atol=1e-6)


def test_rnn_over_feature_frames_stacks_layers_and_checks_its_input():
    model = RNNEncoder(hidden=4, num_layers=2, dropout=0.1)
    frames = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 13))
    variables = model.init(jax.random.PRNGKey(0), frames, train=False)
    out = model.apply(variables, frames, train=False)
    assert out.pooled.shape == (3, 4) and out.mask is None and set(variables["params"]) == {"layer_0", "layer_1"}
    np.testing.assert_allclose(out.pooled, out.tokens[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="token-id input needs vocab_size"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 4), jnp.int32), train=False)
    with pytest.raises(ValueError, match="cell='rnn'; valid: lstm, gru"):
        RNNEncoder(cell="rnn").init(jax.random.PRNGKey(0), frames, train=False)
    with pytest.raises(ValueError, match=r"frames \[B, T, F\] \(float\) or token ids"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 4)), train=False)


@pytest.mark.parametrize("encoder,shape", [
    (SmallCNN(features=(4, 8), width=8), (2, 8, 8, 1)),
    (SmallCNN(features=(4, 8), width=8, remat="full"), (2, 8, 8, 1)),
    (SpectrogramCNN(features=(4, 8), width=8), (2, 12, 10)),
    (VGG(width=2, batch_norm=True), (2, 8, 8, 1)),
    (VGG(width=2), (2, 8, 8, 1)),
    (RNNEncoder(hidden=4, num_layers=2, bidirectional=True), (2, 6, 3)),
])
def test_film_hooks_identity_changes_nothing_and_conditioning_changes_the_output(encoder, shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    variables = encoder.init(jax.random.PRNGKey(1), x, train=False)
    plain = encoder.apply(variables, x, train=False).pooled
    channels = encoder.film_channels()
    identity = tuple((jnp.ones((2, c)), jnp.zeros((2, c))) for c in channels)
    np.testing.assert_allclose(encoder.apply(variables, x, train=False, film=identity).pooled, plain, atol=1e-6)
    shifted = tuple((1.5 * jnp.ones((2, c)), 0.3 * jnp.ones((2, c))) for c in channels)
    assert not np.allclose(encoder.apply(variables, x, train=False, film=shifted).pooled, plain, atol=1e-4)
    with pytest.raises(ValueError, match="FiLM needs"):
        encoder.apply(variables, x, train=False, film=identity[:-1])
