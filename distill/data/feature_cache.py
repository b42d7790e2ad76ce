"""A byte-bounded, least-recently-used cache of fbank features, one per loader process.

Features are recomputed from audio every time an utterance is read unless cached; 960 h of 80-dim float32 fbank
is about 110 GB, so the cache must be bounded and is off unless asked for (`feature_cache_mb`). The limit is per
process: each DataLoader worker fills its own (batches go to workers round-robin, so a worker sees a random part
of the corpus each epoch) and the cache only pays off when the training set's features fit in one worker's limit.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["FeatureCache"]


class FeatureCache:
    """Arrays by utterance id, evicting the least recently used once their bytes exceed `max_bytes`.

    An array larger than the whole limit is not kept. A pickled cache (a dataset sent to a spawned worker) arrives
    empty with the same limit: the parent's arrays are never shipped to workers. Callers must not modify returned
    arrays (they are the cached ones)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"feature cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    @classmethod
    def from_mb(cls, mb: float) -> "FeatureCache | None":
        """A cache of `mb` MiB; None (no cache) for 0."""
        if mb < 0:
            raise ValueError(f"feature cache size must be >= 0 MB, got {mb}")
        return cls(int(mb * (1 << 20))) if mb else None

    def get(self, key: str) -> np.ndarray | None:
        arr = self._items.get(key)
        if arr is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return arr

    def __setitem__(self, key: str, arr: np.ndarray) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if arr.nbytes > self.max_bytes:
            return
        self._items[key] = arr
        self.nbytes += arr.nbytes
        while self.nbytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes
            self.evictions += 1

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])
