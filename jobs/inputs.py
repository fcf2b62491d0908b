"""Inputs shared by the jobs: Parquet checked from its metadata, members of tar shards, object listings.

Every function takes the job's bound :class:`~clipn_core.storage.Storage` and raises
:class:`~clipn_core.errors.InputError` naming the URI and the config field at fault.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator

import pyarrow.dataset as pads

from clipn_core.errors import InputError, redact_uri
from clipn_core.storage import Storage, with_protocol


def checked_parquet(uri: str, field: str, storage: Storage, columns: dict[str, tuple[str, tuple]]) -> pads.Dataset:
    """Open the Parquet file or folder at ``uri`` (config field ``field``) and check ``columns``
    ({config field: (column name, accepted Arrow types)}) from the metadata only.

    Raises :class:`InputError` naming the URI and the field at fault (no access, missing
    path, not Parquet, missing column, wrong type).
    """
    fs, path = storage.fs(uri)
    try:
        found = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - missing bucket, access denied: one clear line
        raise InputError(f"cannot access {field} {redact_uri(uri)}: {type(e).__name__}: {e}") from e
    if not found:
        raise InputError(f"{field} does not exist: {redact_uri(uri)}")
    try:
        ds = pads.dataset(path, filesystem=storage.arrow(uri)[0], format="parquet")
    except Exception as e:  # noqa: BLE001 - not Parquet, unreadable footer, ...
        raise InputError(f"cannot read Parquet at {redact_uri(uri)} ({field}): {type(e).__name__}: {e}") from e
    for field_name, (column, kinds) in columns.items():
        if column not in ds.schema.names:
            raise InputError(f"{redact_uri(uri)} has no column {column!r} ({field_name}); columns: {ds.schema.names}")
        if ds.schema.field(column).type not in kinds:
            raise InputError(f"{redact_uri(uri)}: column {column!r} ({field_name}) is "
                             f"{ds.schema.field(column).type}, expected {kinds[0]}")
    return ds


def list_objects(uri: str, extensions: list[str], storage: Storage) -> list[str]:
    """Sorted full URIs of objects under ``uri`` whose extension is in ``extensions``, listed here.

    For a few thousand objects (tar shards, small prefixes); the scoring job lists image
    prefixes in Ray tasks instead.
    """
    fs, path = storage.fs(uri)
    try:
        if not fs.exists(path):
            raise InputError(f"input prefix does not exist: {redact_uri(uri)}")
        found = fs.find(path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - bucket missing, access denied...: one clear line
        raise InputError(f"cannot list {redact_uri(uri)}: {type(e).__name__}: {e}") from e
    exts = tuple(extensions)
    return sorted(with_protocol(fs, p) for p in found if p.lower().endswith(exts))


def tar_members(shard: str, storage: Storage) -> Iterator[tuple[str, bytes]]:
    """(normalised member name, bytes) of each regular file in a tar shard, in archive order.

    Reading or parsing errors (missing object, torn archive) propagate to the caller,
    possibly after some members were yielded.
    """
    fs, path = storage.fs(shard)  # shards are large: s3fs may fetch them in concurrent ranges
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path)), mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                yield posixpath.normpath(member.name), tar.extractfile(member).read()
