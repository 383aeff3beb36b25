"""Robustness evaluation: deterministic noise, dropped modalities, scores on a constructed dataset, plot and table."""

import json

import numpy as np
import pytest

from mmjax.evaluate import robustness as rb

NUM_CLASSES = 3


def _dataset(num=150, batch_size=32, seed=0):
    """Batches where "a" is the one-hot label (perfectly informative) and "b" is noise; the last batch is padded.

    Padding rows carry a wrong label, so counting them would lower the accuracy.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % NUM_CLASSES
    a = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    b = rng.normal(size=(num, 4)).astype(np.float32)
    batches = []
    for start in range(0, num, batch_size):
        rows = slice(start, start + batch_size)
        batch = {"a": a[rows], "b": b[rows], "label": labels[rows].astype(np.int32)}
        batch[rb.VALID_KEY] = np.ones(len(batch["label"]), np.int32)
        pad = batch_size - len(batch["label"])
        if pad:
            batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
            batch[rb.VALID_KEY][-pad:] = 0
            batch["label"][-pad:] = (batch["label"][-pad:] + 1) % NUM_CLASSES
        batches.append(batch)
    assert any(b[rb.VALID_KEY].min() == 0 for b in batches)
    return batches


def _copy(batches):
    return [{k: v.copy() for k, v in b.items()} for b in batches]


def predict_from_a(batch):
    """Uses only modality "a": the argmax of its values, or the impossible class -1 where "a" is marked missing."""
    predictions = np.argmax(batch["a"], axis=1)
    if "a_mask" in batch:
        predictions = np.where(batch["a_mask"] > 0, predictions, -1)
    return predictions


def test_valid_key_matches_pipeline():
    from mmjax.data import pipeline

    assert rb.VALID_KEY == pipeline.VALID_KEY


def test_add_noise_is_deterministic_and_local():
    batch = _dataset()[0]
    original = {k: v.copy() for k, v in batch.items()}
    noisy = rb.add_noise(batch, "a", 1.0, 0.5, seed=3, batch_index=2)
    again = rb.add_noise(batch, "a", 1.0, 0.5, seed=3, batch_index=2)
    np.testing.assert_array_equal(noisy["a"], again["a"])
    assert noisy["a"].dtype == batch["a"].dtype and noisy["a"].shape == batch["a"].shape
    assert not np.array_equal(noisy["a"], batch["a"])
    for key in ("b", "label", rb.VALID_KEY):
        np.testing.assert_array_equal(noisy[key], batch[key])
    for key, value in original.items():  # The input is untouched.
        np.testing.assert_array_equal(batch[key], value)
    # Changing the seed, level or batch index changes the noise; so does the modality.
    base = noisy["a"] - batch["a"]
    for kwargs in ({"seed": 4, "batch_index": 2}, {"seed": 3, "batch_index": 1}):
        other = rb.add_noise(batch, "a", 1.0, 0.5, **kwargs)["a"] - batch["a"]
        assert not np.allclose(other, base)
    other_level = (rb.add_noise(batch, "a", 2.0, 0.5, seed=3, batch_index=2)["a"] - batch["a"]) / 2.0
    assert not np.allclose(other_level, base)
    batch_b = dict(batch, b=batch["a"].copy())  # Same values under another name: different noise.
    noise_b = rb.add_noise(batch_b, "b", 1.0, 0.5, seed=3, batch_index=2)["b"] - batch["a"]
    assert not np.allclose(noise_b, base)
    # The noise has the requested size.
    big = rb.add_noise({"x": np.zeros((200, 50), np.float32)}, "x", 2.0, 0.5, seed=0, batch_index=0)["x"]
    assert abs(big.std() - 1.0) < 0.05


def test_add_noise_level_zero_is_identity():
    batch = _dataset()[0]
    same = rb.add_noise(batch, "a", 0.0, 1.0, seed=0, batch_index=0)
    assert same is not batch
    for key in batch:
        np.testing.assert_array_equal(same[key], batch[key])


def test_add_noise_rejects_bad_arguments():
    batch = _dataset()[0]
    with pytest.raises(KeyError, match="'c'"):
        rb.add_noise(batch, "c", 1.0, 1.0, seed=0, batch_index=0)
    with pytest.raises(ValueError, match="level"):
        rb.add_noise(batch, "a", -1.0, 1.0, seed=0, batch_index=0)


def test_drop_modality_sets_mask_and_zeros():
    batch = _dataset()[0]
    original = {k: v.copy() for k, v in batch.items()}
    dropped = rb.drop_modality(batch, "a")
    np.testing.assert_array_equal(dropped["a_mask"], np.zeros(len(batch["label"]), np.float32))
    assert not dropped["a"].any() and dropped["a"].shape == batch["a"].shape
    np.testing.assert_array_equal(dropped["b"], batch["b"])
    assert "a_mask" not in batch
    for key, value in original.items():
        np.testing.assert_array_equal(batch[key], value)


def test_modality_scale_uses_valid_present_rows_only():
    batches = _dataset()
    for batch in batches:
        batch["b"][batch[rb.VALID_KEY] == 0] = 1e6  # Padding must not count.
    batches[0]["b_mask"] = np.ones(len(batches[0]["label"]), np.float32)
    batches[0]["b_mask"][:5] = 0  # Nor rows where the modality is missing.
    batches[0]["b"][:5] = -1e6
    expected = np.concatenate(
        [b["b"][(b[rb.VALID_KEY] > 0) & (b.get("b_mask", np.ones(len(b["label"]))) > 0)] for b in batches]
    ).astype(np.float64).std()
    assert rb.modality_scale(batches, "b") == pytest.approx(float(expected), rel=1e-9)
    assert rb.modality_scale([{"c": np.full((4, 2), 3.0), "label": np.zeros(4)}], "c") == 1.0  # Constant.


def test_evaluate_robustness_on_constructed_dataset():
    batches = _dataset()
    original = _copy(batches)
    calls = []

    def make_batches():
        calls.append(1)
        return iter(batches)

    results = rb.evaluate_robustness(predict_from_a, make_batches, ["a", "b"], seed=0)
    levels = list(rb.DEFAULT_NOISE_LEVELS)
    assert results["levels"] == levels
    assert results["clean"] == 1.0  # Padding rows (with wrong labels) are excluded.
    noise_a = results["noise"]["a"]
    assert noise_a[0] == 1.0
    assert all(later <= earlier + 0.02 for earlier, later in zip(noise_a, noise_a[1:]))
    assert noise_a[-1] < 0.7 and noise_a[-1] < noise_a[1]
    assert results["noise"]["b"] == [1.0] * len(levels)  # predict ignores "b".
    assert results["missing"] == {"a": 0.0, "b": 1.0}  # predict answers -1 where "a" is missing.
    assert results["relative_robustness"]["b"] == pytest.approx(1.0)
    assert results["effective_robustness"]["a"] == pytest.approx(results["relative_robustness"]["a"] - 1.0)
    assert results["scale"]["a"] == pytest.approx(np.sqrt(2) / 3)  # std of one-hot values over 3 classes.
    assert len(calls) == 1 + 2 * (len(levels) - 1) + 2  # clean, non-zero levels per modality, missing per modality.
    for batch, before in zip(batches, original):  # The input batches are untouched.
        for key, value in before.items():
            np.testing.assert_array_equal(batch[key], value)
    json.dumps(results)
    # Deterministic across runs.
    assert rb.evaluate_robustness(predict_from_a, lambda: iter(batches), ["a", "b"], seed=0) == results


def test_relative_robustness_is_trapezoid_mean():
    batches = _dataset()
    levels = (0.0, 1.0, 3.0)
    results = rb.evaluate_robustness(predict_from_a, lambda: batches, ["a"], levels=levels, seed=1)
    n0, n1, n3 = results["noise"]["a"]
    expected = ((n0 + n1) / 2 * 1.0 + (n1 + n3) / 2 * 2.0) / 3.0
    assert results["relative_robustness"]["a"] == pytest.approx(expected)
    assert rb.area_under_curve([2.0], [0.5]) == 0.5


def test_evaluate_robustness_rejects_bad_inputs():
    batches = _dataset()
    with pytest.raises(ValueError, match="increasing"):
        rb.evaluate_robustness(predict_from_a, lambda: batches, ["a"], levels=(0.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        rb.evaluate_robustness(lambda b: np.zeros((len(b["label"]), 3)), lambda: batches, ["a"])
    with pytest.raises(KeyError, match="'c'"):
        rb.evaluate_robustness(predict_from_a, lambda: batches, ["c"])


def _fake_results(clean, offset):
    levels = [0.0, 1.0, 2.0]
    return {
        "levels": levels,
        "metric": "accuracy",
        "clean": clean,
        "noise": {"a": [clean, clean - offset, clean - 2 * offset], "b": [clean] * 3},
        "missing": {"a": 0.3, "b": clean},
        "relative_robustness": {"a": clean - offset, "b": clean},
    }


def test_plot_and_table(tmp_path):
    by_method = {"early": _fake_results(0.9, 0.1), "late": _fake_results(0.8, 0.05)}
    path = tmp_path / "robustness.png"
    rb.plot_robustness(by_method, str(path), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = rb.robustness_table(by_method).strip().splitlines()
    assert table[0] == "| method | clean | AUC a | AUC b | missing a | missing b |"
    assert len(table) == 2 + len(by_method)
    assert table[2].startswith("| early | 0.9000 | 0.8000 | 0.9000 | 0.3000 |")
    assert table[3].startswith("| late |")
