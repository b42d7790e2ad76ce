"""glibc allocator thresholds for the codec's large temporaries.

The quantizer search allocates MBs per chunk of rows (beam-search accumulators ~8 MB per 64-row chunk at 16 x 256,
ICM pairwise sums ~17 MB). glibc serves anything above its mmap threshold (dynamic, at most 32 MiB; frozen at
128 KiB when MALLOC_TRIM_THRESHOLD_ is set, as Dask's nanny does) with a fresh mmap, so every chunk pays page
faults and munmap: measured 2.2x slower quantizer training at 1024-dim (87 of 103 s in the kernel) and 2.7x slower
extraction under Dask (both before the search was chunked, when a block's temporaries were tens of MB). Raising the
thresholds keeps those blocks in the heap. Results are unchanged (same arithmetic); the process keeps freed memory
for reuse instead of returning it at once. A process-wide setting, so it is called by the process owners
(the extraction worker, the `train-quantizer` command), not inside the library.
"""
from __future__ import annotations

import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
TRIM_BYTES = 256 << 20
MMAP_BYTES = 256 << 20


def raise_glibc_thresholds() -> bool:
    """Raise glibc's trim and mmap thresholds in this process; False where there is no glibc (nothing to do)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES))
    except (OSError, AttributeError):  # musl or another libc
        return False
