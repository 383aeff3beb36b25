"""Tests for the numpy audio front end (mmjax.data.audio_features): mel scale, log-mel, resampling, lengths,
standardisation."""

import numpy as np
import pytest

from mmjax.data import audio_features

SR = 8000
N_FFT = 256
HOP = 160
N_MELS = 40


def _tone(freq_hz, seconds=1.0, sample_rate=SR, amplitude=0.5):
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _mel_centres_hz(n_mels=N_MELS, fmin=0.0, fmax=SR / 2):
    mels = np.linspace(audio_features.hz_to_mel(fmin), audio_features.hz_to_mel(fmax), n_mels + 2)
    edges = audio_features.mel_to_hz(mels)
    return edges[1:-1]


def _log_mel(x, **kwargs):
    params = dict(n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS) | kwargs
    return audio_features.log_mel_spectrogram(x, SR, **params)


# --- mel scale and filterbank -------------------------------------------------------


def test_htk_mel_scale_reference_points_and_inverse():
    assert audio_features.hz_to_mel(0.0) == 0.0
    assert audio_features.hz_to_mel(1000.0) == pytest.approx(999.99, abs=0.01)  # HTK: ~1000 mel at 1 kHz
    hz = np.array([0.0, 123.0, 1000.0, 3999.0])
    np.testing.assert_allclose(audio_features.mel_to_hz(audio_features.hz_to_mel(hz)), hz, atol=1e-9)


