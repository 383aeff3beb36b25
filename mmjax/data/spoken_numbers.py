"""Spoken-Numbers: an offline, deterministic speech-to-text dataset of spoken digit sequences (TFDS ``spoken_numbers``).

What and why: utterances of 3 to 7 digits ("three one four one five") read by eSpeak NG voices in background noise,
with their transcripts, for training and testing speech recognisers (a CTC head on an audio encoder, or a text
decoder over it) in minutes on a CPU, on speakers never heard in training. Built from what is installed; nothing is
downloaded. The voices, their split and the noise are AV-Digits' (:mod:`mmjax.data.av_digits`, imported, not
copied), so the two datasets hear the same speakers in the same splits.

Recipe, per example (every draw from ``numpy.random.default_rng((SEED, split, index))``):

* a length n drawn uniformly from :data:`MIN_DIGITS`..:data:`MAX_DIGITS` and n digits drawn uniformly (repeats
  allowed, so a recogniser must separate "one one" from "one");
* the split's next speaker (AV-Digits' speaker split, :func:`av_digits.split_speakers`: 72 / 10 / 21 of the 103
  speakers, disjoint; dealt round-robin over the split in a seeded order) with the speaker's base rate, pitch and
  intonation range (:func:`av_digits.speaker_voice`), rate and pitch jittered per utterance as AV-Digits does, the
  rate :data:`RATE_OFFSET` words per minute faster (150-270 wpm: digit strings are read briskly);
* the digit words read as one connected utterance by eSpeak NG (:func:`av_digits.clean_speech`: resampled to
  8 kHz, silence trimmed, unit RMS); with probability :data:`GROUPED` the digits are read in groups of 2-4
  separated by commas (eSpeak pauses there, as people read phone numbers); the transcript has no commas;
* a lead-in and a tail of :data:`MARGIN_S` seconds each, then AV-Digits' white/pink background noise over the whole
  clip at an SNR drawn from :data:`SNR_DB` against the speech and a random gain (:func:`av_digits.add_noise`),
  stored as int16 of the clip's own length (at most :data:`MAX_SAMPLES`, 4.17 s; checked when built; the
  clips last 1.7 s on average, 99% of them under 3 s, the longest 4.1 s).

Features: ``audio`` int16 [samples] (variable length); ``transcript`` Text (lowercase digit words, single spaces);
``num_digits`` int32; ``speaker`` Text; ``snr_db`` float32. Splits (:data:`SPLIT_SIZES`): train 3,000, validation
300, test 600 utterances, stored in generation order. ``build(data_dir, sizes)`` takes other sizes (for tests) under
the same version, so build those into their own data dir.

Determinism: eSpeak NG is reloaded and re-seeded per utterance (:mod:`mmjax.data.espeak`), every other draw comes
from the seeded generators above, and examples are re-serialised with sorted feature maps, so rebuilding, in any
process, writes byte-identical array_record files. Building the default sizes takes 28 s of CPU time on 2 cores
(eSpeak NG about half of it; 43 s wall-clock while other jobs shared the cores).

Batches (:func:`dataset`, ``config.data.name = "spoken_numbers"``): ``audio`` float32 [MAX_FRAMES, n_mels], the
log-mel spectrogram (AV-Digits' front end: 8 kHz, 256-sample FFT, hop 160, 40 mels; ``data.audio`` overrides)
standardised over the utterance's real frames and zero-padded to MAX_FRAMES (208 by default) frames;
``audio_frame_mask`` float32 [MAX_FRAMES] (1 = a real frame: :func:`mmjax.data.core.frame_mask_key`, which the CTC
model and the text decoder honour); ``text`` int32 [MAX_LEN] ([CLS] digit words [SEP], then [PAD]); ``label``
int32, the number of digits minus 3 (class names "3 digits" ... "7 digits"). The word-level tokenizer
(:func:`build_tokenizer`) is [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then "zero" ... "nine": 15 tokens.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tokenizers import Tokenizer

from mmjax.data import av_digits
from mmjax.data.audio_features import log_mel_spectrogram, standardize
from mmjax.data.core import Dataset, build_on_process_zero, frame_mask_key
from mmjax.data.ops.audio_ops import SpecAugment
from mmjax.data.tfds_builder import OfflineBuilder, prepare, split_sizes
from mmjax.data.tokenization import as_text, encode_texts, tokenizer_from, word_level_tokenizer
from mmjax.registry import DATASETS

__all__ = [
    "DIGIT_NAMES",
    "MAX_DIGITS",
    "MAX_FRAMES",
    "MAX_LEN",
    "MAX_SAMPLES",
    "MIN_DIGITS",
    "SEED",
    "SPLITS",
    "SPLIT_SIZES",
    "SpokenNumbers",
    "SpokenNumbersAugment",
    "SpokenNumbersPreprocess",
    "SpokenSource",
    "build",
    "build_tokenizer",
    "dataset",
    "generate_examples",
    "max_frames",
    "raw_source",
    "reading",
    "tokenizer",
]

SEED = 20_260_311
DIGIT_NAMES = av_digits.DIGIT_NAMES
SPLITS = av_digits.SPLITS  # train / validation / test, with AV-Digits' disjoint speakers.
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 400}
MIN_DIGITS, MAX_DIGITS = 3, 7
MAX_LEN = MAX_DIGITS + 2  # Token ids per transcript: [CLS] + at most 7 words + [SEP].

SAMPLE_RATE = av_digits.SAMPLE_RATE
MAX_FRAMES = 208  # Log-mel frames of the longest clip at the default front end (a multiple of 16).
MAX_SAMPLES = av_digits.N_FFT + (MAX_FRAMES - 1) * av_digits.HOP_LENGTH  # 33,376 samples, 4.17 s.
MARGIN_S = (0.1, 0.3)  # Seconds of noise before and after the speech, each drawn in this range.
SNR_DB = (0.0, 12.0)  # Speech-to-noise ratio, dB (AV-Digits' range).
RATE_OFFSET = 40  # Words per minute added to each speaker's AV-Digits rate: digit strings are read briskly.
GROUPED = 0.5  # Share of utterances read in comma-separated groups of 2-4 digits.
GROUP_SIZES = (2, 3, 4)

_STREAM_DEALER = 1  # The speaker order of each split; examples use (SEED, split, index).


def reading(digits: np.ndarray, rng: np.random.Generator) -> str:
    """The text eSpeak NG reads: the digit words, in comma-separated groups with probability :data:`GROUPED`."""
    words = [DIGIT_NAMES[d] for d in digits]
    if rng.uniform() >= GROUPED:
        return " ".join(words)
    groups, start = [], 0
    while start < len(words):
        size = int(rng.choice(GROUP_SIZES))
        groups.append(" ".join(words[start:start + size]))
        start += size
    return ", ".join(groups)


def _resolve_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    resolved = {**SPLIT_SIZES, **dict(sizes or {})}
    unknown = sorted(set(resolved) - set(SPLITS))
    if unknown:
        raise ValueError(f"spoken_numbers: unknown split(s) {unknown}; splits: {list(SPLITS)}")
    return resolved


def _dealer(split: str) -> list[str]:
    """The split's speakers in a seeded order; example i is spoken by entry i % len."""
    speakers = av_digits.split_speakers()[split]
    order = np.random.default_rng((SEED, _STREAM_DEALER, SPLITS.index(split))).permutation(len(speakers))
    return [speakers[i] for i in order]


