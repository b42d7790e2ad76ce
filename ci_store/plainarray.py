"""Read the store's small plain zarr arrays (utterance index, quantizer) with every size checked before allocating.

zarr would allocate whatever an array's zarr.json (shape, chunk shape) or a chunk's zstd frame (declared size)
or vlen header (item count) claims. These arrays are written by ci_store with one fixed codec chain (`bytes` or
`vlen-utf8`, then `zstd`), so they are decoded here instead: the metadata is validated first, the output is
allocated only within the caller's budget, and each chunk must decode to exactly its expected size
(docs/store-format.md, "Untrusted stores").
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from numcodecs.vlen import VLenUTF8

from . import zstdframe
from .errors import StoreError
from .format import parse_json
from .fsio import ObjectStore

NUMERIC_TYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                 "float32", "float64")
MAX_ARRAY_CHUNKS = 1 << 16      # chunk objects per array (index: 2**16 x 2**20 utterances)


@dataclass(frozen=True)
class PlainArray:
    path: str                   # key of the array's folder, e.g. "index/offsets"
    where: str                  # for messages: URL of the array
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype | None      # None: variable-length UTF-8 strings

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def chunk_keys(self) -> list[tuple[tuple[int, ...], str]]:
        grid = [range(math.ceil(s / c)) for s, c in zip(self.shape, self.chunks)]
        return [(i, f"{self.path}/c" + "".join(f"/{k}" for k in i)) for i in itertools.product(*grid)]


def parse_array(raw: bytes | None, path: str, where: str, codecs: tuple[str, ...] = ("bytes", "zstd")) -> PlainArray:
    """Validate one array's zarr.json: a Zarr v3 array with a regular chunk grid, default chunk keys, fill value
    0 (or "" for strings) and exactly the codec chain ci_store writes (numeric arrays: `codecs`; the v2 index
    writes raw `bytes` only)."""
    at = f"{where}/{path}"
    if raw is None:
        raise StoreError(f"{at}: array is missing (no zarr.json)")
    meta = parse_json(raw, f"{at}/zarr.json")
    try:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise ValueError("not a Zarr v3 array")
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        if meta["chunk_grid"].get("name") != "regular" or meta["chunk_key_encoding"].get("name") != "default":
            raise ValueError("not a regular chunk grid with default chunk keys")
        if meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/":
            raise ValueError("chunk key separator is not '/'")
        counts = [*shape, *chunks]
        if (not isinstance(shape, list) or not isinstance(chunks, list) or len(shape) != len(chunks)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in counts)
                or any(x < 0 for x in shape) or any(x < 1 for x in chunks)):
            raise ValueError(f"shape {shape!r} / chunk shape {chunks!r}")
        if any(c > max(1, d) for c, d in zip(chunks, shape)):     # so a chunk is never larger than the array
            raise ValueError(f"chunk shape {chunks} larger than the array {shape}")
        names = [c["name"] for c in meta["codecs"]]
        if meta.get("storage_transformers"):
            raise ValueError("storage transformers")
        data_type = meta["data_type"]
        if data_type == "string":
            if names != ["vlen-utf8", "zstd"] or meta.get("fill_value") != "":
                raise ValueError(f"string array with codecs {names}, fill value {meta.get('fill_value')!r}")
            dtype = None
        elif data_type in NUMERIC_TYPES:
            dtype = np.dtype(data_type)
            endian = meta["codecs"][0].get("configuration", {}).get("endian")
            if names != list(codecs) or not (endian == "little" or (endian is None and dtype.itemsize == 1)):
                raise ValueError(f"codecs {names} (endian {endian!r})")
            fill = meta.get("fill_value")
            if fill not in (0, 0.0, False) or isinstance(fill, str):
                raise ValueError(f"fill value {fill!r}")
        else:
            raise ValueError(f"data type {data_type!r}")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise StoreError(f"{at}: not an array ci-store writes ({type(e).__name__}: {e})") from None
    grid = math.prod(math.ceil(s / c) for s, c in zip(shape, chunks))
    if grid > MAX_ARRAY_CHUNKS:
        raise StoreError(f"{at}: {grid} chunks, more than the {MAX_ARRAY_CHUNKS} allowed")
    return PlainArray(path, at, tuple(shape), tuple(chunks), dtype)


def read_numeric(objects: ObjectStore, arrays: list[PlainArray], max_nbytes: int) -> list[np.ndarray]:
    """Decode numeric arrays (all chunks fetched concurrently); StoreError if together they would take more
    than max_nbytes. A missing chunk reads as 0, as zarr writes no chunk that holds only the fill value."""
    total = sum(a.size * a.dtype.itemsize for a in arrays)
    if total > max_nbytes:
        raise StoreError(f"{arrays[0].where if len(arrays) == 1 else 'arrays ' + ', '.join(a.where for a in arrays)}"
                         f": {total} bytes, more than the {max_nbytes} allowed")
    keys = [(a, i, k) for a in arrays for i, k in a.chunk_keys()]
    blobs = objects.get_many([k for _, _, k in keys])
    out = {a.path: np.zeros(a.shape, a.dtype) for a in arrays}
    for (a, i, key), blob in zip(keys, blobs):
        if blob is None:
            continue
        n = math.prod(a.chunks)
        raw = zstdframe.decompress(blob, f"{a.where} chunk {key}", exact=n * a.dtype.itemsize)
        chunk = raw.view(a.dtype.newbyteorder("<")).reshape(a.chunks).astype(a.dtype, copy=False)
        dst = tuple(slice(k * c, min((k + 1) * c, s)) for k, c, s in zip(i, a.chunks, a.shape))
        out[a.path][dst] = chunk[tuple(slice(0, d.stop - d.start) for d in dst)]
    return [out[a.path] for a in arrays]


def read_strings(objects: ObjectStore, a: PlainArray, max_item_bytes: int) -> np.ndarray:
    """Decode a 1-D string array whose every chunk must be stored (ids are never the empty fill value), fetched
    concurrently; each chunk may decode to at most max_item_bytes per item on average, and must hold exactly
    its item count."""
    if len(a.shape) != 1:
        raise StoreError(f"{a.where}: expected a 1-D string array, got shape {a.shape}")
    (n,) = a.chunks
    keys = a.chunk_keys()
    blobs = objects.get_many([k for _, k in keys])
    missing = [k for (_, k), b in zip(keys, blobs) if b is None]
    if missing:
        raise StoreError(f"{a.where}: chunk {missing[0]} is missing ({len(missing)} of {len(keys)} missing)")
    parts = []
    for ((i,), key), blob in zip(keys, blobs):
        where = f"{a.where} chunk {key}"
        raw = zstdframe.decompress(blob, where, limit=4 + n * (4 + max_item_bytes))
        if len(raw) < 4 or int.from_bytes(raw[:4].tobytes(), "little") != n:
            raise StoreError(f"{where}: does not hold {n} strings")
        try:
            items = VLenUTF8().decode(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{where}: cannot decode strings ({e})") from None
        parts.append(np.asarray(items[:min(n, a.shape[0] - i * n)], dtype=np.dtypes.StringDType()))
    return np.concatenate(parts) if parts else np.asarray([], dtype=np.dtypes.StringDType())
