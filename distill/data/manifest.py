"""Corpus manifests: one `Utterance` list from lhotse cuts/recordings/supervisions or plain JSONL.

Lhotse manifests are parsed as JSON (no lhotse dependency) so any lhotse corpus recipe can feed the extraction
job; sample counts follow lhotse's own rounding so frame counts agree with what icefall recipes see.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable, Iterator

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
    """Seconds -> samples exactly as lhotse.utils.compute_num_samples (round half up after 8-digit rounding)."""
    return int(Decimal(round(duration * sampling_rate, ndigits=8)).quantize(0, rounding=ROUND_HALF_UP))


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


def _iter_jsonl(path: str, storage_options: dict | None) -> Iterator[tuple[int, dict]]:
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


class _Recording:
    """The parts of a lhotse Recording we need."""

    def __init__(self, ctx: _Ctx, d: dict):
        self.id = str(ctx.req(d, "id", "recording"))
        self.sampling_rate = _as_int(ctx, ctx.req(d, "sampling_rate", f"recording {self.id!r}"),
                                     "sampling_rate", minimum=1)
        self.num_samples = _as_int(ctx, d["num_samples"], "num_samples") if d.get("num_samples") is not None else None
        self.duration = _as_float(ctx, d["duration"], "duration") if d.get("duration") is not None else None
        for t in d.get("transforms") or []:
            name = t.get("name") if isinstance(t, dict) else None
            if name != "Resample":  # resampling is done by read_audio anyway; anything else alters content
                raise ctx.err(f"recording {self.id!r}: audio transform {name!r} is not supported "
                              f"(only Resample); apply it offline and write a new manifest")
            src_sr = t.get("kwargs", {}).get("source_sampling_rate")
            if src_sr:
                self.sampling_rate = _as_int(ctx, src_sr, "source_sampling_rate", minimum=1)
                self.num_samples = (compute_num_samples(self.duration, self.sampling_rate)
                                    if self.duration is not None else None)
        sources = ctx.req(d, "sources", f"recording {self.id!r}")
        if not isinstance(sources, list) or not sources:
            raise ctx.err(f"recording {self.id!r}: 'sources' must be a non-empty list")
        self.sources: list[tuple[str, list[int]]] = []
        for s in sources:
            if not isinstance(s, dict):
                raise ctx.err(f"recording {self.id!r}: each source must be an object")
            typ = s.get("type", "file")
            if typ not in ("file", "url"):
                raise ctx.err(f"recording {self.id!r}: source type {typ!r} is not supported (file or url only)")
            src = ctx.req(s, "source", f"recording {self.id!r} source")
            chans = s.get("channels", [0])
            if not isinstance(chans, list) or not chans:
                raise ctx.err(f"recording {self.id!r}: source 'channels' must be a non-empty list")
            self.sources.append((str(src), [int(c) for c in chans]))
        self.ctx = ctx

    @property
    def all_channels(self) -> list[int]:
        return [c for _, chans in self.sources for c in chans]

    def locate(self, channel: Any, who: str) -> tuple[str, int | None]:
        """(audio path, channel index inside that file or None = downmix) for a lhotse channel spec."""
        if isinstance(channel, list):
            if len(channel) == 1:
                channel = channel[0]
            elif len(self.sources) == 1 and sorted(channel) == sorted(self.sources[0][1]):
                return self.sources[0][0], None
            else:
                raise self.ctx.err(f"{who}: multi-channel selection {channel} is not supported "
                                   f"(only a single channel or all channels of a single-source recording)")
        if channel is None:
            if len(self.sources) != 1:
                raise self.ctx.err(f"{who}: downmix of a multi-source recording is not supported")
            src, chans = self.sources[0]
            return src, (0 if len(chans) == 1 else None)
        channel = int(channel)
        for src, chans in self.sources:
            if channel in chans:
                return src, chans.index(channel)
        raise self.ctx.err(f"{who}: channel {channel} not in recording {self.id!r} channels {self.all_channels}")

    def default_channel(self) -> Any:
        chans = self.all_channels
        return chans[0] if len(chans) == 1 else chans


def _texts(sups: Iterable[dict]) -> tuple[str | None, str | None]:
    sups = sorted(sups, key=lambda s: float(s.get("start") or 0.0))
    texts = [s["text"].strip() for s in sups if isinstance(s.get("text"), str) and s["text"].strip()]
    speakers = {s.get("speaker") for s in sups if s.get("speaker") is not None}
    return (" ".join(texts) if texts else None), (speakers.pop() if len(speakers) == 1 else None)


def _parse_cut(ctx: _Ctx, d: dict, audio_root: str | None) -> Utterance:
    cid = str(ctx.req(d, "id", "cut"))
    typ = d.get("type")
    if typ not in ("MonoCut", "Cut", "MultiCut"):
        raise ctx.err(f"cut {cid!r}: cut type {typ!r} is not supported (MonoCut/MultiCut only)")
    if d.get("recording") is None:
        raise ctx.err(f"cut {cid!r} has no recording (features-only cuts cannot be re-embedded)")
    rec = _Recording(ctx, d["recording"])
    start = _as_float(ctx, ctx.req(d, "start", f"cut {cid!r}"), "start")
    duration = _as_float(ctx, ctx.req(d, "duration", f"cut {cid!r}"), "duration")
    audio, chan = rec.locate(d.get("channel", rec.default_channel()), f"cut {cid!r}")
    text, speaker = _texts(s for s in (d.get("supervisions") or []) if isinstance(s, dict))
    return Utterance(id=cid, audio=_join_root(audio, audio_root), sample_rate=rec.sampling_rate,
                     num_samples=compute_num_samples(duration, rec.sampling_rate), offset=start,
                     duration=duration, text=text, channel=chan, speaker=speaker)


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


def _load_recordings(path: str, so: dict | None) -> dict[str, _Recording]:
    recs: dict[str, _Recording] = {}
    for lineno, d in _iter_jsonl(path, so):
        ctx = _Ctx(path, lineno)
        if _kind(d) != "recording":
            raise ctx.err("expected a lhotse Recording (with 'sources')")
        r = _Recording(ctx, d)
        if r.id in recs:
            raise ManifestError(f"{path}: duplicate recording id {r.id!r}")
        recs[r.id] = r
    return recs


def _load_supervisions(path: str, so: dict | None) -> list[tuple[_Ctx, dict]]:
    out = []
    for lineno, d in _iter_jsonl(path, so):
        ctx = _Ctx(path, lineno)
        if _kind(d) != "supervision":
            raise ctx.err("expected a lhotse SupervisionSegment (with 'recording_id')")
        ctx.req(d, "id", "supervision")
        ctx.req(d, "recording_id", f"supervision {d['id']!r}")
        out.append((ctx, d))
    return out


def _from_recordings(recs: dict[str, _Recording], sups: list[tuple[_Ctx, dict]] | None,
                     audio_root: str | None) -> list[Utterance]:
    by_rec: dict[str, list[dict]] = {}
    for ctx, s in sups or []:
        if s["recording_id"] not in recs:
            raise ctx.err(f"supervision {s['id']!r} refers to unknown recording {s['recording_id']!r}")
        by_rec.setdefault(s["recording_id"], []).append(s)
    utts = []
    for r in recs.values():
        audio, chan = r.locate(r.default_channel(), f"recording {r.id!r}")
        n = r.num_samples
        if n is None and r.duration is not None:
            n = compute_num_samples(r.duration, r.sampling_rate)
        dur = r.duration if r.duration is not None else (n / r.sampling_rate if n is not None else None)
        text, speaker = _texts(by_rec.get(r.id, []))
        utts.append(Utterance(id=r.id, audio=_join_root(audio, audio_root), sample_rate=r.sampling_rate,
                              num_samples=n, offset=0.0, duration=dur, text=text, channel=chan, speaker=speaker))
    return utts


def _from_supervisions(sups: list[tuple[_Ctx, dict]], recs: dict[str, _Recording],
                       audio_root: str | None) -> list[Utterance]:
    utts = []
    for ctx, s in sups:
        sid = str(s["id"])
        rec = recs.get(s["recording_id"])
        if rec is None:
            raise ctx.err(f"supervision {sid!r} refers to unknown recording {s['recording_id']!r}")
        start = _as_float(ctx, ctx.req(s, "start", f"supervision {sid!r}"), "start")
        duration = _as_float(ctx, ctx.req(s, "duration", f"supervision {sid!r}"), "duration")
        audio, chan = rec.locate(s.get("channel", rec.default_channel()), f"supervision {sid!r}")
        text, speaker = _texts([s])
        utts.append(Utterance(id=sid, audio=_join_root(audio, audio_root), sample_rate=rec.sampling_rate,
                              num_samples=compute_num_samples(duration, rec.sampling_rate), offset=start,
                              duration=duration, text=text, channel=chan, speaker=speaker))
    return utts


def _first_kind(path: str, so: dict | None) -> str:
    for _, d in _iter_jsonl(path, so):
        return _kind(d)
    return "empty"


def check_unique(utts: list[Utterance], path: str) -> None:
    dups = duplicate_ids(u.id for u in utts)
    if dups:
        raise ManifestError(f"{path}: duplicate utterance ids: {name_some(dups, 20)}")


def load_manifest(path_or_url: str, *, recordings: str | None = None, supervisions: str | None = None,
                  storage_options: dict | None = None, audio_root: str | None = None) -> list[Utterance]:
    """Read a manifest (local path or fsspec URL, .jsonl or .jsonl.gz) into utterances; the format is detected.

    - lhotse CutSet: one utterance per cut (text = its supervisions' texts joined in time order).
    - lhotse RecordingSet: one utterance per recording; `supervisions=` (a SupervisionSet) adds text.
    - lhotse SupervisionSet with `recordings=` (a RecordingSet): one utterance per supervision segment.
    - plain JSONL: {"id", "audio", optional "text", "duration", "sample_rate", "num_samples", "offset",
      "channel", "speaker"}.
    Relative audio paths are joined onto `audio_root` when given (otherwise left as written, i.e. relative to
    the working directory, like lhotse). Duplicate ids raise ManifestError listing them.
    """
    so = storage_options
    kind = _first_kind(path_or_url, so)
    if kind == "empty":
        raise ManifestError(f"{path_or_url}: manifest is empty")
    if kind in ("cut", "plain") and (recordings or supervisions):
        raise ManifestError(f"{path_or_url}: a {'CutSet' if kind == 'cut' else 'plain'} manifest is complete; "
                            f"do not pass recordings=/supervisions=")
    utts: list[Utterance] = []
    if kind in ("cut", "plain"):
        for lineno, d in _iter_jsonl(path_or_url, so):
            ctx = _Ctx(path_or_url, lineno)
            k = _kind(d)
            if k != kind:
                raise ctx.err(f"mixed manifest: expected a {kind} record, got {k}")
            utts.append(_parse_cut(ctx, d, audio_root) if kind == "cut" else _parse_plain(ctx, d, audio_root))
    elif kind == "recording":
        if recordings:
            raise ManifestError(f"{path_or_url} is a RecordingSet; pass supervisions= (not recordings=)")
        recs = _load_recordings(path_or_url, so)
        sups = _load_supervisions(supervisions, so) if supervisions else None
        utts = _from_recordings(recs, sups, audio_root)
    elif kind == "supervision":
        if not recordings:
            raise ManifestError(f"{path_or_url} is a lhotse SupervisionSet; pass its RecordingSet as recordings=")
        utts = _from_supervisions(_load_supervisions(path_or_url, so), _load_recordings(recordings, so),
                                  audio_root)
    else:
        raise ManifestError(f"{path_or_url}:1: unrecognised record (expected a lhotse cut/recording/supervision "
                            f"or a plain {{'id', 'audio'}} line)")
    check_unique(utts, path_or_url)
    return utts
