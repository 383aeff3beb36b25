"""Tests for the Spoken-Numbers TFDS builder and its dataset entry (mmjax.data.spoken_numbers).

Builds a small version (a few seconds: eSpeak NG speaks every utterance)."""

import hashlib
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import av_digits
from mmjax.data import spoken_numbers as sn
from mmjax.data.core import frame_mask_key
from mmjax.data.datasets import get_dataset
from mmjax.data.pipeline import input_spec
from tests.conftest import REPO_ROOT

SIZES = {"train": 48, "validation": 12, "test": 24}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    sn.build(data_dir, sizes=SIZES)
    return data_dir


@pytest.fixture(scope="module")
def examples(data_dir):
    return {split: [sn.SpokenSource(tfds.data_source("spoken_numbers", data_dir=data_dir, split=split))[i]
                    for i in range(SIZES[split])] for split in sn.SPLITS}


def _digests(data_dir):
    folder = os.path.join(data_dir, "spoken_numbers", str(sn.SpokenNumbers.VERSION))
    names = sorted(n for n in os.listdir(folder) if ".array_record" in n)
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in names}


def test_transcripts_are_3_to_7_digit_words_with_their_count(examples):
    lengths = set()
    for rows in examples.values():
        for e in rows:
            words = e["transcript"].split()
            assert e["transcript"] == " ".join(words) and all(w in sn.DIGIT_NAMES for w in words)
            assert e["num_digits"] == len(words) and sn.MIN_DIGITS <= len(words) <= sn.MAX_DIGITS
            lengths.add(len(words))
    assert lengths == set(range(3, 8))  # Every length occurs in 84 utterances.


def test_speakers_are_av_digits_speakers_disjoint_across_splits(examples):
    speakers = {split: {e["speaker"] for e in rows} for split, rows in examples.items()}
    split = av_digits.split_speakers()
    for name, heard in speakers.items():
        assert heard <= set(split[name])
    assert not speakers["train"] & speakers["test"] and not speakers["train"] & speakers["validation"]
    assert len(speakers["validation"]) == 10  # 12 utterances dealt round-robin over the split's 10 speakers.


def test_audio_is_variable_length_speech_above_noise_within_the_padded_length(examples):
    lengths = [e["audio"].size for rows in examples.values() for e in rows]
    assert max(lengths) <= sn.MAX_SAMPLES and len(set(lengths)) > 10
    for e in examples["test"]:
        assert e["audio"].dtype == np.int16 and 0.0 <= e["snr_db"] <= 12.0
        audio = e["audio"].astype(np.float64)
        windows = (audio[: audio.size // 400 * 400] ** 2).reshape(-1, 400).mean(axis=1)  # 50 ms each.
        # The first 50 ms are noise only (the lead-in lasts at least 100 ms); speech is louder somewhere.
        assert windows.max() > (3.0 if e["snr_db"] > 3.0 else 1.5) * windows[0]
    longer = [np.mean([e["audio"].size for e in examples["train"] if e["num_digits"] == n]) for n in (3, 7)]
    assert longer[1] > 1.5 * longer[0]  # Seven digits take longer to say than three.


def test_reading_groups_some_utterances_with_commas_but_transcripts_never_have_them():
    readings = [sn.reading(np.arange(7), np.random.default_rng(seed)) for seed in range(40)]
    grouped = [r for r in readings if "," in r]
    assert 0 < len(grouped) < 40
    for r in readings:
        assert r.replace(",", "").split() == list(sn.DIGIT_NAMES[:7])


def test_rebuild_in_a_fresh_process_is_byte_identical(data_dir, tmp_path):
    fresh = str(tmp_path / "fresh")
    code = f"from mmjax.data import spoken_numbers as sn; sn.build({fresh!r}, sizes={SIZES!r})"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=REPO_ROOT)
    assert _digests(fresh) == _digests(data_dir)


def test_other_sizes_in_a_built_data_dir_are_refused(data_dir):
    with pytest.raises(ValueError, match="already built .* with sizes"):
        sn.build(data_dir, sizes={"train": 10})


def test_tokenizer_has_the_digit_words_after_the_specials():
    tokenizer = sn.build_tokenizer()
    assert tokenizer.get_vocab_size() == 15
    assert [tokenizer.id_to_token(i) for i in range(15)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                             *sn.DIGIT_NAMES]
    assert tokenizer.encode("three one four").ids == [2, 8, 6, 9, 3]


def test_dataset_entry_gives_padded_log_mel_frame_mask_transcript_ids_and_digit_count(data_dir, examples):
    dataset = get_dataset(ml_collections.ConfigDict({"name": "spoken_numbers", "data_dir": data_dir}))
    assert dataset.splits == SIZES and dataset.modalities == ("audio", "text") and dataset.num_classes == 5
    spec = input_spec(dataset, "train")
    assert spec == {"audio": ((sn.MAX_FRAMES, 40), "float32"), frame_mask_key("audio"): ((sn.MAX_FRAMES,), "float32"),
                    "text": ((sn.MAX_LEN,), "int32"), "label": ((), "int32")}
    raw = examples["test"][3]
    out = dataset.preprocess(dataset.source("test")[3])
    frames = 1 + (raw["audio"].size - av_digits.N_FFT) // av_digits.HOP_LENGTH
    mask = out[frame_mask_key("audio")]
    assert mask[:frames].all() and not mask[frames:].any()
    real = out["audio"][:frames]
    assert abs(real.mean()) < 1e-4 and abs(real.std() - 1.0) < 1e-3  # Standardised over the real frames only.
    assert not out["audio"][frames:].any()
    words = raw["transcript"].split()
    ids = sn.build_tokenizer().encode(raw["transcript"]).ids
    np.testing.assert_array_equal(out["text"], ids + [0] * (sn.MAX_LEN - len(ids)))
    assert len(ids) == len(words) + 2 and out["label"] == len(words) - 3
    with pytest.raises(ValueError, match="data.max_len=8 would cut transcripts"):
        get_dataset(ml_collections.ConfigDict({"name": "spoken_numbers", "data_dir": data_dir, "max_len": 8}))


def test_spec_augment_masks_only_real_frames_of_the_training_stream(data_dir):
    config = {"name": "spoken_numbers", "data_dir": data_dir,
              "spec_augment": {"freq_masks": 2, "freq_width": 6, "time_masks": 2, "time_width": 5}}
    dataset = get_dataset(ml_collections.ConfigDict(config))
    example = dataset.preprocess(dataset.source("train")[0])
    frames = int(example[frame_mask_key("audio")].sum())
    changed = 0
    for seed in range(10):
        out = dataset.augment(example, np.random.default_rng(seed))
        assert not out["audio"][frames:].any() and set(out) == set(example)
        masked = out["audio"] != example["audio"]
        changed += masked.any()
        assert np.all(out["audio"][masked] == 0.0)  # Masked values take the standardised mean.
        np.testing.assert_array_equal(out["audio"], dataset.augment(example, np.random.default_rng(seed))["audio"])
    assert changed >= 8
    assert get_dataset(ml_collections.ConfigDict({"name": "spoken_numbers", "data_dir": data_dir})).augment is None
    config["spec_augment"] = {"time_mask": 2}
    with pytest.raises(ValueError, match=r"config data.spec_augment: unknown field\(s\) \['time_mask'\]"):
        get_dataset(ml_collections.ConfigDict(config))
