"""List: the objects under a prefix as a stream of ``uri`` / ``modified`` blocks, listed in Ray tasks, never held on
the driver.

**Object stores (S3, MinIO).** ListObjectsV2 returns keys in order, 1,000 per request, so
one lister takes 10,000 sequential requests for 10 million keys. The key space under the
prefix is therefore cut into disjoint key ranges that Ray read tasks list in parallel,
each page by page (bounded memory; a range is resumed from its start if its task is
retried). The driver plans the ranges with a few probes and holds only range bounds,
never a key list. A range is "every key starting with Q"; it is split by the character
that follows Q, found by a skip-scan (a loose index scan):

1. list the first page of Q: fewer keys than a page means a small range, done; otherwise
   the page's keys give Q's first next-characters, and all but the last are small;
2. from just past the last character seen, ask for the first key (one request, one key):
   its next character is Q's next child; repeat until no key is left.

Only characters that occur cost a request, whatever they are, so a range with ``d``
children costs about ``d`` requests; the frontier is split breadth-first, ranges
concurrently, until there are enough ranges (about four per CPU) or none is large.
Date- or hash-partitioned lakes split along their folders; a flat folder of
``img_00000001.jpg`` keys skips the shared ``img_0000`` in a request per character and
then splits along its digits.

A range is listed with ``Prefix`` Q and stops at its end; every key falls in exactly one
range.

**Local folders** split by sub-folder (each listed recursively in its own task) plus one
range for the files at the top. Other fsspec stores are listed by one task.

**Entries the listing cannot use never stop it.** One rule per kind, the same in every
store (an S3 listing only meets the first two: its keys are UTF-8 and it has no links):

- a name without one of ``input.extensions``: left out, counted as ``extension``;
- not modified after the ``since`` watermark: left out, counted as ``watermark``;
- a name that is not UTF-8 (``os.scandir`` gives it surrogate-escaped; Arrow strings and
  Parquet cannot hold it, and any other spelling would not be the object's name): left out,
  counted as ``unencodable_name`` (a folder so named counts once, unlisted), and logged;
- a folder that cannot be listed (permission denied, vanished during the listing, I/O
  error): left out, counted as ``unreadable_folder`` (its objects are unknown), and logged;
- an entry that is not a regular file once links are followed (a FIFO, socket or device,
  whose read could block forever, or a link to a folder, which is never followed so that
  link cycles cannot loop): left out, counted as ``not_a_file``;
- a file that cannot be examined (a dangling link, a link loop, a file that vanished
  between the folder's listing and its ``stat``): listed, so it gets its row, ``read_error``
  from the fetch; its modification time is the link's own, or unknown (then ``since`` keeps it).

A file that can be examined but not read (permission denied) is listed and gets its
``read_error`` row from the fetch.

Each task counts what it listed and what it left out, by reason, per range, and reports them
to the run's :class:`~jobs.score.counts.InputCounts` (keyed by range so a retried task does not
count twice), which hands the totals to the driver for the manifest and the row check.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import fsspec.asyn
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from clipn_core.errors import InputError, redact_uri
from clipn_core.storage import Storage
from jobs.score.counts import LEFT_OUT, LISTED, LISTING, InputCounts
from jobs.score.store import store_now
from schemas.status import LEFT_OUT_REASONS

PAGE_SIZE = 1000  # keys per ListObjectsV2 request (S3's maximum)
MODIFIED = pa.timestamp("us", tz="UTC")  # the listing's ``modified`` column: the object's LastModified (null: unknown)
_MAX_CHAR = "\U0010ffff"  # the greatest code point: sorts after every other character in UTF-8 order
_MAX_PROBES = 2000  # planning requests at most
_PROBES_IN_FLIGHT = 32
_LOGGED_PER_REASON = 5  # a task logs the first few entries it leaves out for each reason, then only counts

log = logging.getLogger("clipn.score.listing")


@dataclass(frozen=True)
class KeyRange:
    """Keys ``k`` with ``lower <= k < upper`` (``upper`` None: no bound), all starting with ``prefix``.

    Keys are the paths below the bucket (S3) or below the listed folder's parent (local);
    ``prefix`` is what the store is asked for, a prefix of ``lower`` and ``upper``.
    """

    prefix: str
    lower: str
    upper: str | None

    def holds(self, key: str) -> bool:
        return key >= self.lower and (self.upper is None or key < self.upper)


def successor(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None for the empty prefix)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            nxt = last + 1 if not 0xD800 <= last + 1 <= 0xDFFF else 0xE000  # skip surrogates (not UTF-8)
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


def start_after(lower: str) -> str:
    """A string just below ``lower`` for S3's ``StartAfter``: every key >= ``lower`` sorts after it, and almost
    nothing below ``lower`` does (only keys carrying U+10FFFF, which the range then drops)."""
    last = ord(lower[-1])
    if last == 0:
        return lower[:-1]
    prev = last - 1 if not 0xD800 <= last - 1 <= 0xDFFF else 0xD7FF
    return lower[:-1] + chr(prev) + _MAX_CHAR


@dataclass(frozen=True)
class Listed:
    """One listed object: its key, size in bytes and last-modified time (UTC; None when unknown)."""

    key: str
    size: int
    modified: dt.datetime | None


# ------------------------------------------------------------------ S3


async def _s3_pages(fs, bucket: str, rng: KeyRange, page_size: int):
    """(page, more): pages (lists of :class:`Listed`) of the keys of ``rng`` in order, and whether the range
    goes on after each; stops at the range's end."""
    kwargs = {"Bucket": bucket, "Prefix": rng.prefix, "MaxKeys": page_size}
    if rng.lower > rng.prefix:
        kwargs["StartAfter"] = start_after(rng.lower)
    while True:
        resp = await fs._call_s3("list_objects_v2", **kwargs)
        page, done = [], not resp.get("IsTruncated")
        for obj in resp.get("Contents", []):
            key = obj["Key"]
            if rng.upper is not None and key >= rng.upper:
                done = True
                break
            if key >= rng.lower:
                page.append(Listed(key, int(obj.get("Size", 0)), obj["LastModified"]))
        yield page, not done
        if done:
            return
        kwargs["ContinuationToken"] = resp["NextContinuationToken"]


