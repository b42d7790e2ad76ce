import math

import numpy as np
import pytest

from distill.data.fbank import compute_fbank, num_fbank_frames


def _mel(f):
    return 1127.0 * math.log(1.0 + f / 700.0)


@pytest.mark.parametrize("sr", [16000, 8000])
def test_frame_count_formula_matches_output(sr):
    rng = np.random.default_rng(0)
    shift = sr // 100
    lengths = [0, 1, shift // 2 - 1, shift // 2, shift - 1, shift, shift + 1, 3 * shift // 2, 399, 400, 401]
    lengths += list(rng.integers(0, 3 * sr, size=20))
    for n in lengths:
        wave = (rng.standard_normal(int(n)) * 0.1).astype(np.float32)
        feats = compute_fbank(wave, sample_rate=sr)
        assert feats.shape == (num_fbank_frames(int(n), sr), 80), n
        assert feats.dtype == np.float32
    # snip_edges=False: frame count is duration / 10 ms rounded
    assert num_fbank_frames(16000) == 100
    assert num_fbank_frames(16079) == 100 and num_fbank_frames(16080) == 101


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_pure_tone_peaks_in_expected_mel_bin(freq):
    sr, bins = 16000, 80
    t = np.arange(sr) / sr
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    feats = compute_fbank(wave, sr, bins)
    lo, hi = _mel(20.0), _mel(sr / 2 - 400.0)
    delta = (hi - lo) / (bins + 1)
    expected = (_mel(freq) - lo) / delta - 1  # bin i is centred at lo + (i + 1) * delta
    peak = int(feats[10:-10].mean(0).argmax())
    assert abs(peak - expected) <= 1.0, (peak, expected)
    # energy far from the tone is much lower than at the peak
    far = feats[10:-10].mean(0)[int(expected) + 15 if expected < 50 else int(expected) - 15]
    assert feats[10:-10].mean(0)[peak] - far > 5.0


def test_deterministic_and_scale_convention():
    rng = np.random.default_rng(1)
    wave = (rng.standard_normal(12345) * 0.05).astype(np.float32)
    a, b = compute_fbank(wave), compute_fbank(wave.copy())
    np.testing.assert_array_equal(a, b)  # dither 0
    # samples are used on the [-1, 1] scale: x32768 shifts every bin by log(32768^2) (power spectrum)
    c = compute_fbank(wave * 32768.0)
    np.testing.assert_allclose(c - a, 2 * math.log(32768.0), atol=1e-2)


def test_bad_input_is_refused_with_clear_error():
    with pytest.raises(ValueError, match="1-D"):
        compute_fbank(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        compute_fbank(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="NaN"):
        compute_fbank(np.full(1000, np.nan, np.float32))
    with pytest.raises(ValueError):
        num_fbank_frames(-1)
