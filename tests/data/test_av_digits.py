"""Tests for the AV-Digits TFDS builder (mmjax.data.av_digits).

The full build (~15-20 s on 2 cores) happens once per module; the rebuild-in-a-fresh-
process byte-identity check (another ~20 s) is marked slow.
"""

import hashlib
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from mmjax.data import av_digits
from tests.conftest import REPO_ROOT

N_IMAGES = 1797


@pytest.fixture(scope="module")
def data_dir(av_digits_dir):
    """The session's AV-Digits build (tests/conftest.py), shared with the trainer tests."""
    return av_digits_dir


@pytest.fixture(scope="module")
def examples(data_dir):
    """Every split read back through tfds.data_source, as lists of example dicts."""
    out = {}
    for split in av_digits.SPLITS:
        source = tfds.data_source("av_digits", data_dir=data_dir, split=split)
        out[split] = [source[i] for i in range(len(source))]
    return out


def _array_record_digests(data_dir):
    folder = os.path.join(data_dir, "av_digits", str(av_digits.AvDigits.VERSION))
    names = sorted(n for n in os.listdir(folder) if ".array_record" in n)
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in names}


# --- built dataset ------------------------------------------------------------------------


def test_builder_metadata(data_dir):
    builder = av_digits.build(data_dir)  # already built: returns without rebuilding
    assert builder.name == "av_digits"
    assert str(builder.info.version) == "1.0.0"
    assert "1.0.0" in builder.RELEASE_NOTES
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert set(builder.info.splits) == set(av_digits.SPLITS)
    assert builder.info.features["label"].names == list(av_digits.DIGIT_NAMES)
    assert set(_array_record_digests(data_dir)) == {
        f"av_digits-{split}.array_record-00000-of-00001" for split in av_digits.SPLITS
    }


def test_split_sizes_cover_all_images_roughly_70_10_20(examples):
    sizes = {split: len(rows) for split, rows in examples.items()}
    assert sum(sizes.values()) == N_IMAGES
    for split, fraction in zip(av_digits.SPLITS, av_digits.SPLIT_FRACTIONS, strict=True):
        assert sizes[split] / N_IMAGES == pytest.approx(fraction, abs=0.01), sizes


def test_every_image_used_exactly_once(examples):
    indices = [int(e["image_index"]) for rows in examples.values() for e in rows]
    assert sorted(indices) == list(range(N_IMAGES))


def test_speakers_disjoint_across_splits(examples):
    speakers = {split: {e["speaker"].decode() for e in rows} for split, rows in examples.items()}
    assert not speakers["train"] & speakers["test"]
    assert not speakers["train"] & speakers["validation"]
    assert not speakers["validation"] & speakers["test"]
    assert set().union(*speakers.values()) <= set(av_digits.SPEAKERS)
    assert speakers == {split: set(s) for split, s in av_digits.split_speakers().items()}


def test_labels_agree_with_load_digits_targets(examples):
    targets = load_digits().target
    for rows in examples.values():
        for e in rows:
            assert e["label"] == targets[e["image_index"]]


def test_feature_dtypes_and_shapes(examples):
    e = examples["test"][0]
    assert set(e) == {"image", "audio", "label", "speaker", "image_index", "snr_db"}
    assert e["image"].dtype == np.uint8 and e["image"].shape == (8, 8, 1)
    assert e["audio"].dtype == np.int16 and e["audio"].shape == (av_digits.CLIP_SAMPLES,)
    assert isinstance(e["speaker"], bytes)
    assert 0 <= e["label"] < 10
    lo, hi = av_digits.SNR_DB
    assert lo <= e["snr_db"] <= hi


def test_images_are_noisy_versions_of_the_sklearn_digits(examples):
    clean = load_digits().images * (255.0 / 16.0)
    rows = examples["train"][:200]
    stored = np.stack([e["image"][..., 0] for e in rows]).astype(np.float64)
    original = clean[[e["image_index"] for e in rows]]
    error = np.abs(stored - original).mean()
    assert 10.0 < error < 80.0, error
    corr = np.corrcoef(stored.ravel(), original.ravel())[0, 1]
    assert corr > 0.5, corr


def test_audio_has_speech_above_the_noise(examples):
    """The 0.25 s with the most energy are louder than the quietest 0.25 s (speech vs noise)."""
    for e in examples["validation"][:50]:
        frames = e["audio"].astype(np.float64).reshape(8, -1)
        energy = np.sort((frames**2).mean(axis=1))
        assert energy[-1] > 1.5 * energy[0]
        assert np.abs(e["audio"]).max() > 1000


def test_log_mel_defaults_match_module_constants(examples):
    features = av_digits.log_mel(examples["test"][0]["audio"])
    assert features.shape == (av_digits.N_FRAMES, av_digits.N_MELS) == (49, 40)
    assert np.isfinite(features).all()


