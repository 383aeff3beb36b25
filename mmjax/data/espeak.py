"""Offline speech synthesis with eSpeak NG through ctypes.

The shared library and voice data come from the PyPI package ``espeakng-loader``;
a system ``libespeak-ng`` (with its compiled-in data path) is the fallback. Nothing
is downloaded.

:func:`synthesize` is a pure function of its arguments, which the AV-Digits builder
needs for byte-identical rebuilds. eSpeak NG does not give that for free:

* it keeps synthesis state in C statics (pitch-flutter phase, automatic gain
  control, glottal cycle counters) that carry over from one utterance to the next,
  so the same request returns different samples depending on what was said before.
  Each call therefore loads the library, initialises it, speaks and unloads it
  (``dlclose``) again: about 1 ms, plus about 3 ms to load the voice again;
* breathy and Klatt voices draw noise from eSpeak NG's own generator (seeded from
  the clock at start-up) and from the C library's ``rand()``. Both are re-seeded
  before every utterance (``espeak_ng_SetRandSeed`` and ``srand``; the latter
  resets ``rand()`` for the whole process, which nothing in mmjax relies on).

Locating the library happens once per process (a lazy, cached singleton), and a
module-level lock serialises all calls, because the engine is not thread-safe.
"""

from __future__ import annotations

import _ctypes
import ctypes
import ctypes.util
import dataclasses
import functools
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from mmjax.data.core import is_int

__all__ = [
    "DEFAULT_VOICE",
    "EspeakError",
    "PITCH_RANGE",
    "RATE_RANGE",
    "available_variants",
    "synthesize",
]

DEFAULT_VOICE = "en-us"

# eSpeak NG API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_EE_OK = 0
_EE_NOT_FOUND = 2