async def _first_key(fs, bucket: str, prefix: str, at_least: str) -> str | None:
    """The first key starting with ``prefix`` that is >= ``at_least``, or None: one request."""
    kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1}
    if at_least > prefix:
        kwargs["StartAfter"] = start_after(at_least)
    while True:  # StartAfter may let through a key below at_least (only keys carrying U+10FFFF): skip it
        resp = await fs._call_s3("list_objects_v2", **kwargs)
        keys = [o["Key"] for o in resp.get("Contents", [])]
        if not keys:
            return None
        if keys[0] >= at_least:
            return keys[0]
        kwargs["StartAfter"] = keys[0]


async def _children(fs, bucket: str, rng: KeyRange, page_size: int,
                    limit: asyncio.Semaphore) -> tuple[list[KeyRange], list[KeyRange], int]:
    """Split a whole-prefix range by its next characters (module docstring): (small children, children that
    may be large, requests made). A small range comes back alone as a small child."""
    q = rng.prefix
    async with limit:
        pages = _s3_pages(fs, bucket, rng, page_size)
        try:
            first, more = await pages.__anext__()
        finally:
            await pages.aclose()
    requests = 1
    if not more:
        return ([rng] if first else []), [], requests
    chars: list[str] = []
    exact = False  # a key equal to the prefix itself
    for obj in first:
        if len(obj.key) == len(q):
            exact = True
        elif not chars or chars[-1] != obj.key[len(q)]:
            chars.append(obj.key[len(q)])
    small = [KeyRange(q, q, q + "\x00")] if exact else []
    small += [KeyRange(q + c, q + c, successor(q + c)) for c in chars[:-1]]
    large = [KeyRange(q + chars[-1], q + chars[-1], successor(q + chars[-1]))] if chars else []
    cursor = successor(q + chars[-1]) if chars else q + "\x00"
    while cursor is not None and (rng.upper is None or cursor < rng.upper):
        async with limit:
            key = await _first_key(fs, bucket, q, cursor)
        requests += 1
        if key is None:
            break
        c = key[len(q)]
        large.append(KeyRange(q + c, q + c, successor(q + c)))
        cursor = successor(q + c)
    return small, large, requests


