"""A fault-injecting HTTP proxy on loopback, in front of the test S3 server (moto, used like MinIO).

For a configurable share of requests it answers 503 SlowDown or 500 InternalError (as
S3 does, with an XML error body), resets the connection without answering, or delays
the request before forwarding it. Everything else is forwarded unchanged. Decisions
come from a seeded generator, the fault kinds take turns, and every injected fault is
counted per kind, so a test can report what it survived.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("503", "500", "reset", "slow")
_S3_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
}


class FaultProxy:
    """``FaultProxy(upstream, rate, kinds, seed)``; ``start()`` returns the proxy's endpoint URL.

    ``rate`` in [0, 1] is the share of requests that get a fault; ``slow_s`` the delay of a
    slow response (seconds). ``counts`` holds faults injected per kind and ``requests`` the total.
    """

    def __init__(self, upstream: str, rate: float = 0.1, kinds: tuple[str, ...] = FAULT_KINDS, seed: int = 0,
                 slow_s: float = 0.3):
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.upstream = urlsplit(upstream)
        self.rate, self.kinds, self.slow_s = rate, tuple(kinds), slow_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._turn = 0
        self.counts = dict.fromkeys(self.kinds, 0)
        self.requests = 0
        # answer every request 403 InvalidAccessKeyId, as S3 does for unknown credentials
        self.deny_access = False
        self._server: ThreadingHTTPServer | None = None

    @property
    def injected(self) -> int:
        return sum(self.counts.values())

    def _decide(self) -> str | None:
        with self._lock:
            self.requests += 1
            if not self.kinds or self._rng.random() >= self.rate:
                return None
            kind = self.kinds[self._turn % len(self.kinds)]
            self._turn += 1
            self.counts[kind] += 1
            return kind

    def start(self) -> str:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                kind = "denied" if proxy.deny_access else proxy._decide()
                if kind == "reset":
                    # RST instead of an answer: SO_LINGER with a zero timeout, then close
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind in _S3_ERRORS:
                    status, code, message = _S3_ERRORS[kind]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if kind == "slow":
                    time.sleep(proxy.slow_s)
                self._forward(body)

            def _forward(self, body: bytes):
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but announces the object's size
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
