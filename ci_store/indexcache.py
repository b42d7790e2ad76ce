"""Per-host local copy of a remote format v2 store's index arrays, memory-mapped like a local store's.

Remote v2 readers otherwise fetch 256 KiB blocks per cold lookup into private per-process caches: ~1 GET per
lookup at 10k h, and every DataLoader worker of a host re-reads the same blocks. Copying `index/` once per host
and mapping it gives every process the local numbers and one shared page cache (docs/store-format.md, "Format v2",
"Index cache"). The copy is as untrusted as the store: every per-entry check of HashIndex still applies.
"""
from __future__ import annotations

import errno
import hashlib
import fcntl
import logging
import os
import re
import warnings

from .errors import StoreError

log = logging.getLogger("ci_store")
ENV_VAR = "CI_STORE_INDEX_CACHE"        # a directory, or "off" / "0" / "none" to keep ranged reads
AUTO_MIN_BYTES = 64 << 20               # "auto" copies indexes larger than this (smaller ones warm in a few GETs)
DOWNLOAD_PART_BYTES = 8 << 20           # one ranged GET
DOWNLOAD_PARTS_AT_ONCE = 8              # at most 64 MiB in memory while copying
_OFF = ("off", "0", "none", "false", "no")


class IndexCacheWarning(UserWarning):
    """The local index copy could not be used (unwritable or full cache directory): ranged reads instead."""


def default_dir() -> str | None:
    """$CI_STORE_INDEX_CACHE, else $XDG_CACHE_HOME/ci-store/index, else ~/.cache/ci-store/index; None when the
    variable says off."""
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():
        return None if env.strip().lower() in _OFF else os.path.expanduser(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ci-store", "index")


def check_option(index_cache):
    """The open_store argument: "auto", a directory (str / PathLike), or None / False (off)."""
    if index_cache is None or index_cache is False or index_cache == "auto":
        return index_cache
    if isinstance(index_cache, (str, os.PathLike)) and not isinstance(index_cache, bool) and os.fspath(index_cache):
        return os.fspath(index_cache)
    raise StoreError(f"index_cache must be 'auto', a directory path, or None/False (off), got {index_cache!r}")


def choose_dir(index_cache, total_bytes: int) -> str | None:
    """The cache directory to use for a remote v2 index of `total_bytes`, or None for ranged reads."""
    if index_cache is None or index_cache is False:
        return None
    if index_cache == "auto":
        return default_dir() if total_bytes > AUTO_MIN_BYTES else None
    return index_cache


def cache_key(meta: dict, url: str) -> str:
    """Names the index content: format version, plan digest (ids, frames, shards) and the hash table's
    parameters (the hash arrays depend on them), plus a digest of the store URL: a copy only ever serves the
    store it came from, so another (untrusted) store claiming the same plan cannot plant its index for it.
    The store records no per-array checksum; sizes are checked."""
    plan = str(meta.get("plan_sha256", ""))
    if not re.fullmatch(r"[0-9a-f]{64}", plan):       # check_meta already refuses this; never build odd paths
        raise StoreError(f"plan_sha256 {plan!r} is not a sha256 hex digest")
    where = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return (f"v{int(meta['format_version'])}-{plan}-h{int(meta['id_hash_bits'])}-b{int(meta['index_block'])}"
            f"-u{where}")


def _size_ok(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def _download(objects, key: str, size: int, dest: str, where: str) -> None:
    """Copy one object into `dest` atomically: temp file in the same directory, size checked, fsync, rename."""
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            spans = [(a, min(size, a + DOWNLOAD_PART_BYTES)) for a in range(0, size, DOWNLOAD_PART_BYTES)]
            for i in range(0, len(spans), DOWNLOAD_PARTS_AT_ONCE):
                batch = spans[i:i + DOWNLOAD_PARTS_AT_ONCE]
                for (a, b), blob in zip(batch, objects.get_ranges([(key, a, b) for a, b in batch])):
                    if blob is None or len(blob) != b - a:
                        raise StoreError(f"{where}: array data {key} is missing or shorter than {size} bytes")
                    f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if os.path.getsize(tmp) != size:
            raise StoreError(f"{where}: copy of {key} has {os.path.getsize(tmp)} bytes, expected {size}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def local_copy(objects, meta: dict, arrays: dict[str, tuple[str, int]], cache_dir: str,
               where: str) -> tuple[dict[str, str], list[str]] | None:
    """Files holding the index arrays `{name: (object key, bytes)}` in `<cache_dir>/<key>/<name>`, downloading
    those missing or of the wrong size under an exclusive flock on `<cache_dir>/<key>.lock` (one process of the
    host downloads, the others wait and then map). Returns ({name: file}, names downloaded by this process), or
    None with an IndexCacheWarning when the directory cannot be written (the caller reads ranges instead)."""
    key = cache_key(meta, objects.url)
    folder = os.path.join(cache_dir, key)
    files = {name: os.path.join(folder, name) for name in arrays}
    if all(_size_ok(files[n], size) for n, (_, size) in arrays.items()):
        return files, []                    # complete copies appear only by rename: no lock needed
    got = []
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(cache_dir, f"{key}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for name, (obj, size) in arrays.items():
                if not _size_ok(files[name], size):     # another process may have finished it while we waited
                    if os.path.exists(files[name]):
                        log.warning("%s: cached index array %s has the wrong size; downloading it again",
                                    where, files[name])
                    _download(objects, obj, size, files[name], where)
                    got.append(name)
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(fd)                    # releases the lock
    except OSError as e:
        reason = "full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "not writable"
        warnings.warn(f"{where}: index cache {cache_dir} is {reason} ({e}); reading the index by ranged "
                      f"requests instead (set {ENV_VAR} to another directory, or 'off')", IndexCacheWarning,
                      stacklevel=3)
        return None
    return files, got