async def _split_all(fs, bucket: str, ranges: list[KeyRange], page_size: int):
    limit = asyncio.Semaphore(_PROBES_IN_FLIGHT)
    return await asyncio.gather(*(_children(fs, bucket, r, page_size, limit) for r in ranges))


def plan_s3(fs, bucket: str, prefix: str, target: int, page_size: int = PAGE_SIZE) -> list[KeyRange]:
    """Disjoint key ranges covering every key under ``prefix`` in ``bucket`` (module docstring); [] when none."""
    final: list[KeyRange] = []
    frontier = [KeyRange(prefix, prefix, successor(prefix))]
    requests = 0
    while frontier and len(final) + len(frontier) < target and requests < _MAX_PROBES:
        splits = fsspec.asyn.sync(fs.loop, _split_all, fs, bucket, frontier, page_size)
        frontier = []
        for small, large, made in splits:
            final += small
            frontier += large
            requests += made
    return sorted(final + frontier, key=lambda r: r.lower)


def _list_s3(fs, bucket: str, rng: KeyRange, page_size: int) -> Iterator[list[Listed]]:
    pages = _s3_pages(fs, bucket, rng, page_size)
    while True:
        try:
            page, _ = fsspec.asyn.sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        yield page


# ------------------------------------------------------------------ folders (local, other fsspec stores)


@dataclass(frozen=True)
class Folder:
    """The files in ``path`` (a folder path, no protocol), and with ``recursive`` everything below it."""

    path: str
    recursive: bool


def plan_local(root: str) -> list[Folder]:
    """One range per sub-folder of ``root`` (listed recursively) and one for the files directly in it."""
    folders = [Folder(root, recursive=False)]
    with os.scandir(root) as entries:
        folders += [Folder(e.path, recursive=True) for e in entries if e.is_dir(follow_symlinks=False)]
    return folders


def _pages(items: Iterator[Listed], page_size: int) -> Iterator[list[Listed]]:
    page: list[Listed] = []
    for item in items:
        page.append(item)
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


class LeftOut:
    """What one listing task left out: counts by reason (:data:`LEFT_OUT_REASONS`), the first few logged."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, reason: str, what: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= _LOGGED_PER_REASON:
            # ascii(): a name that is not UTF-8 is shown escaped instead of failing the log line
            log.warning("listing left out %s (%s)%s", ascii(what), reason, f": {detail}" if detail else "")


def wanted(name: str, extensions: tuple[str, ...], left_out: LeftOut) -> bool:
    """Whether an object called ``name`` has one of ``extensions`` (counted in ``left_out`` if not)."""
    if name.lower().endswith(extensions):
        return True
    left_out.counts["extension"] += 1  # not logged: expected in any lake
    return False


def _encodable(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes from os.scandir
        return False
    return True


def _when(st: os.stat_result) -> dt.datetime:
    return dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)


def _examine(entry: os.DirEntry, left_out: LeftOut) -> Listed | None:
    """A file entry (name already wanted) as :class:`Listed`, or None when left out (module docstring)."""
    try:
        st = entry.stat()  # follows links
    except OSError:  # dangling link, link loop, vanished: listed, so its row records the read error
        try:
            own = _when(entry.stat(follow_symlinks=False))
        except OSError:
            own = None
        return Listed(entry.path, 0, own)
    if not stat.S_ISREG(st.st_mode):
        left_out.add("not_a_file", entry.path, stat.filemode(st.st_mode))
        return None
    return Listed(entry.path, st.st_size, _when(st))


def walk_local(folder: Folder, extensions: tuple[str, ...], left_out: LeftOut) -> Iterator[Listed]:
    """The files of ``folder`` with one of ``extensions``, as :class:`Listed`; every entry it cannot use is
    counted in ``left_out`` by reason (module docstring), never raised."""
    if not _encodable(folder.path):
        left_out.add("unencodable_name", folder.path)
        return
    stack = [folder.path]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:  # the iteration itself may fail mid-folder (EIO): counted below
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False  # then examined as a file: stat tells
                    if is_dir:
                        if not folder.recursive:
                            continue  # a range of its own (plan_local)
                        if _encodable(entry.path):
                            stack.append(entry.path)
                        else:
                            left_out.add("unencodable_name", entry.path)
                        continue
                    if not wanted(entry.name, extensions, left_out):
                        continue
                    if not _encodable(entry.path):
                        left_out.add("unencodable_name", entry.path)
                        continue
                    found = _examine(entry, left_out)
                    if found is not None:
                        yield found
        except OSError as e:
            left_out.add("unreadable_folder", current, f"{type(e).__name__}: {e.strerror or e}")


def walk_generic(fs, folder: Folder, extensions: tuple[str, ...], left_out: LeftOut) -> Iterator[Listed]:
    """:func:`walk_local` for other fsspec stores, folder by folder with ``fs.ls``: a folder that cannot be listed
    is counted (``fs.walk`` drops it silently below the top folder, whatever its ``on_error``), and only entries
    of type ``file`` are listed."""
    stack = [folder.path]
    while stack:
        current = stack.pop()
        try:
            entries = fs.ls(current, detail=True)
        except OSError as e:
            left_out.add("unreadable_folder", current, f"{type(e).__name__}: {e}")
            continue
        for info in entries:
            key = info["name"].rstrip("/")
            if info.get("type") == "directory":
                if key != current.rstrip("/") and folder.recursive:
                    stack.append(key)
                continue
            name = key.rsplit("/", 1)[-1]
            if not wanted(name, extensions, left_out):
                continue
            if not _encodable(key):
                left_out.add("unencodable_name", key)
                continue
            if info.get("type", "file") != "file":
                left_out.add("not_a_file", key, str(info.get("type")))
                continue
            yield Listed(key, int(info.get("size") or 0), _info_time(info))


def _info_time(info: dict) -> dt.datetime | None:
    """An fsspec entry's modification time (UTC), None when the store gives none (``since`` then keeps it)."""
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if mtime is None or isinstance(mtime, dt.datetime):
        return mtime
    try:
        return dt.datetime.fromtimestamp(float(mtime), dt.timezone.utc)
    except (TypeError, ValueError):
        when = dt.datetime.fromisoformat(str(mtime).replace("Z", "+00:00"))  # gcsfs' "updated"
        return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


