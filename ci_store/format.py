"""Format constants and attribute validation for ci-store format versions 1 and 2 (see docs/store-format.md).

Everything a reader needs to interpret a store is written here once, so writers and readers cannot drift.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .errors import StoreError

FORMAT_NAME = "ci-store"
FORMAT_VERSION = 2              # what create() writes; readers read every version up to it
FORMAT_VERSIONS = (1, 2)
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
FLOAT_SHARD_GRANULE = 256               # float shard sizes are multiples of this (the layouts of existing jobs)
TARGET_FLOAT_SHARD_BYTES = 128 << 20     # float shards are sized to ~128 MiB uncompressed
# Float inner chunks: ~128 KiB decoded (32 frames at 1024-dim float32), so an utterance read fetches little more
# than its own rows; uncompressed, because zstd gains only ~7 % on float labels and its decoding (~1 GB/s) would
# bound reads at a few hundred utterances/s (docs/store-format.md, "Float stores: defaults and read path").
TARGET_FLOAT_CHUNK_BYTES = 128 << 10
MIN_FLOAT_CHUNK_FRAMES, MAX_FLOAT_CHUNK_FRAMES = 16, 256
DEFAULT_COMPRESSOR = {"codes": "zstd:3", "float": "none"}

# Limits a reader enforces before allocating anything a store's metadata asks for (docs/store-format.md,
# "Untrusted stores"); create() refuses layouts beyond them, so every store it writes stays readable.
MAX_SHARD_BYTES = 1 << 30       # decoded rows of one shard (defaults: 16 MiB codes, ~128 MiB float)
MAX_SHARD_CHUNKS = 1 << 20      # inner chunks per shard: the shard index is at most 16 MiB
MAX_SHARDS = (1 << 31) - 1      # index/shard is int32
ARRAY_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")   # quantizer array names: one plain path part
SHA256_RE = re.compile(r"[0-9a-f]{64}")

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
    chunk = chunk_frames or FLOAT_SHARD_GRANULE
    per_frame = int(width) * float_dtype(dtype).itemsize
    return max(chunk, (TARGET_FLOAT_SHARD_BYTES // per_frame) // chunk * chunk)


def default_float_chunk_frames(width: int, itemsize: int) -> int:
    """Target inner chunk of a float store: the power of two of frames nearest below TARGET_FLOAT_CHUNK_BYTES,
    kept within [MIN_FLOAT_CHUNK_FRAMES, MAX_FLOAT_CHUNK_FRAMES] (more chunks per read cost per-chunk work)."""
    frames = max(1, TARGET_FLOAT_CHUNK_BYTES // (int(width) * int(itemsize)))
    frames = 1 << (frames.bit_length() - 1)
    return min(MAX_FLOAT_CHUNK_FRAMES, max(MIN_FLOAT_CHUNK_FRAMES, frames))


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


def parse_compressor(spec: str | None, kind: str = "codes") -> tuple[str, int | None]:
    """'zstd' / 'zstd:LEVEL' / 'none' -> (name, level); None: the kind's default. The only chains format v1
    writes (see the doc)."""
    spec = DEFAULT_COMPRESSOR[kind] if spec is None else str(spec)
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


MANIFEST_KEY = f"{DONE_GROUP}/manifest.json.zst"   # format v2: every completion record of a complete store


def done_key(shard: int) -> str:
    """Object key of a shard's completion record."""
    return f"{DONE_GROUP}/shard-{shard:06d}.json"


def shard_key(array: str, shard: int) -> str:
    """Object key of shard `shard` of a [frames, width] array (zarr v3 default chunk key encoding)."""
    return f"{array}/c/{shard}/0"


