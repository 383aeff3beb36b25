"""Tests for eSpeak NG synthesis (mmjax.data.espeak): voices, determinism, argument errors."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import espeak
from tests.conftest import REPO_ROOT


def test_synthesize_returns_nonsilent_int16_speech():
    wave, rate = espeak.synthesize("seven", voice="en-us", rate=175, pitch=50)
    assert rate == 22050
    assert wave.dtype == np.int16 and wave.ndim == 1
    assert 0.2 * rate < wave.size < 2.0 * rate
    assert np.sqrt(np.mean(wave.astype(np.float64) ** 2)) > 300


def test_different_voices_rates_and_pitches_differ():
    base, _ = espeak.synthesize("three", voice="en-us+m3", rate=175, pitch=50)
    other_voice, _ = espeak.synthesize("three", voice="en+f2", rate=175, pitch=50)
    slower, _ = espeak.synthesize("three", voice="en-us+m3", rate=100, pitch=50)
    higher, _ = espeak.synthesize("three", voice="en-us+m3", rate=175, pitch=90)
    for variant in (other_voice, higher):
        assert not np.array_equal(base, variant)
    assert slower.size > 1.3 * base.size


def test_synthesize_is_a_pure_function_even_for_noisy_voices():
    voice = "en-gb-x-rp+Reed"  # Klatt synthesis with breath noise
    first, _ = espeak.synthesize("four", voice=voice)
    espeak.synthesize("something else entirely", voice="en+whisper", rate=300)
    again, _ = espeak.synthesize("four", voice=voice)
    np.testing.assert_array_equal(first, again)


def test_synthesize_is_identical_in_a_fresh_process():
    code = (
        "import hashlib; from mmjax.data import espeak; "
        "print(hashlib.sha256(espeak.synthesize('eight', voice='en+whisperf', pitch=70)[0].tobytes()).hexdigest())"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    here, _ = espeak.synthesize("eight", voice="en+whisperf", pitch=70)
    assert out.stdout.strip() == hashlib.sha256(here.tobytes()).hexdigest()


def test_available_variants_lists_known_variants():
    variants = espeak.available_variants()
    assert {"m3", "f2", "klatt", "whisper"} <= set(variants)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"voice": "xx-nonexistent"}, ValueError, "xx-nonexistent"),
        ({"voice": "en-us+nosuchvariant"}, ValueError, "nosuchvariant"),
        ({"rate": 20}, ValueError, "rate=20"),
        ({"pitch": 150}, ValueError, "pitch=150"),
        ({"pitch_range": -1}, ValueError, "pitch_range=-1"),
        ({"rate": 175.0}, TypeError, "rate"),
    ],
)
def test_synthesize_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        espeak.synthesize("one", **kwargs)


@pytest.mark.parametrize("text", ["", "   ", None])
def test_synthesize_rejects_empty_text(text):
    with pytest.raises(ValueError, match="text"):
        espeak.synthesize(text)
