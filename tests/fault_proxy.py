"""A fault-injecting HTTP proxy on loopback, in front of the test S3 server (moto, used like MinIO).

For a configurable share of requests it answers 503 SlowDown or 500 InternalError (as
S3 does, with an XML error body), resets the connection without answering, or delays
the request before forwarding it. Everything else is forwarded unchanged. Decisions
come from a seeded generator, the fault kinds take turns, and every injected fault is
counted per kind, so a test can report what it survived.

``latency_s`` adds a fixed delay to every request before it is forwarded: real S3
answers in 20-100 ms, loopback in under 1 ms, so benchmarks use it to show what the
jobs do with object-store latency. ``seen`` counts requests by (method, path, whether
a query string was sent), e.g. to check that an object is fetched with one GET.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("503", "500", "reset", "slow")
STATS_PATH = "/__fault_proxy_stats__"
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
                 slow_s: float = 0.3, latency_s: float = 0.0):
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.upstream = urlsplit(upstream)
        self.rate, self.kinds, self.slow_s, self.latency_s = rate, tuple(kinds), slow_s, latency_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._turn = 0
        self.counts = dict.fromkeys(self.kinds, 0)
        self.requests = 0
        self.seen: Counter = Counter()
        # answer every request 403 InvalidAccessKeyId, as S3 does for unknown credentials
        self.deny_access = False
        self._server: ThreadingHTTPServer | None = None

    @property
    def injected(self) -> int:
        return sum(self.counts.values())

    def _decide(self, method: str, target: str) -> str | None:
        path, _, query = target.partition("?")
        with self._lock:
            self.requests += 1
            self.seen[(method, path, bool(query))] += 1
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
                if self.path == STATS_PATH:  # the proxy's own counters, for a proxy run as a separate process
                    data = json.dumps({"requests": proxy.requests, "counts": proxy.counts,
                                       "seen": [[*k, v] for k, v in proxy.seen.items()]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                body = self._body()
                kind = "denied" if proxy.deny_access else proxy._decide(self.command, self.path)
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
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


class ProxyProcess:
    """A :class:`FaultProxy` in a process of its own (``python tests/fault_proxy.py``), so that a benchmark's
    driver does not carry the proxy's work under its own GIL. ``stats()`` reads the proxy's counters."""

    def __init__(self, upstream: str, rate: float = 0.0, latency_s: float = 0.0, seed: int = 0):
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--upstream", upstream, "--rate", str(rate), "--latency-s", str(latency_s),
             "--seed", str(seed)], stdout=subprocess.PIPE, text=True)
        self.endpoint = self._proc.stdout.readline().strip()
        if not self.endpoint.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the proxy process did not start (printed {self.endpoint!r})")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.endpoint + STATS_PATH, timeout=10) as r:
            data = json.loads(r.read())
        data["seen"] = Counter({(m, p, q): n for m, p, q, n in data["seen"]})
        return data

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


def start_moto_process() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own on 127.0.0.1 at a free port; (process, endpoint URL)."""
    from jobs.demo import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's server did not start within 30 s")


def _main() -> None:
    ap = argparse.ArgumentParser(description="run a FaultProxy in front of UPSTREAM until killed; prints its endpoint")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--latency-s", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    proxy = FaultProxy(args.upstream, rate=args.rate, seed=args.seed, latency_s=args.latency_s)
    print(proxy.start(), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    _main()
