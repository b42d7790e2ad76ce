"""Format constants and attribute validation for ci-store format version 1 (see docs/store-format.md).

Everything a reader needs to interpret a store is written here once, so writers and readers cannot drift.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import StoreError

FORMAT_NAME = "ci-store"
FORMAT_VERSION = 1
ATTRS_KEY = "ci_store"          # root group attribute holding the store metadata dict
KINDS = ("codes", "float")
ARRAY_NAME = {"codes": "codes", "float": "embeddings"}
INDEX_GROUP = "index"
DONE_GROUP = "done"
QUANTIZER_GROUP = "quantizer"
INDEX_ARRAYS = ("ids", "offsets", "num_frames", "shard", "sort_order")
INDEX_CHUNK = 1 << 20           # index entries per zarr chunk
PAD_VALUE = 0                   # padding rows (shard tails, failed utterances) hold 0; it is also the fill_value

DEFAULT_CODES_SHARD_FRAMES = 1 << 20     # 16 MiB of uint8 codes per shard at 16 codebooks
DEFAULT_CODES_CHUNK_FRAMES = 1024        # inner chunk: ~20 s of audio at 50 Hz
DEFAULT_FLOAT_CHUNK_FRAMES = 256
TARGET_FLOAT_SHARD_BYTES = 128 << 20     # float shards are sized to ~128 MiB uncompressed
DEFAULT_COMPRESSOR = "zstd:3"

REQUIRED_META = ("format", "format_version", "kind", "array", "dtype", "width", "frame_rate", "total_frames",
                 "padded_frames", "num_utterances", "num_shards", "shard_frames", "chunk_frames", "pad_value",
                 "compressor", "plan_sha256")


def created_by() -> str:
    try:
        from importlib.metadata import version
        return f"ci-store {version('ci-store')}"
    except Exception:  # running from a source tree that is not installed
        return "ci-store (unknown version)"


def codes_dtype(codebook_size: int) -> np.dtype:
    """Smallest unsigned type holding indexes 0..codebook_size-1."""
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, (int, np.integer)) or codebook_size < 2:
        raise StoreError(f"codebook_size must be an integer >= 2, got {codebook_size!r}")
    if codebook_size <= 256:
        return np.dtype("uint8")
    if codebook_size <= 65536:
        return np.dtype("uint16")
    raise StoreError(f"codebook_size {codebook_size} is larger than 65536, which uint16 indexes cannot hold")


def float_dtype(dtype) -> np.dtype:
    dt = np.dtype("float32" if dtype is None else dtype)
    if dt not in (np.dtype("float32"), np.dtype("float16")):
        raise StoreError(f"float stores hold float32 or float16, got dtype {dt}")
    return dt


def default_shard_frames(kind: str = "codes", width: int | None = None, dtype=None,
                         chunk_frames: int | None = None) -> int:
    """Codes: 2**20 frames. Float: a multiple of the chunk size giving ~128 MiB shards (64-256 MiB range)."""
    if kind == "codes":
        return DEFAULT_CODES_SHARD_FRAMES
    if kind != "float":
        raise StoreError(f"kind must be one of {KINDS}, got {kind!r}")
    if not width:
        raise StoreError("default_shard_frames for a float store needs its width (dim)")
    chunk = chunk_frames or DEFAULT_FLOAT_CHUNK_FRAMES
    per_frame = int(width) * float_dtype(dtype).itemsize
    return max(chunk, (TARGET_FLOAT_SHARD_BYTES // per_frame) // chunk * chunk)


def choose_chunk_frames(shard_frames: int, target: int) -> int:
    """Largest divisor of shard_frames not above `target`; the sharding codec needs chunks that tile a shard."""
    if shard_frames <= target:
        return shard_frames
    for c in range(target, 0, -1):
        if shard_frames % c == 0:
            if c * 8 < target:
                raise StoreError(
                    f"shard_frames={shard_frames} has no divisor near the inner chunk size {target} "
                    f"(best is {c}); use a multiple of {target} (e.g. {math.ceil(shard_frames / target) * target})")
            return c
    raise AssertionError("unreachable")


def parse_compressor(spec: str | None) -> tuple[str, int | None]:
    """'zstd' / 'zstd:LEVEL' / 'none' -> (name, level). The only chains format v1 writes (see the doc)."""
    spec = DEFAULT_COMPRESSOR if spec is None else str(spec)
    name, _, level = spec.partition(":")
    if name == "none" and not level:
        return "none", None
    if name == "zstd":
        try:
            lv = int(level) if level else 3
        except ValueError:
            raise StoreError(f"bad zstd level in compressor {spec!r}") from None
        if not -7 <= lv <= 22:
            raise StoreError(f"zstd level must be in -7..22, got {lv}")
        return "zstd", lv
    raise StoreError(f"unsupported compressor {spec!r}: use 'zstd', 'zstd:LEVEL' or 'none'")


def compressor_spec(name: str, level: int | None) -> str:
    return "none" if name == "none" else f"zstd:{level}"


def done_key(shard: int) -> str:
    """Object key of a shard's completion record."""
    return f"{DONE_GROUP}/shard-{shard:06d}.json"


def shard_key(array: str, shard: int) -> str:
    """Object key of shard `shard` of a [frames, width] array (zarr v3 default chunk key encoding)."""
    return f"{array}/c/{shard}/0"


def check_meta(meta: Any, where: str) -> dict:
    """Validate the root attributes of an existing store; StoreError says what is wrong and where."""
    if not isinstance(meta, dict):
        raise StoreError(f"{where} is a Zarr group but not a ci-store (no '{ATTRS_KEY}' attributes)")
    if meta.get("format") != FORMAT_NAME:
        raise StoreError(f"{where} is not a ci-store (format is {meta.get('format')!r}, expected {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise StoreError(f"{where}: format_version is missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise StoreError(f"{where} has format_version {version}, newer than this ci-store supports "
                         f"({FORMAT_VERSION}); upgrade ci-store to read it")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StoreError(f"{where}: store metadata lacks {', '.join(missing)}")
    if meta["kind"] not in KINDS:
        raise StoreError(f"{where}: unknown kind {meta['kind']!r} (expected one of {KINDS})")
    if meta["array"] != ARRAY_NAME[meta["kind"]]:
        raise StoreError(f"{where}: array name {meta['array']!r} does not match kind {meta['kind']!r}")
    parse_compressor(meta["compressor"])
    return meta
