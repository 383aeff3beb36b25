"""Modality-imbalance diagnostics (mmjax.evaluate.diagnostics) on logits whose contributions are known."""

import numpy as np

from mmjax.evaluate.diagnostics import diagnostics_from_logits, mask_patterns


def test_mask_patterns_list_each_presence_pattern_once():
    assert mask_patterns(["audio", "image"]) == [(1, 1), (1, 0), (0, 1)]
    assert len(mask_patterns(["a", "b", "c"])) == 7


def test_diagnostics_of_an_additive_model():
    # Logits = bias + c_audio + c_image, each modality's contribution known: masking it removes it.
    rng = np.random.default_rng(0)
    n, k = 200, 4
    labels = rng.integers(0, k, n)
    bias = rng.normal(size=k)
    c_audio = 0.5 * rng.normal(size=(n, k))
    c_image = 3.0 * np.eye(k)[labels] + rng.normal(size=(n, k))
    logits = {(1, 1): bias + c_audio + c_image, (1, 0): bias + c_audio, (0, 1): bias + c_image}
    result = diagnostics_from_logits(logits, labels, ["audio", "image"])
    v_audio, v_image = np.var(c_audio, axis=0).sum(), np.var(c_image, axis=0).sum()
    np.testing.assert_allclose(result["logit_variance_share_audio"], v_audio / (v_audio + v_image))
    np.testing.assert_allclose(result["logit_variance_share_image"], v_image / (v_audio + v_image))
    assert result["only_image_accuracy"] == np.mean(np.argmax(bias + c_image, -1) == labels)
    assert result["only_audio_accuracy"] == np.mean(np.argmax(bias + c_audio, -1) == labels)
    assert result["only_image_accuracy"] > 0.8 > 0.5 > result["only_audio_accuracy"]
