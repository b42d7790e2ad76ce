"""Utterance index: id -> (offset, num_frames, shard), stored as zarr arrays and looked up in memory.

Two lookup paths: a dict (O(1), built lazily on first lookup; ~100 bytes per utterance) and binary search over
the ids in sorted order (bisect over the ids permuted by the stored `sort_order`; no per-id Python objects),
which "auto" picks for stores with more than DICT_LIMIT utterances.
"""
from __future__ import annotations

import bisect
import threading

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .errors import StoreError
from .format import INDEX_ARRAYS, INDEX_CHUNK, INDEX_GROUP
from .fsio import ObjectStore
from .plainarray import parse_array, read_numeric, read_strings
from .plan import ShardPlan

DICT_LIMIT = 2_000_000
LOOKUPS = ("auto", "dict", "sorted")
INDEX_DTYPES = {"ids": "string", "offsets": "int64", "num_frames": "int64", "shard": "int32", "sort_order": "int64"}
MAX_ID_BYTES = 1024             # average UTF-8 bytes per utterance id a reader accepts in an ids chunk


class ContainsByPosition:
    """`in` for an index whose position() raises KeyError for an absent id (the v1 and the v2 index)."""

    def __contains__(self, utt_id) -> bool:
        try:
            self.position(utt_id)
            return True
        except KeyError:
            return False


