"""What the output store offers beyond fsspec's file API: its own clock, and writes that succeed only if an
object is (or is not yet) a given version. The night lease (:mod:`jobs.score.lease`) and the watermark use them.

* **S3 and S3-compatible stores** (AWS, MinIO, moto): conditional requests, ``If-None-Match: *`` to create
  and ``If-Match: <ETag>`` to replace or delete, and the store's clock from each response's ``Date`` header
  (so no driver clock is ever compared with an object's ``LastModified``);
* **local folders**: a hard link to create (fails if the name exists; the content is complete before the
  name appears), an atomic rename to replace and to delete, the machine's clock;
* **other fsspec stores**: ``pipe_file(mode="create")`` (atomic only where the implementation makes it so)
  and read-compare-write to replace and delete. Callers verify what they wrote (the lease re-reads its
  object at every heartbeat and before publishing), which is all that protects them there.

Every function takes a URI and the job's :class:`~clipn_core.storage.Storage`. Times are UTC datetimes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import fsspec.asyn

from clipn_core.storage import Storage

_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict")


@dataclass(frozen=True)
class Version:
    """An object as the store returned it: its bytes, when it was last written and an identity of that write
    (``tag``: the ETag on S3), and the store's clock when it answered (``seen_at``). ``seen_at - modified``
    is the object's age measured on one clock."""

    data: bytes
    modified: dt.datetime
    tag: str
    seen_at: dt.datetime


def _kind(fs) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return "s3" if protocol in ("s3", "s3a") else "local" if protocol in ("file", "local") else "other"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _date(resp: dict) -> dt.datetime:
    """The store's clock from a botocore response's ``Date`` header (second resolution, so never late)."""
    header = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return parsedate_to_datetime(header).astimezone(dt.timezone.utc) if header else _now()


def _condition_failed(e: BaseException) -> bool:
    """A refused conditional request (s3fs raises FileExistsError for If-None-Match and OSError otherwise)."""
    code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
    return isinstance(e, FileExistsError) or code in _CONDITION_FAILED


def _s3(fs, method: str, **kwargs) -> dict:
    return fsspec.asyn.sync(fs.loop, fs._call_s3, method, **kwargs)


async def _s3_get(fs, bucket: str, key: str) -> tuple[dict, bytes]:
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    return resp, await resp["Body"].read()


def store_now(storage: Storage, uri: str) -> dt.datetime:
    """The clock of the store holding ``uri``: for S3 the ``Date`` of a one-key listing of the URI's bucket
    (truncated to the second, so at most the true time); the local clock otherwise."""
    fs, path = storage.fs(uri)
    if _kind(fs) != "s3":
        return _now()
    bucket, _, key = path.partition("/")
    return _date(_s3(fs, "list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1))


def read(storage: Storage, uri: str) -> Version | None:
    """The object at ``uri`` and its version, or None when there is none (one request on S3)."""
    fs, path = storage.fs(uri)
    kind = _kind(fs)
    try:
        if kind == "s3":
            bucket, _, key = path.partition("/")
            resp, data = fsspec.asyn.sync(fs.loop, _s3_get, fs, bucket, key)
            return Version(data, resp["LastModified"].astimezone(dt.timezone.utc), resp["ETag"], _date(resp))
        if kind == "local":
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
            return Version(data, dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc),
                           f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}", _now())
        data = fs.cat_file(path)
        info = fs.info(path)
    except FileNotFoundError:
        return None
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created") or 0
    if not isinstance(mtime, dt.datetime):
        mtime = dt.datetime.fromtimestamp(float(mtime), dt.timezone.utc)
    modified = mtime if mtime.tzinfo else mtime.replace(tzinfo=dt.timezone.utc)
    return Version(data, modified, hashlib.sha256(data + modified.isoformat().encode()).hexdigest(), _now())


def create(storage: Storage, uri: str, data: bytes) -> bool:
    """Write ``data`` at ``uri`` only if no object is there; False when one is (or another conditional write
    to it is in flight). Parent folders are created for local paths."""
    fs, path = storage.fs(uri)
    kind = _kind(fs)
    if kind == "s3":
        bucket, _, key = path.partition("/")
        try:
            _s3(fs, "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except OSError as e:
            if _condition_failed(e):
                return False
            raise
        return True
    if kind == "local":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def replace(storage: Storage, uri: str, data: bytes, expected: Version) -> bool:
    """Overwrite ``uri`` with ``data`` only if it still holds the ``expected`` write; False otherwise (also
    when it is gone)."""
    fs, path = storage.fs(uri)
    kind = _kind(fs)
    if kind == "s3":
        bucket, _, key = path.partition("/")
        try:
            _s3(fs, "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=expected.tag)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _condition_failed(e):
                return False
            raise
        return True
    now = read(storage, uri)
    if now is None or now.tag != expected.tag:
        return False
    if kind == "local":
        os.replace(_write_temp(path, data), path)
    else:
        fs.pipe_file(path, data)
    return True


def delete(storage: Storage, uri: str, expected: Version) -> bool:
    """Delete ``uri`` only if it still holds the ``expected`` write; False otherwise (also when it is gone)."""
    fs, path = storage.fs(uri)
    kind = _kind(fs)
    if kind == "s3":
        bucket, _, key = path.partition("/")
        try:
            _s3(fs, "delete_object", Bucket=bucket, Key=key, IfMatch=expected.tag)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _condition_failed(e):
                return False
            raise
        return True
    if kind == "local":
        # take the name away atomically, then look at what was taken: another write since ``expected`` goes back
        tomb = f"{path}.{uuid.uuid4().hex}.deleted"
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return False
        taken = read(storage, tomb)
        if taken is not None and taken.tag == expected.tag:  # a rename keeps the inode and modification time
            os.unlink(tomb)
            return True
        try:
            os.link(tomb, path)
        except FileExistsError:
            pass  # a newer object took the name meanwhile: the one we took was already superseded
        os.unlink(tomb)
        return False
    now = read(storage, uri)
    if now is None or now.tag != expected.tag:
        return False
    fs.rm(path)
    return True


def put(storage: Storage, uri: str, data: bytes) -> None:
    """Write ``uri`` whole so that a reader sees the old object or the new one, never a part: one PUT on an
    object store, a rename over the old file on a local folder (parent folders created)."""
    fs, path = storage.fs(uri)
    if _kind(fs) == "local":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(_write_temp(path, data), path)
    else:
        fs.pipe_file(path, data)


def _write_temp(path: str, data: bytes) -> str:
    """``data`` in a new file beside ``path`` (same filesystem, so it can be linked or renamed into place)."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp
