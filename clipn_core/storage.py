"""Object-storage access through fsspec: local paths, ``file://``, ``s3://`` (MinIO via endpoint_url), ...

``storage_options`` are passed to fsspec unchanged (for s3fs: ``key``, ``secret``,
``anon``, ``profile``, ``client_kwargs={"endpoint_url": ..., "region_name": ...}``).
Errors name the URI with credentials and signed query strings removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from .errors import StorageError, redact_uri

DEFAULT_CACHE_DIR = Path(os.environ.get("CLIPN_CACHE_DIR", Path.home() / ".cache" / "clipn_lake"))


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local protocol (``s3://``, ``gs://``, ...)."""
    protocol = fsspec.core.split_protocol(str(uri))[0]
    return protocol not in (None, "file", "local")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, path without protocol) for ``uri``."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise StorageError(f"cannot open storage for {redact_uri(uri)}: {e}") from e
    return fs, path


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """All bytes of one object; :class:`StorageError` naming the URI when it cannot be read."""
    fs, path = filesystem(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise StorageError(f"not found: {redact_uri(uri)}") from e
    except PermissionError as e:
        raise StorageError(f"access denied reading {redact_uri(uri)} (check the credentials and the bucket policy): {e}") from e
    except Exception as e:  # noqa: BLE001 - re-raised typed, with the URI
        raise StorageError(f"cannot read {redact_uri(uri)}: {type(e).__name__}: {e}") from e


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The UTF-8 text of one file, read as every text file of the product is (class lists, templates, lexicons):
    a leading byte-order mark dropped (Notepad and Excel write one), so the first line is what it shows; CRLF and
    CR line ends are for ``str.splitlines``. Raises :class:`StorageError` naming the URI when it cannot be read or
    is not UTF-8."""
    data = read_bytes(uri, storage_options)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StorageError(f"{redact_uri(uri)} is not UTF-8 text: byte {e.start} is {data[e.start:e.start + 1]!r}") from e


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write one object; parent folders are created for local paths."""
    fs, path = filesystem(uri, storage_options)
    try:
        if not is_remote(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        fs.pipe_file(path, data)
    except PermissionError as e:
        raise StorageError(f"access denied writing {redact_uri(uri)} (check the credentials and the bucket policy): {e}") from e
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot write {redact_uri(uri)}: {type(e).__name__}: {e}") from e


def check_writable(uri: str, field: str, storage_options: dict[str, Any] | None = None, probe: str = ".probe") -> None:
    """Write and delete an empty object at ``uri + probe``; :class:`StorageError` naming ``field`` (the config
    field holding ``uri``) when that fails (missing bucket, no rights), so jobs fail before any work starts."""
    probe_uri = uri + probe
    try:
        write_bytes(probe_uri, b"", storage_options)
        fs, path = filesystem(probe_uri, storage_options)
        fs.rm(path)
    except Exception as e:  # noqa: BLE001 - typed, with the field at fault
        raise StorageError(f"{field} {redact_uri(uri)} is not writable: {e}") from e


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def local_copy(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local path holding the object at ``uri``: the path itself when local, else a cached download.

    The cache key is the URI plus the object's ETag/size/mtime, so a replaced object is
    fetched again. Downloads go to a temporary file renamed into place (no torn reads).
    """
    if not is_remote(uri):
        path = Path(fsspec.core.strip_protocol(str(uri)) if str(uri).startswith("file://") else uri)
        if not path.exists():
            raise StorageError(f"not found: {path}")
        return path
    fs, path = filesystem(uri, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        raise StorageError(f"not found: {redact_uri(uri)}") from e
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot stat {redact_uri(uri)}: {type(e).__name__}: {e}") from e
    version = f"{info.get('ETag') or info.get('etag') or ''}:{info.get('size')}:{info.get('LastModified') or info.get('mtime') or ''}"
    key = hashlib.sha256(f"{redact_uri(uri)}|{version}".encode()).hexdigest()[:24]
    target_dir = Path(cache_dir or DEFAULT_CACHE_DIR) / key
    target = target_dir / Path(path).name
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".part")
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        shutil.move(tmp, target)
    except Exception as e:  # noqa: BLE001
        Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"cannot download {redact_uri(uri)}: {type(e).__name__}: {e}") from e
    return target


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def arrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """(pyarrow filesystem wrapping the fsspec one, path without protocol) for Arrow and Ray readers/writers."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def remove_tree(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete ``uri`` and everything under it; nothing when it does not exist."""
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def with_protocol(fs, path: str) -> str:
    """The full URI of ``path`` on ``fs`` (``s3://bucket/key``; local paths stay plain)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


@dataclass(frozen=True)
class Storage:
    """Object storage bound once to its options: the fsspec and Arrow filesystems of any URI.

    Built from a job's ``StorageConfig`` (``cfg.storage.bind()``) and handed to every
    stage, Ray tasks and actors included (it pickles as its options). ``options`` are
    fsspec storage options, passed unchanged to the library functions that take them.
    """

    options: dict = field(default_factory=dict)

    def fs(self, uri: str):
        """(fsspec filesystem, path without protocol) for ``uri``."""
        return filesystem(uri, self.options)

    def arrow(self, uri: str):
        """(pyarrow filesystem, path without protocol) for ``uri``, for Arrow and Ray readers/writers."""
        return arrow_filesystem(uri, self.options)

    def object_reader(self, uri: str):
        """(fsspec filesystem, path) tuned to read whole small objects with one request each: s3fs
        otherwise sends a HEAD before every GET to decide on a ranged, concurrent download."""
        if fsspec.core.split_protocol(str(uri))[0] in ("s3", "s3a"):
            return filesystem(uri, {**self.options, "max_concurrency": 1})
        return filesystem(uri, self.options)

    def read_bytes(self, uri: str) -> bytes:
        return read_bytes(uri, self.options)

    def write_bytes(self, uri: str, data: bytes) -> None:
        write_bytes(uri, data, self.options)

    def exists(self, uri: str) -> bool:
        return exists(uri, self.options)

    def remove_tree(self, uri: str) -> None:
        remove_tree(uri, self.options)

    def check_writable(self, uri: str, field_name: str, probe: str = ".probe") -> None:
        check_writable(uri, field_name, self.options, probe)
