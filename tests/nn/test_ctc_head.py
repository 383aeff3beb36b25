"""Padded speech: the frame mask mapped to encoder tokens, honoured by the CTC head (`model.name="ctc"`) and by the
text decoder's cross-attention (a causal RNN encoder keeps every real token independent of the padding, so the
outputs must not change when only padding changes); the CTC head's targets and checks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.nn.builder import build_model
from mmjax.nn.common import frames_to_token_mask
from mmjax.tasks import build_task

FRAMES, MELS = 12, 8
LENGTHS = np.array([12, 7, 4, 9])
RNN = dict(name="rnn", cell="gru", hidden=8)  # Forward in time: token t reads frames <= t only.


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    text = np.zeros((4, 6), np.int32)
    for i, n in enumerate((4, 2, 1, 3)):
        text[i, 0], text[i, 1:n + 1], text[i, n + 1] = 2, rng.integers(5, 15, n), 3
    mask = (np.arange(FRAMES)[None] < LENGTHS[:, None]).astype(np.float32)
    audio = rng.normal(size=(4, FRAMES, MELS)).astype(np.float32) * mask[..., None]
    return {"audio": audio, "audio_frame_mask": mask, "text": text}


def _repadded(batch):
    """The same utterances with other values in their padding frames."""
    noise = np.random.default_rng(9).normal(size=batch["audio"].shape).astype(np.float32) * 3.0
    real = np.arange(FRAMES)[None, :, None] < LENGTHS[:, None, None]
    return dict(batch, audio=np.where(real, batch["audio"], noise))


def test_frame_mask_maps_to_the_tokens_that_start_on_a_real_frame():
    mask = (np.arange(8)[None] < np.array([8, 5, 1, 0])[:, None]).astype(np.float32)
    tokens = np.asarray(frames_to_token_mask(jnp.asarray(mask), 4))  # Stride 2: token t starts at frame 2t.
    np.testing.assert_array_equal(tokens.sum(axis=1), [4, 3, 1, 0])
    np.testing.assert_array_equal(np.asarray(frames_to_token_mask(jnp.asarray(mask), 8)), mask > 0)


def test_ctc_head_masks_padding_frames_and_its_loss_ignores_them():
    config = ml_collections.ConfigDict(dict(name="ctc", num_classes=5, encoders=dict(audio=RNN),
                                            ctc=dict(vocab_size=15)))
    model = build_model(config)
    batch = _batch()
    variables = model.init(jax.random.PRNGKey(0), batch, train=False)
    out = model.apply(variables, batch, train=False)
    assert out["ctc_logits"].shape == (4, FRAMES, 16) and out["ctc_logits"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["ctc_mask"]).sum(axis=1), LENGTHS)
    np.testing.assert_array_equal(np.asarray(out["target_mask"]).sum(axis=1), [4, 2, 1, 3])
    task = build_task({"name": "ctc"}, num_classes=5)
    loss = np.asarray(task.loss(out, None))
    repadded = np.asarray(task.loss(model.apply(variables, _repadded(batch), train=False), None))
    np.testing.assert_allclose(loss, repadded, rtol=1e-6)
    unmasked = {k: v for k, v in batch.items() if k != "audio_frame_mask"}
    changed = np.asarray(task.loss(model.apply(variables, _repadded(unmasked), train=False), None))
    assert np.abs(changed - loss).max() > 1e-3  # Without the frame mask the padding is read.


@pytest.mark.parametrize("mode", ["cross", "prefix"])
def test_the_text_decoder_never_attends_to_padding_frames(mode):
    config = ml_collections.ConfigDict(dict(
        name="captioner", num_classes=5, encoders=dict(audio=RNN),
        decoder=dict(mode=mode, condition=("audio",), vocab_size=15, max_len=6, width=16, depth=1, num_heads=2,
                     mlp_dim=32)))
    model = build_model(config)
    batch = _batch(1)
    variables = model.init(jax.random.PRNGKey(0), batch, train=False)
    logits = np.asarray(model.apply(variables, batch, train=False)["logits"])
    np.testing.assert_allclose(logits, np.asarray(model.apply(variables, _repadded(batch), train=False)["logits"]),
                               atol=1e-5)
    unmasked = {k: v for k, v in batch.items() if k != "audio_frame_mask"}
    other = np.asarray(model.apply(variables, _repadded(unmasked), train=False)["logits"])
    assert np.abs(other - np.asarray(model.apply(variables, unmasked, train=False)["logits"])).max() > 1e-4


def test_ctc_config_errors_name_the_key():
    def config(**ctc):
        return ml_collections.ConfigDict(dict(name="ctc", num_classes=5, encoders=dict(audio=RNN), ctc=ctc))

    with pytest.raises(ValueError, match=r"config model.ctc: unknown field\(s\) \['vocab'\]"):
        build_model(config(vocab=15))
    with pytest.raises(ValueError, match="config model.ctc.vocab_size=0 must be a positive integer"):
        build_model(config(vocab_size=0))
    with pytest.raises(ValueError, match=r"config model.ctc.modality='image': the CTC head reads one encoder"):
        build_model(config(modality="image"))
    model = build_model(config(vocab_size=15))
    short = dict(_batch(), text=np.zeros((4, FRAMES + 3), np.int32))  # Up to 13 targets for 12 frames.
    with pytest.raises(ValueError, match="CTC: texts of 15 ids hold up to 13 target tokens, but the audio encoder "
                                         "gives 12 frames"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), short, train=False))
