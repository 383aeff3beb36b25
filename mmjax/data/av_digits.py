"""AV-Digits: an offline, deterministic audio-visual digits dataset (TFDS ``av_digits``).

Recipe (AV-MNIST style, built entirely from what is installed, nothing downloaded):

* Images: the 1,797 real handwritten 8x8 digits shipped with scikit-learn
  (``sklearn.datasets.load_digits``, values 0..16), scaled to uint8 0..255 and stored
  as ``[8, 8, 1]``. Each is corrupted at build time with Gaussian pixel noise
  (std 45) plus one random 2..4 x 2..4 rectangle overwritten with uniform noise.
* Audio: the word for the image's digit ("zero".."nine"), spoken by eSpeak NG
  (:mod:`mmjax.data.espeak`). A speaker is one of 103 eSpeak voice variants with one
  of 8 English accents (``"en-us+m3"``, ``"en-gb-scotland+f2"``, ...); each speaker
  has its own base rate (130..210 wpm), pitch and intonation range, with rate and
  pitch jittered per utterance. The utterance is trimmed, resampled to 8 kHz, centred
  in a 1 s clip (8,000 samples) with a random shift of up to +-50 ms, mixed with
  white/pink background noise at an SNR drawn from 0..12 dB, given a random gain of
  +-6 dB and stored as int16. Clean utterances are cached per (speaker, digit, rate,
  pitch) within a split; shift, noise and gain are drawn per example.
* Each image is used exactly once, paired with an utterance of the same digit.

Features: ``image`` uint8 [8, 8, 1]; ``audio`` int16 [8000]; ``label`` ClassLabel
(zero..nine); ``speaker`` text; ``image_index`` int64 (row of ``load_digits()``);
``snr_db`` float32 (the speech-to-noise ratio drawn for the clip).

Splits: images are split per class 70/10/20 into ``train``/``validation``/``test``
(1,258 / 179 / 360 examples). The 103 speakers are split 70/10/20 as well
(72 / 10 / 21), and each split only hears its own speakers, so test speakers never
occur in training; speakers are dealt round-robin over a split's images ordered by
digit, so each speaker says every digit about equally often.

Determinism: every random choice comes from ``numpy.random.default_rng`` seeded from
:data:`SEED` (per example: ``(SEED, image_index)``), eSpeak NG is reloaded and
re-seeded for each utterance (see :mod:`mmjax.data.espeak`), and examples are
re-serialised with sorted feature maps (protobuf's upb backend otherwise orders them
differently in every process), so rebuilding a version, in any process, writes
byte-identical array_record files.

Calibration, test accuracy (validation in brackets) of quick proxies trained on
``train``; audio features are :func:`log_mel` (49 frames x 40 mels):

================================================  ===========  ===========  ===========
proxy                                             image only   audio only   fused
================================================  ===========  ===========  ===========
logistic regression (C=0.01, standardised)        82.8 (82.1)  78.1 (72.1)  90.8 (91.1)
same, late fusion (sum of log-probabilities)      --           --           93.9 (92.2)
ridge classifier (alpha=1000, standardised)       79.4 (79.9)  72.5 (67.0)  90.3 (89.4)
small CNNs (25 epochs, concatenated embeddings)   86.9 (83.8)  76.7 (76.5)  90.0 (87.7)
================================================  ===========  ===========  ===========

The ridge row is what ``tests/data/test_av_digits.py`` checks (it is the fastest).
"Fused" concatenates the two feature vectors, except in the late-fusion row.

Build time on a 2-core machine: about 15-18 s (about 9 s of it eSpeak NG).

Reading needs no TensorFlow::

    from mmjax.data import av_digits
    builder = av_digits.build("/path/to/tensorflow_datasets")
    train = tfds.data_source("av_digits", data_dir="/path/to/tensorflow_datasets", split="train")
    example = train[0]   # dict of numpy arrays / Python scalars / bytes

The ``av_digits`` entry of the dataset registry (``config.data.name = "av_digits"``, :func:`dataset`) builds it on
first use and preprocesses examples with :class:`AvDigitsPreprocess` (``data.target`` picks the label; several
comma-separated targets, e.g. ``"digit,value"``, give each its own batch key for multi-task models).

**Imbalanced variant** (``data.imbalance``, :class:`ImbalancedSource`; the same built files, changed when read):
the training split's audio carries a shortcut and the held-out speakers' audio is noisier. Each training clip (a
``cue_fraction`` of them) gets a faint pure tone whose frequency names its digit (400 + 300 d Hz, ``cue_db``
below the clip's RMS), so audio is the easiest modality to fit in training; validation and test clips (unseen
speakers) get no tone and extra white noise at an SNR drawn from ``eval_snr_db``, so audio generalises worst. This
is the failure a fusion model must survive: fit on the modality that is easy in training, it loses to its own
image-only model at test (README "Modality imbalance"). Deterministic: every draw is seeded by the image index.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
import scipy.fft
import tensorflow_datasets as tfds

from mmjax.data import espeak
from mmjax.data.audio_features import (
    add_deltas,
    cepstrum,
    cmvn,
    fit_length,
    log_mel_spectrogram,
    resample,
    standardize,
)
from mmjax.data.core import Dataset, Example, build_on_process_zero
from mmjax.data.raw_inputs import RawInput
from mmjax.data.tfds_builder import OfflineBuilder, prepare, split_sizes
from mmjax.registry import DATASETS

__all__ = [
    "ACCENTS",
    "AV_DIGITS_TARGETS",
    "AvDigits",
    "AvDigitsPreprocess",
    "CLIP_SAMPLES",
    "IMBALANCE_DEFAULTS",
    "ImbalancedSource",
    "DIGIT_NAMES",
    "HOP_LENGTH",
    "N_FFT",
    "N_FRAMES",
    "N_MELS",
    "PairedSource",
    "SAMPLE_RATE",
    "SEED",
    "SPEAKERS",
    "SPLITS",
    "VARIANTS",
    "add_noise",
    "assign_speakers",
    "background_noise",
    "build",
    "clean_speech",
    "clean_utterance",
    "corrupt_image",
    "dataset",
    "generate_examples",
    "log_mel",
    "noisy_clip",
    "speaker_voice",
    "split_image_indices",
    "split_speakers",
]

# Audio front-end defaults for models reading this dataset.
SAMPLE_RATE = 8000
CLIP_SAMPLES = SAMPLE_RATE  # exactly 1 s
N_FFT = 256
HOP_LENGTH = 160
N_MELS = 40
N_FRAMES = 1 + (CLIP_SAMPLES - N_FFT) // HOP_LENGTH  # 49

SEED = 20_240_917
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)

ACCENTS = (
    "en-us", "en", "en-gb-scotland", "en-gb-x-rp",
    "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
# eSpeak NG 1.52 voice variants (espeakng-loader 0.2.4), all but "Mr serious" (a space
# in its name), pinned here so that a newer voice set cannot silently change the data.
VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael",
    "Mike", "Nguyen", "Reed", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm",
    "Tweaky", "UniRobot", "adam", "anika", "anikaRobot", "announcer", "antonio",
    "aunty", "belinda", "benjamin", "boris", "caleb", "croak", "david", "ed", "edward",
    "edward2", "f1", "f2", "f3", "f4", "f5", "fast", "grandma", "grandpa", "gustave",
    "ian", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta", "klatt", "klatt2",
    "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3", "m4", "m5", "m6",
    "m7", "m8", "marcelo", "max", "michel", "miguel", "mike2", "norbert", "pablo",
    "paul", "pedro", "quincy", "rob", "robert", "robosoft", "robosoft2", "robosoft3",
    "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro",
    "shelby", "steph", "steph2", "steph3", "travis", "victor", "whisper", "whisperf",
    "zac",
)
# One speaker per variant; accents assigned round-robin.
SPEAKERS = tuple(f"{ACCENTS[i % len(ACCENTS)]}+{v}" for i, v in enumerate(VARIANTS))

# Image corruption (pixel values on the 0..255 scale).
IMAGE_NOISE_STD = 45.0
ERASE_SIZE = (2, 4)  # side lengths of the erased rectangle, inclusive

# Speaker voices and audio corruption.
SPEAKER_RATE = (130, 210)  # base words per minute, per speaker
SPEAKER_PITCH = (25, 75)  # base eSpeak pitch, per speaker
SPEAKER_PITCH_RANGE = (20, 80)  # eSpeak intonation range, per speaker
RATE_JITTER = (-20, 0, 20)
PITCH_JITTER = (-8, 0, 8)
SNR_DB = (0.0, 12.0)  # speech-to-noise ratio over the spoken part
GAIN_DB = (-6.0, 6.0)
MAX_SHIFT = 400  # samples (50 ms) either side of the centred position
SPEECH_RMS = 0.05  # of full scale, before the random gain
TRIM_THRESHOLD = 0.02  # of the utterance peak

# Distinct random streams derived from SEED.
_STREAM_IMAGE_SPLIT, _STREAM_SPEAKER_SPLIT, _STREAM_SPEAKER_VOICE, _STREAM_ASSIGN = range(4)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: (images float64 [1797, 8, 8] in 0..16, labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target.astype(np.int64)


def _fraction_sizes(n: int) -> tuple[int, int, int]:
    """Split ``n`` items 70/10/20, rounding train and validation, test takes the rest."""
    n_train = round(n * SPLIT_FRACTIONS[0])
    n_val = round(n * SPLIT_FRACTIONS[1])
    return n_train, n_val, n - n_train - n_val


def split_image_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified 70/10/20 split of image indices (sorted within each split)."""
    rng = np.random.default_rng((SEED, _STREAM_IMAGE_SPLIT))
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in range(len(DIGIT_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == digit))
        bounds = np.cumsum(_fraction_sizes(len(members)))[:-1]
        for split, chunk in zip(SPLITS, np.split(members, bounds), strict=False):
            parts[split].append(chunk)
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def split_speakers() -> dict[str, tuple[str, ...]]:
    """Disjoint 70/10/20 split of :data:`SPEAKERS`."""
    rng = np.random.default_rng((SEED, _STREAM_SPEAKER_SPLIT))
    order = [SPEAKERS[i] for i in rng.permutation(len(SPEAKERS))]
    bounds = np.cumsum(_fraction_sizes(len(order)))
    starts = (0, *bounds[:-1])
    return {split: tuple(order[a:b]) for split, a, b in zip(SPLITS, starts, bounds, strict=False)}


