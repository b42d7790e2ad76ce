"""Offline multi-speaker English speech corpus synthesised with espeak-ng, written as lhotse CutSets.

Why: the distillation pipeline needs real audio with real transcripts in CI and demos, and no data set can be
downloaded there. espeak-ng (a Debian package) speaks bundled public-domain sentences (`distill.synth.text`)
with many accents, voice variants, speeds and pitches; we resample to 16 kHz and add noise at a random SNR so
the teacher/student see varied, imperfect input.

Everything is a function of the seed: sentence split assignment, per-utterance voice/speed/pitch/noise (drawn
from a generator keyed by the utterance id), and which utterances end up in each split (they are taken in id
order until the split's hours are reached). Worker count only changes speed, never a byte of output.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ci_store.fsio import replace_file
from distill.data.audio import resample
from distill.data.manifest import Utterance
from distill.data.writing import write_jsonl_manifest, write_lhotse_cuts
from distill.synth.text import SENTENCES_PATH, load_sentences

__all__ = ["CorpusError", "EspeakMissingError", "BASE_VOICES", "VARIANTS", "ESPEAK_RATE", "make_corpus",
           "synthesize", "check_voices"]

ESPEAK_RATE = 22050
SPLITS = ("train", "dev", "test")
_SPLIT_CODE = {"train": 1, "dev": 2, "test": 3}

# Accents (espeak-ng base voices) x voice variants; speaker id = "base+variant". Variants sound human enough for
# ASR (no whisper/croak/robot/'demonic' effects). Missing ones (older espeak-ng) raise a clear error.
BASE_VOICES = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
               "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "adam", "Andy", "Annie", "aunty", "belinda", "benjamin",
            "david", "ed", "edward", "grandma", "grandpa", "linda", "max", "Michael", "paul", "quincy", "rob",
            "robert", "steph", "travis", "victor")

SPEED_WPM = (130, 200)   # espeak-ng -s (default 175)
PITCH = (25, 75)         # espeak-ng -p (default 50)
WORD_GAPS = (0, 0, 0, 1, 2)  # espeak-ng -g, units of 10 ms
PAD_S = (0.05, 0.30)     # silence kept before/after speech when trimming
PEAK = (0.30, 0.95)      # final peak level, fraction of full scale


class CorpusError(RuntimeError):
    """Corpus generation cannot proceed (bad arguments, synthesis failure, unsafe output dir)."""


class EspeakMissingError(CorpusError):
    """espeak-ng is not installed: the project installs it (`make sysdeps` or `apt-get install espeak-ng`)."""


# ------------------------------------------------------------------------------------------------ espeak-ng

def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissingError("espeak-ng not found on PATH; install it with `make sysdeps` "
                                 "(apt-get install espeak-ng)")
    return exe


@lru_cache(maxsize=1)
def _available_voices() -> tuple[frozenset, frozenset]:
    exe = _espeak()

    def listing(arg: str) -> list[list[str]]:
        r = subprocess.run([exe, f"--voices={arg}"], capture_output=True, text=True, check=True)
        return [ln.split() for ln in r.stdout.splitlines()[1:] if ln.strip()]

    bases = frozenset(cols[1] for cols in listing("en") if len(cols) > 1)
    variants = frozenset(cols[4][3:] for cols in listing("variant") if len(cols) > 4 and cols[4].startswith("!v/"))
    return bases, variants


def check_voices(bases=BASE_VOICES, variants=VARIANTS) -> None:
    """Raise CorpusError naming any voice this espeak-ng lacks (it would silently fall back to another)."""
    have_b, have_v = _available_voices()
    missing = [b for b in bases if b not in have_b] + [f"+{v}" for v in variants if v not in have_v]
    if missing:
        raise CorpusError(f"espeak-ng lacks voices {missing}; pass voices= / variants= it has "
                          f"(`espeak-ng --voices=en`, `espeak-ng --voices=variant`)")


def _parse_wav(buf: bytes, what: str) -> np.ndarray:
    """espeak-ng --stdout writes a streaming RIFF header with bogus sizes: take everything after 'data'."""
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise CorpusError(f"{what}: espeak-ng did not return a WAV stream")
    i = 12
    fmt = None
    while i + 8 <= len(buf):
        cid, size = buf[i:i + 4], int.from_bytes(buf[i + 4:i + 8], "little")
        if cid == b"fmt " and i + 24 <= len(buf):
            code, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", buf, i + 8)
            fmt = (code, channels, rate, bits)
        elif cid == b"data":
            if fmt != (1, 1, ESPEAK_RATE, 16):  # PCM, mono, 22.05 kHz, 16 bit
                raise CorpusError(f"{what}: unexpected espeak-ng format {fmt} (want PCM mono {ESPEAK_RATE} Hz 16-bit)")
            data = buf[i + 8:]
            return np.frombuffer(data[:len(data) // 2 * 2], "<i2").astype(np.float64) / 32768.0
        i += 8 + size
    raise CorpusError(f"{what}: no audio data from espeak-ng")


def synthesize(text: str, voice: str = "en-us", *, speed: int = 175, pitch: int = 50, word_gap: int = 0) -> np.ndarray:
    """Speak `text` with espeak-ng; float64 samples in [-1, 1) at 22.05 kHz."""
    cmd = [_espeak(), "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-g", str(int(word_gap)),
           "-a", "100", "--stdout", "--", text]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"espeak-ng timed out for voice {voice!r}, text {text[:60]!r}") from None
    if r.returncode != 0:
        raise CorpusError(f"espeak-ng failed for voice {voice!r}: {r.stderr.decode(errors='replace').strip()}")
    x = _parse_wav(r.stdout, f"voice {voice!r}")
    if not np.any(x):
        raise CorpusError(f"espeak-ng produced silence for voice {voice!r}, text {text!r}")
    return x


# ----------------------------------------------------------------------------------------- one utterance

@dataclass(frozen=True)
class _Spec:
    id: str
    split: str
    text: str
    voice: str
    speed: int
    pitch: int
    word_gap: int
    snr_db: float
    noise: str
    pad_s: tuple
    peak: float


def _utt_rng(seed: int, uid: str) -> np.random.Generator:
    digest = hashlib.sha256(uid.encode()).digest()
    return np.random.default_rng([int(seed)] + [int.from_bytes(digest[i:i + 4], "little") for i in (0, 4, 8, 12)])


def _make_spec(seed: int, uid: str, split: str, text: str, voices: list[str], snr_db: tuple) -> _Spec:
    r = _utt_rng(seed, uid)
    return _Spec(id=uid, split=split, text=text, voice=voices[int(r.integers(len(voices)))],
                 speed=int(r.integers(SPEED_WPM[0], SPEED_WPM[1] + 1)), pitch=int(r.integers(PITCH[0], PITCH[1] + 1)),
                 word_gap=int(WORD_GAPS[int(r.integers(len(WORD_GAPS)))]),
                 snr_db=round(float(r.uniform(*snr_db)), 2), noise=("white", "pink")[int(r.integers(2))],
                 pad_s=(round(float(r.uniform(*PAD_S)), 3), round(float(r.uniform(*PAD_S)), 3)),
                 peak=round(float(r.uniform(*PEAK)), 3))


def _trim(x: np.ndarray, rate: int, pad_s: tuple, threshold_db: float = -45.0) -> np.ndarray:
    """Cut leading/trailing silence, keeping pad_s seconds before and after the first/last 10 ms frame within
    threshold_db of the loudest frame."""
    hop = max(1, rate // 100)
    n = x.size // hop
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[:n * hop].reshape(n, hop) ** 2, axis=1))
    loud = np.flatnonzero(rms > rms.max() * 10 ** (threshold_db / 20))
    start = max(0, loud[0] * hop - int(pad_s[0] * rate))
    end = min(x.size, (loud[-1] + 1) * hop + int(pad_s[1] * rate))
    return x[start:end]


def _smooth_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT lengths with large prime factors are many times slower."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35 << max(0, (-(-n // p35) - 1).bit_length())  # times the smallest power of two reaching n
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    """Unit-power white or pink (1/f power) noise, n samples."""
    if colour == "pink":  # shape white noise's spectrum by 1/sqrt(f), then keep the first n samples
        m = _smooth_size(n)
        spec = np.fft.rfft(rng.standard_normal(m))
        f = np.arange(spec.size, dtype=np.float64)
        spec[0], f[0] = 0.0, 1.0
        w = np.fft.irfft(spec / np.sqrt(f), m)[:n]
    else:
        w = rng.standard_normal(n)
    return w / (np.sqrt(np.mean(w ** 2)) + 1e-12)


def _render(spec: _Spec, seed: int, rate: int, trim: bool) -> np.ndarray:
    """Spec -> int16 samples at `rate`: synthesis, resampling, trimming, noise at spec.snr_db, peak level."""
    try:
        x = synthesize(spec.text.lower(), spec.voice, speed=spec.speed, pitch=spec.pitch, word_gap=spec.word_gap)
    except CorpusError as e:
        raise CorpusError(f"utterance {spec.id}: {e}") from None
    x = resample(x, ESPEAK_RATE, rate)
    if trim:
        x = _trim(x, rate, spec.pad_s)
    power = np.mean(x ** 2)
    noise_rng = np.random.default_rng(_utt_rng(seed, spec.id).bit_generator.seed_seq.spawn(1)[0])
    y = x + _noise(noise_rng, x.size, spec.noise) * np.sqrt(power / 10 ** (spec.snr_db / 10))
    y *= spec.peak / np.max(np.abs(y))
    return np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)


def _write_audio(path: str, samples: np.ndarray, rate: int) -> int:
    """Encode in memory, check by reading the header back, then write atomically; returns the sample count."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="FLAC" if path.endswith(".flac") else "WAV", subtype="PCM_16")
    buf.seek(0)
    info = sf.info(buf)
    if info.samplerate != rate or info.channels != 1 or info.frames != samples.size:
        raise CorpusError(f"{path}: read back {info.frames} samples at {info.samplerate} Hz x {info.channels} ch, "
                          f"wrote {samples.size} at {rate} Hz mono")
    replace_file(path, buf.getvalue())
    return int(info.frames)


