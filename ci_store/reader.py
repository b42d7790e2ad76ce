"""Row reads from sharded label arrays with few requests: each shard's index is fetched once per process and
cached, and all inner chunks a batch needs in one shard are fetched as one byte range per run of nearby chunks,
with every range of the batch requested concurrently (what matters on object storage, where latency dominates).

Uncompressed frame-major chunks (float stores' default) on local disk take a shorter path: the stored bytes of a
chunk are the rows themselves, so one vectored read (preadv) per run of adjacent chunks puts the rows of every
chunk an utterance covers whole straight into the result array and the crc32c of each chunk into a small
buffer; only the first and last chunk, partly outside the utterance, go through a scratch buffer. A chunk's crc32c
is checked the first time a reader reads it, before the result is returned; completed shards are write-once, so a
chunk whose bytes matched once is not hashed again by the same reader (a training run's later epochs), which is
what makes these reads as fast as HDF5's unchecked ones. `ci-store verify` and every new handle check afresh
(docs/store-format.md, "Reading").
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import crc32c
import numpy as np

from .errors import StoreError
from .format import shard_key
from .fsio import ObjectStore
from .shardcodec import EMPTY, ShardLayout

MAX_GAP_BYTES = 64 << 10     # merge two chunk runs of one shard when at most this many unneeded bytes lie between
                             # (ranges are fetched concurrently, so a wider merge mostly adds bytes, not speed)


class ShardReader:
    def __init__(self, objects: ObjectStore, array: str, layout: ShardLayout, max_cached_indexes: int = 4096):
        self.objects = objects
        self.array = array
        self.layout = layout
        self.max_cached = max_cached_indexes
        self._indexes: OrderedDict[int, np.ndarray] = OrderedDict()
        self._checked: dict[int, np.ndarray] = {}  # shard -> chunks whose crc32c matched (direct path), per index
        self._lock = threading.Lock()

    def _where(self, shard: int, chunk: int | None = None) -> str:
        key = shard_key(self.array, shard)
        return f"{self.objects.url}/{key}" + ("" if chunk is None else f" (inner chunk {chunk})")

    def indexes(self, shards: Sequence[int], sizes: dict[int, int]) -> dict[int, np.ndarray]:
        """Shard indexes, fetching the missing ones concurrently. sizes[s]: object bytes (0: all padding).

        The index is the object's tail; its offset comes from the size in the completion record, so a plain range
        request suffices (suffix requests are not supported by every fsspec layer, e.g. simplecache).
        """
        out, missing = {}, []
        with self._lock:
            for s in shards:
                if s in self._indexes:
                    self._indexes.move_to_end(s)
                    out[s] = self._indexes[s]
                else:
                    missing.append(s)
        fetch = [s for s in missing if sizes[s] > 0]
        for s in fetch:
            if not self.layout.index_nbytes <= sizes[s] <= self.layout.max_object_nbytes:
                raise StoreError(f"{self._where(s)}: completion record gives {sizes[s]} bytes, not a possible size "
                                 f"(from {self.layout.index_nbytes} to {self.layout.max_object_nbytes})")
        tails = self.objects.get_ranges([(shard_key(self.array, s), sizes[s] - self.layout.index_nbytes, sizes[s])
                                         for s in fetch])
        got = dict(zip(fetch, tails))
        for s in missing:
            if sizes[s] == 0:
                idx = np.full((self.layout.nchunks, 2), EMPTY, dtype="<u8")
            else:
                if got[s] is None:
                    raise StoreError(f"{self._where(s)}: shard object is missing although its completion record exists")
                idx = self.layout.decode_index(got[s], self._where(s), sizes[s])
            out[s] = idx
            with self._lock:
                self._indexes[s] = idx
                self._checked.pop(s, None)
                while len(self._indexes) > self.max_cached:
                    gone, _ = self._indexes.popitem(last=False)
                    self._checked.pop(gone, None)
        return out

    @property
    def direct(self) -> bool:
        """Whether reads take the local vectored path (uncompressed, frame-major chunks on local disk)."""
        return self.objects.local and self.layout.compressor == "none" and not self.layout.transpose

    def read(self, requests: Sequence[tuple[int, int, int]], sizes: dict[int, int],
             names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Rows [lo, hi) of shard s (shard-local) for each (s, lo, hi), as [hi - lo, width] arrays.

        names: the utterance of each request, named in the StoreError a corrupted or truncated read raises."""
        L = self.layout
        C = L.chunk_frames
        needed: dict[int, set[int]] = {}
        first: dict[int, int] = {}          # shard -> first request reading it (named in shard-level errors)
        for k, (s, lo, hi) in enumerate(requests):
            needed.setdefault(s, set()).update(range(lo // C, (hi - 1) // C + 1))
            first.setdefault(s, k)
        try:
            idx = self.indexes(list(needed), sizes)
        except StoreError as e:
            bad = [s for s in needed if s not in self._indexes]
            raise _for(e, names, first[bad[0]] if bad else 0) from None
        if self.direct:
            # one block for the whole batch: fresh memory for many utterances at once is mapped in large pages
            # (numpy asks for transparent huge pages from 4 MiB), where one array per utterance would take a
            # page fault per 4 KiB every batch once the allocator has returned the previous batch to the system
            le = L.dtype.newbyteorder("<")
            if len(requests) == 1:
                (s, lo, hi), = requests
                res = np.empty((hi - lo, L.width), le)
                self._read_direct(s, lo, hi, idx[s], names, 0, res)
                return [res.astype(L.dtype, copy=False)]
            block = np.empty((sum(hi - lo for _, lo, hi in requests), L.width), le)
            out, pos = [], 0
            for k, (s, lo, hi) in enumerate(requests):
                res = block[pos:pos + hi - lo]
                pos += hi - lo
                self._read_direct(s, lo, hi, idx[s], names, k, res)
                out.append(res.astype(L.dtype, copy=False))
            return out

        ranges, members = [], []   # one byte range per run of chunks; members: (shard, [(chunk, start, n)])
        for s, chunks in needed.items():
            stored = [c for c in sorted(chunks) if idx[s][c, 0] != EMPTY]
            run: list[tuple[int, int, int]] = []
            for c in stored:
                off, n = int(idx[s][c, 0]), int(idx[s][c, 1])
                if run and not (0 <= off - (run[-1][1] + run[-1][2]) <= MAX_GAP_BYTES):
                    ranges.append((shard_key(self.array, s), run[0][1], run[-1][1] + run[-1][2]))
                    members.append((s, run))
                    run = []
                run.append((c, off, n))
            if run:
                ranges.append((shard_key(self.array, s), run[0][1], run[-1][1] + run[-1][2]))
                members.append((s, run))
        blobs = self.objects.get_ranges(ranges)

        reader_of = {}                      # (shard, chunk) -> first request reading it (named in errors)
        for k, (s, lo, hi) in enumerate(requests):
            for c in range(lo // C, (hi - 1) // C + 1):
                reader_of.setdefault((s, c), k)
        decoded: dict[tuple[int, int], np.ndarray] = {}
        for (s, run), blob, (_, base, end) in zip(members, blobs, ranges):
            if blob is None or len(blob) != end - base:
                raise _for(StoreError(f"{self._where(s)}: object missing or shorter than its index says "
                                      f"(corrupted)"), names, reader_of[(s, run[0][0])])
            for c, off, n in run:
                try:
                    decoded[(s, c)] = L.decode_chunk(blob[off - base:off - base + n], self._where(s, c))
                except StoreError as e:
                    raise _for(e, names, reader_of[(s, c)]) from None
        out = []
        for s, lo, hi in requests:
            res = np.empty((hi - lo, L.width), dtype=L.dtype)
            for c in range(lo // C, (hi - 1) // C + 1):
                a, b = max(lo, c * C), min(hi, (c + 1) * C)
                chunk = decoded.get((s, c))
                if chunk is None:
                    res[a - lo:b - lo] = 0
                else:
                    res[a - lo:b - lo] = chunk[a - c * C:b - c * C]
            out.append(res)
        return out

    def _read_direct(self, s: int, lo: int, hi: int, index: np.ndarray, names, k: int, res: np.ndarray) -> None:
        """Rows [lo, hi) of shard s into `res` (C-contiguous, little-endian) from uncompressed frame-major chunks
        on local disk: one preadv per run of chunks stored back to back, whole chunks straight into `res`, every
        chunk's crc32c checked."""
        L = self.layout
        C, cn = L.chunk_frames, L.chunk_nbytes
        row = L.width * L.dtype.itemsize
        flat = res.reshape(-1).view(np.uint8)
        c0, c1 = lo // C, (hi - 1) // C
        entries = index[c0:c1 + 1]
        is_stored = entries[:, 0] != EMPTY
        # decode_index allows no other size for an uncompressed chunk; checked again before it sizes a read
        bad = is_stored & (entries[:, 1] != cn + 4)
        if bad.any():
            c = c0 + int(np.flatnonzero(bad)[0])
            raise _for(StoreError(f"{self._where(s, c)}: stored chunk of {int(index[c, 1])} bytes, expected "
                                  f"{cn + 4}"), names, k)
        offsets, stored = entries[:, 0].tolist(), is_stored.tolist()
        with self._lock:
            checked = self._checked.setdefault(s, np.zeros(L.nchunks, bool))
        crcs = np.empty((c1 - c0 + 1, 4), np.uint8)
        runs: list[tuple[int, list]] = []       # (object offset, [(chunk, target buffer, rows [a, b) if scratch)])
        end = None
        for i, off in enumerate(offsets):
            c = c0 + i
            a, b = max(lo, c * C), min(hi, c * C + C)
            if not stored[i]:
                flat[(a - lo) * row:(b - lo) * row] = 0
                end = None
                continue
            if a == c * C and b == c * C + C:
                target, part = flat[(a - lo) * row:(b - lo) * row], None
            else:
                target, part = np.empty(cn, np.uint8), (a, b)
            if off != end:
                runs.append((off, []))
            runs[-1][1].append((c, target, part))
            end = off + cn + 4
        key = shard_key(self.array, s)
        for off, members in runs:
            bufs = []
            for c, target, _ in members:
                bufs += (target, crcs[c - c0])
            want = len(members) * (cn + 4)
            got = self.objects.read_into(key, off, bufs)
            if got is None:
                raise _for(StoreError(f"{self._where(s)}: shard object is missing although its completion record "
                                      f"exists"), names, k)
            if got != want:
                raise _for(StoreError(f"{self._where(s, members[0][0])}: object ends {want - got} bytes before "
                                      f"the chunks its index lists (truncated or corrupted)"), names, k)
            expected = crcs[members[0][0] - c0:members[-1][0] - c0 + 1].view("<u4").ravel().tolist()
            for (c, target, part), crc in zip(members, expected):
                if not checked[c]:
                    if crc32c.crc32c(target) != crc:
                        raise _for(StoreError(f"{self._where(s, c)}: checksum mismatch (corrupted data)"), names, k)
                    checked[c] = True
                if part is not None:
                    a, b = part
                    flat[(a - lo) * row:(b - lo) * row] = target[(a - c * C) * row:(b - c * C) * row]


def _for(err: StoreError, names: Sequence[str] | None, k: int) -> StoreError:
    """err, naming the utterance of request k when the caller named its requests."""
    if names is None:
        return err
    return StoreError(f"{err} (reading utterance {names[k]!r})")