def speaker_voice(speaker: str) -> tuple[int, int, int]:
    """Base (rate, pitch, pitch_range) of a speaker, fixed by its position in SPEAKERS."""
    rng = np.random.default_rng((SEED, _STREAM_SPEAKER_VOICE, SPEAKERS.index(speaker)))
    return (
        int(rng.integers(SPEAKER_RATE[0], SPEAKER_RATE[1] + 1)),
        int(rng.integers(SPEAKER_PITCH[0], SPEAKER_PITCH[1] + 1)),
        int(rng.integers(SPEAKER_PITCH_RANGE[0], SPEAKER_PITCH_RANGE[1] + 1)),
    )


def assign_speakers(split: str, image_indices: np.ndarray, labels: np.ndarray) -> dict[int, str]:
    """Deals the split's speakers round-robin over its images ordered by digit.

    Every speaker then gets about the same number of utterances of each digit.
    """
    speakers = split_speakers()[split]
    rng = np.random.default_rng((SEED, _STREAM_ASSIGN, SPLITS.index(split)))
    shuffled = rng.permutation(image_indices)
    by_digit = shuffled[np.argsort(labels[shuffled], kind="stable")]
    dealer = [speakers[i] for i in rng.permutation(len(speakers))]
    return {int(index): dealer[k % len(dealer)] for k, index in enumerate(by_digit)}