def _produce(job):
    spec, seed, rate, trim, path = job
    n = _write_audio(path, _render(spec, seed, rate, trim), rate)
    return spec, path, n


# ------------------------------------------------------------------------------------------------ manifests

def _utterance(spec: _Spec, path: str, num_samples: int, rate: int) -> Utterance:
    return Utterance(id=spec.id, audio=path, sample_rate=rate, num_samples=num_samples, duration=num_samples / rate,
                     text=spec.text, speaker=spec.voice)


# ---------------------------------------------------------------------------------------------- the corpus

def _est_seconds(sentence: str) -> float:
    """Rough spoken length at the mean speed (165 wpm), used only to size the dev/test sentence pools."""
    return 0.5 + len(sentence.split()) * 60.0 / 165.0


def _partition(sentences: list[str], seed: int, seconds: dict[str, float]) -> dict[str, list[str]]:
    """Disjoint sentence pools: dev and test get enough sentences for their hours (+50%, at most 15% of the
    text each), train gets the rest. Depends only on seed and dev/test hours, so --hours can grow freely."""
    order = np.random.default_rng([int(seed), 7]).permutation(len(sentences))
    shuffled = [sentences[i] for i in order]
    pools, pos = {}, 0
    cap = max(1, int(0.15 * len(shuffled)))
    for split in ("dev", "test"):
        take, acc = 0, 0.0
        while seconds[split] > 0 and take < cap and acc < 1.5 * seconds[split]:
            acc += _est_seconds(shuffled[pos + take])
            take += 1
        pools[split] = shuffled[pos:pos + take]
        pos += take
    pools["train"] = shuffled[pos:]
    return pools


