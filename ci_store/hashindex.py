"""Format v2 utterance index: fixed-width arrays a reader maps or range-reads instead of loading.

Every array is a plain zarr v3 array stored as one uncompressed little-endian object, so its bytes on disk are the
array itself: a local reader memory-maps it (the DataLoader workers of one host then share the page cache instead
of each decoding a copy), a remote reader fetches only the byte ranges a lookup needs. Ids are found through a
table of 64-bit FNV-1a hashes sorted ascending (`hash_keys`, with the row of each in `hash_rows`) and a small
`hash_fence` (every `index_block`-th key) held in memory: a lookup reads one block of keys and then the stored id
of each candidate row, so hash collisions cost a comparison, never a wrong answer. Nothing per utterance is read
at open; each entry is checked against the layout when it is used (docs/store-format.md, "Format v2").
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from .errors import StoreError, name_some
from . import indexcache
from .format import INDEX_GROUP
from .index import ContainsByPosition
from .fsio import ObjectStore
from .plainarray import parse_array

HASH_NAME = "fnv1a-64"
ID_HASH_BITS = 64           # what create() writes; tests lower it to force collisions (the store records its own)
HASH_BLOCK = 4096           # keys per fence entry: one lookup reads one block (32 KiB of keys)
MAX_HASH_BLOCK = 1 << 20
MAX_ID_BYTES = 1024         # UTF-8 bytes of one id (v1: on average per ids chunk)
MAX_UTTERANCES = (1 << 32) - 1      # hash_rows is uint32
V2_ARRAYS = {"offsets": "int64", "num_frames": "int32", "id_ends": "uint64", "id_bytes": "uint8",
             "hash_keys": "uint64", "hash_rows": "uint32", "hash_fence": "uint64", "shard_starts": "uint64"}
FNV_OFFSET, FNV_PRIME, MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
REMOTE_BLOCK_BYTES = 256 << 10      # remote reads fetch and cache whole blocks of this size
REMOTE_CACHE_BLOCKS = 512           # per array: at most 128 MiB cached


def id_hash(uid: str, bits: int = 64) -> int:
    """FNV-1a 64 of the id's UTF-8 bytes, keeping the low `bits` bits."""
    h = FNV_OFFSET
    for b in uid.encode("utf-8"):
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h & ((1 << bits) - 1)


