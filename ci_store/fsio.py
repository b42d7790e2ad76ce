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
import os
import threading
from typing import Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .errors import StoreError


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


class ObjectStore:
    """Synchronous get/set/list of whole or partial objects under one store root."""

    def __init__(self, url: str, storage_options: dict | None = None, read_only: bool = False):
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

    def _path(self, key: str) -> str:
        return os.path.join(self.url, *key.split("/"))

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

    # --- reads -------------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        if self.local:
            return self._read_local(key)
        buf = sync(self.zarr_store.get(key, self._proto))
        return None if buf is None else buf.to_bytes()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Whole objects, fetched concurrently."""
        if self.local:
            return [self._read_local(k) for k in keys]
        async def run():
            bufs = await asyncio.gather(*(self.zarr_store.get(k, self._proto) for k in keys))
            return [None if b is None else b.to_bytes() for b in bufs]
        return sync(run()) if keys else []

    def get_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes | None]:
        """Byte ranges [start, end) of objects, fetched concurrently; None for a missing object."""
        if self.local:
            return [self._read_local(k, a, b) for k, a, b in requests]
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
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; cannot write {key}")
        if self.local:
            # write-then-rename: a reader or a crash never sees half an object
            replace_file(self._path(key), data)
            return
        sync(self.zarr_store.set(key, self._proto.buffer.from_bytes(data)))

    def delete(self, key: str) -> None:
        if self.read_only:
            raise StoreError(f"{self.url} is open read-only; cannot delete {key}")
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


def write_file(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write one whole file at a local path or fsspec URL; local files are replaced atomically."""
    fs, p = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        replace_file(p, data)
    else:
        with fs.open(p, "wb") as f:
            f.write(data)