def test_filterbank_shape_range_and_cache():
    fb = audio_features.mel_filterbank(SR, N_FFT, N_MELS)
    assert fb.shape == (N_FFT // 2 + 1, N_MELS)
    assert fb.dtype == np.float32
    assert fb.min() >= 0.0 and fb.max() <= 1.0
    assert np.all(fb.max(axis=0) > 0.5), "every filter must cover at least one FFT bin well"
    assert audio_features.mel_filterbank(SR, N_FFT, N_MELS) is fb
    with pytest.raises(ValueError):
        fb[0, 0] = 1.0  # shared cached array is read-only


def test_filterbank_respects_band_limits():
    fb = audio_features.mel_filterbank(SR, N_FFT, 20, 300.0, 3000.0)
    bin_hz = np.fft.rfftfreq(N_FFT, 1 / SR)
    assert np.all(fb[bin_hz <= 300.0] == 0.0)
    assert np.all(fb[bin_hz >= 3000.0] == 0.0)


# --- log-mel spectrogram ------------------------------------------------------------


def test_frame_count_and_dtype():
    out = _log_mel(np.zeros(8000, np.float32))
    assert out.shape == (1 + (8000 - N_FFT) // HOP, N_MELS) == (49, 40)
    assert out.dtype == np.float32


@pytest.mark.parametrize("mel_index", [8, 15, 22, 30, 36])
def test_pure_tone_peaks_in_its_mel_bin(mel_index):
    freq = _mel_centres_hz()[mel_index]
    spec = _log_mel(_tone(freq))
    assert np.all(spec.argmax(axis=1) == mel_index)


def test_louder_tone_gives_higher_log_energy_by_the_power_ratio():
    quiet = _log_mel(_tone(1000.0, amplitude=0.1)).max()
    loud = _log_mel(_tone(1000.0, amplitude=0.4)).max()
    assert loud - quiet == pytest.approx(np.log(16.0), abs=1e-3)


def test_silence_hits_the_log_floor():
    out = _log_mel(np.zeros(1000), log_floor=1e-4)
    np.testing.assert_allclose(out, np.log(np.float32(1e-4)))


def test_int16_input_is_scaled_to_unit_range():
    x = _tone(700.0)
    as_int = np.round(x * 32768).astype(np.int16)
    np.testing.assert_allclose(_log_mel(as_int), _log_mel(as_int.astype(np.float32) / 32768), rtol=1e-6)


def test_batch_axes_are_kept():
    batch = np.stack([_tone(500.0), _tone(1500.0), np.zeros(8000, np.float32)])
    out = _log_mel(batch.reshape(3, 1, 8000))
    assert out.shape == (3, 1, 49, 40)
    np.testing.assert_allclose(out[1, 0], _log_mel(batch[1]), rtol=1e-6)


@pytest.mark.parametrize(
    "waveform, kwargs, match",
    [
        (np.zeros(100), {}, "shorter than one frame"),
        (np.zeros(8000), {"n_fft": 0}, "n_fft"),
        (np.zeros(8000), {"hop_length": 2.5}, "hop_length"),
        (np.zeros(8000), {"n_mels": -1}, "n_mels"),
        (np.zeros(8000), {"fmax": 5000.0}, "fmax=5000"),
        (np.zeros(8000), {"fmin": 3000.0, "fmax": 2000.0}, "fmin=3000"),
        (np.zeros(8000), {"log_floor": 0.0}, "log_floor"),
    ],
)
def test_log_mel_argument_errors(waveform, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _log_mel(waveform, **kwargs)


def test_log_mel_rejects_non_numeric_audio():
    with pytest.raises(TypeError, match="dtype"):
        _log_mel(np.array(["a"] * 300))


# --- resample and fit_length -----------------------------------------------------------


def test_resample_length_and_tone_frequency():
    x = _tone(440.0, seconds=0.5, sample_rate=22050)
    y = audio_features.resample(x, 22050, SR)
    assert y.dtype == np.float32
    assert y.shape == (int(np.ceil(x.size * SR / 22050)),)
    spectrum = np.abs(np.fft.rfft(y))
    assert np.fft.rfftfreq(y.size, 1 / SR)[spectrum.argmax()] == pytest.approx(440.0, abs=4.0)


def test_resample_matches_scipy_default_filter():
    from scipy import signal

    x = np.random.default_rng(0).standard_normal(5000)
    expected = signal.resample_poly(x, 160, 441).astype(np.float32)
    np.testing.assert_array_equal(audio_features.resample(x, 22050, SR), expected)


def test_resample_same_rate_and_int_input_keep_units():
    x = np.array([0, 1000, -1000, 32767], np.int16)
    np.testing.assert_array_equal(audio_features.resample(x, SR, SR), x.astype(np.float32))
    assert np.abs(audio_features.resample(np.full(4000, 1000, np.int16), 16000, SR)[200:-200] - 1000).max() < 5


@pytest.mark.parametrize("rates", [(0, 8000), (8000, -1), (8000.0, 16000)])
def test_resample_rejects_bad_rates(rates):
    with pytest.raises(ValueError, match="rate"):
        audio_features.resample(np.zeros(10), *rates)


def test_fit_length_pads_crops_and_shifts():
    x = np.arange(1, 6, dtype=np.int16)
    np.testing.assert_array_equal(audio_features.fit_length(x, 8), [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(audio_features.fit_length(x, 3), [1, 2, 3])
    np.testing.assert_array_equal(audio_features.fit_length(x, 8, offset=2), [0, 0, 1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(audio_features.fit_length(x, 4, offset=-2), [3, 4, 5, 0])
    np.testing.assert_array_equal(audio_features.fit_length(x, 3, offset=10), [0, 0, 0])
    assert audio_features.fit_length(x, 8).dtype == np.int16
    assert audio_features.fit_length(np.ones((2, 3)), 5).shape == (2, 5)


@pytest.mark.parametrize("n, offset", [(0, 0), (5, 1.5)])
def test_fit_length_errors(n, offset):
    with pytest.raises(ValueError):
        audio_features.fit_length(np.ones(3), n, offset=offset)


# --- standardize and the window ----------------------------------------------------------


def test_standardize_gives_float32_with_zero_mean_and_unit_std():
    x = np.arange(12, dtype=np.int16).reshape(3, 4)
    out = audio_features.standardize(x)
    assert out.dtype == np.float32 and out.shape == (3, 4)
    assert abs(float(out.mean())) < 1e-6 and abs(float(out.std()) - 1.0) < 1e-4
    np.testing.assert_array_equal(audio_features.standardize(np.ones(5)), np.zeros(5))  # eps: no division by 0.


def test_hann_window_is_periodic_cached_and_read_only():
    window = audio_features.hann_window(8)
    assert window is audio_features.hann_window(8) and window.dtype == np.float32 and not window.flags.writeable
    np.testing.assert_allclose(window, 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(8) / 8), atol=1e-7)


# --- MFCC, deltas, CMVN: against python_speech_features (HTK conventions) ----------------------


def _known_signal():
    """A 440 Hz tone plus a 200 -> 3000 Hz chirp and a little seeded noise: energy in every mel band."""
    t = np.arange(SR) / SR
    chirp = np.sin(2 * np.pi * (200 * t + 1400 * t**2))
    noise = np.random.default_rng(0).normal(scale=0.01, size=SR)
    return (0.4 * np.sin(2 * np.pi * 440 * t) + 0.3 * chirp + noise).astype(np.float64)


def test_cepstrum_matches_python_speech_features_mfcc():
    psf = pytest.importorskip("python_speech_features")
    from scipy.signal import get_window

    signal = _known_signal()
    options = dict(samplerate=SR, winlen=N_FFT / SR, winstep=HOP / SR, nfilt=N_MELS, nfft=N_FFT, lowfreq=0,
                   highfreq=SR / 2, preemph=0.0, winfunc=lambda n: get_window("hann", n, fftbins=True))
    # Its filterbank energies (its own integer-bin triangles), through our DCT and lifter, give its MFCCs.
    energies, _ = psf.fbank(signal, **options)
    for lifter in (0, 22):
        reference = psf.mfcc(signal, numcep=13, ceplifter=lifter, appendEnergy=False, **options)
        ours = audio_features.cepstrum(np.log(energies), n_mfcc=13, lifter=lifter)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(audio_features.cepstrum(np.log(energies), 13, 22),
                               psf.base.lifter(audio_features.cepstrum(np.log(energies), 13), 22), rtol=1e-5)


def test_deltas_match_python_speech_features_and_stack_in_order():
    psf = pytest.importorskip("python_speech_features")
    features = audio_features.mfcc(_known_signal(), SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, n_mfcc=13)
    for width in (1, 2, 3):
        np.testing.assert_allclose(audio_features.deltas(features, width), psf.delta(features, width), rtol=1e-4,
                                   atol=1e-5)
    stacked = audio_features.add_deltas(features, order=2)
    assert stacked.shape == (features.shape[0], 39)
    np.testing.assert_array_equal(stacked[:, :13], features)
    np.testing.assert_allclose(stacked[:, 26:], psf.delta(psf.delta(features, 2), 2), rtol=1e-4, atol=1e-5)


def test_mfcc_is_the_orthonormal_dct_of_the_log_mel_spectrogram():
    signal = _known_signal().astype(np.float32)
    log_mel = _log_mel(signal)
    cepstra = audio_features.mfcc(signal, SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, n_mfcc=20)
    assert cepstra.shape == (log_mel.shape[0], 20) and cepstra.dtype == np.float32
    m = np.arange(N_MELS)
    for n in (0, 1, 7, 19):  # The formula of the docstring, by hand.
        basis = np.sqrt((2 - (n == 0)) / N_MELS) * np.cos(np.pi * n * (m + 0.5) / N_MELS)
        np.testing.assert_allclose(cepstra[:, n], log_mel.astype(np.float64) @ basis, rtol=1e-4, atol=1e-4)
    flat = audio_features.cepstrum(np.full((3, N_MELS), -2.0), n_mfcc=5)  # Constant energies: only c_0.
    np.testing.assert_allclose(flat, [[-2.0 * np.sqrt(N_MELS), 0, 0, 0, 0]] * 3, atol=1e-5)
    with pytest.raises(ValueError, match="n_mels >= n_mfcc=41"):
        audio_features.cepstrum(log_mel, n_mfcc=41)


def test_cmvn_standardises_each_coefficient_over_the_frames():
    features = np.random.default_rng(0).normal(loc=[5.0, -3.0], scale=[2.0, 0.1], size=(50, 2))
    normalised = audio_features.cmvn(features)
    np.testing.assert_allclose(normalised.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(normalised.std(0), 1, atol=1e-3)


def test_av_digits_preprocess_gives_mfcc_features_on_request():
    from mmjax.data.av_digits import AvDigitsPreprocess

    example = {"image": np.zeros((8, 8, 1), np.uint8), "label": 3,
               "audio": (_known_signal() * 10000).astype(np.int16)}
    log_mel = AvDigitsPreprocess(SR, N_FFT, HOP, N_MELS)(example)["audio"]
    mfcc = AvDigitsPreprocess(SR, N_FFT, HOP, N_MELS, features="mfcc", n_mfcc=13, deltas=2)(example)["audio"]
    assert log_mel.shape == (49, N_MELS) and mfcc.shape == (49, 39)
    expected = audio_features.cmvn(audio_features.add_deltas(audio_features.cepstrum(
        _log_mel(example["audio"].astype(np.float32) / 32768.0), 13), 2))
    np.testing.assert_allclose(mfcc, expected, rtol=1e-5, atol=1e-5)