def test_reading_needs_neither_tensorflow_nor_the_builder_code(data_dir):
    """A fresh process without mmjax on its path reads the files and never imports tensorflow."""
    script = textwrap.dedent(
        f"""
        import sys
        import tensorflow_datasets as tfds
        source = tfds.data_source("av_digits", data_dir={data_dir!r}, split="test")
        example = source[3]
        assert "mmjax" not in sys.modules
        print(len(source), example["audio"].shape, example["image"].dtype, "tensorflow" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=str(data_dir), check=True, capture_output=True, text=True
    )
    assert out.stdout.strip().split("\n")[-1] == "360 (8000,) uint8 False"


# --- building blocks ----------------------------------------------------------------------


def test_image_split_is_stratified_and_disjoint():
    labels = load_digits().target
    parts = av_digits.split_image_indices(labels)
    assert sum(len(p) for p in parts.values()) == N_IMAGES
    assert len(np.unique(np.concatenate(list(parts.values())))) == N_IMAGES
    for digit in range(10):
        per_split = [np.sum(labels[parts[s]] == digit) for s in av_digits.SPLITS]
        total = sum(per_split)
        assert abs(per_split[0] - 0.7 * total) <= 1 and abs(per_split[1] - 0.1 * total) <= 1


def test_speaker_split_sizes():
    parts = av_digits.split_speakers()
    assert [len(parts[s]) for s in av_digits.SPLITS] == [72, 10, 21]
    assert sorted(sum(parts.values(), ())) == sorted(av_digits.SPEAKERS)


def test_corruption_is_seeded():
    image = load_digits().images[0]
    a = av_digits.corrupt_image(image, np.random.default_rng(1))
    b = av_digits.corrupt_image(image, np.random.default_rng(1))
    c = av_digits.corrupt_image(image, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    speech = np.sin(np.linspace(0, 300, 4000))
    speech /= np.sqrt(np.mean(speech**2))
    clip, snr = av_digits.noisy_clip(speech, np.random.default_rng(3))
    again, snr_again = av_digits.noisy_clip(speech, np.random.default_rng(3))
    assert clip.dtype == np.int16 and clip.shape == (av_digits.CLIP_SAMPLES,)
    np.testing.assert_array_equal(clip, again)
    assert snr == snr_again


def test_generation_is_identical_in_a_fresh_process():
    """Cheap end-to-end determinism check on a few validation examples (eSpeak included)."""
    code = textwrap.dedent(
        """
        import hashlib, itertools
        from mmjax.data import av_digits
        for key, e in itertools.islice(av_digits.generate_examples("validation"), 12):
            print(key, e["speaker"], hashlib.sha256(e["audio"].tobytes() + e["image"].tobytes()).hexdigest())
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    here = [
        f"{key} {e['speaker']} {hashlib.sha256(e['audio'].tobytes() + e['image'].tobytes()).hexdigest()}"
        for key, e in itertools.islice(av_digits.generate_examples("validation"), 12)
    ]
    assert out.stdout.strip().split("\n") == here


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="'dev'"):
        next(av_digits.generate_examples("dev"))


# --- slow checks ------------------------------------------------------------------------------


@pytest.mark.slow
def test_rebuild_in_a_fresh_process_is_byte_identical(data_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    code = f"from mmjax.data import av_digits; av_digits.build({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert _array_record_digests(str(tmp_path)) == _array_record_digests(data_dir)


def test_neither_modality_alone_is_near_perfect_but_fusion_helps(examples):
    """Linear proxies (ridge classifiers, ~4 s): each modality well below 100%, fused clearly above both."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(rows):
        image = np.stack([e["image"].reshape(-1) for e in rows]).astype(np.float32)
        mel = np.stack([av_digits.log_mel(e["audio"]).reshape(-1) for e in rows])
        return image, mel, np.array([e["label"] for e in rows])

    train_img, train_mel, train_y = features(examples["train"])
    test_img, test_mel, test_y = features(examples["test"])

    def accuracy(train_x, test_x):
        model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1000.0))
        return model.fit(train_x, train_y).score(test_x, test_y)

    image_acc = accuracy(train_img, test_img)  # 0.794 when written
    audio_acc = accuracy(train_mel, test_mel)  # 0.725
    fused_acc = accuracy(np.hstack([train_img, train_mel]), np.hstack([test_img, test_mel]))  # 0.903
    assert 0.65 <= image_acc <= 0.9, image_acc
    assert 0.6 <= audio_acc <= 0.9, audio_acc
    assert fused_acc >= max(image_acc, audio_acc) + 0.05, (image_acc, audio_acc, fused_acc)


def _tone_power(clip, digit):
    """The share of the clip's spectral power within 20 Hz of digit `digit`'s shortcut tone."""
    spectrum = np.abs(np.fft.rfft(np.asarray(clip, np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(clip), 1 / av_digits.SAMPLE_RATE)
    near = np.abs(freqs - (400 + 300 * digit)) < 20
    return spectrum[near].sum() / spectrum.sum()


def test_imbalanced_variant_puts_a_digit_tone_on_training_clips_and_noise_on_held_out_ones(data_dir):
    settings = av_digits.imbalance_settings({"cue_db": 10.0})
    for split in ("train", "test"):
        plain = tfds.data_source("av_digits", data_dir=data_dir, split=split)
        changed = av_digits.ImbalancedSource(plain, split, settings)
        for i in range(6):
            before, after = plain[i], changed[i]
            assert after["image_index"] == before["image_index"] and after["label"] == before["label"]
            np.testing.assert_array_equal(after["audio"], changed[i]["audio"])  # deterministic per example
            digit = int(before["label"])
            other = (digit + 5) % 10
            if split == "train":  # the tone of its own digit (10 dB down: ~0.09 of the power), not another digit's
                assert _tone_power(after["audio"], digit) > _tone_power(before["audio"], digit) + 0.05
                assert _tone_power(after["audio"], other) < _tone_power(before["audio"], other) + 0.01
            else:  # no tone, extra noise: at -6..0 dB SNR the residual's power is at least the clip's
                residual = after["audio"].astype(np.float64) - before["audio"]
                assert np.mean(residual**2) >= 0.9 * np.mean(before["audio"].astype(np.float64) ** 2)
                assert _tone_power(after["audio"], digit) < _tone_power(before["audio"], digit) + 0.01
    with pytest.raises(ValueError, match="unknown key"):
        av_digits.imbalance_settings({"cue_dB": 10})
    with pytest.raises(ValueError, match="cue_fraction"):
        av_digits.imbalance_settings({"cue_fraction": 2})