def _sentence_for(pool: list[str], i: int, seed: int, split: str) -> str:
    """The i-th utterance's sentence: a pass through the pool, reshuffled for each further pass (reuse is
    with other voices, since voices are drawn per utterance)."""
    k, r = divmod(i, len(pool))
    if k == 0:
        return pool[r]
    perm = np.random.default_rng([int(seed), _SPLIT_CODE[split], 1000 + k]).permutation(len(pool))
    return pool[perm[r]]


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CorpusError(f"output {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, "corpus.json")):
            raise CorpusError(f"output dir {out_dir} is not empty and is not a corpus made by make_corpus; "
                              f"refusing to write into it")
        if not overwrite:
            raise CorpusError(f"output dir {out_dir} already holds a corpus; pass overwrite=True (--overwrite)")
        shutil.rmtree(os.path.join(out_dir, "audio"), ignore_errors=True)
        for split in SPLITS + ("train_small",):  # stale splits of the old corpus must not survive
            for name in (f"cuts_{split}.jsonl.gz", f"{split}.jsonl"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.unlink(os.path.join(out_dir, name))


def make_corpus(out_dir: str, hours: float = 10.0, dev_hours: float | None = None, test_hours: float | None = None,
                student_hours: float | None = None, seed: int = 0, workers: int = 2, sample_rate: int = 16000,
                snr_db: tuple[float, float] = (10.0, 30.0), progress: bool = True, *, trim: bool = True,
                audio_format: str = "flac", voices: list[str] | None = None, sentences_path: str | None = None,
                relative_paths: bool = False, overwrite: bool = False) -> dict[str, str]:
    """Synthesise train/dev/test (+ optional train_small) into out_dir; returns split -> CutSet manifest path.

    hours: train audio; dev_hours/test_hours default to 10% of it. Splits use disjoint sentences (speakers
    overlap). student_hours: also write `cuts_train_small.jsonl.gz`, a seeded subset of train of that size
    (the labelled student set; the teacher trains on all of train). Each split is filled in utterance-id order
    until its hours are reached, so the output is identical for any `workers`. Audio paths in the manifests are
    absolute unless relative_paths (then relative to out_dir). Raises EspeakMissingError without espeak-ng.
    """
    if hours <= 0:
        raise CorpusError(f"hours must be > 0, got {hours}")
    dev_hours = 0.1 * hours if dev_hours is None else float(dev_hours)
    test_hours = 0.1 * hours if test_hours is None else float(test_hours)
    if dev_hours < 0 or test_hours < 0:
        raise CorpusError(f"dev_hours/test_hours must be >= 0, got {dev_hours}/{test_hours}")
    if student_hours is not None and not 0 < student_hours <= hours:
        raise CorpusError(f"student_hours must be in (0, hours={hours}], got {student_hours}")
    lo, hi = (float(v) for v in snr_db)
    if not lo <= hi:
        raise CorpusError(f"snr_db must be (low, high) with low <= high, got {snr_db}")
    if audio_format not in ("flac", "wav"):
        raise CorpusError(f"audio_format must be 'flac' or 'wav', got {audio_format!r}")
    if int(workers) < 1 or int(sample_rate) < 8000:
        raise CorpusError(f"need workers >= 1 and sample_rate >= 8000, got {workers}, {sample_rate}")
    _espeak()
    voices = list(voices) if voices else [f"{b}+{v}" for b in BASE_VOICES for v in VARIANTS]
    check_voices(sorted({v.split("+")[0] for v in voices}), sorted({v.split("+")[1] for v in voices if "+" in v}))
    try:
        sentences = load_sentences(sentences_path)
    except ValueError as e:
        raise CorpusError(str(e)) from None
    seconds = {"train": hours * 3600.0, "dev": dev_hours * 3600.0, "test": test_hours * 3600.0}
    pools = _partition(sentences, seed, seconds)
    if not pools["train"]:
        raise CorpusError(f"no sentences left for train ({len(sentences)} sentences in all)")

    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "corpus.json"), "w") as f:  # marks the dir as ours while incomplete
        json.dump({"status": "incomplete"}, f)

    from tqdm.auto import tqdm

    bar = tqdm(total=round(sum(seconds.values()), 1), desc="synthesising", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of audio [{elapsed}<{remaining}]")
    cuts: dict[str, list[dict]] = {}
    batch = max(8, 4 * int(workers))
    with ThreadPoolExecutor(int(workers)) as pool:
        for split in SPLITS:
            if seconds[split] <= 0:
                continue
            adir = os.path.join(out_dir, "audio", split)
            os.makedirs(adir, exist_ok=True)
            got, total, i = [], 0.0, 0
            while total < seconds[split]:
                jobs = []
                for k in range(i, i + batch):
                    uid = f"{split}_{k:06d}"
                    spec = _make_spec(seed, uid, split, _sentence_for(pools[split], k, seed, split), voices, (lo, hi))
                    jobs.append((spec, seed, int(sample_rate), trim, os.path.join(adir, f"{uid}.{audio_format}")))
                i += batch
                for spec, path, n in pool.map(_produce, jobs):
                    if total >= seconds[split]:  # past the target inside this batch: not part of the corpus
                        os.unlink(path)
                        continue
                    src = os.path.relpath(path, out_dir) if relative_paths else path
                    got.append(_utterance(spec, src, n, int(sample_rate)))
                    bar.update(min(n / sample_rate, seconds[split] - total))
                    total += n / sample_rate
            cuts[split] = got
    bar.close()

    if student_hours is not None:
        order = np.random.default_rng([int(seed), 99]).permutation(len(cuts["train"]))
        small, acc = [], 0.0
        for j in order:
            if acc >= student_hours * 3600.0:
                break
            small.append(cuts["train"][j])
            acc += small[-1].duration
        cuts["train_small"] = sorted(small, key=lambda u: u.id)

    paths = {}
    for split, cs in cuts.items():
        paths[split] = os.path.join(out_dir, f"cuts_{split}.jsonl.gz")
        write_lhotse_cuts(cs, paths[split], probe=False, language="English")
        write_jsonl_manifest(cs, os.path.join(out_dir, f"{split}.jsonl"))
    summary = {
        "seed": int(seed), "sample_rate": int(sample_rate), "snr_db": [lo, hi], "trim": bool(trim),
        "audio_format": audio_format, "relative_paths": bool(relative_paths),
        "text_source": os.path.basename(sentences_path or SENTENCES_PATH),
        "espeak_ng": subprocess.run([_espeak(), "--version"], capture_output=True, text=True).stdout.strip(),
        "splits": {s: {"utterances": len(cs), "hours": round(sum(u.duration for u in cs) / 3600.0, 4),
                       "distinct_sentences": len({u.text for u in cs}),
                       "speakers": len({u.speaker for u in cs}),
                       "manifest": os.path.basename(paths[s])} for s, cs in cuts.items()},
        "sentence_pools": {s: len(p) for s, p in pools.items()},
        "voices": voices,
    }
    replace_file(os.path.join(out_dir, "corpus.json"), json.dumps(summary, indent=1).encode("utf-8"))
    return paths