def id_hashes(id_bytes: np.ndarray, id_ends: np.ndarray, bits: int = 64, chunk: int = 1 << 20) -> np.ndarray:
    """id_hash of every id of a column (UTF-8 bytes back to back, end offsets), vectorised over ids."""
    n = len(id_ends)
    out = np.empty(n, np.uint64)
    prime = np.uint64(FNV_PRIME)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        start = int(id_ends[a - 1]) if a else 0
        ends = id_ends[a:b].astype(np.int64) - start
        lens = np.diff(ends, prepend=0)
        width = int(lens.max())
        mat = np.zeros((b - a, width), np.uint8)
        mat[np.arange(width) < lens[:, None]] = id_bytes[start:start + int(ends[-1])]
        h = np.full(b - a, FNV_OFFSET, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(width):
                live = j < lens
                h = np.where(live, (h ^ mat[:, j]) * prime, h)
        out[a:b] = h
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


def hash_table(keys: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted keys, rows, fence) of the hash table over per-row keys."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    return sorted_keys, order.astype(np.uint32), sorted_keys[::block].copy()


# --- one stored array ------------------------------------------------------------------------------------------
class Column:
    """A 1-D array stored as one raw object: memory-mapped on local disk, else read in cached ranged blocks."""

    def __init__(self, objects: ObjectStore, path: str, dtype: np.dtype, n: int, where: str,
                 file: str | None = None):
        """file: a local copy of the object to map (indexcache), else the store's own file when it is local."""
        self.objects, self.key, self.n, self.where = objects, f"{path}/c/0", n, f"{where}/{path}"
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._map = None
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        if objects.local and file is None:
            file = os.path.join(objects.url, *self.key.split("/"))
        if file is not None and n:
            try:
                size = os.path.getsize(file)
            except OSError:
                raise StoreError(f"{self.where}: array data {self.key} is missing") from None
            if size != n * self.dtype.itemsize:
                raise StoreError(f"{self.where}: {size} bytes stored, expected {n} x {self.dtype.itemsize}")
            # a plain ndarray over the map: np.memmap's subclass hooks cost more than a lookup
            self._map = np.memmap(file, dtype=self.dtype, mode="r", shape=(n,)).view(np.ndarray)

    def __len__(self) -> int:
        return self.n

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Elements [lo, hi) (clipped to the array)."""
        lo, hi = max(0, lo), min(self.n, hi)
        if hi <= lo:
            return np.empty(0, self.dtype)
        if self._map is not None:
            return self._map[lo:hi]
        size = self.dtype.itemsize
        a, b = lo * size, hi * size
        first, last = a // REMOTE_BLOCK_BYTES, (b - 1) // REMOTE_BLOCK_BYTES
        with self._lock:
            missing = [k for k in range(first, last + 1) if k not in self._blocks]
        if missing:
            total = self.n * size
            spans = [(k * REMOTE_BLOCK_BYTES, min(total, (k + 1) * REMOTE_BLOCK_BYTES)) for k in missing]
            got = self.objects.get_ranges([(self.key, s, e) for s, e in spans])
            for k, (s, e), blob in zip(missing, spans, got):
                if blob is None or len(blob) != e - s:
                    raise StoreError(f"{self.where}: array data {self.key} is missing or shorter than "
                                     f"{self.n} x {size} bytes")
                with self._lock:
                    self._blocks[k] = blob
        with self._lock:
            parts = []
            for k in range(first, last + 1):
                self._blocks.move_to_end(k)
                parts.append(self._blocks[k])
            raw = b"".join(parts)
            while len(self._blocks) > REMOTE_CACHE_BLOCKS:
                self._blocks.popitem(last=False)
        off = a - first * REMOTE_BLOCK_BYTES
        return np.frombuffer(raw, self.dtype, hi - lo, off)

    def __getitem__(self, i: int):
        if self._map is not None and 0 <= i < self.n:
            return self._map[i]
        return self.read(i, i + 1)[0]

    def all(self) -> np.ndarray:
        return self.read(0, self.n)


# --- the index -------------------------------------------------------------------------------------------------
class HashIndex(ContainsByPosition):
    """Format v2 index of one store: id -> position through the hash table; entries read on demand."""

    lookup = "hash"

    def __init__(self, cols: dict[str, Column], shard_starts: np.ndarray, fence: np.ndarray, meta: dict,
                 where: str):
        self.cols, self.shard_starts, self.fence = cols, shard_starts, fence
        self.n = meta["num_utterances"]
        self.S, self.num_shards = meta["shard_frames"], meta["num_shards"]
        self.bits, self.block = meta["id_hash_bits"], meta["index_block"]
        self.id_nbytes = len(cols["id_bytes"])
        self.where = f"{where}/{INDEX_GROUP}"
        self.cache_files: dict[str, str] = {}       # index_cache: the local copies mapped ({} : none)
        self.cache_downloaded: list[str] = []      # the arrays this process downloaded into the cache

    def __len__(self) -> int:
        return self.n

    # lookups
    def position(self, utt_id: str) -> int:
        """Storage position of `utt_id`; KeyError naming it when absent."""
        if isinstance(utt_id, str) and utt_id:
            h = np.uint64(id_hash(utt_id, self.bits))
            f = self.fence
            b0 = max(int(f.searchsorted(h, "left")) - 1, 0)
            b1 = max(int(f.searchsorted(h, "right")), b0 + 1)
            lo = b0 * self.block
            keys = self.cols["hash_keys"].read(lo, b1 * self.block)
            i, j = int(keys.searchsorted(h, "left")), int(keys.searchsorted(h, "right"))
            rows = self.cols["hash_rows"]
            for k in range(lo + i, lo + j):
                r = int(rows[k])
                if r >= self.n:
                    raise StoreError(f"{self.where}/hash_rows: row {r} outside [0, {self.n})")
                if self.id_at(r) == utt_id:
                    return r
        raise KeyError(f"utterance {utt_id!r} is not in the store")

    def id_at(self, pos: int) -> str:
        ends = self.cols["id_ends"]
        a = int(ends[pos - 1]) if pos else 0
        b = int(ends[pos])
        if not 0 <= a < b <= self.id_nbytes or b - a > MAX_ID_BYTES:
            raise StoreError(f"{self.where}/id_ends: entries {max(pos - 1, 0)}..{pos} are not increasing id ends "
                             f"inside id_bytes ({self.id_nbytes} bytes; ids of 1 to {MAX_ID_BYTES} bytes)")
        try:
            return self.cols["id_bytes"].read(a, b).tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"{self.where}/id_bytes: ids {pos}..{pos} are not valid UTF-8") from None

    def ids_range(self, lo: int, hi: int) -> list[str]:
        """Ids of positions [lo, hi), checked: ends increasing, inside id_bytes, each 1..MAX_ID_BYTES of UTF-8."""
        if hi <= lo:
            return []
        ends = self.cols["id_ends"].read(max(lo - 1, 0), hi).astype(np.int64)
        if lo == 0:
            ends = np.concatenate([[0], ends])
        lens = np.diff(ends)
        if (ends[0] < 0 or ends[-1] > self.id_nbytes or (lens < 1).any() or (lens > MAX_ID_BYTES).any()):
            raise StoreError(f"{self.where}/id_ends: entries {lo}..{hi - 1} are not increasing id ends inside "
                             f"id_bytes ({self.id_nbytes} bytes; ids of 1 to {MAX_ID_BYTES} bytes)")
        raw = self.cols["id_bytes"].read(int(ends[0]), int(ends[-1])).tobytes()
        base = int(ends[0])
        try:
            return [raw[a - base:b - base].decode("utf-8") for a, b in zip(ends[:-1].tolist(), ends[1:].tolist())]
        except UnicodeDecodeError:
            raise StoreError(f"{self.where}/id_bytes: ids {lo}..{hi - 1} are not valid UTF-8") from None

    def frames_range(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, num_frames) of positions [lo, hi), int64, unchecked (the caller checks the layout)."""
        return (self.cols["offsets"].read(lo, hi).astype(np.int64),
                self.cols["num_frames"].read(lo, hi).astype(np.int64))

    def entry(self, pos: int) -> tuple[int, int, int]:
        """(offset, num_frames, shard) of a position, checked against the layout before anything uses it."""
        if not 0 <= pos < self.n:
            raise StoreError(f"{self.where}: position {pos} outside [0, {self.n})")
        off = int(self.cols["offsets"][pos])
        n = int(self.cols["num_frames"][pos])
        s = off // self.S
        if (not 0 <= s < self.num_shards or not 1 <= n <= self.S or off + n > (s + 1) * self.S
                or not self.shard_starts[s] <= pos < self.shard_starts[s + 1]):
            raise StoreError(f"{self.where}: entry {pos} (offset {off}, {n} frames) is outside its shard "
                             f"(shards hold {self.S} frames, {self.num_shards} shards)")
        return off, n, s

    def shard_range(self, s: int) -> tuple[int, int]:
        return int(self.shard_starts[s]), int(self.shard_starts[s + 1])

    # whole arrays (verify, stats, plans: these read every entry)
    @property
    def offsets(self) -> np.ndarray:
        return self.cols["offsets"].all().astype(np.int64)

    @property
    def num_frames(self) -> np.ndarray:
        return self.cols["num_frames"].all().astype(np.int64)

    @property
    def shard(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_shards, dtype=np.int32), np.diff(self.shard_starts.astype(np.int64)))

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.ids_range(0, self.n), dtype=np.dtypes.StringDType())

    def to_plan(self, shard_frames: int):
        from .plan import ShardPlan
        return ShardPlan.from_columns(shard_frames, self.cols["id_bytes"].all(), self.cols["id_ends"].all(),
                                      self.num_frames, self.shard_starts.astype(np.int64))

    def problems(self) -> list[str]:
        """verify's checks of the whole index: layout (contiguous, within shards), unique ids, the hash table."""
        from .plan import column_problems
        out = column_problems(self.S, self.cols["id_bytes"].all(), self.cols["id_ends"].all(),
                              self.num_frames, self.shard_starts.astype(np.int64), self.offsets)
        if out:
            return out
        keys = id_hashes(self.cols["id_bytes"].all(), self.cols["id_ends"].all(), self.bits)
        want_keys, _, want_fence = hash_table(keys, self.block)
        got_keys, got_rows = self.cols["hash_keys"].all(), self.cols["hash_rows"].all()
        if (got_rows >= self.n).any():
            out.append(f"index/hash_rows holds rows outside [0, {self.n})")
        elif not np.array_equal(got_keys, want_keys):
            out.append("index/hash_keys are not the sorted id hashes")
        elif not np.array_equal(keys[got_rows.astype(np.int64)], got_keys) or \
                not np.array_equal(np.sort(got_rows), np.arange(self.n, dtype=np.uint32)):
            out.append("index/hash_rows is not a permutation giving each key's row")
        if not np.array_equal(self.fence, want_fence):
            out.append("index/hash_fence is not every index_block-th key")
        return out

    # --- storage -----------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, objects: ObjectStore, meta: dict, where: str, index_cache="auto") -> "HashIndex":
        """Open the index of a v2 store whose metadata passed check_meta: each array's zarr.json (shape, type,
        one raw chunk), then the two small arrays held in memory (shard_starts, hash_fence), checked.
        index_cache (remote stores): "auto", a directory or None/False; see indexcache.choose_dir."""
        n, block = meta["num_utterances"], meta["index_block"]
        names = list(V2_ARRAYS)
        paths = [f"{INDEX_GROUP}/{k}" for k in names]
        raws = objects.get_many([f"{p}/zarr.json" for p in paths])
        shapes = {}
        for name, path, raw in zip(names, paths, raws):
            a = parse_array(raw, path, where, codecs=("bytes",))
            want = {"shard_starts": meta["num_shards"] + 1, "hash_fence": -(-n // block)}.get(name, n)
            if name == "id_bytes":
                if len(a.shape) != 1 or not n <= a.shape[0] <= n * MAX_ID_BYTES:
                    raise StoreError(f"{a.where}: shape {a.shape}, expected between {n} and {n * MAX_ID_BYTES} "
                                     f"bytes of ids")
                want = a.shape[0]
            if a.shape != (want,) or str(a.dtype) != V2_ARRAYS[name] or a.chunks != (max(want, 1),):
                raise StoreError(f"{a.where}: shape {a.shape}, type {a.dtype}, chunks {a.chunks}; expected "
                                 f"({want},) {V2_ARRAYS[name]} in one chunk (num_utterances={n}, "
                                 f"num_shards={meta['num_shards']}, index_block={block})")
            shapes[name] = (path, a.dtype, want)
        files, downloaded = {}, []
        if not objects.local:
            arrays = {name: (f"{path}/c/0", want * np.dtype(dt).itemsize)
                      for name, (path, dt, want) in shapes.items() if want}
            cache_dir = indexcache.choose_dir(index_cache, sum(size for _, size in arrays.values()))
            if cache_dir is not None:
                got = indexcache.local_copy(objects, meta, arrays, cache_dir, f"{where}/{INDEX_GROUP}")
                if got is not None:
                    files, downloaded = got
        cols = {name: Column(objects, path, dt, want, where, files.get(name))
                for name, (path, dt, want) in shapes.items()}
        starts = cols["shard_starts"].all().astype(np.int64)
        if starts[0] != 0 or starts[-1] != n or (np.diff(starts) < 1).any():
            raise StoreError(f"{where}/{INDEX_GROUP}/shard_starts: not strictly increasing from 0 to {n} "
                             f"(every shard holds at least one utterance)")
        fence = np.array(cols["hash_fence"].all())
        if len(fence) > 1 and not (fence[1:] >= fence[:-1]).all():
            raise StoreError(f"{where}/{INDEX_GROUP}/hash_fence: not sorted")
        out = cls(cols, starts, fence, meta, where)
        out.cache_files, out.cache_downloaded = files, downloaded
        return out


def write(group: zarr.Group, objects: ObjectStore, plan, bits: int, block: int) -> None:
    """Write the v2 index of `plan` (a ShardPlan): array metadata through zarr, each array's one chunk as raw
    little-endian bytes (what zarr's `bytes` codec would write)."""
    id_bytes, id_ends, frames, starts = plan.columns()
    keys, rows, fence = hash_table(plan.hashes(bits), block)
    g = group.create_group(INDEX_GROUP, attributes={
        "description": "format v2 utterance index: raw little-endian arrays (one chunk each); ids looked up "
                       f"by the {HASH_NAME} hash table hash_keys/hash_rows, hash_fence = every index_block-th key"})
    arrays = {"offsets": plan.offsets(), "num_frames": frames, "id_ends": id_ends, "id_bytes": id_bytes,
              "hash_keys": keys, "hash_rows": rows, "hash_fence": fence, "shard_starts": starts}
    for name, dtype in V2_ARRAYS.items():
        arr = np.ascontiguousarray(arrays[name], dtype=np.dtype(dtype).newbyteorder("<"))
        g.create_array(name, shape=arr.shape, chunks=(max(len(arr), 1),), dtype=dtype, compressors=None,
                       filters=None, serializer=BytesCodec(endian="little"))
        objects.set(f"{INDEX_GROUP}/{name}/c/0", memoryview(arr.view(np.uint8)))


def plan_digest(plan) -> str:
    """plan_sha256 of a v2 store: sha256 over the plan's columns (no JSON text of 80M ids)."""
    id_bytes, id_ends, frames, starts = plan.columns()
    h = hashlib.sha256(b"ci-store-plan-v2\n")
    h.update(np.array([plan.shard_frames, len(id_ends), len(starts) - 1], "<u8").tobytes())
    for arr, dt in ((id_ends, "<u8"), (frames, "<i8"), (starts, "<u8")):
        h.update(np.ascontiguousarray(arr, dtype=dt).view(np.uint8))
    h.update(np.ascontiguousarray(id_bytes, np.uint8))
    return h.hexdigest()


def utterances_digest(plan) -> str:
    """Order-free identity of the utterance set of a v2 store: sha256 over (64-bit id hash, frames) sorted."""
    keys = plan.hashes(64)
    order = np.argsort(keys, kind="stable")
    h = hashlib.sha256(b"ci-store-utterances-v2\n")
    h.update(np.ascontiguousarray(keys[order], "<u8").view(np.uint8))
    h.update(np.ascontiguousarray(plan.columns()[2][order], "<i8").view(np.uint8))
    return h.hexdigest()


def duplicate_problems(id_bytes: np.ndarray, id_ends: np.ndarray, keys64: np.ndarray) -> list[str]:
    """Ids stored more than once, found through equal hashes (each run of equal hashes then compared as bytes)."""
    order = np.argsort(keys64, kind="stable")
    k = keys64[order]
    same = np.flatnonzero(k[1:] == k[:-1])
    if not len(same):
        return []
    ends = id_ends.astype(np.int64)

    def get(r):
        a = int(ends[r - 1]) if r else 0
        return bytes(id_bytes[a:int(ends[r])])
    rows = sorted({int(i) for j in same for i in (j, j + 1)})
    seen: dict[tuple[int, bytes], int] = {}
    dups = []
    for i in rows:
        key = (int(k[i]), get(int(order[i])))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 2:
            dups.append(key[1].decode("utf-8", "replace"))
    return [f"duplicate utterance ids: {name_some(dups)}"] if dups else []
