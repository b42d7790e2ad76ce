"""Checkpoints of an unfinished CI shard: the codes of each finished segment, so that a pre-empted shard task
resumes at the last finished segment instead of redoing the whole shard's teacher work.

Layout: `<CI store>/partial/shard-<s:06d>/segment-<k:06d>.bin`, one object per finished segment (segments:
distill/extract/shard_task.py), written once and never modified, all deleted right after the shard's completion
record is written. Readers and `verify` never look under `partial/` (docs/store-format.md).

Payload: MAGIC, an 8-byte little-endian header length, a JSON header (store identity, shard, segment, its
utterances with frame counts, failures, codes dtype/width, sha256 of the codes), then the codes of the segment's
successful utterances in segment order (C order, little-endian). Nothing is unpickled. A checkpoint that does not
match what the task would compute now (other quantizer, teacher or plan, other segment boundaries, damaged bytes)
is ignored and its segment recomputed: a checkpoint can cost work, never correctness.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from ci_store.fsio import ObjectStore

PARTIAL_PREFIX = "partial"
MAGIC = b"ci-store-partial\n"
FORMAT, VERSION = "ci-store-partial", 1

log = logging.getLogger(__name__)


@dataclass
class SegmentCodes:
    """What a checkpoint restores: codes of the segment's successful utterances, its failures, its frames."""

    codes: dict[str, np.ndarray]
    failures: dict[str, str]
    frames: int


def store_identity(meta: dict) -> str:
    """sha256 of what makes codes valid for a store: its plan, quantizer and teacher (checkpoints of another
    store, or of a store re-created at the same URL with other inputs, never match)."""
    key = {k: meta.get(k) for k in ("plan_sha256", "quantizer_id", "quantizer_sha256", "teacher", "dtype", "width")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class ShardCheckpoints:
    """The checkpoint objects of one CI shard (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict | None, shard: int, identity: str, dtype, width: int):
        self.objects = ObjectStore(url, storage_options)
        self.shard, self.identity = int(shard), identity
        self.dtype, self.width = np.dtype(dtype), int(width)
        self.prefix = f"{PARTIAL_PREFIX}/shard-{self.shard:06d}/"

    def _key(self, segment: int) -> str:
        return f"{self.prefix}segment-{segment:06d}.bin"

    def keys(self) -> list[str]:
        return self.objects.list_prefix(self.prefix)

    def save(self, segment: int, utts: list[tuple[str, int]], codes: dict[str, np.ndarray],
             failures: dict[str, str]) -> None:
        """Checkpoint one finished segment: `codes` for every utterance of `utts` not in `failures`."""
        ok = [u for u, _ in utts if u not in failures]
        body = b"".join(np.ascontiguousarray(codes[u], dtype=self.dtype.newbyteorder("<")).tobytes() for u in ok)
        header = {"format": FORMAT, "version": VERSION, "identity": self.identity, "shard": self.shard,
                  "segment": int(segment), "utterances": [[u, int(n)] for u, n in utts],
                  "failures": {u: failures[u] for u in sorted(failures)}, "dtype": self.dtype.str.lstrip("<>|="),
                  "width": self.width, "nbytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        raw = json.dumps(header, sort_keys=True).encode()
        self.objects.set(self._key(segment), MAGIC + len(raw).to_bytes(8, "little") + raw + body)

    def load(self, segments: list[list[tuple[str, int]]]) -> dict[int, SegmentCodes]:
        """Valid checkpoints of this shard, by segment number, for the segments the task plans now."""
        out = {}
        for key in self.keys():
            name = key.rsplit("/", 1)[-1]
            try:
                k = int(name[len("segment-"):-len(".bin")])
            except ValueError:
                continue
            if not (name.startswith("segment-") and name.endswith(".bin")) or not 0 <= k < len(segments):
                continue
            data = self.objects.get(key)
            got = None if data is None else self._parse(data, k, segments[k])
            if got is None:
                log.warning("shard %d: ignoring checkpoint %s (does not match this run); recomputing it",
                            self.shard, key)
            else:
                out[k] = got
        return out

    def _parse(self, data: bytes, segment: int, utts: list[tuple[str, int]]) -> SegmentCodes | None:
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
            return None
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
        start = len(MAGIC) + 8 + n
        try:
            h = json.loads(data[len(MAGIC) + 8:start])
        except (ValueError, UnicodeDecodeError):
            return None
        body = data[start:]
        if not isinstance(h, dict) or not isinstance(h.get("failures"), dict):
            return None
        want = {"format": FORMAT, "version": VERSION, "identity": self.identity, "shard": self.shard,
                "segment": segment, "utterances": [[u, int(f)] for u, f in utts],
                "dtype": self.dtype.str.lstrip("<>|="), "width": self.width, "nbytes": len(body)}
        if any(h.get(k) != v for k, v in want.items()) or hashlib.sha256(body).hexdigest() != h.get("sha256"):
            return None
        failures = h["failures"]
        if not set(failures) <= {u for u, _ in utts}:
            return None
        ok = [(u, f) for u, f in utts if u not in failures]
        rows = sum(f for _, f in ok)
        if rows * self.width * self.dtype.itemsize != len(body):
            return None
        flat = np.frombuffer(body, dtype=self.dtype.newbyteorder("<")).astype(self.dtype).reshape(rows, self.width)
        codes, at = {}, 0
        for u, f in ok:
            codes[u] = flat[at:at + f]
            at += f
        return SegmentCodes(codes, {u: str(r) for u, r in failures.items()}, rows)

    def clear(self) -> None:
        """Delete every checkpoint of the shard (after its completion record is written)."""
        for key in self.keys():
            self.objects.delete(key)
        if self.objects.local:  # no empty partial/shard-N/ folders left behind in a local store
            for d in (self.prefix.rstrip("/"), PARTIAL_PREFIX):
                try:
                    os.rmdir(os.path.join(self.objects.url, *d.split("/")))
                except OSError:
                    pass
