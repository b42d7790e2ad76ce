"""Real storage faults for the tests (not production code).

- `FlakyFileSystem` ("flaky://" + a local path): an fsspec filesystem registered in fsspec's protocol registry
  that serves local files but raises planned exceptions (real ConnectionResetError, TimeoutError, ...) at the next
  opens of a file, or at a read after some bytes, and counts every open.
- `GatedFileSystem` ("gated://" + a local path): opening a file blocks while `<CI_STORE_TEST_GATE_DIR>/<file
  name>.closed` exists, so a test can stop a shard task at a chosen utterance and kill its process there.
- `SlowDownProxy`: an HTTP proxy in front of the moto S3 server that answers S3's real throttling response
  (503 SlowDown) to the first N requests for chosen keys and forwards everything else.
"""
from __future__ import annotations

import collections
import http.client
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem


class _FailingReads:
    """A file whose reads fail with `exc` once `after` bytes have been read (seek/tell keep working)."""

    def __init__(self, f, exc: BaseException, after: int):
        self._f, self._exc, self._left = f, exc, after

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            raise self._exc
        data = self._f.read(n if n is not None and n >= 0 and n <= self._left else self._left)
        self._left -= len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FlakyFileSystem(LocalFileSystem):
    protocol = ("flaky",)
    opens: collections.Counter = collections.Counter()
    _faults: dict[str, list] = {}
    _lock = threading.Lock()

    @classmethod
    def plan(cls, path: str, *faults) -> None:
        """The next opens of `path` fail, one fault each: an exception (raised at open) or (exception, after)
        (raised by a read once `after` bytes were read)."""
        with cls._lock:
            cls._faults.setdefault(cls._strip_protocol(path), []).extend(faults)

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls._faults.clear()
            cls.opens.clear()

    @classmethod
    def count(cls, path: str) -> int:
        return cls.opens[cls._strip_protocol(path)]

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        with self._lock:
            self.opens[path] += 1
            queue = self._faults.get(path)
            fault = queue.pop(0) if queue else None
        if fault is None:
            return super()._open(path, mode, **kwargs)
        if isinstance(fault, BaseException):
            raise fault
        exc, after = fault
        return _FailingReads(super()._open(path, mode, **kwargs), exc, after)


class GatedFileSystem(LocalFileSystem):
    protocol = ("gated",)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        gate = os.path.join(os.environ.get("CI_STORE_TEST_GATE_DIR", "/nonexistent"), os.path.basename(path))
        while os.path.exists(gate + ".closed"):
            time.sleep(0.05)
        return super()._open(path, mode, **kwargs)


def register() -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    fsspec.register_implementation("gated", GatedFileSystem, clobber=True)


SLOWDOWN_XML = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message><RequestId>fault-injection</RequestId></Error>")


class SlowDownProxy:
    """`with SlowDownProxy(moto_endpoint) as p:` point s3fs at p.url; p.throttle(key, n) makes the next n
    requests whose path ends with `key` get 503 SlowDown; p.throttled counts those answered so."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.throttled: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()
        self._plan: dict[str, int] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                key = next((k for k in proxy._plan if urlsplit(self.path).path.endswith(k)), None)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    if key is not None:
                        proxy.requests[key] += 1
                    throttle = key is not None and proxy._plan[key] > 0
                    if throttle:
                        proxy._plan[key] -= 1
                        proxy.throttled[key] += 1
                if throttle:
                    payload = b"" if self.command == "HEAD" else SLOWDOWN_XML
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_XML)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD"
                                                       else resp.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def throttle(self, key: str, n: int) -> None:
        with self._lock:
            self._plan[key] = n

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
