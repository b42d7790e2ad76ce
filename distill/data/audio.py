"""Read one utterance as float32 mono at the teacher's rate, with errors that name the utterance and file.

Audio goes through fsspec so local disks, S3 and GCS work alike; resampling is a polyphase Kaiser-windowed sinc
filter in numpy (no scipy/torchaudio needed) aligned like scipy.signal.resample_poly, and the output length is
exactly `Utterance.num_samples_at(rate)` (ceil(n * to / from)) so frame counts are known before audio is read.

Storage faults are of two kinds. Transient ones (timeouts, connection resets, HTTP 429/5xx such as S3's 503
SlowDown; `is_transient_io_error`) are retried with jittered exponential backoff, a bounded number of times, before
the utterance is declared failed; everything else (missing, corrupt, empty, wrong format, permissions) fails at
once. A fault raised while libsndfile reads through fsspec would otherwise be swallowed by soundfile's callbacks
and look like a truncated or corrupt file, so reads go through `_FaultRecorder`, which keeps the real exception.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import fsspec
import numpy as np
import soundfile as sf

from ci_store.fsio import is_transient
from distill.data.manifest import Utterance, compute_num_samples, resampled_length

__all__ = ["AudioError", "read_audio", "resample", "probe_utterance", "probe_missing", "is_transient_io_error",
           "IO_ATTEMPTS", "IO_BACKOFF_SECONDS"]

# Same default as lhotse (LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE): headers are sometimes a few ms off.
DURATION_TOLERANCE_S = 0.025
# Reads of one utterance on transient storage faults, and the first retry's delay ceiling (doubling up to
# IO_BACKOFF_MAX_SECONDS, full jitter): 5 attempts wait ~7 s at most, enough to ride out an S3 throttle burst.
IO_ATTEMPTS, IO_BACKOFF_SECONDS, IO_BACKOFF_MAX_SECONDS = 5, 0.5, 8.0


class AudioError(Exception):
    """An utterance's audio cannot be used; `.utt_id`, `.reason` and `.path` say which and why. `.transient` is
    True for a storage fault that another attempt may not meet (the reason then says how many attempts failed)."""

    def __init__(self, utt_id: str, reason: str, path: str | None = None, transient: bool = False):
        self.utt_id, self.reason, self.path, self.transient = utt_id, reason, path, transient
        where = f" (file {path})" if path else ""
        super().__init__(f"utterance {utt_id!r}{where}: {reason}")

    def __reduce__(self):  # keep all fields across process boundaries (Dask workers pickle exceptions)
        return (type(self), (self.utt_id, self.reason, self.path, self.transient))


# ------------------------------------------------------------------------------------ transient storage faults

def is_transient_io_error(exc: BaseException) -> bool:
    """True when reading again later may succeed (timeouts, resets, HTTP 408/429/5xx, S3 SlowDown, socket errnos,
    botocore/aiohttp connection errors, anywhere in the cause chain). The store's classification, so audio reads
    and store I/O agree on what is worth a retry: ci_store.fsio.is_transient."""
    return is_transient(exc)


def _io_error(utt: Utterance, what: str, e: BaseException) -> AudioError:
    """AudioError for a storage fault, marked transient or not by is_transient_io_error."""
    transient = is_transient_io_error(e)
    kind = "transient storage error" if transient else "I/O error"
    return AudioError(utt.id, f"{what}: {kind} ({type(e).__name__}: {e})", utt.audio, transient=transient)


def with_io_retries(fn: Callable[[], object], utt: Utterance, *, attempts: int = IO_ATTEMPTS,
                    backoff: float = IO_BACKOFF_SECONDS, on_retry: Callable[[AudioError, int, float], None] | None
                    = None, sleep: Callable[[float], None] = time.sleep):
    """fn() with transient AudioErrors retried: up to `attempts` calls, waiting a random time in
    [0, min(IO_BACKOFF_MAX_SECONDS, backoff * 2**k)] before retry k+1 (full jitter, so workers throttled together
    do not retry together). Permanent errors raise at once; the last transient one raises with its reason saying
    how many attempts failed. on_retry(error, attempt, delay) is called before each wait."""
    attempts = max(1, int(attempts))
    for k in range(attempts):
        try:
            return fn()
        except AudioError as e:
            if not e.transient:
                raise
            if k == attempts - 1:
                raise AudioError(e.utt_id, f"{e.reason}; still failing after {attempts} attempts", e.path,
                                 transient=True) from None
            delay = random.uniform(0.0, min(IO_BACKOFF_MAX_SECONDS, backoff * (2 ** k)))
            if on_retry is not None:
                on_retry(e, k + 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


class _FaultRecorder(io.RawIOBase):
    """A read-only file wrapper for soundfile that keeps the first I/O exception of the underlying file.

    soundfile calls read/seek from C callbacks that swallow Python exceptions (a connection reset mid-read would
    surface as a short read, i.e. a "truncated" or "corrupt" file); here the exception is stored and the read
    reports end of file, and open_sound/read_audio raise the stored exception's AudioError instead."""

    def __init__(self, f):
        super().__init__()
        self._f, self.error = f, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.error is not None:
            return 0
        try:
            data = self._f.read(len(buf))
        except Exception as e:  # noqa: BLE001 - kept and re-raised as an AudioError by the caller
            self.error = e
            return 0
        n = len(data)
        buf[:n] = data
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        if self.error is None:
            try:
                return self._f.seek(offset, whence)
            except Exception as e:  # noqa: BLE001
                self.error = e
        return self.tell()

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()


