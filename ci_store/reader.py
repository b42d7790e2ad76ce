"""Row reads from sharded label arrays with few requests: each shard's index is fetched once per process and
cached, and all inner chunks a batch needs in one shard are fetched as one byte range per run of nearby chunks,
with every range of the batch requested concurrently (what matters on object storage, where latency dominates).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

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
                while len(self._indexes) > self.max_cached:
                    self._indexes.popitem(last=False)
        return out

    def read(self, requests: Sequence[tuple[int, int, int]], sizes: dict[int, int]) -> list[np.ndarray]:
        """Rows [lo, hi) of shard s (shard-local) for each (s, lo, hi), as [hi - lo, width] arrays."""
        L = self.layout
        C = L.chunk_frames
        needed: dict[int, set[int]] = {}
        for s, lo, hi in requests:
            needed.setdefault(s, set()).update(range(lo // C, (hi - 1) // C + 1))
        idx = self.indexes(list(needed), sizes)

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

        decoded: dict[tuple[int, int], np.ndarray] = {}
        for (s, run), blob, (_, base, end) in zip(members, blobs, ranges):
            if blob is None or len(blob) != end - base:
                raise StoreError(f"{self._where(s)}: object missing or shorter than its index says (corrupted)")
            for c, off, n in run:
                decoded[(s, c)] = L.decode_chunk(blob[off - base:off - base + n], self._where(s, c))
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
