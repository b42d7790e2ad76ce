"""Corpus manifests: one `Utterance` list from lhotse manifests (parsed by lhotse, `distill.data.lhotse_manifest`)
or plain JSONL (a thin adapter kept here); sample counts follow lhotse's own rounding, so frame counts agree with
what icefall recipes see.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

from ci_store.errors import duplicate_ids, name_some

__all__ = [
    "ManifestError",
    "Utterance",
    "compute_num_samples",
    "resampled_length",
    "load_manifest",
]


class ManifestError(ValueError):
    """A manifest is malformed or inconsistent; the message names the file, line and/or utterance ids."""


def compute_num_samples(duration: float, sampling_rate: int) -> int:
    """Seconds -> samples, lhotse's rounding (half up after 8-digit rounding)."""
    from lhotse.utils import compute_num_samples as lhotse_num_samples

    return int(lhotse_num_samples(duration, sampling_rate))


def resampled_length(num_samples: int, from_rate: int, to_rate: int) -> int:
    """Output length of a polyphase resampler (ceil(n * to / from)), the same as scipy.signal.resample_poly."""
    if from_rate == to_rate:
        return int(num_samples)
    g = math.gcd(int(from_rate), int(to_rate))
    up, down = to_rate // g, from_rate // g
    return -(-int(num_samples) * up // down)


@dataclass(frozen=True)
class Utterance:
    """One unit of extraction: a (segment of a) channel of an audio file.

    `num_samples` counts samples of this utterance (not of the whole file) at the file's `sample_rate`;
    `offset` is where it starts in the file, in seconds. `channel=None` means "downmix all channels".
    """

    id: str
    audio: str
    sample_rate: int | None = None
    num_samples: int | None = None
    offset: float = 0.0
    duration: float | None = None
    text: str | None = None
    channel: int | None = 0
    speaker: str | None = None
    lhotse_cut: dict | None = None  # a cut lhotse renders (speed-perturbed, mixed, in-memory); see lhotse_manifest

    def num_samples_at(self, rate: int) -> int:
        """Exact sample count after resampling to `rate` (what `read_audio(utt, rate)` returns)."""
        if self.sample_rate is None:
            raise ManifestError(f"utterance {self.id!r}: sample rate unknown; run probe_missing() first")
        n = self.num_samples
        if n is None:
            if self.duration is None:
                raise ManifestError(f"utterance {self.id!r}: length unknown; run probe_missing() first")
            n = compute_num_samples(self.duration, self.sample_rate)
        return resampled_length(n, self.sample_rate, int(rate))

    @property
    def start_sample(self) -> int:
        """First sample of the utterance in the file (needs sample_rate)."""
        if self.sample_rate is None:
            raise ManifestError(f"utterance {self.id!r}: sample rate unknown; run probe_missing() first")
        return compute_num_samples(self.offset, self.sample_rate)


# ----------------------------------------------------------------------------------------------- reading

def _open_text(path: str, mode: str, storage_options: dict | None):
    return fsspec.open(path, mode, compression="infer", encoding="utf-8", **(storage_options or {}))


def iter_jsonl(path: str, storage_options: dict | None) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-empty line; ManifestError naming file and line otherwise."""
    try:
        with _open_text(path, "rt", storage_options) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ManifestError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:  # unreadable, bad gzip, not UTF-8
        raise ManifestError(f"{path}: cannot read manifest ({e})") from None


def _kind(obj: dict) -> str:
    if isinstance(obj.get("type"), str) and obj["type"].endswith("Cut"):  # MonoCut, MultiCut, MixedCut, ...
        return "cut"
    if {"start", "duration"} <= set(obj) and ("recording" in obj or "features" in obj):  # a cut without "type"
        return "cut"
    if "sources" in obj:
        return "recording"
    if "recording_id" in obj:
        return "supervision"
    if "audio" in obj:
        return "plain"
    return "unknown"


class _Ctx:
    """Where a record came from, for error messages."""

    def __init__(self, path: str, lineno: int):
        self.path, self.lineno = path, lineno

    def err(self, msg: str) -> ManifestError:
        return ManifestError(f"{self.path}:{self.lineno}: {msg}")

    def req(self, obj: dict, key: str, what: str = "record") -> Any:
        """obj[key], or a ManifestError naming the record, the field, the file and the line."""
        if obj.get(key) is None:
            raise self.err(f"{what} is missing required field {key!r}")
        return obj[key]


def _as_int(ctx: _Ctx, v: Any, name: str, *, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ctx.err(f"field {name!r} must be an integer, got {v!r}")
    if int(v) < minimum:
        raise ctx.err(f"field {name!r} must be >= {minimum}, got {v!r}")
    return int(v)


def _as_float(ctx: _Ctx, v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ctx.err(f"field {name!r} must be a finite number >= 0, got {v!r}")
    return float(v)


def _join_root(audio: str, audio_root: str | None) -> str:
    if audio_root is None or "://" in audio or os.path.isabs(audio):
        return audio
    if "://" in audio_root:
        return posixpath.join(audio_root, audio)
    return os.path.join(audio_root, audio)


def _parse_plain(ctx: _Ctx, d: dict, audio_root: str | None) -> Utterance:
    uid = str(ctx.req(d, "id"))
    audio = ctx.req(d, "audio", f"utterance {uid!r}")
    if not isinstance(audio, str) or not audio:
        raise ctx.err(f"utterance {uid!r}: 'audio' must be a non-empty string")
    sr = _as_int(ctx, d["sample_rate"], "sample_rate", minimum=1) if d.get("sample_rate") is not None else None
    n = _as_int(ctx, d["num_samples"], "num_samples") if d.get("num_samples") is not None else None
    dur = _as_float(ctx, d["duration"], "duration") if d.get("duration") is not None else None
    off = _as_float(ctx, d.get("offset") or 0.0, "offset")
    if n is None and dur is not None and sr is not None:
        n = compute_num_samples(dur, sr)
    if dur is None and n is not None and sr is not None:
        dur = n / sr
    chan = d.get("channel", 0)
    if chan is not None:
        chan = _as_int(ctx, chan, "channel")
    text = d.get("text")
    speaker = d.get("speaker")
    return Utterance(id=uid, audio=_join_root(audio, audio_root), sample_rate=sr, num_samples=n, offset=off,
                     duration=dur, text=text if text is None else str(text), channel=chan,
                     speaker=None if speaker is None else str(speaker))


def _first_kind(path: str, so: dict | None) -> str:
    for _, d in iter_jsonl(path, so):
        return _kind(d)
    return "empty"


def check_unique(utts: list[Utterance], path: str) -> None:
    dups = duplicate_ids(u.id for u in utts)
    if dups:
        raise ManifestError(f"{path}: duplicate utterance ids: {name_some(dups, 20)}")


def load_manifest(path_or_url: str, *, recordings: str | None = None, supervisions: str | None = None,
                  storage_options: dict | None = None, audio_root: str | None = None) -> list[Utterance]:
    """Read a manifest (local path or fsspec URL; .jsonl or .jsonl.gz, or a Lhotse Shar directory) into utterances;
    the format is detected.

    - lhotse CutSet (jsonl or Shar): one utterance per cut (text = its supervisions' texts joined in time order);
      speed-perturbed and mixed cuts are extracted as lhotse renders them (what the teacher would hear).
    - lhotse RecordingSet: one utterance per recording; `supervisions=` (a SupervisionSet) adds text.
    - lhotse SupervisionSet with `recordings=` (a RecordingSet): one utterance per supervision segment.
    - plain JSONL: {"id", "audio", optional "text", "duration", "sample_rate", "num_samples", "offset",
      "channel", "speaker"}.
    Relative audio paths are joined onto `audio_root` when given (otherwise left as written, i.e. relative to
    the working directory, like lhotse). Duplicate ids raise ManifestError listing them.
    """
    from distill.data import lhotse_manifest as L

    so = storage_options
    if L.is_shar_dir(path_or_url, so):
        utts = L.load_shar(path_or_url, so)
        check_unique(utts, path_or_url)
        return utts
    kind = _first_kind(path_or_url, so)
    if kind == "empty":
        raise ManifestError(f"{path_or_url}: manifest is empty")
    if kind in ("cut", "plain") and (recordings or supervisions):
        raise ManifestError(f"{path_or_url}: a {'CutSet' if kind == 'cut' else 'plain'} manifest is complete; "
                            f"do not pass recordings=/supervisions=")
    items = iter_jsonl(path_or_url, so)
    if kind == "plain":
        utts = []
        for lineno, d in items:
            ctx = _Ctx(path_or_url, lineno)
            if _kind(d) != "plain":
                raise ctx.err(f"mixed manifest: expected a plain record, got {_kind(d)}")
            utts.append(_parse_plain(ctx, d, audio_root))
    elif kind == "cut":
        utts = L.cuts_to_utterances(items, path_or_url, audio_root)
    elif kind == "recording":
        if recordings:
            raise ManifestError(f"{path_or_url} is a RecordingSet; pass supervisions= (not recordings=)")
        utts = L.recordings_to_utterances(items, path_or_url,
                                          iter_jsonl(supervisions, so) if supervisions else None, supervisions,
                                          audio_root)
    elif kind == "supervision":
        if not recordings:
            raise ManifestError(f"{path_or_url} is a lhotse SupervisionSet; pass its RecordingSet as recordings=")
        utts = L.supervisions_to_utterances(items, path_or_url, iter_jsonl(recordings, so), recordings, audio_root)
    else:
        raise ManifestError(f"{path_or_url}:1: unrecognised record (expected a lhotse cut/recording/supervision "
                            f"or a plain {{'id', 'audio'}} line)")
    check_unique(utts, path_or_url)
    return utts