# Accepted parameter ranges: rate in words per minute (beyond 450 eSpeak NG needs
# libsonic), pitch and pitch range on eSpeak's 0..99 scale.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 99)

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_LOCK = threading.Lock()
_RAND_SEED = 1


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded, initialised, or failed to synthesise."""


@dataclasses.dataclass(frozen=True)
class _Library:
    """Where the shared library and its voice data live."""

    path: str
    data_path: str | None  # None: the library's compiled-in default.


@functools.lru_cache(maxsize=1)
def _library() -> _Library:
    """Locates libespeak-ng once per process: espeakng-loader first, then the system."""
    try:
        import espeakng_loader
    except ImportError:
        espeakng_loader = None
    if espeakng_loader is not None:
        path = espeakng_loader.get_library_path()
        if os.path.exists(path):
            return _Library(path, espeakng_loader.get_data_path())
    system = ctypes.util.find_library("espeak-ng")
    if system is None:
        raise EspeakError(
            "no eSpeak NG library found: install the PyPI package 'espeakng-loader' "
            "or a system libespeak-ng"
        )
    return _Library(system, None)


class _Engine:
    """One freshly loaded and initialised instance of libespeak-ng (see module doc)."""

    def __init__(self, library: _Library):
        self._path = library.path
        self._lib = ctypes.CDLL(library.path)
        self._declare_signatures()
        data = None if library.data_path is None else library.data_path.encode()
        self.sample_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.sample_rate <= 0:
            self.close()
            raise EspeakError(
                f"espeak_Initialize failed (returned {self.sample_rate}) with data path "
                f"{library.data_path!r}"
            )
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._collect)  # must outlive the synthesis
        self._lib.espeak_SetSynthCallback(self._callback)

    def _declare_signatures(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p

    def _seed_noise(self) -> None:
        """Fixes eSpeak NG's and the C library's random sequences before an utterance."""
        set_seed = getattr(self._lib, "espeak_ng_SetRandSeed", None)  # eSpeak NG >= 1.52
        if set_seed is not None:
            set_seed.argtypes = [ctypes.c_long]
            set_seed.restype = None
            set_seed(_RAND_SEED)
        _seed_c_rand()

    def _collect(self, wav, num_samples, events) -> int:
        """Synthesis callback: copies each chunk of samples; returning 0 means go on."""
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def data_path(self) -> str:
        """The voice-data directory the engine actually uses."""
        path = ctypes.c_char_p()
        self._lib.espeak_Info(ctypes.byref(path))
        return (path.value or b"").decode()

    def speak(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """Synthesises ``text`` and returns the int16 samples."""
        status = self._lib.espeak_SetVoiceByName(voice.encode())
        if status == _EE_NOT_FOUND:
            raise ValueError(f"unknown eSpeak NG voice {voice!r} (language part not found)")
        if status != _EE_OK:
            raise EspeakError(f"espeak_SetVoiceByName({voice!r}) failed with status {status}")
        for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
            status = self._lib.espeak_SetParameter(param, value, 0)
            if status != _EE_OK:
                raise EspeakError(f"espeak_SetParameter({param}, {value}) failed with status {status}")
        encoded = text.encode("utf-8")
        self._chunks = []
        self._seed_noise()
        status = self._lib.espeak_Synth(
            encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if status != _EE_OK:
            raise EspeakError(f"espeak_Synth({text!r}) failed with status {status}")
        self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, np.int16)
        return np.concatenate(self._chunks).astype(np.int16, copy=False)

    def close(self) -> None:
        """Terminates and unloads the library so the next engine starts from clean statics."""
        self._lib.espeak_Terminate()
        handle = self._lib._handle
        del self._lib
        (_ctypes.dlclose if hasattr(_ctypes, "dlclose") else _ctypes.FreeLibrary)(handle)
        if _still_loaded(self._path):
            _warn_state_leak(self._path)


@functools.lru_cache(maxsize=1)
def _c_library() -> ctypes.CDLL | None:
    """The C runtime whose ``rand()`` libespeak-ng calls (None where there is none to find)."""
    name = ctypes.util.find_library("c") or ("msvcrt" if os.name == "nt" else None)
    return None if name is None else ctypes.CDLL(name)


def _seed_c_rand() -> None:
    """Resets the C ``rand()`` sequence so noise-using voices are reproducible."""
    libc = _c_library()
    if libc is not None:
        libc.srand(ctypes.c_uint(_RAND_SEED))


def _still_loaded(path: str) -> bool:
    """True if ``path`` stays mapped after our dlclose (someone else holds it open)."""
    if not hasattr(os, "RTLD_NOLOAD"):
        return False
    try:
        probe = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
    except OSError:
        return False
    _ctypes.dlclose(probe._handle)  # the probe took a reference of its own
    return True


@functools.cache
def _warn_state_leak(path: str) -> None:
    warnings.warn(
        f"{path} is also loaded by other code in this process, so it cannot be reset "
        "between utterances; eSpeak NG output may now depend on earlier calls",
        RuntimeWarning,
        stacklevel=4,  # the caller of synthesize()
    )


def _check_int(name: str, value: int, bounds: tuple[int, int]) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name}={value} is outside [{bounds[0]}, {bounds[1]}]")


@functools.lru_cache(maxsize=4)
def _variants_in(data_path: str) -> frozenset[str]:
    """Variant names shipped in an eSpeak NG data directory (``voices/!v``)."""
    directory = Path(data_path) / "voices" / "!v"
    if not directory.is_dir():
        return frozenset()
    return frozenset(p.name for p in directory.iterdir() if p.is_file())


def _check_variant(voice: str, data_path: str) -> None:
    """eSpeak NG silently ignores an unknown ``+variant``; we refuse it instead."""
    if "+" not in voice:
        return
    variant = voice.split("+", 1)[1]
    if variant not in _variants_in(data_path):
        raise ValueError(
            f"unknown eSpeak NG voice variant {variant!r} in voice {voice!r}; "
            "see available_variants()"
        )


def available_variants() -> list[str]:
    """Names usable after ``+`` in a voice (e.g. ``"en-us+m3"``), sorted."""
    with _LOCK:
        engine = _Engine(_library())
        try:
            data_path = engine.data_path()
        finally:
            engine.close()
    return sorted(_variants_in(data_path))


def synthesize(
    text: str,
    *,
    voice: str = DEFAULT_VOICE,
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
) -> tuple[np.ndarray, int]:
    """Speaks ``text`` with eSpeak NG and returns ``(int16 waveform, sample_rate)``.

    Args:
      text: UTF-8 text to speak; must contain a non-space character.
      voice: a language voice such as ``"en-us"``, ``"en"``, ``"en-gb-scotland"``,
        ``"en-029"``, optionally with a variant: ``"en-us+m3"``, ``"en+f2"``.
      rate: speaking rate in words per minute, 80..450.
      pitch: base pitch, 0..99 (50 is the voice's normal pitch).
      pitch_range: intonation range, 0..99 (0 is monotone).

    The result depends only on the arguments (and the eSpeak NG build), see module doc.
    The sample rate is that of the engine, 22050 Hz for the bundled library.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if not isinstance(voice, str) or not voice:
        raise ValueError(f"voice must be a non-empty string, got {voice!r}")
    _check_int("rate", rate, RATE_RANGE)
    _check_int("pitch", pitch, PITCH_RANGE)
    _check_int("pitch_range", pitch_range, PITCH_RANGE)
    with _LOCK:
        engine = _Engine(_library())
        try:
            _check_variant(voice, engine.data_path())
            waveform = engine.speak(text, voice, int(rate), int(pitch), int(pitch_range))
            return waveform, engine.sample_rate
        finally:
            engine.close()
