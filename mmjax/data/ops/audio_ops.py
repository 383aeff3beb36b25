"""Audio ops: resample, crop or pad, log-mel, MFCC (+ deltas, CMVN) and SpecAugment (mmjax.data.audio_features)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from mmjax.data.audio_features import (
    add_deltas,
    cmvn,
    fit_length,
    log_mel_spectrogram,
    mel_filterbank,
    mfcc,
    resample,
)
from mmjax.data.core import is_int
from mmjax.data.ops.op_base import Op, RandomOp, describe, positive_arg, register


def _waveform(value, op: str) -> np.ndarray:
    audio = np.asarray(value)
    if audio.ndim != 1 or not (np.issubdtype(audio.dtype, np.floating) or np.issubdtype(audio.dtype, np.integer)):
        raise ValueError(f"{op} expects a 1-D waveform, got {describe(value)}")
    return audio


@register("resample")
@dataclasses.dataclass(frozen=True)
class Resample(Op):
    """Waveform at the dataset's sample rate (or `from_rate`) -> float32 at `rate` (polyphase, scipy); the ops
    after it see `rate`."""

    rate: int
    from_rate: int | None = None

    def __post_init__(self):
        positive_arg("resample", "rate", self.rate)
        if self.from_rate is not None:
            positive_arg("resample", "from_rate", self.from_rate)

    def bind(self, context):
        source = self.from_rate or context.sample_rate
        if source is None:
            raise ValueError(
                "resample: the input sample rate is unknown here; give it as resample(RATE, from_rate=...)")
        return dataclasses.replace(self, from_rate=source), dataclasses.replace(context, sample_rate=self.rate)

    def __call__(self, value):
        return resample(_waveform(value, "resample"), self.from_rate, self.rate)


def _align_offset(length: int, n: int, align: str) -> int:
    if align == "start":
        return 0
    if align == "end":
        return n - length
    return (n - length) // 2


@register("crop_or_pad")
@dataclasses.dataclass(frozen=True)
class CropOrPad(Op):
    """Waveform (last axis) -> exactly `length` samples: cut, or zero-padded, keeping the `align` = "start",
    "center" or "end" of the clip."""

    length: int
    align: str = "start"

    def __post_init__(self):
        positive_arg("crop_or_pad", "length", self.length)
        if self.align not in ("start", "center", "end"):
            raise ValueError(f"crop_or_pad: align={self.align!r}; valid: start, center, end")

    def __call__(self, value):
        audio = np.asarray(value)
        if audio.ndim == 0:
            raise ValueError(f"crop_or_pad expects an array with a time axis, got {describe(value)}")
        return fit_length(audio, self.length, offset=_align_offset(audio.shape[-1], self.length, self.align))


@register("random_crop_or_pad")
@dataclasses.dataclass(frozen=True)
class RandomCropOrPad(RandomOp):
    """Waveform -> exactly `length` samples: a random window of a longer clip, or a shorter clip zero-padded at a
    random position. Evaluation: `crop_or_pad(length, align="center")`."""

    length: int

    def __post_init__(self):
        positive_arg("random_crop_or_pad", "length", self.length)

    def eval_ops(self) -> tuple[Op, ...]:
        return (CropOrPad(self.length, "center"),)

    def __call__(self, value, rng):
        audio = np.asarray(value)
        if audio.ndim == 0:
            raise ValueError(f"random_crop_or_pad expects an array with a time axis, got {describe(value)}")
        slack = self.length - audio.shape[-1]
        offset = int(rng.integers(min(0, slack), max(0, slack) + 1))
        return fit_length(audio, self.length, offset=offset)


@register("log_mel")
@dataclasses.dataclass(frozen=True)
class LogMel(Op):
    """Waveform -> float32 log-mel spectrogram `[frames, n_mels]` (mmjax.data.audio_features.log_mel_spectrogram) at the
    sample rate in effect; `n_fft` defaults to 25 ms rounded up to a power of two, `hop_length` to 10 ms."""

    n_mels: int = 40
    n_fft: int | None = None
    hop_length: int | None = None
    fmin: float = 0.0
    fmax: float | None = None
    sample_rate: int | None = None

    def __post_init__(self):
        positive_arg("log_mel", "n_mels", self.n_mels)
        for field in ("n_fft", "hop_length", "sample_rate"):
            if getattr(self, field) is not None:
                positive_arg("log_mel", field, getattr(self, field))

    def bind(self, context):
        rate = self.sample_rate or context.sample_rate
        if rate is None:
            raise ValueError(f"{self.name}: the sample rate is unknown here; give it as {self.name}(sample_rate=...)")
        n_fft = self.n_fft or 2 ** math.ceil(math.log2(0.025 * rate))
        hop = self.hop_length or max(1, rate // 100)
        mel_filterbank(rate, n_fft, self.n_mels, float(self.fmin), self.fmax)  # Checks fmin/fmax now, not per example.
        return dataclasses.replace(self, sample_rate=rate, n_fft=n_fft, hop_length=hop), context

    def __call__(self, value):
        return log_mel_spectrogram(_waveform(value, "log_mel"), self.sample_rate, n_fft=self.n_fft,
                                   hop_length=self.hop_length, n_mels=self.n_mels, fmin=float(self.fmin),
                                   fmax=self.fmax)


@register("mfcc")
@dataclasses.dataclass(frozen=True)
class Mfcc(LogMel):
    """Waveform -> float32 MFCCs `[frames, n_mfcc * (deltas + 1)]` (mmjax.data.audio_features.mfcc: the orthonormal
    DCT-II of the log-mel spectrogram that `log_mel` computes with the same arguments, optional HTK `lifter`), with
    `deltas` = 1 or 2 orders of regression deltas over +-`delta_width` frames appended (the classic 39-dimensional
    feature is `mfcc(n_mfcc=13, deltas=2)`)."""

    n_mfcc: int = 13
    lifter: int = 0
    deltas: int = 0
    delta_width: int = 2

    def __post_init__(self):
        positive_arg("mfcc", "n_mels", self.n_mels)
        for field in ("n_fft", "hop_length", "sample_rate"):
            if getattr(self, field) is not None:
                positive_arg("mfcc", field, getattr(self, field))
        positive_arg("mfcc", "n_mfcc", self.n_mfcc)
        positive_arg("mfcc", "delta_width", self.delta_width)
        if self.n_mfcc > self.n_mels:
            raise ValueError(f"mfcc: n_mfcc={self.n_mfcc} exceeds n_mels={self.n_mels}")
        for field in ("lifter", "deltas"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 0:
                raise ValueError(f"mfcc: {field} must be an int >= 0, got {getattr(self, field)!r}")

    def __call__(self, value):
        cepstra = mfcc(_waveform(value, "mfcc"), self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length,
                       n_mels=self.n_mels, n_mfcc=self.n_mfcc, lifter=self.lifter, fmin=float(self.fmin),
                       fmax=self.fmax)
        return add_deltas(cepstra, self.deltas, self.delta_width)


@register("deltas")
@dataclasses.dataclass(frozen=True)
class Deltas(Op):
    """Features `[frames, coefficients]` (e.g. after `log_mel`) -> `[frames, coefficients * (order + 1)]` with
    `order` orders of regression deltas over +-`width` frames appended (mmjax.data.audio_features.add_deltas)."""

    order: int = 2
    width: int = 2

    def __post_init__(self):
        positive_arg("deltas", "order", self.order)
        positive_arg("deltas", "width", self.width)

    def __call__(self, value):
        features = np.asarray(value)
        if features.ndim != 2:
            raise ValueError(f"deltas expects features [frames, coefficients], got {describe(value)}")
        return add_deltas(features, self.order, self.width)


@register("cmvn")
@dataclasses.dataclass(frozen=True)
class Cmvn(Op):
    """Features `[frames, coefficients]` -> each coefficient standardised over the utterance's frames (cepstral
    mean and variance normalisation; `standardize` instead uses one mean and deviation for the whole array)."""

    def __call__(self, value):
        features = np.asarray(value)
        if features.ndim != 2:
            raise ValueError(f"cmvn expects features [frames, coefficients], got {describe(value)}")
        return cmvn(features)


@register("spec_augment")
@dataclasses.dataclass(frozen=True)
class SpecAugment(RandomOp):
    """SpecAugment's masks (Park et al. 2019) on a spectrogram `[frames, bins]`: `freq_masks` bands of 0..
    `freq_width` bins and `time_masks` spans of 0..`time_width` frames set to `fill` ("mean" of the spectrogram,
    or a number). Evaluation: unchanged."""

    freq_masks: int = 2
    freq_width: int = 8
    time_masks: int = 2
    time_width: int = 10
    fill: Any = "mean"

    def __post_init__(self):
        for field in ("freq_masks", "freq_width", "time_masks", "time_width"):
            value = getattr(self, field)
            if not is_int(value) or value < 0:
                raise ValueError(f"spec_augment: {field} must be an int >= 0, got {value!r}")
        if self.fill != "mean" and (isinstance(self.fill, bool) or not isinstance(self.fill, (int, float))):
            raise ValueError(f"spec_augment: fill must be 'mean' or a number, got {self.fill!r}")

    def __call__(self, value, rng):
        spec = np.array(value, dtype=np.float32)  # A copy: the cached input is never written.
        if spec.ndim != 2:
            raise ValueError(
                f"spec_augment expects a spectrogram [frames, bins] (after log_mel), got {describe(value)}")
        fill = spec.mean() if self.fill == "mean" else np.float32(self.fill)
        frames, bins = spec.shape
        for count, width, size, axis in ((self.freq_masks, self.freq_width, bins, 1),
                                         (self.time_masks, self.time_width, frames, 0)):
            for _ in range(count):
                w = int(rng.integers(0, min(width, size) + 1))
                start = int(rng.integers(0, size - w + 1))
                if axis == 1:
                    spec[:, start : start + w] = fill
                else:
                    spec[start : start + w] = fill
        return spec