def corrupt_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0..16 digit -> noisy uint8 ``[8, 8, 1]``: Gaussian noise plus one noise-filled rectangle."""
    pixels = image.astype(np.float64) * (255.0 / 16.0)
    pixels = pixels + rng.normal(0.0, IMAGE_NOISE_STD, size=pixels.shape)
    height, width = (int(s) for s in rng.integers(ERASE_SIZE[0], ERASE_SIZE[1] + 1, size=2))
    top = int(rng.integers(0, 8 - height + 1))
    left = int(rng.integers(0, 8 - width + 1))
    pixels[top : top + height, left : left + width] = rng.uniform(0.0, 255.0, size=(height, width))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[..., None]


def clean_utterance(speaker: str, digit: int, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
    """The spoken digit at :data:`SAMPLE_RATE`, silence trimmed, float64 with unit RMS."""
    return clean_speech(DIGIT_NAMES[digit], speaker, rate, pitch, pitch_range)


def clean_speech(text: str, speaker: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
    """`text` spoken by eSpeak NG in `speaker`'s voice, resampled to :data:`SAMPLE_RATE`, leading and trailing
    silence trimmed (below :data:`TRIM_THRESHOLD` of the peak), float64 with unit RMS."""
    waveform, rate_hz = espeak.synthesize(text, voice=speaker, rate=rate, pitch=pitch, pitch_range=pitch_range)
    speech = resample(waveform, rate_hz, SAMPLE_RATE).astype(np.float64)
    loud = np.flatnonzero(np.abs(speech) > TRIM_THRESHOLD * np.abs(speech).max(initial=0.0))
    if loud.size == 0:
        raise RuntimeError(f"eSpeak NG produced silence for {text!r} by {speaker!r}")
    speech = speech[loud[0] : loud[-1] + 1]
    return speech / np.sqrt(np.mean(speech**2))


def background_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS mix of white and pink (1/f power) noise, random mixing weight.

    The pink noise is shaped over the next length whose FFT is fast (`scipy.fft.next_fast_len`; 8,000 samples, a
    1 s clip, already is) and cut to `n`: clips of any length then cost about the same per sample."""
    white = rng.standard_normal(n)
    fast = scipy.fft.next_fast_len(n, real=True)
    spectrum = np.fft.rfft(rng.standard_normal(fast))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    pink = np.fft.irfft(spectrum / np.sqrt(freqs), n=fast)[:n]
    pink /= np.sqrt(np.mean(pink**2))
    weight = rng.uniform()
    noise = weight * white + (1.0 - weight) * pink
    return noise / np.sqrt(np.mean(noise**2))


