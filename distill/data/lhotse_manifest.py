"""lhotse manifests in: CutSets (jsonl or Lhotse Shar), RecordingSets and SupervisionSets -> `Utterance`s.

lhotse parses and validates the manifests (its own `from_dict`s, its own sample rounding), so any lhotse/icefall
recipe's manifests feed the extraction job unchanged. Each cut becomes an Utterance of one of two kinds:
- a plain segment of one audio file (single `file`/`url` source, no transform other than Resample): read by
  `distill.data.audio.read_audio` through fsspec, with storage options, at the file's own rate;
- anything else lhotse can render (speed/tempo/volume-perturbed recordings, MixedCuts, multi-source downmixes,
  in-memory sources): the cut travels with the Utterance (`lhotse_cut`) and lhotse renders exactly what the
  teacher would hear (`Cut.load_audio`), which is what the labels are extracted for.
Lhotse Shar input: the cuts' audio lives in tar shards; each utterance reads its member `tar://ID.EXT::SHARD`.
"""
from __future__ import annotations

import os
import posixpath
import re
import tarfile
from typing import Any, Iterable

import fsspec

from distill.data.manifest import ManifestError, Utterance, compute_num_samples, iter_jsonl

__all__ = ["utterance_from_cut", "cuts_to_utterances", "recordings_to_utterances", "supervisions_to_utterances",
           "load_shar", "is_shar_dir", "deserialize"]

_PLAIN_TRANSFORMS = ("Resample",)  # read_audio resamples anyway; every other transform changes the content


def deserialize(d: dict, where: str):
    """A lhotse manifest item (Cut, Recording or SupervisionSegment) from its dict, errors naming `where`."""
    from lhotse.serialization import deserialize_item

    try:
        return deserialize_item(d)
    except KeyError as e:
        raise ManifestError(f"{where}: {_what(d)} is missing required field {e}") from None
    except Exception as e:  # lhotse's own validation (bad types, unknown cut type, ...)
        raise ManifestError(f"{where}: {_what(d)} is not a valid lhotse item ({type(e).__name__}: {e})") from None


def _what(d: dict) -> str:
    kind = d.get("type") or ("recording" if "sources" in d else "supervision" if "recording_id" in d else "item")
    return f"{kind} {d.get('id')!r}" if d.get("id") is not None else kind


def _join_root(path: str, audio_root: str | None) -> str:
    if audio_root is None or "://" in path or os.path.isabs(path):
        return path
    return posixpath.join(audio_root, path) if "://" in audio_root else os.path.join(audio_root, path)


def _texts(sups: Iterable) -> tuple[str | None, str | None]:
    sups = sorted(sups, key=lambda s: float(s.start))
    texts = [s.text.strip() for s in sups if isinstance(s.text, str) and s.text.strip()]
    speakers = {s.speaker for s in sups if s.speaker is not None}
    return (" ".join(texts) if texts else None), (speakers.pop() if len(speakers) == 1 else None)


def _plain_source(rec, channel: Any, who: str) -> tuple[str, int | None] | None:
    """(path, channel inside that file or None = downmix) when plain file reading reproduces lhotse's audio for
    this recording and channel selection; None when lhotse must render it."""
    if any(t.to_dict().get("name") not in _PLAIN_TRANSFORMS for t in (rec.transforms or [])):
        return None
    if any(s.type not in ("file", "url") for s in rec.sources):
        return None
    chans = list(channel) if isinstance(channel, (list, tuple)) else [channel]
    for c in chans:
        if c not in rec.channel_ids:
            raise ManifestError(f"{who}: channel {c} not in recording {rec.id!r} channels {rec.channel_ids}")
    if len(chans) == 1:
        for s in rec.sources:
            if chans[0] in s.channels:
                return s.source, s.channels.index(chans[0])
    if len(rec.sources) == 1 and sorted(chans) == sorted(rec.sources[0].channels):
        return rec.sources[0].source, None
    return None


def _source_rate(rec) -> int:
    """The rate of the file itself (before a Resample transform), which read_audio decodes at."""
    for t in rec.transforms or []:
        kw = t.to_dict().get("kwargs", {})
        if t.to_dict().get("name") == "Resample" and kw.get("source_sampling_rate"):
            return int(kw["source_sampling_rate"])
    return int(rec.sampling_rate)


def utterance_from_cut(cut, *, audio_root: str | None = None, where: str = "") -> Utterance:
    """One Utterance for one lhotse cut (MonoCut, MultiCut or MixedCut)."""
    from lhotse.cut import MixedCut, PaddingCut

    who = f"{where}: cut {cut.id!r}" if where else f"cut {cut.id!r}"
    if isinstance(cut, PaddingCut):
        raise ManifestError(f"{who} is a PaddingCut (silence): there is nothing for a teacher to label")
    text, speaker = _texts(cut.supervisions)
    if not isinstance(cut, MixedCut):
        if not cut.has_recording:
            raise ManifestError(f"{who} has no recording (features-only cuts cannot be re-embedded)")
        plain = _plain_source(cut.recording, cut.channel, who)
        if plain is not None:
            path, chan = plain
            rate = _source_rate(cut.recording)
            return Utterance(id=cut.id, audio=_join_root(path, audio_root), sample_rate=rate,
                             num_samples=compute_num_samples(cut.duration, rate), offset=float(cut.start),
                             duration=float(cut.duration), text=text, channel=chan, speaker=speaker)
    # rendered by lhotse: speed-perturbed, mixed, in-memory or multi-source audio
    sources = [s.source for t in _recordings(cut) for s in t.sources if isinstance(s.source, str)]
    return Utterance(id=cut.id, audio=sources[0] if sources else f"<lhotse cut {cut.id}>",
                     sample_rate=int(cut.sampling_rate), num_samples=int(cut.num_samples),
                     offset=0.0, duration=float(cut.duration), text=text, channel=0, speaker=speaker,
                     lhotse_cut=(cut.with_recording_path_prefix(audio_root) if audio_root else cut).to_dict())


