"""Encode and decode one shard object of zarr v3's `sharding_indexed` codec for format v1's fixed codec chains.

Why not let zarr do it: zarr encodes each inner chunk through its async pipeline (~0.6 us/frame here, below the
1M frames/s write goal) and, on reads, refetches the shard index and fetches inner chunks one request at a
time. The byte layout is the standard one, so plain zarr reads these shards (tests check byte equality with
zarr's own encoder and that zarr decodes what we write):

    shard object = chunk_0 payload | chunk_1 payload | ... | index
    chunk payload = crc32c-appended( compress( bytes_le( transpose?(chunk) ) ) )
    index = uint64 little-endian (offset, nbytes) per inner chunk in order, then crc32c of those bytes
An all-padding inner chunk is not stored: its index entry is (2**64-1, 2**64-1) and it reads as PAD_VALUE.
"""
from __future__ import annotations

from dataclasses import dataclass

import crc32c
import numpy as np
from numcodecs import Zstd

from . import zstdframe
from .errors import StoreError
from .format import PAD_VALUE
from .zstdframe import compress_bound

EMPTY = np.uint64(2**64 - 1)


def _crc(data) -> bytes:
    return crc32c.crc32c(data).to_bytes(4, "little")


@dataclass(frozen=True)
class ShardLayout:
    """How rows of one shard map to inner chunks and bytes."""

    shard_frames: int
    chunk_frames: int
    width: int
    dtype: np.dtype
    transpose: bool            # codes are stored codebook-major inside a chunk (runs of repeated codes compress)
    compressor: str            # "zstd" or "none"
    level: int | None = None

    @property
    def nchunks(self) -> int:
        return self.shard_frames // self.chunk_frames

    @property
    def index_nbytes(self) -> int:
        return self.nchunks * 16 + 4

    @property
    def chunk_nbytes(self) -> int:
        """Decoded bytes of one inner chunk."""
        return self.chunk_frames * self.width * self.dtype.itemsize

    @property
    def max_payload_nbytes(self) -> int:
        """Largest stored inner chunk: its bytes (or zstd's worst case for them) plus the crc32c."""
        raw = self.chunk_nbytes
        return (compress_bound(raw) if self.compressor == "zstd" else raw) + 4

    @property
    def max_object_nbytes(self) -> int:
        return self.nchunks * self.max_payload_nbytes + self.index_nbytes

    def zarr_codecs(self) -> dict:
        """Keyword arguments for zarr.create_array describing exactly this layout."""
        from zarr.codecs import BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec
        compressors = [ZstdCodec(level=self.level, checksum=False)] if self.compressor == "zstd" else []
        return dict(chunks=(self.chunk_frames, self.width), shards=(self.shard_frames, self.width),
                    filters=[TransposeCodec(order=(1, 0))] if self.transpose else None,
                    serializer=BytesCodec(endian="little"), compressors=compressors + [Crc32cCodec()],
                    fill_value=PAD_VALUE)

    # --- encode ------------------------------------------------------------------------------------------------
    def encode(self, block: np.ndarray) -> bytes | None:
        """Shard bytes for a [shard_frames, width] block; None when every inner chunk is padding."""
        assert block.shape == (self.shard_frames, self.width) and block.dtype == self.dtype
        le = self.dtype.newbyteorder("<")
        chunks = np.ascontiguousarray(block, dtype=le).reshape(self.nchunks, self.chunk_frames, self.width)
        # bitwise test, so that -0.0 in a float chunk is stored rather than read back as +0.0
        nonempty = chunks.view(np.uint8).reshape(self.nchunks, -1).any(axis=1)
        zstd = Zstd(level=self.level, checksum=False) if self.compressor == "zstd" else None
        index = np.full((self.nchunks, 2), EMPTY, dtype="<u8")
        parts, pos = [], 0
        for c in np.flatnonzero(nonempty):
            chunk = chunks[c].T if self.transpose else chunks[c]
            raw = np.ascontiguousarray(chunk).tobytes()
            comp = zstd.encode(raw) if zstd is not None else raw
            payload = bytes(comp) + _crc(comp)
            index[c] = (pos, len(payload))
            pos += len(payload)
            parts.append(payload)
        if not parts:
            return None
        index_bytes = index.tobytes()
        parts.append(index_bytes + _crc(index_bytes))
        return b"".join(parts)

    # --- decode ------------------------------------------------------------------------------------------------
    def decode_index(self, tail: bytes, where: str, object_nbytes: int) -> np.ndarray:
        """[nchunks, 2] (offset, nbytes) from the last index_nbytes bytes of a shard object of object_nbytes bytes.

        Every entry is checked before anything is read with it: both fields empty or neither, a payload size
        between 5 bytes and the largest this layout can store, within the object's bytes before the index, and
        no two payloads overlapping. A hostile index therefore cannot make a read fetch or allocate more than the
        object holds."""
        if tail is None or len(tail) != self.index_nbytes:
            raise StoreError(f"{where}: shard index truncated ({0 if tail is None else len(tail)} bytes, "
                             f"expected {self.index_nbytes})")
        body, crc = tail[:-4], tail[-4:]
        if _crc(body) != crc:
            raise StoreError(f"{where}: shard index checksum mismatch (corrupted object)")
        index = np.frombuffer(body, dtype="<u8").reshape(self.nchunks, 2)
        off, n = index[:, 0], index[:, 1]
        empty = off == EMPTY
        data_end = object_nbytes - self.index_nbytes
        if data_end < 0:
            raise StoreError(f"{where}: object of {object_nbytes} bytes is shorter than its shard index")
        lo = 4 + (self.chunk_nbytes if self.compressor == "none" else 1)
        bad = (empty != (n == EMPTY)) | (~empty & ((n < lo) | (n > self.max_payload_nbytes) | (off > data_end)))
        bad |= ~empty & ~bad & (off + np.minimum(n, self.max_payload_nbytes) > data_end)   # no overflow: n is small
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            raise StoreError(f"{where}: shard index entry of inner chunk {c} (offset {int(off[c])}, "
                             f"{int(n[c])} bytes) is outside the {data_end} data bytes of the object or not a "
                             f"possible chunk size (at most {self.max_payload_nbytes}): corrupted or crafted object")
        stored = np.flatnonzero(~empty)
        order = stored[np.argsort(off[stored], kind="stable")]
        overlap = np.flatnonzero(off[order[1:]] < off[order[:-1]] + n[order[:-1]])
        if len(overlap):
            a, b = int(order[overlap[0]]), int(order[overlap[0] + 1])
            raise StoreError(f"{where}: shard index entries of inner chunks {a} and {b} overlap: corrupted or "
                             f"crafted object")
        return index

    def decode_chunk(self, payload: bytes, where: str) -> np.ndarray:
        """[chunk_frames, width] array from one stored chunk payload, checking its crc32c and, before decoding,
        that it decodes to exactly one chunk (so a zstd frame claiming more allocates nothing)."""
        if not 4 < len(payload) <= self.max_payload_nbytes:
            raise StoreError(f"{where}: stored chunk of {len(payload)} bytes is not a possible size")
        body, crc = payload[:-4], payload[-4:]
        if _crc(body) != crc:
            raise StoreError(f"{where}: checksum mismatch (corrupted data)")
        if self.compressor == "zstd":
            raw = zstdframe.decompress(body, where, exact=self.chunk_nbytes)
        elif len(body) == self.chunk_nbytes:
            raw = body
        else:
            raise StoreError(f"{where}: stored chunk holds {len(body)} bytes, expected {self.chunk_nbytes}")
        arr = np.frombuffer(raw, dtype=self.dtype.newbyteorder("<"))
        if self.transpose:
            return arr.reshape(self.width, self.chunk_frames).T.astype(self.dtype)
        return arr.reshape(self.chunk_frames, self.width).astype(self.dtype, copy=False)

    def decode_shard(self, data: bytes | None, where: str) -> np.ndarray:
        """All [shard_frames, width] rows of a whole shard object (None: all padding), every check applied."""
        block = np.full((self.shard_frames, self.width), PAD_VALUE, dtype=self.dtype)
        if data is None:
            return block
        if len(data) < self.index_nbytes:
            raise StoreError(f"{where}: object of {len(data)} bytes is shorter than its shard index")
        index = self.decode_index(data[len(data) - self.index_nbytes:], where, len(data))
        C = self.chunk_frames
        for c in np.flatnonzero(index[:, 0] != EMPTY):
            off, n = int(index[c, 0]), int(index[c, 1])
            block[c * C:(c + 1) * C] = self.decode_chunk(data[off:off + n], f"{where} (inner chunk {c})")
        return block