def generate_examples(split: str, sizes: Mapping[str, int] | None = None) -> Iterator[tuple[int, dict]]:
    """Yields ``(index, features)`` for one split, in index order (module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    dealer = _dealer(split)
    for index in range(_resolve_sizes(sizes)[split]):
        rng = np.random.default_rng((SEED, SPLITS.index(split), index))
        digits = rng.integers(0, 10, size=int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1)))
        speaker = dealer[index % len(dealer)]
        base_rate, base_pitch, pitch_range = av_digits.speaker_voice(speaker)
        rate = base_rate + RATE_OFFSET + int(rng.choice(av_digits.RATE_JITTER))
        pitch = base_pitch + int(rng.choice(av_digits.PITCH_JITTER))
        speech = av_digits.clean_speech(reading(digits, rng), speaker, rate, pitch, pitch_range)
        lead, tail = (int(rng.uniform(*MARGIN_S) * SAMPLE_RATE) for _ in range(2))
        placed = np.concatenate([np.zeros(lead), speech, np.zeros(tail)])
        if placed.size > MAX_SAMPLES:
            raise RuntimeError(f"spoken_numbers: {split} example {index} ({' '.join(DIGIT_NAMES[d] for d in digits)!r} "
                               f"by {speaker!r} at {rate} wpm) lasts {placed.size} samples, over MAX_SAMPLES="
                               f"{MAX_SAMPLES}")
        clip, snr_db = av_digits.add_noise(placed, rng, SNR_DB)
        yield index, {
            "audio": clip,
            "transcript": " ".join(DIGIT_NAMES[d] for d in digits),
            "num_digits": np.int32(len(digits)),
            "speaker": speaker,
            "snr_db": np.float32(snr_db),
        }


class SpokenNumbers(OfflineBuilder):
    """TFDS builder for Spoken-Numbers (module docstring); array_record by default. ``sizes`` ({split: utterances},
    missing splits default to SPLIT_SIZES) writes other data under the same version: build it into its own dir."""

    name = "spoken_numbers"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 3-7 spoken digits by eSpeak NG voices (AV-Digits' speakers, disjoint across "
        "splits) in white/pink noise, with transcripts.",
    }

    def __init__(self, *, sizes: Mapping[str, int] | None = None, **kwargs):
        self._sizes = _resolve_sizes(sizes)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                "transcript": tfds.features.Text(),
                "num_digits": tfds.features.Scalar(dtype=np.int32),
                "speaker": tfds.features.Text(),
                "snr_db": tfds.features.Scalar(dtype=np.float32),
            }),
            supervised_keys=None,
            disable_shuffling=True,  # Stored in index order (each example seeded by its index).
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        """The examples of ``split`` (see :func:`generate_examples`), timing printed to stderr."""
        start = time.perf_counter()
        count = 0
        for key, example in generate_examples(split, self._sizes):
            count += 1
            yield key, example
        print(f"spoken_numbers: generated {count} {split} examples in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)


def build(data_dir: str | None = None, sizes: Mapping[str, int] | None = None) -> tfds.core.DatasetBuilder:
    """Builds Spoken-Numbers under ``data_dir`` (default: TFDS's) unless already there; returns the builder.

    With ``sizes=None`` an existing build is used whatever its sizes; explicit ``sizes`` that differ from an
    existing build raise a ValueError (build them into another data dir).
    """
    builder = SpokenNumbers(data_dir=data_dir, sizes=sizes)
    if builder.is_prepared() and sizes is not None and split_sizes(builder) != _resolve_sizes(sizes):
        raise ValueError(f"spoken_numbers is already built in {builder.data_dir} with sizes {split_sizes(builder)}, "
                         f"not {_resolve_sizes(sizes)}; use another data_dir")
    return prepare(builder)


# ------------------------------------------------------------------------------------------ tokenisation


def build_tokenizer() -> Tokenizer:
    """The word-level tokenizer of the transcripts (`tokenization.word_level_tokenizer` over "zero" ... "nine"):
    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, the digit words 5..14; texts wrapped as [CLS] ... [SEP]."""
    return word_level_tokenizer(DIGIT_NAMES)


def tokenizer(data_config: Mapping[str, Any] | None = None) -> Tokenizer:
    """A fresh copy of this dataset's tokenizer (the evaluators turn generated ids into words with it)."""
    del data_config
    return tokenizer_from(build_tokenizer)


# --------------------------------------------------------------------------------------------- dataset entry


def max_frames(n_fft: int, hop_length: int) -> int:
    """Log-mel frames of a clip of MAX_SAMPLES samples: the padded length of every utterance's spectrogram."""
    return 1 + (MAX_SAMPLES - n_fft) // hop_length


class SpokenSource:
    """A random-access split with texts decoded: ``audio`` int16 [samples], ``transcript`` / ``speaker`` str,
    ``num_digits`` int, ``snr_db`` float."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[int(index)]
        return {"audio": np.asarray(example["audio"], np.int16), "transcript": as_text(example["transcript"]),
                "speaker": as_text(example["speaker"]), "num_digits": int(example["num_digits"]),
                "snr_db": float(example["snr_db"])}


@dataclasses.dataclass(frozen=True)
class SpokenNumbersPreprocess:
    """Example -> ``audio`` float32 [frames, n_mels] (log-mel standardised over the real frames, zero-padded to
    `frames`), ``audio_frame_mask`` float32 [frames], ``text`` int32 [max_len], ``label`` int32 (digits - 3).
    Picklable."""

    n_fft: int = av_digits.N_FFT
    hop_length: int = av_digits.HOP_LENGTH
    n_mels: int = av_digits.N_MELS
    max_len: int = MAX_LEN

    @property
    def frames(self) -> int:
        return max_frames(self.n_fft, self.hop_length)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        waveform = np.asarray(example["audio"], np.float32) / 32768.0
        mel = log_mel_spectrogram(waveform, SAMPLE_RATE, n_fft=self.n_fft, hop_length=self.hop_length,
                                  n_mels=self.n_mels)
        if len(mel) > self.frames:
            raise ValueError(f"spoken_numbers: an utterance of {waveform.size} samples gives {len(mel)} frames, "
                             f"over the {self.frames} of MAX_SAMPLES={MAX_SAMPLES}")
        audio = np.zeros((self.frames, self.n_mels), np.float32)
        audio[:len(mel)] = standardize(mel)
        mask = np.zeros(self.frames, np.float32)
        mask[:len(mel)] = 1.0
        return {"audio": audio, frame_mask_key("audio"): mask,
                "text": encode_texts(build_tokenizer, [example["transcript"]], self.max_len)[0],
                "label": np.int32(int(example["num_digits"]) - MIN_DIGITS)}


@dataclasses.dataclass(frozen=True)
class SpokenNumbersAugment:
    """Training stream only: SpecAugment's frequency and time masks (Park et al. 2019; the `spec_augment` op) on
    the utterance's real frames, filled with 0 (their mean after standardisation); padding stays zero."""

    spec_augment: SpecAugment

    def __call__(self, example: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        frames = int(np.sum(example[frame_mask_key("audio")] > 0))
        audio = np.array(example["audio"], np.float32)
        audio[:frames] = self.spec_augment(audio[:frames], rng)
        return {**example, "audio": audio}


def raw_source(data_config: Mapping[str, Any], split: str) -> SpokenSource:
    """A split's stored examples (transcripts, speakers), whatever `data.cache_in_memory` did to the dataset's
    preprocessed source: the references of generated transcripts."""
    return SpokenSource(build(data_config.get("data_dir") or None).as_data_source(split=split))


@DATASETS.register("spoken_numbers")
def dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """Spoken-Numbers (module docstring) for speech-to-text: `data.data_dir`; `data.audio` (`n_fft`, `hop_length`,
    `n_mels`) changes the log-mel front end; `data.max_len` (default 9) the transcript's token ids;
    `data.spec_augment` (a dict of `spec_augment` op fields, e.g. `{"time_masks": 2, "time_width": 5}`; empty:
    off) masks the training stream's spectrograms (`SpokenNumbersAugment`)."""
    builder = build_on_process_zero(lambda: build(data_config.get("data_dir") or None))
    audio = data_config.get("audio", None) or {}
    max_len = int(data_config.get("max_len", MAX_LEN))
    if max_len < MAX_LEN:
        raise ValueError(f"config data.max_len={max_len} would cut transcripts: {MAX_DIGITS} digits need "
                         f"{MAX_LEN} ids ([CLS] words [SEP])")
    preprocess = SpokenNumbersPreprocess(n_fft=audio.get("n_fft", av_digits.N_FFT),
                                         hop_length=audio.get("hop_length", av_digits.HOP_LENGTH),
                                         n_mels=audio.get("n_mels", av_digits.N_MELS), max_len=max_len)
    masks = dict(data_config.get("spec_augment", None) or {})
    unknown = sorted(set(masks) - {"freq_masks", "freq_width", "time_masks", "time_width"})  # The fill is 0.
    if unknown:
        raise ValueError(f"config data.spec_augment: unknown field(s) {unknown}; valid: freq_masks, freq_width, "
                         "time_masks, time_width")
    return Dataset(
        name="spoken_numbers",
        source=lambda split: SpokenSource(builder.as_data_source(split=split)),
        preprocess=preprocess,
        splits=split_sizes(builder),
        num_classes=MAX_DIGITS - MIN_DIGITS + 1,
        modalities=("audio", "text"),  # `audio_frame_mask` rides along (the models read it with the audio).
        class_names=tuple(f"{n} digits" for n in range(MIN_DIGITS, MAX_DIGITS + 1)),
        task="contrastive",  # (audio, transcript) pairs: the kind of data the text tasks (caption, ctc) read.
        augment=SpokenNumbersAugment(SpecAugment(**masks, fill=0.0)) if masks else None,
    )
