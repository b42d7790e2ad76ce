"""Utterance index: id -> (offset, num_frames, shard), stored as zarr arrays and looked up in memory.

Two lookup paths: a dict (O(1), built lazily on first lookup; ~100 bytes per utterance) and binary search over
the ids in sorted order (np.searchsorted on the stored `sort_order` permutation; no per-id Python objects),
which "auto" picks for stores with more than DICT_LIMIT utterances.
"""
from __future__ import annotations

import threading

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .errors import StoreError
from .format import INDEX_CHUNK, INDEX_GROUP
from .plan import ShardPlan

DICT_LIMIT = 2_000_000
LOOKUPS = ("auto", "dict", "sorted")


class UtteranceIndex:
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
        k = int(np.searchsorted(self._sorted, utt_id))
        if k < len(self._sorted) and self._sorted[k] == utt_id:
            return int(self.sort_order[k])
        raise KeyError(f"utterance {utt_id!r} is not in the store")

    def __contains__(self, utt_id) -> bool:
        try:
            self.position(utt_id)
            return True
        except KeyError:
            return False

    def entry(self, pos: int) -> tuple[int, int, int]:
        return int(self.offsets[pos]), int(self.num_frames[pos]), int(self.shard[pos])

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
    def read(cls, root: zarr.Group, where: str, lookup: str = "auto") -> "UtteranceIndex":
        try:
            g = root[INDEX_GROUP]
            arrays = {name: g[name][:] for name in ("ids", "offsets", "num_frames", "shard", "sort_order")}
        except KeyError as e:
            raise StoreError(f"{where}: index array missing ({e})") from None
        return cls(arrays["ids"], arrays["offsets"], arrays["num_frames"], arrays["shard"],
                   arrays["sort_order"], lookup=lookup)