def _sf_reason(e: Exception, f) -> str:
    """libsndfile's own words, without soundfile's "Error opening <file object repr>: " prefix (the AudioError
    already names the manifest's path; the repr of an fsspec file object names nothing useful)."""
    if isinstance(e, sf.LibsndfileError):
        return e.error_string.strip()
    return str(e).replace(repr(f), "file")


@contextmanager
def open_sound(utt: Utterance, storage_options: dict | None = None) -> Iterator[sf.SoundFile]:
    """Open the utterance's file through fsspec as a soundfile.SoundFile; open failures become AudioError
    (`.transient` set for storage faults worth retrying, see is_transient_io_error)."""
    with _open_sound(utt, storage_options) as (snd, _):
        yield snd


@contextmanager
def _open_sound(utt: Utterance, storage_options: dict | None) -> Iterator[tuple[sf.SoundFile, _FaultRecorder]]:
    """open_sound, also yielding the file's _FaultRecorder (read_audio checks it after reading)."""
    try:
        if "::" in utt.audio:  # a member of an archive (Lhotse Shar: tar://ID.flac::SHARD.tar): read it whole
            fs, member = fsspec.core.url_to_fs(utt.audio, **(storage_options or {}))
            f = io.BytesIO(fs.cat_file(member))
        else:
            f = fsspec.open(utt.audio, "rb", **(storage_options or {})).open()
    except FileNotFoundError:
        raise AudioError(utt.id, "audio file not found", utt.audio) from None
    except Exception as e:  # permissions, directories, bad URLs: fatal; timeouts, resets, 5xx: transient
        raise _io_error(utt, "cannot open audio file", e) from None
    f = _FaultRecorder(f)
    try:
        try:
            snd = sf.SoundFile(f)
        except Exception as e:  # LibsndfileError (a RuntimeError) for corrupt/unknown formats
            if f.error is not None:  # the storage failed under libsndfile: not the file's fault
                raise _io_error(utt, "reading the audio header failed", f.error) from None
            size = None
            try:
                f.seek(0, 2)
                size = f.tell()
            except Exception:
                pass
            if size == 0:
                raise AudioError(utt.id, "empty audio file (0 bytes)", utt.audio) from None
            raise AudioError(utt.id, f"unreadable or corrupt audio ({_sf_reason(e, f)})", utt.audio) from None
        with snd:
            yield snd, f
            if f.error is not None:
                raise _io_error(utt, "reading the audio failed", f.error)
    finally:
        f.close()


# Kaiser-windowed sinc: 32 zero crossings per side, beta 8, cutoff at 0.93 x the lower Nyquist. Measured for
# 22.05 -> 16 kHz: flat to 6.5 kHz, -0.2 dB at 7 kHz, >= 84 dB rejection of everything above 8 kHz (no aliasing).
ZERO_CROSSINGS, KAISER_BETA, ROLLOFF = 32, 8.0, 0.93


@functools.lru_cache(maxsize=32)
def _polyphase_bank(up: int, down: int) -> tuple[np.ndarray, int]:
    """The anti-aliasing low-pass at the up-sampled rate, split into `up` phases: bank[p, m + lim] = h(p + m*up),
    so that y[n] = sum_m x[n*down // up - m] * bank[(n*down) % up, m + lim]."""
    max_rate = max(up, down)
    half = ZERO_CROSSINGS * max_rate
    taps = np.arange(-half, half + 1, dtype=np.float64)
    cutoff = ROLLOFF / max_rate
    h = cutoff * np.sinc(cutoff * taps) * np.kaiser(2 * half + 1, KAISER_BETA)
    h = h / h.sum() * up
    lim = half // up + 1
    m = np.arange(-lim, lim + 1)
    idx = np.arange(up)[:, None] + m[None, :] * up  # offset from the filter centre
    bank = np.where(np.abs(idx) <= half, h[np.clip(idx + half, 0, 2 * half)], 0.0)
    return bank.astype(np.float32), lim


