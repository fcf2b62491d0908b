"""Manifest lines: one rule for every malformed or out-of-store line (an ``invalid_uri`` row, never a fetch)."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from clipn_core.storage import Storage
from clipn_core.uri_scope import InvalidUriError, UriScope
from jobs.score.read import fetch, fetch_batch, read_status
from schemas.score_config import InputConfig

S3_MANIFEST = "s3://lake/manifests/tonight.parquet"
# every kind of line a manifest on s3://lake/ must not fetch -> a word of the reason given
REFUSED = {
    "null": (None, "null"),
    "empty": ("", "empty"),
    "whitespace": ("  \t", "whitespace"),
    "not_a_string": (5, "not a string"),
    "relative": ("images/a.jpg", "relative"),
    "dot_relative": ("./a.jpg", "relative"),
    "home_relative": ("~/a.jpg", "relative"),
    "local_path": ("/etc/passwd", "outside"),
    "file_uri": ("file:///etc/passwd", "outside"),
    "file_uri_with_host": ("file://host/etc/passwd", "host"),
    "instance_metadata": ("http://169.254.169.254/latest/meta-data/iam/", "outside"),
    "another_bucket": ("s3://other/a.jpg", "outside"),
    "a_bucket_sharing_the_prefix": ("s3://lake-evil/a.jpg", "outside"),
    "another_protocol": ("gs://lake/a.jpg", "outside"),
    "chained": ("simplecache::s3://lake/a.jpg", "chained"),
    "chained_inside": ("s3://lake/a.jpg::http://169.254.169.254/", "chained"),
    "dot_segments": ("s3://lake/images/../../other/a.jpg", "dot segments"),
    "no_bucket": ("s3:///a.jpg", "bucket"),
    "unparsable": ("http://[::1/a.jpg", "unparsable"),
    "nul": ("s3://lake/a\x00.jpg", "NUL"),
}
ACCEPTED = ["s3://lake/images/a.jpg", "s3a://lake/images/a.jpg", "s3://lake/odd key #1 ?ü+%20[x]*.jpg"]


@pytest.mark.parametrize("kind", list(REFUSED))
def test_every_malformed_or_foreign_line_is_refused_with_its_reason(kind):
    value, reason = REFUSED[kind]
    scope = UriScope.for_manifest(S3_MANIFEST)
    assert reason in scope.problem(value)
    with pytest.raises(InvalidUriError, match="not fetched") as e:
        scope.check(value)
    assert read_status(e.value) == "invalid_uri"


@pytest.mark.parametrize("value", ACCEPTED)
def test_lines_in_the_manifests_bucket_are_fetched_as_they_are(value):
    assert UriScope.for_manifest(S3_MANIFEST).problem(value) is None


def test_a_local_manifest_reaches_the_local_filesystem_and_the_allowed_prefixes():
    scope = UriScope.for_manifest("manifest.parquet", ["s3://other/images", "/mnt/lake/"])
    assert scope.prefixes == ("/", "s3://other/images/", "/mnt/lake/")
    assert scope.problem("/data/a.jpg") is None and scope.problem("file:///data/a.jpg") is None
    assert scope.problem("s3://other/images/a.jpg") is None
    for refused in ("s3://other/imagesX/a.jpg", "s3://other/a.jpg", "s3://lake/a.jpg", "a.jpg", None, ""):
        assert scope.problem(refused) is not None, refused
    remote = UriScope.for_manifest(S3_MANIFEST, ["/mnt/lake"])
    assert remote.problem("/mnt/lake/a.jpg") is None
    assert "outside" in remote.problem("/mnt/lake/../../etc/passwd")  # compared after normalising


@pytest.mark.parametrize("bad", ["", "images/", "simplecache::s3://x/", "http://[::1/"])
def test_allowed_prefixes_are_checked_with_the_config(bad):
    with pytest.raises(ValidationError, match="allowed_uri_prefixes"):
        InputConfig(kind="manifest", uri=S3_MANIFEST, allowed_uri_prefixes=[bad])
    with pytest.raises(ValidationError, match="needs kind: manifest"):
        InputConfig(kind="prefix", uri="s3://lake/images/", allowed_uri_prefixes=["s3://other/"])


@contextlib.contextmanager
def recording_http_server():
    """(base URL, paths asked for) of a loopback HTTP server that answers every GET with four bytes."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"data")

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()


@pytest.fixture()
def recording_server():
    with recording_http_server() as found:
        yield found


def test_a_refused_line_is_never_fetched(recording_server):
    """Observed on the wire: a line outside the scope sends no request, the same line allowed does."""
    base, seen = recording_server
    line = f"{base}/latest/meta-data/a.jpg"
    out = fetch_batch({"uri": [line, None, ""]}, Storage({}), 4, scope=UriScope.for_manifest(S3_MANIFEST))
    assert list(out["status"]) == ["invalid_uri"] * 3 and list(out["uri"]) == [line, "", ""]
    assert "outside the input's store" in out["error"][0] and "null uri" in out["error"][1]
    assert seen == []
    allowed = UriScope.for_manifest(S3_MANIFEST, [f"{base}/latest/"])
    assert fetch([line], Storage({}), 4, scope=allowed) == [b"data"] and seen  # the observation itself works