def parse_json(raw: bytes, where: str) -> dict:
    """A JSON object from a metadata object of the store; StoreError naming it for anything else."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{where} does not hold a JSON object (got {type(obj).__name__})")
    return obj


def check_layout_limits(shard_frames: int, chunk_frames: int, width: int, itemsize: int, where: str) -> None:
    """Refuse a layout whose shard or shard index is larger than a reader will allocate (see MAX_* above)."""
    shard_bytes = shard_frames * width * itemsize
    if shard_bytes > MAX_SHARD_BYTES:
        raise StoreError(f"{where}: shards of shard_frames={shard_frames} x width {width} x {itemsize} bytes are "
                         f"{shard_bytes} bytes decoded, more than the {MAX_SHARD_BYTES} a reader allocates; "
                         f"use smaller shards")
    if shard_frames // chunk_frames > MAX_SHARD_CHUNKS:
        raise StoreError(f"{where}: shard_frames/chunk_frames = {shard_frames // chunk_frames} inner chunks per "
                         f"shard, more than the {MAX_SHARD_CHUNKS} a reader allows; use larger chunks")


def _int(meta: dict, key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    x = meta[key]
    if isinstance(x, bool) or not isinstance(x, int) or x < lo or (hi is not None and x > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise StoreError(f"{where}: store metadata {key} must be an integer {bounds}, got {x!r}")
    return x


def _optional(meta: dict, key: str, types, where: str, what: str):
    x = meta.get(key)
    if x is not None and (isinstance(x, bool) or not isinstance(x, types)):
        raise StoreError(f"{where}: store metadata {key} must be {what} or null, got {x!r}")
    return x


def check_meta(meta: Any, where: str) -> dict:
    """Validate the root attributes of an existing store, types and ranges included (they size every read);
    StoreError says what is wrong and where."""
    if not isinstance(meta, dict):
        raise StoreError(f"{where} is a Zarr group but not a ci-store (no '{ATTRS_KEY}' attributes)")
    if meta.get("format") != FORMAT_NAME:
        raise StoreError(f"{where} is not a ci-store (format is {meta.get('format')!r}, expected {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreError(f"{where}: format_version is missing or not a positive integer ({version!r})")
    if version > FORMAT_VERSION:
        raise StoreError(f"{where} has format_version {version}, newer than this ci-store supports "
                         f"({FORMAT_VERSION}); upgrade ci-store to read it")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StoreError(f"{where}: store metadata lacks {', '.join(missing)}")
    kind = meta["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise StoreError(f"{where}: unknown kind {kind!r} (expected one of {KINDS})")
    if meta["array"] != ARRAY_NAME[kind]:
        raise StoreError(f"{where}: array name {meta['array']!r} does not match kind {kind!r}")
    allowed = ("uint8", "uint16") if kind == "codes" else ("float32", "float16")
    if meta["dtype"] not in allowed:
        raise StoreError(f"{where}: dtype {meta['dtype']!r} is not one of {allowed} ({kind} store)")
    width = _int(meta, "width", where, lo=1)
    if kind == "codes":
        if _int(meta, "num_codebooks", where, lo=1) != width:
            raise StoreError(f"{where}: num_codebooks {meta['num_codebooks']} differs from width {width}")
        if _int(meta, "codebook_size", where, lo=2) - 1 > np.iinfo(meta["dtype"]).max:
            raise StoreError(f"{where}: codebook_size {meta['codebook_size']} does not fit dtype {meta['dtype']}")
    else:
        for key in ("num_codebooks", "codebook_size"):
            if meta.get(key) is not None:
                raise StoreError(f"{where}: {key} must be null in a float store, got {meta[key]!r}")
        if meta.get("dim") != width:
            raise StoreError(f"{where}: dim {meta.get('dim')!r} differs from width {width} (float store)")
    _optional(meta, "dim", int, where, "a positive integer")
    if meta.get("dim") is not None and meta["dim"] < 1:
        raise StoreError(f"{where}: store metadata dim must be positive, got {meta['dim']!r}")
    rate = meta["frame_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise StoreError(f"{where}: frame_rate must be a positive number, got {rate!r}")
    shard_frames = _int(meta, "shard_frames", where, lo=1)
    chunk_frames = _int(meta, "chunk_frames", where, lo=1, hi=shard_frames)
    if shard_frames % chunk_frames:
        raise StoreError(f"{where}: chunk_frames {chunk_frames} does not divide shard_frames {shard_frames}")
    check_layout_limits(shard_frames, chunk_frames, width, np.dtype(meta["dtype"]).itemsize, where)
    num_shards = _int(meta, "num_shards", where, hi=MAX_SHARDS)
    padded = _int(meta, "padded_frames", where)
    if padded != num_shards * shard_frames:
        raise StoreError(f"{where}: padded_frames {padded} is not num_shards x shard_frames "
                         f"({num_shards} x {shard_frames})")
    total = _int(meta, "total_frames", where, hi=padded)
    _int(meta, "num_utterances", where, hi=total)
    if meta["pad_value"] != PAD_VALUE or isinstance(meta["pad_value"], bool):
        raise StoreError(f"{where}: pad_value must be {PAD_VALUE}, got {meta['pad_value']!r}")
    if not isinstance(meta["compressor"], str):
        raise StoreError(f"{where}: compressor must be a string, got {meta['compressor']!r}")
    try:
        parse_compressor(meta["compressor"])
    except StoreError as e:
        raise StoreError(f"{where}: {e}") from None
    order = "codebook-major" if kind == "codes" else "frame-major"
    if meta.get("chunk_order", order) != order:
        raise StoreError(f"{where}: chunk_order {meta['chunk_order']!r} is not {order!r} ({kind} store)")
    for key in ("plan_sha256", "utterances_sha256", "utterances_hash_sha256", "quantizer_sha256"):
        x = meta.get(key)
        if (key == "plan_sha256" or x is not None) and not (isinstance(x, str) and SHA256_RE.fullmatch(x)):
            raise StoreError(f"{where}: {key} must be a sha256 hex digest, got {x!r}")
    if version >= 2:
        if meta.get("id_hash") != "fnv1a-64":
            raise StoreError(f"{where}: id_hash {meta.get('id_hash')!r} is not 'fnv1a-64' (format v2 index)")
        for key, hi in (("id_hash_bits", 64), ("index_block", 1 << 20)):
            if key not in meta:
                raise StoreError(f"{where}: store metadata lacks {key} (format v2 index)")
            _int(meta, key, where, lo=1, hi=hi)
        if meta["num_utterances"] > (1 << 32) - 1 or meta["num_utterances"] < 1:
            raise StoreError(f"{where}: num_utterances {meta['num_utterances']} is outside [1, 2**32) (format v2)")
        if meta["num_shards"] > meta["num_utterances"]:
            raise StoreError(f"{where}: num_shards {meta['num_shards']} exceeds num_utterances "
                             f"{meta['num_utterances']} (every shard holds an utterance)")
    _optional(meta, "quantizer_id", str, where, "a string")
    _optional(meta, "teacher", dict, where, "an object")
    _optional(meta, "extra", dict, where, "an object")
    _optional(meta, "created_by", str, where, "a string")
    return meta