# ------------------------------------------------------------------ the datasource


@dataclass(frozen=True)
class ListingSpec:
    """What every listing task needs: where, which extensions, the watermark and how keys become URIs."""

    kind: str  # s3 | local | generic
    bucket: str
    protocol: str
    extensions: tuple[str, ...]
    since: dt.datetime | None
    page_size: int


def _uri(spec: ListingSpec, key: str) -> str:
    if spec.kind == "s3":
        return f"{spec.protocol}://{spec.bucket}/{key}"
    if spec.kind == "generic" and spec.protocol not in ("file", "local"):
        return f"{spec.protocol}://{key}"
    return key


def _s3_wanted(pages: Iterator[list[Listed]], extensions: tuple[str, ...], left_out: LeftOut):
    for page in pages:
        yield [obj for obj in page if wanted(obj.key, extensions, left_out)]


def _list_ranges(ranges: list[tuple[int, KeyRange | Folder]], spec: ListingSpec, storage: Storage, root: str,
                 counts) -> Iterator[pa.Table]:
    """A listing task: each range's matching objects as ``uri`` / ``modified`` blocks, one per page; counts reported
    per range.
    No entry stops it (module docstring): what it cannot use is counted by reason."""
    fs = storage.fs(root)[0] if spec.kind != "local" else None
    for range_id, rng in ranges:
        listed = 0
        left_out = LeftOut()
        if spec.kind == "s3":
            pages = _s3_wanted(_list_s3(fs, spec.bucket, rng, spec.page_size), spec.extensions, left_out)
        elif spec.kind == "local":
            pages = _pages(walk_local(rng, spec.extensions, left_out), spec.page_size)
        else:
            pages = _pages(walk_generic(fs, rng, spec.extensions, left_out), spec.page_size)
        for page in pages:
            uris, modified = [], []
            for obj in page:
                # an unknown modification time (a dangling link's target) is kept: never silently dropped
                if spec.since is not None and obj.modified is not None and obj.modified <= spec.since:
                    left_out.counts["watermark"] += 1
                    continue
                uris.append(_uri(spec, obj.key))
                modified.append(obj.modified)
            listed += len(uris)
            if uris:
                yield pa.table({"uri": pa.array(uris, pa.string()), "modified": pa.array(modified, MODIFIED)})
        numbers = {LISTED: listed, **{LEFT_OUT + reason: n for reason, n in left_out.counts.items()}}
        ray.get(counts.report.remote(str(range_id), numbers, LISTING))


