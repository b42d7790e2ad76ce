"""Log-mel filterbank features for the student, kaldi-compatible and deterministic.

Settings follow lhotse's `Fbank` / icefall's `kaldifeat` setup so a student trained here sees the same
features as an icefall recipe: 25 ms povey window, 10 ms shift (100 Hz), pre-emphasis 0.97, DC removal,
80 mel bins from 20 Hz to Nyquist-400 Hz, power spectrum, natural-log energies.

Choices that matter for reproducibility:
- dither = 0, so the same audio always gives bit-identical features (kaldi's default dither is random).
- snip_edges = False: frames are centred on multiples of 10 ms and the signal is reflected at the edges, so
  there are exactly `(num_samples + shift // 2) // shift` frames (i.e. round(duration / 10 ms)); this keeps the
  student's frame count proportional to duration, which keeps teacher-label alignment simple.
- Waveform scale: samples in [-1, 1] are fed as they are (lhotse/icefall convention), NOT multiplied by 32768
  like kaldi's int16 input. The two differ only by a constant log(32768**2) ~= 20.8 per bin (apart from the
  1.19e-7 energy floor), and icefall models are trained on the [-1, 1] scale.
"""
from __future__ import annotations

import numpy as np

__all__ = ["compute_fbank", "num_fbank_frames", "FRAME_SHIFT_MS", "FRAME_LENGTH_MS"]

FRAME_SHIFT_MS = 10.0
FRAME_LENGTH_MS = 25.0


def _frame_shift_samples(sample_rate: int) -> int:
    # kaldi: WindowShift() = int(samp_freq * 0.001 * frame_shift_ms)
    return int(sample_rate * 0.001 * FRAME_SHIFT_MS)


def num_fbank_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """Exact number of frames `compute_fbank` returns for `num_samples` samples (snip_edges=False)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    shift = _frame_shift_samples(sample_rate)
    return (int(num_samples) + shift // 2) // shift


def _options(sample_rate: int, num_mel_bins: int):
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
    opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = False
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.mel_opts.num_bins = int(num_mel_bins)
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = -400.0
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    return knf, opts


def compute_fbank(wave: np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 80) -> np.ndarray:
    """Log-mel filterbank [num_fbank_frames(len(wave)), num_mel_bins] float32 of a mono float waveform in [-1, 1]."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"compute_fbank expects a 1-D mono waveform, got array of shape {wave.shape}")
    if not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"compute_fbank expects float samples in [-1, 1], got dtype {wave.dtype} "
                         f"(convert int16 PCM with x / 32768)")
    if sample_rate <= 0 or num_mel_bins <= 0:
        raise ValueError(f"invalid sample_rate={sample_rate} or num_mel_bins={num_mel_bins}")
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise ValueError("compute_fbank: waveform contains NaN or Inf samples")
    n = num_fbank_frames(wave.shape[0], sample_rate)
    out = np.empty((n, num_mel_bins), dtype=np.float32)
    if n == 0:
        return out
    knf, opts = _options(sample_rate, num_mel_bins)
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(float(sample_rate), wave)
    fb.input_finished()
    if fb.num_frames_ready != n:  # would mean kaldi-native-fbank changed its framing rule
        raise RuntimeError(f"kaldi_native_fbank produced {fb.num_frames_ready} frames for {wave.shape[0]} samples, "
                           f"expected {n}")
    for i in range(n):
        out[i] = fb.get_frame(i)  # copies: the returned buffer belongs to the extractor
    return out