def noisy_clip(speech: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Unit-RMS speech -> int16 1 s clip: centred, shifted by up to MAX_SHIFT, noise at a random
    SNR, random gain. Returns ``(clip, snr_db)``."""
    centred = (CLIP_SAMPLES - speech.size) // 2
    offset = centred + int(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1))
    return add_noise(fit_length(speech, CLIP_SAMPLES, offset=offset), rng)


def add_noise(placed: np.ndarray, rng: np.random.Generator,
              snr_range: tuple[float, float] = SNR_DB) -> tuple[np.ndarray, float]:
    """Speech placed in a clip (unit RMS over its spoken part) -> int16: :func:`background_noise` over the whole
    clip at an SNR drawn from `snr_range` (dB, against the speech), then a random gain of :data:`GAIN_DB` around
    :data:`SPEECH_RMS`. Returns ``(clip, snr_db)``."""
    snr_db = float(rng.uniform(*snr_range))
    mix = placed + background_noise(rng, placed.size) * 10.0 ** (-snr_db / 20.0)
    level = SPEECH_RMS * 10.0 ** (rng.uniform(*GAIN_DB) / 20.0) * 32767.0
    return np.clip(np.rint(mix * level), -32768, 32767).astype(np.int16), snr_db


def generate_examples(split: str) -> Iterator[tuple[int, dict]]:
    """Yields ``(image_index, example)`` for one split, in image-index order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    images, labels = _digits()
    indices = split_image_indices(labels)[split]
    speaker_of = assign_speakers(split, indices, labels)
    cache: dict[tuple, np.ndarray] = {}
    for index in indices:
        index = int(index)
        rng = np.random.default_rng((SEED, index))
        digit, speaker = int(labels[index]), speaker_of[index]
        base_rate, base_pitch, pitch_range = speaker_voice(speaker)
        rate = base_rate + int(rng.choice(RATE_JITTER))
        pitch = base_pitch + int(rng.choice(PITCH_JITTER))
        key = (speaker, digit, rate, pitch)
        if key not in cache:
            cache[key] = clean_utterance(speaker, digit, rate, pitch, pitch_range)
        image = corrupt_image(images[index], rng)
        clip, snr_db = noisy_clip(cache[key], rng)
        yield index, {
            "image": image,
            "audio": clip,
            "label": digit,
            "speaker": speaker,
            "image_index": index,
            "snr_db": np.float32(snr_db),
        }


def log_mel(clip: np.ndarray) -> np.ndarray:
    """The default audio features of a clip: float32 ``[N_FRAMES, N_MELS]``."""
    return log_mel_spectrogram(
        clip, SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS
    )


class AvDigits(OfflineBuilder):
    """TFDS builder for AV-Digits (see module docstring); array_record by default."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: sklearn digits with noise and erasing, paired with "
        "eSpeak NG spoken digits (103 speakers, disjoint across splits) in noise.",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "audio": tfds.features.Tensor(shape=(CLIP_SAMPLES,), dtype=np.int16),
                "label": tfds.features.ClassLabel(names=DIGIT_NAMES),
                "speaker": tfds.features.Text(),
                "image_index": tfds.features.Scalar(dtype=np.int64),
                "snr_db": tfds.features.Scalar(dtype=np.float32),
            }),
            supervised_keys=None,
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        """The examples of ``split`` (see :func:`generate_examples`), timing printed to stderr."""
        start = time.perf_counter()
        count = 0
        for key, example in generate_examples(split):
            count += 1
            yield key, example
        print(
            f"av_digits: generated {count} {split} examples in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )


def build(data_dir: str) -> tfds.core.DatasetBuilder:
    """Builds AV-Digits under ``data_dir`` unless already there; returns the builder."""
    return prepare(AvDigits(data_dir=data_dir))


# --------------------------------------------------------------------------------------------- dataset entry


AV_DIGITS_TARGETS = {"digit": "classification", "value": "regression", "digit_pair": "multilabel"}
AUDIO_FEATURES = ("log_mel", "mfcc")  # config data.audio.features
# data.imbalance: the shortcut tone's level below the clip's RMS (dB) and the share of training clips that carry it,
# and the extra white noise of held-out clips (SNR range in dB against the clip's RMS).
IMBALANCE_DEFAULTS = {"cue_db": 10.0, "cue_fraction": 1.0, "eval_snr_db": (-6.0, 0.0)}
_STREAM_IMBALANCE = 7


def parse_targets(target: Any) -> tuple[str, ...]:
    """`data.target` as a tuple of target names: one name, several comma-separated, or a tuple/list (of one or
    more: each is then also returned under its own key)."""
    names = target.split(",") if isinstance(target, str) else target
    if not isinstance(names, (tuple, list)) or not names:
        raise ValueError(f"config data.target={target!r}; valid: {', '.join(AV_DIGITS_TARGETS)} (or several, "
                         "comma-separated)")
    names = tuple(str(n).strip() for n in names)
    for name in names:
        if name not in AV_DIGITS_TARGETS:
            raise ValueError(f"config data.target={target!r}; valid: {', '.join(AV_DIGITS_TARGETS)} (or several, "
                             f"comma-separated); {name!r} is none of them")
    if len(set(names)) != len(names):
        raise ValueError(f"config data.target={target!r} names a target twice")
    return names


def imbalance_settings(value: Any) -> dict | None:
    """`data.imbalance` checked, with defaults (None: off)."""
    if not value:
        return None
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(f"config data.imbalance={value!r} must be a dict of {sorted(IMBALANCE_DEFAULTS)} (or {{}})")
    unknown = sorted(set(value) - set(IMBALANCE_DEFAULTS))
    if unknown:
        raise ValueError(f"config data.imbalance: unknown key(s) {unknown}; valid: {sorted(IMBALANCE_DEFAULTS)}")
    settings = {**IMBALANCE_DEFAULTS, **dict(value)}
    if not isinstance(settings["cue_db"], (int, float)) or isinstance(settings["cue_db"], bool):
        raise ValueError(f"config data.imbalance.cue_db={settings['cue_db']!r} must be a number (dB)")
    if not isinstance(settings["cue_fraction"], (int, float)) or not 0.0 <= settings["cue_fraction"] <= 1.0:
        raise ValueError(f"config data.imbalance.cue_fraction={settings['cue_fraction']!r} must be in [0, 1]")
    snr = settings["eval_snr_db"]
    if not isinstance(snr, (tuple, list)) or len(snr) != 2 or not snr[0] <= snr[1]:
        raise ValueError(f"config data.imbalance.eval_snr_db={snr!r} must be (low, high) in dB with low <= high")
    settings["eval_snr_db"] = (float(snr[0]), float(snr[1]))
    return settings


class ImbalancedSource:
    """A split of AV-Digits with the imbalance of the module docstring: a digit tone on training clips, extra noise
    on held-out ones. Random access, deterministic per example (seeded by its image index), picklable."""

    def __init__(self, source, split: str, settings: Mapping[str, Any]):
        self.source, self.split, self.settings = source, split, dict(settings)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.source[int(index)])
        clip = np.asarray(example["audio"], np.float64)
        rng = np.random.default_rng((SEED, _STREAM_IMBALANCE, int(example["image_index"])))
        rms = max(float(np.sqrt(np.mean(clip**2))), 1.0)
        if self.split == "train":
            if rng.uniform() < self.settings["cue_fraction"]:
                frequency = 400.0 + 300.0 * int(example["label"])
                t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
                amplitude = rms * np.sqrt(2.0) * 10.0 ** (-self.settings["cue_db"] / 20.0)
                clip = clip + amplitude * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))
        else:
            snr_db = rng.uniform(*self.settings["eval_snr_db"])
            clip = clip + rng.standard_normal(clip.shape) * rms * 10.0 ** (-snr_db / 20.0)
        example["audio"] = np.clip(np.rint(clip), -32768, 32767).astype(np.int16)
        return example


class PairedSource:
    """AV-Digits with each image paired to the speech of another example of the same split (fixed permutation).

    Example i keeps its image and takes the audio of example `perm[i]`: its two digits usually differ, so a
    multi-label target {image digit, spoken digit} needs both modalities.
    """

    def __init__(self, source, seed: int = 20261123):
        self.source = source
        self.partner = np.random.default_rng(seed).permutation(len(source))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.source[int(index)])
        partner = self.source[int(self.partner[int(index)])]
        example["audio"], example["audio_label"] = partner["audio"], partner["label"]
        return example


@dataclasses.dataclass(frozen=True)
class AvDigitsPreprocess:
    """AV-Digits example -> model inputs: image in [-1, 1]; audio as a per-utterance normalised log-mel
    (`features="log_mel"`, default) or as MFCCs (`features="mfcc"`: `n_mfcc` cepstra of the same log-mel, HTK
    `lifter`, `deltas` orders of deltas appended, each coefficient normalised over the utterance (CMVN);
    `mmjax.data.audio_features`).

    `target`: "digit" (class id), "value" (the digit as a float, for regression), "digit_pair" (multi-hot of the
    image's digit and the partner utterance's digit, see `PairedSource`); it is the example's `label`. With
    `targets` (several), each target is also returned under its own name (the image's digit for "digit" and
    "value"), for a multi-task model's heads.
    """

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    target: str = "digit"
    targets: tuple[str, ...] = ()  # Several targets: each also under its own key ("digit", "value", "digit_pair").
    features: str = "log_mel"
    n_mfcc: int = 13
    deltas: int = 0
    lifter: int = 0

    def __call__(self, example: Mapping[str, Any]) -> Example:
        image = np.asarray(example["image"], np.float32) / 127.5 - 1.0
        waveform = np.asarray(example["audio"], np.float32) / 32768.0
        mel = log_mel_spectrogram(
            waveform, self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length, n_mels=self.n_mels
        )
        audio = standardize(mel)
        if self.features == "mfcc":
            audio = cmvn(add_deltas(cepstrum(mel, self.n_mfcc, self.lifter), self.deltas))
        out = {"image": image, "audio": audio, "label": self._label(example, self.target)}
        for target in self.targets:
            out[target] = self._label(example, target)
        return out

    @staticmethod
    def _label(example: Mapping[str, Any], target: str) -> np.ndarray:
        if target == "value":
            return np.float32(example["label"])
        if target == "digit_pair":
            label = np.zeros(10, np.float32)
            label[[int(example["label"]), int(example["audio_label"])]] = 1.0
            return label
        return np.int32(example["label"])


def raw_inputs(preprocess: AvDigitsPreprocess) -> dict[str, RawInput]:
    """One raw image (8x8 grey; other sizes resized) or utterance (1 s at 8 kHz, cropped or zero-padded at the end;
    other rates resampled) as `preprocess` treats the stored ones: the same values, as op chains."""
    mel = f"n_mels={preprocess.n_mels}, n_fft={preprocess.n_fft}, hop_length={preprocess.hop_length}"
    if preprocess.features == "mfcc":
        audio = (f"mfcc({mel}, n_mfcc={preprocess.n_mfcc}, lifter={preprocess.lifter}, deltas={preprocess.deltas})"
                 "|cmvn")
    else:
        audio = f"log_mel({mel})|standardize"
    return {
        "image": RawInput("image", "decode(channels=1)|resize(8)|normalize"),
        "audio": RawInput("audio", f"crop_or_pad({CLIP_SAMPLES})|{audio}", sample_rate=preprocess.sample_rate),
    }


@DATASETS.register("av_digits")
def dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """AV-Digits: scikit-learn's handwritten digits paired with eSpeak NG spoken digits (module docstring).

    `data.target` picks the label: "digit" (default, 10 classes), "value" (regression) or "digit_pair"
    (multi-label over 10 digits, each image paired with another example's speech); several, comma-separated
    ("digit,value"), or a tuple (even of one), add each under its own key (the first is also the `label`).
    `data.imbalance` (a dict, see `IMBALANCE_DEFAULTS`; empty: off) reads the imbalanced variant
    (`ImbalancedSource`).
    """
    given = data_config.get("target", "digit")
    targets = parse_targets(given)
    target = targets[0]
    own_keys = not isinstance(given, str) or "," in given  # Each target also under its own key.
    imbalance = imbalance_settings(data_config.get("imbalance"))

    builder = build_on_process_zero(lambda: build(data_config.get("data_dir") or None))
    audio = data_config.get("audio", ml_collections.ConfigDict())
    features = audio.get("features", "log_mel")
    if features not in AUDIO_FEATURES:
        raise ValueError(f"config data.audio.features={features!r}; valid: {', '.join(AUDIO_FEATURES)}")
    if features == "mfcc" and not 0 < audio.get("n_mfcc", 13) <= audio.get("n_mels", N_MELS):
        raise ValueError(f"config data.audio.n_mfcc={audio.get('n_mfcc')!r} must be in [1, data.audio.n_mels]")
    preprocess = AvDigitsPreprocess(
        sample_rate=SAMPLE_RATE,
        n_fft=audio.get("n_fft", N_FFT),
        hop_length=audio.get("hop_length", HOP_LENGTH),
        n_mels=audio.get("n_mels", N_MELS),
        target=target,
        targets=targets if own_keys else (),
        features=features,
        n_mfcc=audio.get("n_mfcc", 13),
        deltas=audio.get("deltas", 0),
        lifter=audio.get("lifter", 0),
    )
    label = builder.info.features["label"]

    def source(split: str):
        data = builder.as_data_source(split=split)
        if imbalance is not None:
            data = ImbalancedSource(data, split, imbalance)
        return PairedSource(data) if "digit_pair" in targets else data
    return Dataset(
        name="av_digits",
        inputs=raw_inputs(preprocess),
        source=source,
        preprocess=preprocess,
        splits=split_sizes(builder),
        num_classes=1 if target == "value" else label.num_classes,
        modalities=("audio", "image"),
        class_names=("value",) if target == "value" else tuple(label.names),
        task=AV_DIGITS_TARGETS[target],
    )