def _left_out(found: dict[str, int]) -> dict[str, int]:
    """The listing scope's totals (as :func:`_list_ranges` reports them) -> entries left out, by reason, each
    present."""
    return {reason: found.get(LEFT_OUT + reason, 0) for reason in LEFT_OUT_REASONS}


class ObjectListing(Datasource):
    """A Ray Data source of the ``uri`` (and ``modified``: LastModified, UTC, null when unknown) of every object under
    a prefix with one of ``extensions``, modified
    after ``since`` when given (module docstring). Planning happens here, on the driver, before any Ray work:
    a missing bucket, no access or an empty prefix raise :class:`InputError` naming the URI. ``started_at``:
    the store's clock when the planning began (the watermark of a night). Its ``counts``: the
    :class:`~jobs.score.counts.InputCounts` the listing tasks report to (its :data:`~jobs.score.counts.LISTING`
    scope), which the run's later stages may share."""

    def __init__(self, uri: str, extensions: list[str], storage: Storage, since: dt.datetime | None = None,
                 target_ranges: int = 64, page_size: int = PAGE_SIZE):
        super().__init__()
        self.uri, self.storage = uri, storage
        self.ranges: list[KeyRange | Folder]
        fs, path = storage.fs(uri)
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        try:
            # before the first listing request: an object written after this may be missed by this listing,
            # so the next night must list it. The store's clock, since its LastModified is what is compared
            self.started_at = store_now(storage, uri)
            if protocol in ("s3", "s3a"):
                bucket, _, key = path.partition("/")
                prefix = key.rstrip("/") + "/" if key.strip("/") else ""  # a folder, as fsspec's find lists it
                self.ranges = plan_s3(fs, bucket, prefix, target_ranges, page_size)
                kind = "s3"
            elif protocol in ("file", "local"):
                bucket = ""
                if not os.path.isdir(path):
                    raise InputError(f"input prefix does not exist: {redact_uri(uri)}")
                self.ranges = plan_local(path.rstrip(os.sep) or os.sep)
                kind = "local"
            else:
                bucket = ""
                self.ranges = [Folder(path, recursive=True)] if fs.exists(path) else []
                kind = "generic"
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - missing bucket, access denied, ...: one clear line
            reason = "access denied (check the credentials and the bucket policy)" if isinstance(e, PermissionError) else ""
            raise InputError(f"cannot list {redact_uri(uri)}: {reason or f'{type(e).__name__}: {e}'}") from e
        if not self.ranges:
            raise InputError(f"input prefix does not exist or holds no objects: {redact_uri(uri)}")
        self.spec = ListingSpec(kind, bucket, protocol if kind != "s3" else "s3", tuple(extensions), since, page_size)
        self.counts = InputCounts.remote()

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        numbered = list(enumerate(self.ranges))
        n_tasks = max(1, min(len(numbered), parallelism if parallelism > 0 else len(numbered)))
        groups = [numbered[i::n_tasks] for i in range(n_tasks)]
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(partial(_list_ranges, group, self.spec, self.storage, self.uri, self.counts), meta,
                         schema=pa.schema([pa.field("uri", pa.string()), pa.field("modified", MODIFIED)]))
                for group in groups]

    def totals(self) -> tuple[int, int]:
        """(objects listed, objects excluded by ``since``) once the dataset has run; raises if a range never
        reported (its rows would be missing)."""
        reported = ray.get(self.counts.reported.remote(LISTING))
        if reported != len(self.ranges):
            raise RuntimeError(f"{len(self.ranges) - reported} of {len(self.ranges)} listing ranges did not finish")
        found = ray.get(self.counts.totals.remote(LISTING))  # one round trip for both numbers
        return found.get(LISTED, 0), _left_out(found)["watermark"]

    def left_out(self) -> dict[str, int]:
        """Entries the listing left out, by reason (:data:`LEFT_OUT_REASONS`, each present), once the dataset
        has run."""
        return _left_out(ray.get(self.counts.totals.remote(LISTING)))