class UtteranceIndex(ContainsByPosition):
    def __init__(self, ids, offsets, num_frames, shard, sort_order=None, lookup: str = "auto"):
        if lookup not in LOOKUPS:
            raise StoreError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
        self.ids = np.asarray(ids, dtype=np.dtypes.StringDType())
        self.offsets = np.asarray(offsets, np.int64)
        self.num_frames = np.asarray(num_frames, np.int64)
        self.shard = np.asarray(shard, np.int32)
        self.sort_order = (np.argsort(self.ids, kind="stable") if sort_order is None
                           else np.asarray(sort_order, np.int64))
        self.lookup = ("dict" if len(self.ids) <= DICT_LIMIT else "sorted") if lookup == "auto" else lookup
        self._dict: dict[str, int] | None = None
        self._sorted: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_plan(cls, plan: ShardPlan, lookup: str = "auto") -> "UtteranceIndex":
        ids, offsets, frames, shard = plan.arrays()
        return cls(ids, offsets, frames, shard, lookup=lookup)

    def to_plan(self, shard_frames: int) -> ShardPlan:
        return ShardPlan.from_arrays(shard_frames, self.ids.tolist(), self.offsets, self.num_frames, self.shard)

    # --- lookup ------------------------------------------------------------------------------------------------
    def position(self, utt_id: str) -> int:
        """Storage position of `utt_id`; KeyError naming it when absent."""
        if self.lookup == "dict":
            if self._dict is None:
                with self._lock:
                    if self._dict is None:
                        self._dict = {u: i for i, u in enumerate(self.ids.tolist())}
            try:
                return self._dict[utt_id]
            except (KeyError, TypeError):
                raise KeyError(f"utterance {utt_id!r} is not in the store") from None
        return self._search(utt_id)

    def _search(self, utt_id: str) -> int:
        if self._sorted is None:
            with self._lock:
                if self._sorted is None:
                    self._sorted = self.ids[self.sort_order]
        if not isinstance(utt_id, str):
            raise KeyError(f"utterance {utt_id!r} is not in the store")
        # bisect, not np.searchsorted: numpy 2.4's searchsorted on StringDType misplaces strings of 16 or more
        # bytes (those stored outside the array's inline slots), so every such id read as absent
        k = bisect.bisect_left(self._sorted, utt_id)
        if k < len(self._sorted) and self._sorted[k] == utt_id:
            return int(self.sort_order[k])
        raise KeyError(f"utterance {utt_id!r} is not in the store")

    def entry(self, pos: int) -> tuple[int, int, int]:
        return int(self.offsets[pos]), int(self.num_frames[pos]), int(self.shard[pos])

    def shard_range(self, s: int) -> tuple[int, int]:
        """Positions [lo, hi) of shard s (storage order groups utterances by shard)."""
        return (int(np.searchsorted(self.shard, s, "left")), int(np.searchsorted(self.shard, s, "right")))

    def ids_range(self, lo: int, hi: int) -> list[str]:
        return self.ids[lo:hi].tolist()

    def frames_range(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, num_frames) of positions [lo, hi), int64."""
        return self.offsets[lo:hi], self.num_frames[lo:hi]

    def id_at(self, pos: int) -> str:
        return str(self.ids[pos])

    def sort_problems(self) -> list[str]:
        """Checks for verify: sort_order is a permutation that sorts the ids."""
        n = len(self.ids)
        if len(self.sort_order) != n or not np.array_equal(np.sort(self.sort_order), np.arange(n)):
            return ["index/sort_order is not a permutation of the utterance positions"]
        s = self.ids[self.sort_order]
        if n > 1 and not np.all(s[1:] > s[:-1]):
            return ["index/sort_order does not sort the ids strictly (unsorted or duplicate ids)"]
        return []

    # --- storage -----------------------------------------------------------------------------------------------
    def write(self, root: zarr.Group) -> None:
        g = root.create_group(INDEX_GROUP, attributes={
            "description": "utterance id -> (offset, num_frames, shard); sort_order sorts ids (code points)"})
        n = max(1, len(self.ids))
        chunk = (min(n, INDEX_CHUNK),)
        for name, arr, dtype in (("ids", self.ids, str), ("offsets", self.offsets, "int64"),
                                 ("num_frames", self.num_frames, "int64"), ("shard", self.shard, "int32"),
                                 ("sort_order", self.sort_order, "int64")):
            a = g.create_array(name, shape=arr.shape, chunks=chunk, dtype=dtype,
                               compressors=[ZstdCodec(level=3)])
            a[:] = arr

    @classmethod
    def read(cls, objects: ObjectStore, meta: dict, where: str, lookup: str = "auto") -> "UtteranceIndex":
        """The stored index of a store whose metadata `meta` passed check_meta, checked against it before use:
        array shapes and types, then every entry inside its shard (so no read can be sized by a crafted entry).
        Memory is bounded by the ids chunks actually stored (each holds at most MAX_ID_BYTES per id on average).
        """
        n = meta["num_utterances"]
        paths = [f"{INDEX_GROUP}/{name}" for name in INDEX_ARRAYS]
        raws = objects.get_many([f"{p}/zarr.json" for p in paths])
        arrays = {name: parse_array(raw, p, where) for name, p, raw in zip(INDEX_ARRAYS, paths, raws)}
        for name, a in arrays.items():
            want = INDEX_DTYPES[name]
            got = "string" if a.dtype is None else str(a.dtype)
            if a.shape != (n,) or got != want:
                raise StoreError(f"{a.where}: shape {a.shape} and type {got}, expected ({n},) and {want} "
                                 f"(num_utterances={n} in the store metadata)")
        ids = read_strings(objects, arrays["ids"], MAX_ID_BYTES)
        if n and not np.all(np.strings.str_len(ids) > 0):
            raise StoreError(f"{arrays['ids'].where}: empty utterance id at position "
                             f"{int(np.flatnonzero(np.strings.str_len(ids) == 0)[0])}")
        numeric = [arrays[k] for k in ("offsets", "num_frames", "shard", "sort_order")]
        offsets, num_frames, shard, sort_order = read_numeric(objects, numeric, max_nbytes=n * 28)
        _check_entries(ids, offsets, num_frames, shard, sort_order, meta, f"{where}/{INDEX_GROUP}")
        return cls(ids, offsets, num_frames, shard, sort_order, lookup=lookup)


def _check_entries(ids, offsets, num_frames, shard, sort_order, meta: dict, where: str) -> None:
    """Each utterance inside its own shard, shard numbers and sort_order within range, frames adding up."""
    S, n = meta["shard_frames"], len(ids)
    start = shard.astype(np.int64) * S
    bad = ((shard < 0) | (shard >= meta["num_shards"]) | (num_frames < 1) | (num_frames > S) | (offsets < start)
           | (offsets > start + S - np.clip(num_frames, 1, S)))
    if bad.any():
        first = np.flatnonzero(bad)
        raise StoreError(f"{where}: {len(first)} entries outside their shard or of impossible size, first "
                         f"{str(ids[first[0]])!r} (offset {int(offsets[first[0]])}, {int(num_frames[first[0]])} "
                         f"frames, shard {int(shard[first[0]])}; shards hold {S} frames, {meta['num_shards']} shards)")
    if n and ((sort_order < 0) | (sort_order >= n)).any():
        raise StoreError(f"{where}: sort_order holds positions outside [0, {n})")
    if int(num_frames.sum()) != meta["total_frames"]:
        raise StoreError(f"{where}: frames add up to {int(num_frames.sum())}, metadata says total_frames="
                         f"{meta['total_frames']}")