def resample(x: np.ndarray, from_rate: int, to_rate: int, *, block: int = 8192) -> np.ndarray:
    """Band-limited resampling of a 1-D signal; returns ceil(len(x) * to_rate / from_rate) samples (float32)."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"resample expects a 1-D signal, got shape {x.shape}")
    if from_rate == to_rate:
        return x.astype(np.float32, copy=False)
    g = math.gcd(int(from_rate), int(to_rate))
    up, down = int(to_rate) // g, int(from_rate) // g
    n_out = resampled_length(len(x), from_rate, to_rate)
    bank, lim = _polyphase_bank(up, down)
    xp = np.concatenate([np.zeros(lim + 1, np.float32), x.astype(np.float32), np.zeros(lim + 2, np.float32)])
    m = np.arange(-lim, lim + 1)
    y = np.empty(n_out, dtype=np.float32)
    for s in range(0, n_out, block):
        t = np.arange(s, min(s + block, n_out), dtype=np.int64) * down
        k0, phase = t // up, t % up
        gathered = xp[(k0[:, None] - m[None, :]) + lim + 1]
        y[s:s + len(t)] = np.einsum("nm,nm->n", gathered, bank[phase])
    return y


def read_audio(utt: Utterance, target_rate: int, storage_options: dict | None = None, *,
               min_samples: int = 1, duration_tolerance: float = DURATION_TOLERANCE_S,
               attempts: int = IO_ATTEMPTS, backoff: float = IO_BACKOFF_SECONDS,
               on_retry: Callable[[AudioError, int, float], None] | None = None) -> np.ndarray:
    """The utterance's samples as float32 mono at `target_rate`, exactly `utt.num_samples_at(target_rate)` long
    (or, when the manifest has no length, the rest of the file from `offset`).

    Raises AudioError for: missing/unreadable/corrupt/empty files, a file rate different from the manifest's,
    a segment past the end of the file or more than `duration_tolerance` seconds short, a missing channel,
    NaN/Inf samples, and results shorter than `min_samples` (counted at `target_rate`). Transient storage faults
    are retried first (`attempts` reads in all, backoff as in with_io_retries); the others raise at once.
    """
    return with_io_retries(lambda: _read_audio_once(utt, int(target_rate), storage_options, min_samples,
                                                    duration_tolerance),
                           utt, attempts=attempts, backoff=backoff, on_retry=on_retry)


def _read_audio_once(utt: Utterance, target_rate: int, storage_options: dict | None, min_samples: int,
                     duration_tolerance: float) -> np.ndarray:
    if utt.lhotse_cut is not None:
        mono, sr, want = _render_lhotse_cut(utt), int(utt.sample_rate), int(utt.num_samples)
        return _finish(utt, mono, sr, want, target_rate, min_samples)
    with _open_sound(utt, storage_options) as (snd, recorder):
        sr, frames, channels = int(snd.samplerate), int(snd.frames), int(snd.channels)
        if utt.sample_rate is not None and utt.sample_rate != sr:
            raise AudioError(utt.id, f"sample rate mismatch: file is {sr} Hz, manifest says {utt.sample_rate} Hz",
                             utt.audio)
        if frames <= 0:
            raise AudioError(utt.id, "empty audio (0 samples)", utt.audio)
        if utt.channel is not None and not 0 <= utt.channel < channels:
            raise AudioError(utt.id, f"channel {utt.channel} requested but the file has {channels} channel(s)",
                             utt.audio)
        start = compute_num_samples(utt.offset, sr)
        if utt.num_samples is not None:
            want = int(utt.num_samples)
        elif utt.duration is not None:
            want = compute_num_samples(utt.duration, sr)
        else:
            want = max(frames - start, 0)
        if start >= frames:
            raise AudioError(utt.id, f"offset {utt.offset}s is past the end of the file ({frames / sr:.3f}s)",
                             utt.audio)
        if want <= 0:
            raise AudioError(utt.id, "empty audio (segment has 0 samples)", utt.audio)
        try:
            snd.seek(start)
            data = snd.read(want, dtype="float32", always_2d=True)
        except Exception as e:
            if recorder.error is not None:
                raise _io_error(utt, "reading the audio failed", recorder.error) from None
            raise AudioError(utt.id, f"decoding failed ({_sf_reason(e, snd)})", utt.audio) from None
        if recorder.error is not None:  # a short read because the storage failed, not a truncated file
            raise _io_error(utt, "reading the audio failed", recorder.error)
    short = want - data.shape[0]
    if short > 0:
        if data.shape[0] == 0:
            raise AudioError(utt.id, "empty audio (nothing could be read)", utt.audio)
        if short > duration_tolerance * sr:
            raise AudioError(utt.id, f"audio truncated: expected {want} samples from {start}, file gave "
                                     f"{data.shape[0]} ({short / sr:.3f}s short)", utt.audio)
        data = np.pad(data, ((0, short), (0, 0)), mode="edge")  # lhotse-style tolerance for header rounding
    mono = data[:, utt.channel] if utt.channel is not None else data.mean(axis=1, dtype=np.float64)
    return _finish(utt, mono, sr, want, target_rate, min_samples)


def _render_lhotse_cut(utt: Utterance) -> np.ndarray:
    """What lhotse plays for the cut (speed/tempo/volume transforms applied, tracks mixed), downmixed to mono."""
    from lhotse.serialization import deserialize_item

    try:
        audio = deserialize_item(utt.lhotse_cut).load_audio()
    except Exception as e:  # missing files, unreadable sources, unsupported transforms; or a storage fault
        raise AudioError(utt.id, f"lhotse could not load the cut's audio ({type(e).__name__}: {e})",
                         utt.audio, transient=is_transient_io_error(e)) from None
    audio = np.asarray(audio, dtype=np.float32).reshape(-1, np.shape(audio)[-1])
    if audio.shape[-1] != utt.num_samples:
        raise AudioError(utt.id, f"lhotse rendered {audio.shape[-1]} samples, the cut says {utt.num_samples}",
                         utt.audio)
    return audio[0] if audio.shape[0] == 1 else audio.mean(axis=0, dtype=np.float64)


def _finish(utt: Utterance, mono: np.ndarray, sr: int, want: int, target_rate: int, min_samples: int) -> np.ndarray:
    """Checks shared by both readers, then resampling to exactly `resampled_length(want)` samples."""
    if not np.isfinite(mono).all():
        bad = int(np.count_nonzero(~np.isfinite(mono)))
        raise AudioError(utt.id, f"audio contains {bad} NaN/Inf sample(s)", utt.audio)
    out = resample(mono, sr, target_rate)
    n = resampled_length(want, sr, target_rate)
    if len(out) != n:  # cannot happen with our resampler, kept as a guard on the documented contract
        out = out[:n] if len(out) > n else np.pad(out, (0, n - len(out)), mode="edge")
    if n < min_samples:
        raise AudioError(utt.id, f"audio too short: {n} samples at {target_rate} Hz < minimum {min_samples}",
                         utt.audio)
    return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- probing

def probe_utterance(utt: Utterance, storage_options: dict | None = None, *, attempts: int = IO_ATTEMPTS,
                    backoff: float = IO_BACKOFF_SECONDS) -> Utterance:
    """Fill sample_rate/num_samples/duration from the file header (soundfile.info) when the manifest lacks them.

    Pure function of one utterance, so callers can map it over workers. Raises AudioError on unreadable files
    (after retrying transient storage faults, as read_audio does: a throttled header read must not plan the
    utterance as empty).
    """
    if utt.sample_rate is not None and utt.num_samples is not None and utt.duration is not None:
        return utt

    def header():
        with open_sound(utt, storage_options) as snd:
            return int(snd.samplerate), int(snd.frames)

    sr, frames = with_io_retries(header, utt, attempts=attempts, backoff=backoff)
    if utt.sample_rate is not None and utt.sample_rate != sr:
        raise AudioError(utt.id, f"sample rate mismatch: file is {sr} Hz, manifest says {utt.sample_rate} Hz",
                         utt.audio)
    n = utt.num_samples
    if n is None:
        if utt.duration is not None:
            n = compute_num_samples(utt.duration, sr)
        else:
            n = max(frames - compute_num_samples(utt.offset, sr), 0)
    dur = utt.duration if utt.duration is not None else n / sr
    return dataclasses.replace(utt, sample_rate=sr, num_samples=n, duration=dur)


def probe_missing(utts: list[Utterance], storage_options: dict | None = None, *, max_workers: int = 8,
                  on_error: Callable[[Utterance, AudioError], Utterance] | None = None,
                  progress: Callable[[], None] | None = None) -> list[Utterance]:
    """probe_utterance over the utterances that need it (threads: header reads are I/O bound); order kept.

    An unreadable file raises its AudioError, unless `on_error(utt, error)` returns the utterance to use instead;
    `progress()` is called once per probed utterance (in the caller's thread)."""
    need = [i for i, u in enumerate(utts)
            if u.sample_rate is None or u.num_samples is None or u.duration is None]
    out = list(utts)
    if not need:
        return out

    def probe(j: int) -> Utterance:
        try:
            return probe_utterance(utts[j], storage_options)
        except AudioError as e:
            if on_error is None:
                raise
            return on_error(utts[j], e)

    if max_workers <= 1 or len(need) == 1:
        for i, u in zip(need, map(probe, need)):
            out[i] = u
            if progress is not None:
                progress()
        return out
    with ThreadPoolExecutor(max_workers=min(max_workers, len(need))) as ex:
        for i, u in zip(need, ex.map(probe, need)):
            out[i] = u
            if progress is not None:
                progress()
    return out
