"""Open a store URL as a zarr Store and give the rest of ci_store a small synchronous object API.

Local paths (and file://) use zarr's LocalStore for zarr metadata and plain file I/O (pread, atomic rename) for
shard objects: hopping onto zarr's event-loop thread costs more than reading a small utterance from page cache.
Every other URL (memory://, s3://, gs://, chained caching URLs such as simplecache::s3://...) goes through fsspec
via zarr's FsspecStore, with storage_options passed through unchanged, and its I/O runs on zarr's own event loop
(zarr.core.sync), which zarr resets after a fork; an fsspec filesystem bound to the parent's loop is never reused
in a child (see CIStore's per-process handles).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .errors import StoreError

log = logging.getLogger("ci_store")
T = TypeVar("T")
try:
    _IOV_MAX = max(2, min(1024, os.sysconf("SC_IOV_MAX")))     # buffers one preadv call may fill
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16


def is_local(url: str) -> bool:
    if "::" in url:
        return False
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def normalize_url(url) -> str:
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise StoreError(f"store URL must be a non-empty string or path, got {url!r}")
    url = url.rstrip("/") or "/"
    return local_path(url) if is_local(url) else url


def chain_options(url: str, storage_options: dict) -> dict:
    """fsspec options for zarr's FsspecStore: every async layer inside a chained URL is made asynchronous too.

    zarr creates the outermost filesystem with asynchronous=True and runs it on zarr's event loop. A caching layer
    (simplecache::, blockcache::, filecache::) creates its target with the options given for its protocol, as a
    synchronous instance by default, and awaits that target's coroutines on zarr's loop. fsspec caches instances
    by their options, so that target is the very instance any other code of the process gets for the same
    options (a job that read its manifest or audio with fsspec, or wrote a store's quantizer), whose S3 client is
    bound to fsspec's own I/O loop; whichever loop uses it second fails with "attached to a different loop".
    Asking for an asynchronous target gives a distinct instance, bound only to the loop that awaits it (zarr's),
    and shared only with ci_store's other asynchronous handles, which run on that same loop.
    The caller's dict is copied, never modified (fsspec's URL parsing merges options into the nested dicts).
    """
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in storage_options.items()}
    for bit in url.split("::")[1:]:
        protocol = fsspec.core.split_protocol(bit)[0] if "://" in bit else bit
        try:
            is_async = fsspec.get_filesystem_class(protocol).async_impl
        except (ImportError, ValueError):
            continue                                      # unknown protocol: let fsspec report it
        layer = opts.get(protocol)
        if is_async and (layer is None or isinstance(layer, dict)):
            opts[protocol] = {**(layer or {}), "asynchronous": True}
    return opts



# --- transient storage faults ----------------------------------------------------------------------------------------
# HTTP statuses and service error codes that mean "try again": the request may succeed unchanged a moment later.
TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERROR_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException", "Throttling",
    "ThrottlingException", "TooManyRequests", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ConditionalRequestConflict",   # S3: a concurrent conditional write on the same key is in flight; retry
})
TRANSIENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "EPIPE", "EAGAIN", "ENETDOWN", "ENETUNREACH",
    "ENETRESET", "EHOSTUNREACH", "EHOSTDOWN", "ESTALE",
    "EBUSY",         # s3fs's translation of 503 SlowDown / ServiceUnavailable and 409 conflicts
    "EREMOTEIO",     # s3fs's translation of 500 InternalError
) if hasattr(errno, n))
# client-library exception classes (matched by name along the MRO, so ci_store imports none of those libraries)
_TRANSIENT_CLASSES = frozenset({
    "botocore.exceptions:HTTPClientError", "botocore.exceptions:ConnectionError",
    "botocore.exceptions:IncompleteReadError", "aiohttp.client_exceptions:ClientConnectionError",
    "aiohttp.client_exceptions:ClientPayloadError", "urllib3.exceptions:ProtocolError",
    "urllib3.exceptions:TimeoutError", "http.client:IncompleteRead", "gcsfs.retry:ChecksumError",
    "requests.exceptions:ConnectionError", "requests.exceptions:Timeout",
})
_NEVER_TRANSIENT = (StoreError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                    NotADirectoryError, ValueError, TypeError, KeyError)
_SECURITY_WORDS = ("Certificate", "CertVerification", "Fingerprint")   # a certificate will not get better


def _class_names(exc: BaseException) -> list[str]:
    return [f"{c.__module__}:{c.__qualname__}" for c in type(exc).__mro__]


def _http_status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, service error code) of a botocore ClientError, aiohttp ClientResponseError or gcsfs HttpError."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):                                     # botocore ClientError
        err = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = err.get("Code")
        return (int(status) if isinstance(status, int) else None), (str(code) if code is not None else None)
    names = _class_names(exc)
    if "aiohttp.client_exceptions:ClientResponseError" in names:
        return getattr(exc, "status", None), None
    if "gcsfs.retry:HttpError" in names:
        code = getattr(exc, "code", None)
        return (code if isinstance(code, int) else None), None
    return None, None


def _error_label(exc: BaseException) -> str:
    """'OSError(SlowDown)': the exception type and the service's error code or status found along its causes."""
    cause, seen = exc, 0
    while cause is not None and seen < 8:
        status, code = _http_status_and_code(cause)
        if code or status:
            return f"{type(exc).__name__}({code or status})"
        cause, seen = cause.__cause__, seen + 1
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """True when a storage error is worth retrying unchanged: timeouts, dropped or refused connections, truncated
    responses, HTTP 408/429/500/502/503/504, S3 SlowDown/InternalError/ServiceUnavailable/throttling codes and
    network errnos (ETIMEDOUT, ECONNRESET, ESTALE, ...). False for everything that will fail the same way again:
    missing objects (FileNotFoundError, HTTP 404), denied access (403), failed preconditions (412,
    FileExistsError), bad data (ValueError, StoreError), certificate failures and anything unrecognised.

    Libraries wrap errors (s3fs raises OSError(EBUSY) with the botocore ClientError as __cause__ for a 503), so the
    cause chain is followed (the implicit __context__ too, for wrappers that raise without `from`). One place
    decides, for the store's object I/O and for audio reads alike (distill.data.audio.is_transient_io_error).
    """
    seen = 0
    while exc is not None and seen < 8:
        seen += 1
        if isinstance(exc, _NEVER_TRANSIENT):
            return False
        names = _class_names(exc)
        if any(w in n for n in names for w in _SECURITY_WORDS):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError)) or any(n in _TRANSIENT_CLASSES for n in names):
            return True
        status, code = _http_status_and_code(exc)
        if status is not None or code is not None:
            return status in TRANSIENT_HTTP_STATUS or code in TRANSIENT_ERROR_CODES
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with jittered exponential backoff for transient storage errors (see is_transient).

    attempts: tries in all (1 = no retry). The wait before retry k (k = 1, 2, ...) is drawn uniformly from
    [d/2, d] with d = min(max_delay, base_delay * 2**(k-1)): exponential so a struggling service gets room,
    jittered so many workers that failed together do not retry in lockstep. The defaults (6 tries, 0.1 s doubling
    to at most 5 s) ride out ~10 s of outage per request, in addition to any retries the client library makes.
    """
    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0

    def __post_init__(self):
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise StoreError(f"RetryPolicy.attempts must be an integer >= 1, got {self.attempts!r}")
        if not (0 <= self.base_delay <= self.max_delay):
            raise StoreError(f"RetryPolicy needs 0 <= base_delay <= max_delay, got {self.base_delay}, "
                             f"{self.max_delay}")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        d = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return (rng or random).uniform(d / 2, d)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


class RetryStats:
    """Counts of retried and abandoned operations (thread-safe); what a benchmark or a job log reports."""

    def __init__(self):
        self._lock = threading.Lock()
        self.retries = 0          # re-attempts made after a transient error
        self.gave_up = 0          # operations that still failed after the last attempt
        self.by_error: dict[str, int] = {}

    def note(self, exc: BaseException | None, gave_up: bool = False) -> None:
        with self._lock:
            if gave_up:
                self.gave_up += 1
            else:
                self.retries += 1
                name = _error_label(exc)
                self.by_error[name] = self.by_error.get(name, 0) + 1
        if self is not PROCESS_RETRIES:
            PROCESS_RETRIES.note(exc, gave_up)

    def snapshot(self) -> dict:
        with self._lock:
            return {"retries": self.retries, "gave_up": self.gave_up, "by_error": dict(self.by_error)}


PROCESS_RETRIES = RetryStats()      # every ObjectStore's counts in this process, summed (for job logs, benchmarks)


def _next_wait(exc: BaseException, attempt: int, policy: RetryPolicy, what: str, stats: RetryStats | None
               ) -> float | None:
    """Seconds to wait before trying again after `exc`; None if it is permanent (the caller re-raises it as is);
    StoreError when the attempts are spent."""
    if not is_transient(exc):
        return None
    if attempt >= policy.attempts:
        if stats:
            stats.note(exc, gave_up=True)
        raise StoreError(f"{what} failed after {attempt} attempt{'s' if attempt > 1 else ''} with transient "
                         f"errors; last: {_error_label(exc)}: {exc}") from exc
    if stats:
        stats.note(exc)
    wait = policy.delay(attempt)
    log.info("%s: transient %s; retry %d of %d in %.2f s", what, _error_label(exc), attempt, policy.attempts - 1,
             wait)
    return wait


def retry_call(fn: Callable[[], T], *, what: str, policy: RetryPolicy | None = None,
               stats: RetryStats | None = None) -> T:
    """fn() retried under `policy` while it raises transient errors (is_transient); a permanent error is raised at
    once, unchanged. When the attempts run out: StoreError naming `what` (e.g. "s3://b/store/codes/c/3/0: get"),
    chained to the last error. Use it for any idempotent storage call (reads, whole-object writes)."""
    policy = policy or DEFAULT_RETRY
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:
            wait = _next_wait(e, attempt, policy, what, stats)
            if wait is None:
                raise
        time.sleep(wait)


async def retry_async(make: Callable[[], Awaitable[T]], *, what: str, policy: RetryPolicy | None = None,
                      stats: RetryStats | None = None) -> T:
    """retry_call for coroutines: `make` builds a fresh awaitable per attempt."""
    policy = policy or DEFAULT_RETRY
    attempt = 0
    while True:
        attempt += 1
        try:
            return await make()
        except Exception as e:
            wait = _next_wait(e, attempt, policy, what, stats)
            if wait is None:
                raise
        await asyncio.sleep(wait)


class RetryingStore(WrapperStore):
    """A zarr Store whose I/O on the wrapped store is retried on transient errors (RetryPolicy, is_transient).

    Other attributes (fs, path, ...) read through to the wrapped store. Listings are collected whole per attempt,
    so a retry never yields a key twice.
    """

    def __init__(self, store, url: str, policy: RetryPolicy, stats: RetryStats):
        super().__init__(store)
        self._url, self._policy, self._stats = url, policy, stats

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_store", "_url", "_policy", "_stats"):
            raise AttributeError(name)
        return getattr(self._store, name)

    def _with_store(self, store):
        return type(self)(store, self._url, self._policy, self._stats)

    def _retry(self, op: str, key: str, make):
        return retry_async(make, what=f"{self._url}/{key}: {op}", policy=self._policy, stats=self._stats)

    async def get(self, key, prototype, byte_range=None):
        op = "get" if byte_range is None else f"get {byte_range}"
        return await self._retry(op, key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def _get_many(self, requests):
        for req in requests:
            yield req[0], await self.get(*req)

    async def exists(self, key):
        return await self._retry("exists", key, lambda: self._store.exists(key))

    async def getsize(self, key):
        return await self._retry("size", key, lambda: self._store.getsize(key))

    async def is_empty(self, prefix):
        return await self._retry("list", prefix, lambda: self._store.is_empty(prefix))

    async def set(self, key, value):
        await self._retry("set", key, lambda: self._store.set(key, value))

    async def set_if_not_exists(self, key, value):
        await self._retry("set", key, lambda: self._store.set_if_not_exists(key, value))

    async def _set_many(self, values):
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key):
        await self._retry("delete", key, lambda: self._store.delete(key))

    async def delete_dir(self, prefix):
        await self._retry("delete", f"{prefix}/" if prefix else "", lambda: self._store.delete_dir(prefix))

    async def _listed(self, op: str, prefix: str, lister):
        async def collect():
            return [k async for k in lister()]
        for k in await self._retry(op, prefix, collect):
            yield k

    def list(self):
        return self._listed("list", "", self._store.list)

    def list_prefix(self, prefix):
        return self._listed("list", prefix, lambda: self._store.list_prefix(prefix))

    def list_dir(self, prefix):
        return self._listed("list", prefix, lambda: self._store.list_dir(prefix))


def _pread_each(fd: int, buffers: list, offset: int) -> int:
    """preadv where the platform has none: pread into each buffer in turn."""
    total = 0
    for b in buffers:
        data = os.pread(fd, len(b), offset + total)
        b[:len(data)] = np.frombuffer(data, np.uint8) if isinstance(b, np.ndarray) else data
        total += len(data)
        if len(data) < len(b):
            break
    return total


_preadv = getattr(os, "preadv", _pread_each)


class ObjectStore:
    """Synchronous get/set/create/list of whole or partial objects under one store root.

    Every operation is retried under `retry` (a RetryPolicy) while it fails with a transient error (is_transient);
    `stats` counts the retries. zarr_store is wrapped in a RetryingStore, so zarr's own I/O through it (metadata,
    utterance index, quantizer, verify's decode) is retried the same way. All operations are idempotent, so a
    retry after a lost response is harmless: a repeated create() then reports the object as existing, and callers
    compare its content (write_shard does).
    """

    def __init__(self, url: str, storage_options: dict | None = None, read_only: bool = False,
                 retry: RetryPolicy | None = None):
        self.retry = retry or DEFAULT_RETRY
        self.stats = RetryStats()
        self.url = normalize_url(url)
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        if is_local(self.url):
            if self.storage_options:
                raise StoreError(f"storage_options given for the local path {self.url}; they apply to fsspec URLs only")
            if read_only and not os.path.isdir(self.url):
                raise StoreError(f"{self.url}: no such directory (not a ci-store)")
            self.zarr_store = LocalStore(self.url, read_only=read_only)
        else:
            try:
                self.zarr_store = FsspecStore.from_url(self.url, read_only=read_only,
                                                       storage_options=chain_options(self.url, self.storage_options))
            except (ImportError, ValueError) as e:
                raise StoreError(f"cannot open {self.url}: {e}") from e
        self._proto = default_buffer_prototype()
        self.local = is_local(self.url)
        self.zarr_store = RetryingStore(self.zarr_store, self.url, self.retry, self.stats)

    def _path(self, key: str) -> str:
        return os.path.join(self.url, *key.split("/"))

    def _retry(self, op: str, key: str, fn: Callable[[], T]) -> T:
        return retry_call(fn, what=f"{self.url}/{key}: {op}", policy=self.retry, stats=self.stats)

    def _read_local(self, key: str, start: int | None = None, end: int | None = None) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                if start is None:
                    return f.read()
                # pread allocates the length asked for: never ask past the end (a crafted index may claim a TiB)
                size = os.fstat(f.fileno()).st_size
                return os.pread(f.fileno(), max(0, min(end, size) - start), start) if start < size else b""
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _preadv_local(self, key: str, offset: int, buffers: list) -> int | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            if len(buffers) <= _IOV_MAX:        # the usual case: everything in one call
                got = _preadv(fd, buffers, offset)
                if got == sum(len(b) for b in buffers):
                    return got
            bufs, i, total = [b for b in buffers if len(b)], 0, 0
            while i < len(bufs):
                got = _preadv(fd, bufs[i:i + _IOV_MAX], offset + total)
                if got == 0:            # end of file: the caller compares the count with what it asked for
                    break
                total += got
                while got and i < len(bufs):        # a short read resumes inside the buffer it stopped in
                    if got >= len(bufs[i]):
                        got -= len(bufs[i])
                        i += 1
                    else:
                        bufs[i], got = bufs[i][got:], 0
            return total
        finally:
            os.close(fd)

    # --- reads -------------------------------------------------------------------------------------------------
    def read_into(self, key: str, offset: int, buffers: Sequence) -> int | None:
        """Local stores only: fill `buffers` (writable, C-contiguous 1-D uint8 numpy arrays or other writable byte
        buffers, in order) from the object's bytes starting at `offset`, with vectored reads straight into them
        (no intermediate copy). Returns the bytes read, fewer than the buffers hold when the object ends first
        (nothing past its end is read or allocated); None when the object is missing."""
        if not self.local:
            raise StoreError(f"{self.url}: read_into is for local stores (remote stores use get_ranges)")
        views = [b if type(b) is np.ndarray and b.dtype == np.uint8 and b.ndim == 1 else memoryview(b).cast("B")
                 for b in buffers]
        return self._retry("read range", key, lambda: self._preadv_local(key, offset, views))

    def get(self, key: str) -> bytes | None:
        if self.local:
            return self._retry("get", key, lambda: self._read_local(key))
        # s3fs sizes a whole-object read from its listing cache: a listing made before another writer (or our own
        # create whose answer was lost) added the object would make it read as missing
        self._forget_listings()
        buf = sync(self.zarr_store.get(key, self._proto))
        return None if buf is None else buf.to_bytes()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Whole objects, fetched concurrently (each retried on its own)."""
        if self.local:
            return [self._retry("get", k, lambda k=k: self._read_local(k)) for k in keys]
        self._forget_listings()

        async def run():
            bufs = await asyncio.gather(*(self.zarr_store.get(k, self._proto) for k in keys))
            return [None if b is None else b.to_bytes() for b in bufs]
        return sync(run()) if keys else []

    def get_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes | None]:
        """Byte ranges [start, end) of objects, fetched concurrently (each retried on its own); None for a missing
        object."""
        if self.local:
            return [self._retry("get range", k, lambda k=k, a=a, b=b: self._read_local(k, a, b))
                    for k, a, b in requests]
        async def run():
            bufs = await asyncio.gather(*(self.zarr_store.get(k, self._proto, RangeByteRequest(a, b))
                                          for k, a, b in requests))
            return [None if b is None else b.to_bytes() for b in bufs]
        return sync(run()) if requests else []

    def _forget_listings(self) -> None:
        """Drop fsspec's cached directory listings: other processes (extraction workers) write objects we must
        see, and a stale listing would report finished shards as missing."""
        fs = getattr(self.zarr_store, "fs", None)
        if fs is not None and hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()

    def exists(self, key: str) -> bool:
        if self.local:
            return os.path.isfile(self._path(key))
        self._forget_listings()
        return bool(sync(self.zarr_store.exists(key)))

    def list_prefix(self, prefix: str) -> list[str]:
        if not self.local:
            self._forget_listings()

        async def run():
            return [k async for k in self.zarr_store.list_prefix(prefix)]
        return sorted(sync(run()))

    def list_all(self) -> list[str]:
        if not self.local:
            self._forget_listings()

        async def run():
            return [k async for k in self.zarr_store.list()]
        return sorted(sync(run()))

    def getsize(self, key: str) -> int:
        return int(sync(self.zarr_store.getsize(key)))

    def total_size(self) -> int:
        """Bytes of all objects under the root (what the store costs on storage)."""
        if is_local(self.url):
            total = 0
            for root, _, files in os.walk(self.url):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
            return total
        keys = self.list_all()

        async def run():
            sizes = await asyncio.gather(*(self.zarr_store.getsize(k) for k in keys))
            return sum(int(s) for s in sizes)
        return sync(run()) if keys else 0

    # --- writes ------------------------------------------------------------------------------------------------
    def set(self, key: str, data: bytes) -> None:
        """Write (or replace) a whole object."""
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; cannot write {key}")
        if self.local:
            # write-then-rename: a reader or a crash never sees half an object
            self._retry("set", key, lambda: replace_file(self._path(key), data))
            return
        sync(self.zarr_store.set(key, self._proto.buffer.from_bytes(data)))

    @property
    def create_mode(self) -> str:
        """How create() makes "only if absent" hold; docs/store-format.md#concurrent-writers says what each gives.

        "link" (local: hard link of a complete temporary file, atomic, NFS included), "if-none-match" (S3 PUT with
        If-None-Match: *), "if-generation-match" (GCS upload with ifGenerationMatch=0) are atomic; "check-then-write"
        (any other fsspec filesystem) is not: two writers can both see the key absent and both write it.
        """
        if self.local:
            return "link"
        protocols = getattr(getattr(self.zarr_store, "fs", None), "protocol", ())
        protocols = {protocols} if isinstance(protocols, str) else set(protocols)
        if protocols & {"s3", "s3a"}:
            return "if-none-match"
        if protocols & {"gs", "gcs"}:
            return "if-generation-match"
        return "check-then-write"

    def create(self, key: str, data: bytes) -> bool:
        """Write a whole object only if `key` does not exist yet: True if this call created it, False if the key was
        already there (its content untouched). A retry after a lost response also returns False; the caller then
        reads the object and compares (write_shard does)."""
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; cannot write {key}")
        mode = self.create_mode
        if mode == "link":
            return self._retry("create", key, lambda: create_file(self._path(key), data))
        if mode == "check-then-write":
            if self.get(key) is not None:
                return False
            self.set(key, data)
            return True
        fs, path = self.zarr_store.fs, f"{self.zarr_store.path.rstrip('/')}/{key}"

        async def put():
            try:
                await fs._pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
        return sync(retry_async(put, what=f"{self.url}/{key}: create", policy=self.retry, stats=self.stats))

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error."""
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; cannot delete {key}")
        if self.local:
            def remove():
                try:
                    os.remove(self._path(key))
                except FileNotFoundError:
                    pass
            self._retry("delete", key, remove)
            return
        sync(self.zarr_store.delete(key))

    def is_empty(self) -> bool:
        if is_local(self.url) and not os.path.exists(self.url):
            return True
        return bool(sync(self.zarr_store.is_empty("")))


def replace_file(path: str, data: bytes) -> None:
    """Write a local file by write-then-rename: a reader or a crash never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def create_file(path: str, data: bytes) -> bool:
    """Create a local file only if absent, atomically: the data goes to a temporary file which is then hard-linked
    to `path` (link() fails if `path` exists, on NFS too), so no reader or competing writer sees half a file.
    True if created, False if `path` already existed. Filesystems without hard links (some FUSE/SMB mounts) fall
    back to O_EXCL, which is just as exclusive but lets a concurrent reader see the file while it is written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if os.path.exists(path):
        return False
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    finally:
        os.unlink(tmp)
    try:
        with open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False


def write_file(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write one whole file at a local path or fsspec URL; local files are replaced atomically."""
    fs, p = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        replace_file(p, data)
    else:
        with fs.open(p, "wb") as f:
            f.write(data)
