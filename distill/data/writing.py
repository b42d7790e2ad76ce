"""Manifests out: plain JSONL and lhotse CutSets written from utterances (the format load_manifest reads back)."""
from __future__ import annotations

import gzip
import io
import json
import posixpath
from typing import Any, Iterable

from ci_store.fsio import write_file
from distill.data.audio import open_sound
from distill.data.manifest import ManifestError, Utterance, check_unique, compute_num_samples

__all__ = ["write_jsonl_manifest", "write_lhotse_cuts"]


def _write_lines(path: str, lines: Iterable[str], storage_options: dict | None) -> None:
    """Write text lines (gzip when the name ends in .gz, byte-reproducible: no timestamp or name)."""
    data = "".join(lines).encode("utf-8")
    if str(path).endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
            gz.write(data)
        data = buf.getvalue()
    write_file(path, data, storage_options)


def write_jsonl_manifest(utts: Iterable[Utterance], path: str, *, storage_options: dict | None = None) -> None:
    """Plain JSONL manifest (the format load_manifest reads back); None fields and defaults are omitted."""
    utts = list(utts)
    check_unique(utts, str(path))

    def line(u: Utterance) -> str:
        d: dict[str, Any] = {"id": u.id, "audio": u.audio}
        for k in ("sample_rate", "num_samples", "duration", "text", "speaker"):
            v = getattr(u, k)
            if v is not None:
                d[k] = v
        if u.offset:
            d["offset"] = u.offset
        if u.channel != 0:
            d["channel"] = u.channel
        return json.dumps(d, ensure_ascii=False) + "\n"

    _write_lines(path, (line(u) for u in utts), storage_options)


def write_lhotse_cuts(utts: Iterable[Utterance], path: str, *, storage_options: dict | None = None,
                      probe: bool = True, language: str | None = None) -> None:
    """Write a lhotse CutSet built with lhotse's own classes (MonoCut per utterance, MultiCut for a downmix;
    embedded Recording + one SupervisionSegment).

    With `probe=True` the audio headers are read (once per file) so each Recording carries the file's true
    channel count and length, as lhotse expects; with `probe=False` files are assumed mono and the recording is
    taken to end where the utterance ends. Utterances sharing a file share a recording id.
    """
    from lhotse import MonoCut, Recording, SupervisionSegment
    from lhotse.audio import AudioSource
    from lhotse.cut import MultiCut

    utts = list(utts)
    check_unique(utts, str(path))
    headers: dict[str, tuple[int, int, int]] = {}  # audio -> (rate, frames, channels)
    if probe:
        for u in utts:
            if u.audio not in headers:
                with open_sound(u, storage_options) as snd:
                    headers[u.audio] = (int(snd.samplerate), int(snd.frames), int(snd.channels))
    users: dict[str, list[Utterance]] = {}
    for u in utts:
        users.setdefault(u.audio, []).append(u)
    rec_ids: dict[str, str] = {}
    taken = {u.id for u in utts}
    for audio, us in users.items():
        if len(us) == 1 and us[0].offset == 0:
            rec_ids[audio] = us[0].id
            continue
        base = posixpath.basename(audio.split("://", 1)[-1]).split(".", 1)[0] or "rec"
        rid, k = base, 1
        while rid in taken:
            k += 1
            rid = f"{base}-{k}"
        taken.add(rid)
        rec_ids[audio] = rid

    def line(u: Utterance) -> str:
        if probe:
            sr, frames, chans = headers[u.audio]
            if u.sample_rate is not None and u.sample_rate != sr:
                raise ManifestError(f"utterance {u.id!r}: manifest says {u.sample_rate} Hz but {u.audio} is {sr} Hz")
        else:
            if u.sample_rate is None:
                raise ManifestError(f"utterance {u.id!r}: sample rate unknown; use probe=True or probe_missing()")
            sr, chans = u.sample_rate, 1
            frames = None
        n = u.num_samples
        if n is None:
            if u.duration is not None:
                n = compute_num_samples(u.duration, sr)
            elif frames is not None:
                n = frames - compute_num_samples(u.offset, sr)
            else:
                raise ManifestError(f"utterance {u.id!r}: length unknown; use probe=True or probe_missing()")
        duration = u.duration if u.duration is not None else n / sr
        if frames is None:
            frames = compute_num_samples(u.offset, sr) + n
        if u.channel is None:
            channel: Any = list(range(chans))
        else:
            if u.channel >= chans:
                raise ManifestError(f"utterance {u.id!r}: channel {u.channel} but {u.audio} has {chans} channel(s)")
            channel = u.channel
        rid = rec_ids[u.audio]
        recording = Recording(id=rid, sources=[AudioSource(type="url" if "://" in u.audio else "file",
                                                           channels=list(range(chans)), source=u.audio)],
                              sampling_rate=sr, num_samples=frames, duration=frames / sr,
                              channel_ids=list(range(chans)))
        sup = SupervisionSegment(id=u.id, recording_id=rid, start=0.0, duration=duration, channel=channel,
                                 text=u.text, language=language, speaker=u.speaker)
        kind = MonoCut if isinstance(channel, int) else MultiCut
        cut = kind(id=u.id, start=u.offset, duration=duration, channel=channel, supervisions=[sup],
                   recording=recording)
        return json.dumps(cut.to_dict(), ensure_ascii=False) + "\n"

    _write_lines(path, [line(u) for u in utts], storage_options)
