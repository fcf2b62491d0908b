"""Inputs shared by the jobs: Parquet checked from its metadata, members of tar shards, object listings.

Every function takes the job's bound :class:`~clipn_core.storage.Storage` and raises
:class:`~clipn_core.errors.InputError` naming the URI and the config field at fault.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


# Read-ahead of a streamed shard: what one open shard costs in memory, whatever its size.
TAR_BLOCK_SIZE = 8 << 20


@dataclass(frozen=True)
class TarEntry:
    """One member of a streamed tar shard (:func:`tar_entries`).

    ``name``: the normalised member name; ``kind``: ``file`` (a regular file), ``link`` (a symbolic or
    hard link: ``detail`` names its target) or ``other`` (a device, FIFO...; ``detail`` names it);
    ``size``: bytes of a file's data (0 otherwise).
    """

    name: str
    kind: str
    size: int
    detail: str = ""


def tar_entries(shard: str, storage: Storage) -> Iterator[tuple[TarEntry, Callable[[], bytes]]]:
    """(entry, read) of each non-directory member of a tar shard, in archive order, streamed.

    The shard is read front to back through one file object (``fs.open``, ``tarfile`` stream mode):
    memory holds one member's bytes and a read-ahead of :data:`TAR_BLOCK_SIZE`, whatever the shard's
    size (tarfile also keeps each member's header: a few hundred bytes per member). ``read()`` returns a ``file`` member's bytes (b"" for the others) and is valid only until the
    next entry; a member that is not read is skipped over without being held. Reading or parsing errors
    (missing object, torn archive, a member cut short) propagate to the caller, possibly after some
    entries were yielded.
    """
    fs, path = storage.fs(shard)
    with fs.open(path, "rb", block_size=TAR_BLOCK_SIZE) as f:
        intact = _ends_intact(f)
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            yield from _entries(tar)
        if not intact:
            # tarfile reads a shard cut at a header as a shorter archive: this is how the cut is seen
            raise tarfile.ReadError("the shard does not end with tar's end-of-archive blocks: it is torn")


def _ends_intact(f) -> bool:
    """Whether an uncompressed tar ends as tar ends (two zero blocks, in 512-byte blocks); a compressed one
    is checked by its decompressor instead. Two small reads, then the file is back at its start."""
    head = f.read(6)
    size = f.seek(0, 2)
    intact = True
    if not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        if size % 512 or size < 1024:
            intact = False
        else:
            f.seek(size - 1024)
            intact = not any(f.read(1024))
    f.seek(0)
    return intact


def _entries(tar: tarfile.TarFile) -> Iterator[tuple[TarEntry, Callable[[], bytes]]]:
    for member in tar:
        if member.isdir():
            continue
        name = posixpath.normpath(member.name)
        if member.isfile():
            yield TarEntry(name, "file", member.size), _reader(tar, member)
        elif member.issym() or member.islnk():
            kind = "symbolic link" if member.issym() else "hard link"
            yield TarEntry(name, "link", 0, f"{kind} to {member.linkname!r}"), bytes
        else:
            yield TarEntry(name, "other", 0, f"tar member of type {member.type!r}"), bytes


def _reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        data = tar.extractfile(member).read()
        if len(data) != member.size:  # stream mode returns what is left of a torn archive
            raise tarfile.ReadError(f"member {member.name!r} cut short: {len(data)} of {member.size} bytes")
        return data
    return read


def tar_members(shard: str, storage: Storage) -> Iterator[tuple[str, bytes]]:
    """(normalised member name, bytes) of each regular file in a tar shard, in archive order, streamed
    (:func:`tar_entries`); links and other members are left out.

    Reading or parsing errors (missing object, torn archive) propagate to the caller,
    possibly after some members were yielded.
    """
    for entry, read in tar_entries(shard, storage):
        if entry.kind == "file":
            yield entry.name, read()
