"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto on loopback), for the fault tests and
bench/s3_faults.py. Not production code.

For a seeded fraction of requests it injects one of these faults, drawn from random.Random(seed) in arrival order:

* "slowdown": answers 503 SlowDown itself; the request never reaches S3 (what S3 does under request-rate pressure)
* "reset": resets the connection before forwarding; the request never reaches S3
* "lost_response": forwards the request, S3 applies it, then resets the connection: the client never hears. This is
  the case that makes a retried create-if-absent see its own object ("exists") and a retried delete find nothing.
* "truncate": forwards, sends the headers and half the body, then resets (a response cut short on the wire)
* "forbidden": answers 403 AccessDenied (a permanent error: for checking that it is *not* retried)
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

TRANSIENT_KINDS = ("slowdown", "reset", "lost_response", "truncate")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length"}
_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
              '<RequestId>faulty-proxy</RequestId></Error>')


class FaultyProxy:
    """Forward HTTP/1.1 requests to `upstream`, injecting faults into a `rate` fraction of them (see module doc).
    Counters: requests (all received), by_method, faults (by kind)."""

    def __init__(self, upstream: str, rate: float, seed: int = 0, kinds=TRANSIENT_KINDS):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rate, self.kinds = float(rate), tuple(kinds)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.by_method: Counter = Counter()
        self.faults: Counter = Counter()
        self._server: ThreadingHTTPServer | None = None

    def decide(self, method: str) -> str | None:
        with self._lock:
            self.requests += 1
            self.by_method[method] += 1
            r, pick = self._rng.random(), self._rng.randrange(len(self.kinds))
            if r >= self.rate:
                return None
            kind = self.kinds[pick]
            self.faults[kind] += 1
            return kind

    def _recount(self, old: str, new: str) -> None:
        with self._lock:
            self.faults[old] -= 1
            self.faults[new] += 1

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.by_method.clear()
            self.faults.clear()

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    def start(self) -> str:
        proxy = self

        class Handler(_Handler):
            pass
        Handler.proxy = proxy
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultyProxy

    def log_message(self, *args) -> None:
        pass

    def _read_body(self) -> bytes:
        n = self.headers.get("Content-Length")
        if n is not None:
            return self.rfile.read(int(n))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the client gets a TCP RST, not an orderly end."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _error(self, status: int, code: str, msg: str) -> None:
        body = _ERROR_XML.format(code=code, msg=msg).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _handle(self) -> None:
        body = self._read_body()
        kind = self.proxy.decide(self.command)
        if kind == "slowdown":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if kind == "forbidden":
            return self._error(403, "AccessDenied", "Access Denied")
        if kind == "reset":
            return self._reset()
        status, reason, headers, data = self._forward(body)
        if kind == "truncate" and (self.command == "HEAD" or len(data) < 2):   # nothing to cut short
            self.proxy._recount(kind, "lost_response")
            kind = "lost_response"
        if kind == "lost_response":
            return self._reset()
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP:
                self.send_header(k, v)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind == "truncate":
            self.wfile.write(data[:len(data) // 2])
            return self._reset()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