def _recordings(cut) -> list:
    from lhotse.cut import MixedCut

    if isinstance(cut, MixedCut):
        return [t.cut.recording for t in cut.tracks if getattr(t.cut, "has_recording", False)]
    return [cut.recording]


def cuts_to_utterances(items: Iterable[tuple[int, dict]], path: str, audio_root: str | None) -> list[Utterance]:
    return [utterance_from_cut(deserialize(d, f"{path}:{n}"), audio_root=audio_root, where=f"{path}:{n}")
            for n, d in items]


def _recording_set(items: Iterable[tuple[int, dict]], path: str) -> dict:
    from lhotse import Recording

    recs: dict = {}
    for n, d in items:
        r = deserialize(d, f"{path}:{n}")
        if not isinstance(r, Recording):
            raise ManifestError(f"{path}:{n}: expected a lhotse Recording (with 'sources')")
        if r.id in recs:
            raise ManifestError(f"{path}: duplicate recording id {r.id!r}")
        recs[r.id] = r
    return recs


def _supervisions(items: Iterable[tuple[int, dict]], path: str, recs: dict) -> list:
    from lhotse import SupervisionSegment

    out = []
    for n, d in items:
        s = deserialize(d, f"{path}:{n}")
        if not isinstance(s, SupervisionSegment):
            raise ManifestError(f"{path}:{n}: expected a lhotse SupervisionSegment (with 'recording_id')")
        if s.recording_id not in recs:
            raise ManifestError(f"{path}:{n}: supervision {s.id!r} refers to unknown recording "
                                f"{s.recording_id!r}")
        out.append(s)
    return out


def recordings_to_utterances(rec_items, rec_path: str, sup_items=None, sup_path: str | None = None,
                             audio_root: str | None = None) -> list[Utterance]:
    """One utterance per recording (all its channels), text from the supervisions in time order."""
    recs = _recording_set(rec_items, rec_path)
    by_rec: dict[str, list] = {}
    for s in _supervisions(sup_items or [], sup_path or "", recs):
        by_rec.setdefault(s.recording_id, []).append(s)
    out = []
    for r in recs.values():
        cut = r.to_cut()  # id = the recording's; MonoCut for one channel, MultiCut (downmix) for several
        cut.supervisions = by_rec.get(r.id, [])
        out.append(utterance_from_cut(cut, audio_root=audio_root, where=rec_path))
    return out


def supervisions_to_utterances(sup_items, sup_path: str, rec_items, rec_path: str,
                               audio_root: str | None = None) -> list[Utterance]:
    """One utterance per supervision segment, cut from its recording."""
    from lhotse import MonoCut
    from lhotse.cut import MultiCut

    recs = _recording_set(rec_items, rec_path)
    out = []
    for s in _supervisions(sup_items, sup_path, recs):
        rec = recs[s.recording_id]
        channel = s.channel if s.channel is not None else rec.channel_ids
        kw = dict(id=s.id, start=s.start, duration=s.duration, channel=channel, recording=rec,
                  supervisions=[s.with_offset(-s.start)])
        cut = MultiCut(**kw) if isinstance(channel, list) and len(channel) > 1 else \
            MonoCut(**{**kw, "channel": channel[0] if isinstance(channel, list) else channel})
        out.append(utterance_from_cut(cut, audio_root=audio_root, where=sup_path))
    return out


# ------------------------------------------------------------------------------------------------ Lhotse Shar

_SHAR_CUTS = re.compile(r"^cuts\.(\d+)\.jsonl(\.gz)?$")


def is_shar_dir(path: str, storage_options: dict | None = None) -> bool:
    """A Lhotse Shar directory: `cuts.NNNNNN.jsonl[.gz]` shards (with `recording.NNNNNN.tar` beside them)."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    try:
        return fs.isdir(p) and any(_SHAR_CUTS.match(posixpath.basename(x)) for x in fs.ls(p, detail=False))
    except OSError:
        return False


def load_shar(path: str, storage_options: dict | None) -> list[Utterance]:
    """Utterances of a Lhotse Shar directory; each reads its audio member from the shard's recording tar."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    names = sorted(x for x in fs.ls(p, detail=False) if _SHAR_CUTS.match(posixpath.basename(x)))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    out = []
    for name in names:
        idx = _SHAR_CUTS.match(posixpath.basename(name)).group(1)
        tar = posixpath.join(p, f"recording.{idx}.tar")
        if not fs.exists(tar):
            raise ManifestError(f"{path}: Shar shard {posixpath.basename(name)} has no recording.{idx}.tar "
                                f"(only the 'recording' field is read)")
        with fs.open(tar, "rb") as f, tarfile.open(fileobj=f) as tf:  # seeks over the data: headers only
            members = {posixpath.splitext(m)[0]: m for m in tf.getnames() if not m.endswith(".json")}
        tar_url = tar if protocol in ("file", "local") else f"{protocol}://{tar}"
        shard_path = name if protocol in ("file", "local") else f"{protocol}://{name}"
        for n, d in iter_jsonl(shard_path, storage_options):
            cut = deserialize(d, f"{shard_path}:{n}")
            if cut.id not in members:
                raise ManifestError(f"{shard_path}:{n}: cut {cut.id!r} has no audio in {tar_url}")
            member = f"tar://{members[cut.id]}::{tar_url}"
            source = cut.recording.sources[0]
            source.type, source.source = "url", member
            out.append(utterance_from_cut(cut, where=shard_path))
    return out