def layout_from_zarr_metadata(meta: dict, where: str) -> ShardLayout:
    """Recognise format v1's codec chain in an array's zarr.json; anything else is not a ci-store array."""
    try:
        shape = meta["shape"]
        shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
        (codec,) = meta["codecs"]
        if codec["name"] != "sharding_indexed":
            raise ValueError("array is not sharded")
        conf = codec["configuration"]
        chunk_shape = conf["chunk_shape"]
        if conf.get("index_location", "end") != "end":
            raise ValueError("shard index is not at the end")
        names = [c["name"] for c in conf["index_codecs"]]
        if names != ["bytes", "crc32c"]:
            raise ValueError(f"index codecs {names}")
        inner = list(conf["codecs"])
        transpose = False
        if inner and inner[0]["name"] == "transpose":
            if list(inner[0]["configuration"]["order"]) != [1, 0]:
                raise ValueError("unsupported transpose order")
            transpose = True
            inner = inner[1:]
        names = [c["name"] for c in inner]
        if names == ["bytes", "zstd", "crc32c"]:
            compressor, level = "zstd", int(inner[1]["configuration"]["level"])
            if inner[1]["configuration"].get("checksum"):
                raise ValueError("zstd checksum flag set")
        elif names == ["bytes", "crc32c"]:
            compressor, level = "none", None
        else:
            raise ValueError(f"inner codecs {names}")
        if len(shape) != 2 or shard_shape[1] != shape[1] or chunk_shape[1] != shape[1]:
            raise ValueError(f"shape {shape}, shards {shard_shape}, chunks {chunk_shape}")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, *shard_shape,
                                                                                      *chunk_shape]):
            raise ValueError(f"shape {shape}, shards {shard_shape}, chunks {chunk_shape}: not counts")
        if meta.get("chunk_key_encoding", {}).get("name", "default") != "default":
            raise ValueError("chunk keys are not zarr's default encoding")
        if meta.get("fill_value") not in (0, 0.0):
            raise ValueError(f"fill_value {meta.get('fill_value')!r}")
        dtype = meta["data_type"]
        if dtype not in ("uint8", "uint16", "float16", "float32"):
            raise ValueError(f"data_type {dtype!r}")
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise StoreError(f"{where}: label array layout is not ci-store format v1 ({e})") from None
    return ShardLayout(int(shard_shape[0]), int(chunk_shape[0]), int(shape[1]), np.dtype(dtype), transpose,
                       compressor, level)
