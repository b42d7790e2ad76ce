"""Bounded zstd decoding for bytes read from a store that may be hostile.

A zstd frame says how many bytes it decodes to, and a plain decoder allocates that much (or, when the frame does
not say, grows its output as long as the data goes on): a few KiB can claim a TiB. Here the frame's declared
size is read from its header and checked against what the format expects *before* any output is allocated, and
the decoder writes into a buffer of exactly that size, so nothing can make it produce more.
"""
from __future__ import annotations

import numpy as np
from numcodecs import zstd as _zstd

from .errors import StoreError

MAGIC = b"\x28\xb5\x2f\xfd"          # zstd frame magic number 0xFD2FB528, little-endian


def compress_bound(nbytes: int) -> int:
    """Largest zstd output for `nbytes` of input (libzstd's ZSTD_COMPRESSBOUND: one frame, as numcodecs writes)."""
    small = ((128 << 10) - nbytes) >> 11 if nbytes < (128 << 10) else 0
    return nbytes + (nbytes >> 8) + small


def frame_content_size(data) -> int | None:
    """Decoded size declared in the header of the zstd frame that starts `data`; None if it declares none.

    Header (RFC 8878 3.1.1.1): magic, frame header descriptor, [window descriptor], [dictionary id],
    [frame content size]. ValueError when `data` does not start with a zstd frame header.
    """
    view = memoryview(data)
    if len(view) < 5 or bytes(view[:4]) != MAGIC:
        raise ValueError("not a zstd frame (bad magic number)")
    fhd = view[4]
    if fhd & 0x08:
        raise ValueError("reserved bit set in the zstd frame header")
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    if len(view) < pos + size:
        raise ValueError("zstd frame header truncated")
    value = int.from_bytes(view[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def decompress(data, where: str, *, exact: int | None = None, limit: int | None = None) -> np.ndarray:
    """Decode zstd `data` into a new uint8 array, refusing (StoreError naming `where`) unless its first frame
    declares exactly `exact` bytes, or at most `limit` bytes; the output buffer is that declared size."""
    try:
        declared = frame_content_size(data)
    except ValueError as e:
        raise StoreError(f"{where}: cannot decompress ({e})") from None
    if declared is None:
        raise StoreError(f"{where}: zstd frame does not declare its decoded size (refused: it could be any size)")
    if exact is not None and declared != exact:
        raise StoreError(f"{where}: zstd frame declares {declared} decoded bytes, expected {exact}")
    if limit is not None and declared > limit:
        raise StoreError(f"{where}: zstd frame declares {declared} decoded bytes, more than the {limit} allowed")
    out = np.empty(declared, np.uint8)
    if declared == 0:                   # numcodecs would treat a zero size as unknown and decode unbounded
        return out
    try:
        _zstd.decompress(data, out)
    except Exception as e:  # noqa: BLE001 - any codec failure is corruption here
        raise StoreError(f"{where}: cannot decompress ({e})") from None
    return out
