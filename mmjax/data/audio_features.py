"""NumPy audio front end: log-mel spectrograms, MFCCs and their deltas, resampling, length fitting and
per-utterance standardisation (of the whole array, or per coefficient: CMVN).

Used per example inside Grain map functions, so everything is vectorised and the mel
filterbank is built once per parameter set (cached). Integer waveforms (e.g. int16)
are read as fixed-point audio and scaled to [-1, 1) before analysis.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import fft, signal

from mmjax.data.core import is_int, positive_int

__all__ = [
    "add_deltas",
    "cepstrum",
    "cmvn",
    "deltas",
    "fit_length",
    "hann_window",
    "hz_to_mel",
    "log_mel_spectrogram",
    "mel_filterbank",
    "mel_to_hz",
    "mfcc",
    "resample",
    "standardize",
]


def hz_to_mel(hz):
    """HTK mel scale: ``2595 * log10(1 + hz / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def _resolve_band(sample_rate: int, fmin: float, fmax: float | None) -> tuple[float, float]:
    nyquist = sample_rate / 2.0
    fmax = nyquist if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= nyquist:
        raise ValueError(
            f"need 0 <= fmin < fmax <= sample_rate / 2 = {nyquist}, got fmin={fmin}, fmax={fmax}"
        )
    return float(fmin), fmax


@functools.lru_cache(maxsize=32)
def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular HTK-mel filters, float32 ``[n_fft // 2 + 1, n_mels]``, peak height 1.

    Filter ``m`` rises linearly from mel centre ``m - 1`` to ``m`` and falls to ``m + 1``,
    with ``n_mels + 2`` centres equally spaced in mel between ``fmin`` and ``fmax``.
    Cached and read-only: callers share one array per parameter set.
    """
    sample_rate = positive_int("sample_rate", sample_rate)
    n_fft = positive_int("n_fft", n_fft)
    n_mels = positive_int("n_mels", n_mels)
    fmin, fmax = _resolve_band(sample_rate, fmin, fmax)
    bin_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bin_hz[:, None] - lower) / (centre - lower)
    falling = (upper - bin_hz[:, None]) / (upper - centre)
    filters = np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)
    filters.flags.writeable = False
    return filters


def _as_float_audio(waveform) -> np.ndarray:
    """float32 view of ``waveform``; integer samples are scaled to [-1, 1)."""
    waveform = np.asarray(waveform)
    if np.issubdtype(waveform.dtype, np.integer):
        return waveform.astype(np.float32) / np.float32(-np.iinfo(waveform.dtype).min)
    if np.issubdtype(waveform.dtype, np.floating):
        return waveform.astype(np.float32, copy=False)
    raise TypeError(f"waveform must have an integer or float dtype, got {waveform.dtype}")


@functools.lru_cache(maxsize=8)
def hann_window(n_fft: int) -> np.ndarray:
    """The periodic Hann window of `n_fft` samples, float32, cached and read-only (shared by the JAX front end)."""
    window = signal.get_window("hann", n_fft, fftbins=True).astype(np.float32)
    window.flags.writeable = False
    return window


def log_mel_spectrogram(
    waveform,
    sample_rate: int,
    *,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    log_floor: float = 1e-6,
) -> np.ndarray:
    """Log mel power spectrogram, float32 ``[..., frames, n_mels]``.

    Frames are ``n_fft`` samples long (periodic Hann window, no centre padding), every
    ``hop_length`` samples: ``frames = 1 + (samples - n_fft) // hop_length``. The power
    spectrum ``|rfft|**2`` goes through :func:`mel_filterbank`, then
    ``log(max(power, log_floor))``. Leading axes of ``waveform`` are kept (batches).
    """
    sample_rate = positive_int("sample_rate", sample_rate)
    n_fft = positive_int("n_fft", n_fft)
    hop_length = positive_int("hop_length", hop_length)
    n_mels = positive_int("n_mels", n_mels)
    if not log_floor > 0:
        raise ValueError(f"log_floor must be > 0, got {log_floor!r}")
    audio = _as_float_audio(waveform)
    if audio.ndim == 0 or audio.shape[-1] < n_fft:
        raise ValueError(
            f"waveform of shape {audio.shape} is shorter than one frame (n_fft={n_fft})"
        )
    filters = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft, axis=-1)[..., ::hop_length, :]
    spectrum = np.fft.rfft(frames * hann_window(n_fft), axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    mel = power @ filters
    return np.log(np.maximum(mel, np.float32(log_floor)))


def cepstrum(log_mel, n_mfcc: int = 13, lifter: int = 0) -> np.ndarray:
    """Mel-frequency cepstral coefficients of a log-mel spectrogram ``[..., frames, n_mels]``: float32
    ``[..., frames, n_mfcc]``.

    c_n = sqrt((2 - [n == 0]) / M) * sum_{m=0}^{M-1} log_mel_m * cos(pi * n * (m + 1/2) / M), n < ``n_mfcc``: the
    orthonormal DCT-II of the M log mel energies (``scipy.fft.dct(type=2, norm="ortho")``), as in Davis &
    Mermelstein, "Comparison of Parametric Representations for Monosyllabic Word Recognition in Continuously
    Spoken Sentences", IEEE TASSP 1980, and HTK / python_speech_features (natural log energies; c_0 is kept).
    ``lifter`` L > 0 applies HTK's sinusoidal liftering c_n *= 1 + (L / 2) sin(pi * n / L) (Juang, Rabiner,
    Wilpon 1987); 0 leaves the coefficients as they are.
    """
    log_mel = np.asarray(log_mel, np.float32)
    n_mfcc = positive_int("n_mfcc", n_mfcc)
    if log_mel.ndim < 2 or n_mfcc > log_mel.shape[-1]:
        raise ValueError(f"cepstrum needs a log-mel spectrogram [..., frames, n_mels] with n_mels >= n_mfcc="
                         f"{n_mfcc}, got shape {log_mel.shape}")
    if not is_int(lifter) or lifter < 0:
        raise ValueError(f"lifter must be an int >= 0, got {lifter!r}")
    cepstra = fft.dct(log_mel.astype(np.float64), type=2, norm="ortho", axis=-1)[..., :n_mfcc]
    if lifter:
        cepstra = cepstra * (1.0 + lifter / 2.0 * np.sin(np.pi * np.arange(n_mfcc) / lifter))
    return cepstra.astype(np.float32)


def mfcc(
    waveform,
    sample_rate: int,
    *,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    n_mfcc: int = 13,
    lifter: int = 0,
    fmin: float = 0.0,
    fmax: float | None = None,
    log_floor: float = 1e-6,
) -> np.ndarray:
    """MFCCs float32 ``[..., frames, n_mfcc]``: :func:`cepstrum` of :func:`log_mel_spectrogram` (same framing)."""
    log_mel = log_mel_spectrogram(waveform, sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                                  fmin=fmin, fmax=fmax, log_floor=log_floor)
    return cepstrum(log_mel, n_mfcc, lifter)


def deltas(features, width: int = 2) -> np.ndarray:
    """Regression deltas along the frames axis of ``[..., frames, coefficients]`` (HTK's formula, as
    python_speech_features' ``delta``): d_t = sum_{n=1}^{N} n (c_{t+n} - c_{t-n}) / (2 sum_{n=1}^{N} n^2) with
    N = ``width``; frames past either end repeat the edge frame. float32, same shape."""
    width = positive_int("width", width)
    features = np.asarray(features, np.float32)
    if features.ndim < 2:
        raise ValueError(f"deltas need features [..., frames, coefficients], got shape {features.shape}")
    frames = features.shape[-2]
    pad = [(0, 0)] * (features.ndim - 2) + [(width, width), (0, 0)]
    padded = np.pad(features.astype(np.float64), pad, mode="edge")
    out = sum(n * (padded[..., width + n : width + n + frames, :] - padded[..., width - n : width - n + frames, :])
              for n in range(1, width + 1))
    return (out / (2 * sum(n * n for n in range(1, width + 1)))).astype(np.float32)


def add_deltas(features, order: int = 2, width: int = 2) -> np.ndarray:
    """``[c, delta c, delta^2 c, ...]`` up to ``order`` concatenated along the last axis: float32
    ``[..., frames, (order + 1) * coefficients]`` (order 0: the features unchanged)."""
    if not is_int(order) or order < 0:
        raise ValueError(f"deltas order must be an int >= 0, got {order!r}")
    parts = [np.asarray(features, np.float32)]
    for _ in range(order):
        parts.append(deltas(parts[-1], width))
    return np.concatenate(parts, axis=-1)


def cmvn(features, eps: float = 1e-5) -> np.ndarray:
    """Cepstral mean and variance normalisation of one utterance ``[frames, coefficients]``: each coefficient
    (column) minus its mean over the frames, divided by its standard deviation (+ ``eps``). float32."""
    features = np.asarray(features, np.float32)
    if features.ndim < 2:
        raise ValueError(f"cmvn needs features [..., frames, coefficients], got shape {features.shape}")
    mean = features.mean(axis=-2, keepdims=True)
    return (features - mean) / (features.std(axis=-2, keepdims=True) + np.float32(eps))


def resample(waveform, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) of the last axis, float32.

    The output keeps the input's units (int16 input gives float samples on the int16
    scale); its length is ``ceil(samples * new_rate / orig_rate)``.
    """
    orig_rate = positive_int("orig_rate", orig_rate)
    new_rate = positive_int("new_rate", new_rate)
    waveform = np.asarray(waveform)
    if not (np.issubdtype(waveform.dtype, np.integer) or np.issubdtype(waveform.dtype, np.floating)):
        raise TypeError(f"waveform must have an integer or float dtype, got {waveform.dtype}")
    if waveform.ndim == 0:
        raise ValueError("waveform must have at least one axis")
    if orig_rate == new_rate:
        return waveform.astype(np.float32)
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    out = signal.resample_poly(
        waveform.astype(np.float64), up, down, axis=-1, window=_lowpass_filter(up, down)
    )
    return out.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _lowpass_filter(up: int, down: int) -> np.ndarray:
    """resample_poly's default anti-aliasing FIR (Kaiser, beta 5), designed once per ratio.

    Designing it takes longer than filtering a 1 s clip, hence the cache.
    """
    max_rate = max(up, down)
    taps = signal.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    taps.flags.writeable = False
    return taps


def fit_length(waveform, n: int, *, offset: int = 0) -> np.ndarray:
    """Exactly ``n`` samples along the last axis: shift right by ``offset``, then crop or zero-pad.

    ``offset > 0`` inserts that many zeros before the waveform, ``offset < 0`` drops
    that many leading samples; whatever then exceeds ``n`` is cut from the end and any
    shortfall is zero-padded at the end. The dtype is preserved.
    """
    n = positive_int("n", n)
    if not is_int(offset):
        raise ValueError(f"offset must be an int, got {offset!r}")
    waveform = np.asarray(waveform)
    if waveform.ndim == 0:
        raise ValueError("waveform must have at least one axis")
    out = np.zeros(waveform.shape[:-1] + (n,), dtype=waveform.dtype)
    src_start = max(0, -offset)
    dst_start = max(0, offset)
    count = min(waveform.shape[-1] - src_start, n - dst_start)
    if count > 0:
        out[..., dst_start : dst_start + count] = waveform[..., src_start : src_start + count]
    return out


def standardize(x, eps: float = 1e-5) -> np.ndarray:
    """float32 ``(x - mean(x)) / (std(x) + eps)`` over the whole array, e.g. a per-utterance normalised log-mel."""
    x = np.asarray(x, np.float32)
    return (x - x.mean()) / (x.std() + np.float32(eps))
