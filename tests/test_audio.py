"""Audio reading: segments, channels, resampling quality and exact lengths, and every error case."""
import pickle

import numpy as np
import pytest
import soundfile as sf

from distill.data.audio import AudioError, probe_utterance, read_audio, resample
from distill.data.manifest import Utterance, resampled_length


def _sine(freq, sr, n, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def _write(path, data, sr, subtype="FLOAT", fmt=None):
    sf.write(str(path), data, sr, subtype=subtype, format=fmt)
    return str(path)


def _peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def test_reads_file_and_segment_exactly(tmp_path):
    x = np.random.default_rng(1).uniform(-0.9, 0.9, 16000).astype(np.float32)
    p = _write(tmp_path / "a.wav", x, 16000)
    np.testing.assert_array_equal(read_audio(Utterance(id="a", audio=p), 16000), x)
    seg = Utterance(id="s", audio=p, sample_rate=16000, offset=0.25, duration=0.5)
    out = read_audio(seg, 16000)
    assert out.dtype == np.float32 and len(out) == seg.num_samples_at(16000) == 8000
    np.testing.assert_array_equal(out, x[4000:12000])


def test_flac_and_channels(tmp_path):
    left, right = _sine(300, 16000, 8000), _sine(1000, 16000, 8000, amp=0.25)
    p = _write(tmp_path / "st.flac", np.stack([left, right], 1), 16000, subtype="PCM_16")
    r = read_audio(Utterance(id="r", audio=p, channel=1), 16000)
    np.testing.assert_allclose(r, right, atol=1 / 32768)
    mix = read_audio(Utterance(id="m", audio=p, channel=None), 16000)
    np.testing.assert_allclose(mix, (left + right) / 2, atol=1 / 32768)
    with pytest.raises(AudioError, match="channel 2 requested but the file has 2 channel"):
        read_audio(Utterance(id="c", audio=p, channel=2), 16000)


def test_resample_22050_to_16000_keeps_frequency_and_length(tmp_path):
    n = 22050 * 2 + 7
    p = _write(tmp_path / "s.wav", _sine(440, 22050, n), 22050)
    utt = probe_utterance(Utterance(id="s", audio=p))
    out = read_audio(utt, 16000)
    assert len(out) == utt.num_samples_at(16000) == resampled_length(n, 22050, 16000) == 32006
    assert abs(_peak_hz(out, 16000) - 440) <= 16000 / len(out)
    # amplitude preserved away from the edges
    assert abs(np.abs(out[1000:-1000]).max() - 0.5) < 0.01
    # matches an ideally sampled 440 Hz sine at 16 kHz
    ideal = _sine(440, 16000, len(out))
    assert np.abs(out[200:-200] - ideal[200:-200]).max() < 2e-3


def test_resampler_filters_aliases_and_keeps_dc():
    sr, n = 22050, 22050
    # above the new Nyquist (8 kHz) content must be removed, not folded back below 8 kHz
    for f in (8500, 9000, 10000):
        y = resample(_sine(f, sr, n), sr, 16000)
        assert np.abs(y[500:-500]).max() < 1e-3, f
    # speech band passes unchanged in amplitude
    for f in (100, 3000, 6000):
        y = resample(_sine(f, sr, n), sr, 16000)
        assert abs(np.abs(y[500:-500]).max() - 0.5) < 0.005, f
    y = resample(np.full(n, 0.3, np.float32), sr, 16000)
    np.testing.assert_allclose(y[500:-500], 0.3, atol=1e-4)
    for m, a, b in [(1, 48000, 16000), (5, 11025, 16000), (4801, 48000, 16000), (999, 16000, 24000)]:
        assert len(resample(np.zeros(m), a, b)) == resampled_length(m, a, b)


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_other_rates_to_16k(tmp_path, rate):
    n = rate // 2 + 3
    p = _write(tmp_path / "x.wav", _sine(1000, rate, n), rate)
    utt = Utterance(id="x", audio=p, sample_rate=rate, num_samples=n)
    out = read_audio(utt, 16000)
    assert len(out) == utt.num_samples_at(16000)
    assert abs(_peak_hz(out, 16000) - 1000) <= 2 * 16000 / len(out)


def test_errors_name_utterance_and_file(tmp_path):
    missing = str(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match=r"utterance 'm' \(file .*nope\.wav\): audio file not found") as ei:
        read_audio(Utterance(id="m", audio=missing), 16000)
    assert (ei.value.utt_id, ei.value.path) == ("m", missing)

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError, match="unreadable or corrupt"):
        read_audio(Utterance(id="c", audio=str(corrupt)), 16000)

    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty audio file \(0 bytes\)"):
        read_audio(Utterance(id="z", audio=str(zero)), 16000)

    empty = _write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty audio \(0 samples\)"):
        read_audio(Utterance(id="e", audio=empty), 16000)

    x = _sine(440, 16000, 1600)
    x[100] = np.nan
    nan = _write(tmp_path / "nan.wav", x, 16000)
    with pytest.raises(AudioError, match="1 NaN/Inf"):
        read_audio(Utterance(id="n", audio=nan), 16000)

    ok = _write(tmp_path / "ok.wav", _sine(440, 16000, 1600), 16000)
    with pytest.raises(AudioError, match="too short: 1600 samples at 16000 Hz < minimum 1601"):
        read_audio(Utterance(id="s", audio=ok), 16000, min_samples=1601)
    assert len(read_audio(Utterance(id="s", audio=ok), 16000, min_samples=1600)) == 1600
    with pytest.raises(AudioError, match="file is 16000 Hz, manifest says 8000 Hz"):
        read_audio(Utterance(id="r", audio=ok, sample_rate=8000), 16000)
    with pytest.raises(AudioError, match="past the end"):
        read_audio(Utterance(id="o", audio=ok, offset=0.2), 16000)
    with pytest.raises(AudioError, match="truncated"):
        read_audio(Utterance(id="t", audio=ok, sample_rate=16000, num_samples=3200), 16000)


def test_small_header_mismatch_is_padded(tmp_path):
    p = _write(tmp_path / "a.wav", _sine(440, 16000, 1600), 16000)
    out = read_audio(Utterance(id="a", audio=p, sample_rate=16000, num_samples=1610), 16000)
    assert len(out) == 1610 and out[-1] == out[1599]


def test_audio_error_pickles():
    e = pickle.loads(pickle.dumps(AudioError("u1", "broken", "/x.wav")))
    assert (e.utt_id, e.reason, e.path, str(e)) == ("u1", "broken", "/x.wav", "utterance 'u1' (file /x.wav): broken")


def test_read_from_s3(tmp_path, s3_bucket):
    import fsspec

    url, so = s3_bucket
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 22050).astype(np.float32)
    local = _write(tmp_path / "a.flac", x, 22050, subtype="PCM_24")
    with open(local, "rb") as src, fsspec.open(f"{url}/a.flac", "wb", **so) as dst:
        dst.write(src.read())
    utt = Utterance(id="a", audio=f"{url}/a.flac", sample_rate=22050, offset=0.5, duration=0.25)
    np.testing.assert_array_equal(read_audio(utt, 22050, storage_options=so),
                                  read_audio(Utterance(id="a", audio=local, offset=0.5, duration=0.25), 22050))
    # 0.25 s at 22050 Hz is 5513 samples (half up), which resample to ceil(5513 * 320 / 441) = 4001
    assert len(read_audio(utt, 16000, storage_options=so)) == utt.num_samples_at(16000) == 4001
    with pytest.raises(AudioError, match="not found"):
        read_audio(Utterance(id="m", audio=f"{url}/missing.flac"), 16000, storage_options=so)
