"""List and read: the scoring job's inputs as a Ray dataset of URIs, and the concurrent object fetch.

Inputs: ``prefix`` (image objects under a URI, listed in Ray tasks), ``manifest`` (a
Parquet/CSV file of URIs, read by Ray) or ``tar`` (WebDataset shards, one row per shard). :func:`start_fetch`
reads the bytes of a batch of URIs with a bounded pool of requests in flight, one request
per object; the read+decode tasks (:mod:`jobs.score.decode`) decode each object as it
arrives. :func:`fetch_batch` is the same read as a step of its own (bytes per row).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as pads
import ray

from clipn_core.errors import InputError, redact_uri
from clipn_core.storage import Storage
from clipn_core.uri_scope import InvalidUriError, UriScope, uri_text
from jobs.inputs import list_objects
from jobs.parquet_read import read_parquet
from jobs.score.listing import ObjectListing
from schemas.status import STATUS_INVALID_URI, STATUS_OK, STATUS_READ_ERROR

if TYPE_CHECKING:  # the config (and the score registry behind it) is only needed on the driver
    from schemas.score_config import InputConfig

_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


@dataclass
class Inputs:
    """The run's input rows (a ``uri`` column) and, for prefix inputs, the listing that counts them. ``expected``:
    what the driver knows the read tasks must account for: a manifest's lines (a Parquet manifest's from its
    metadata, a CSV one's counted in a stream) or the tar shards; None for prefixes (their listing tasks count)."""

    dataset: ray.data.Dataset
    listing: ObjectListing | None = None
    expected: int | None = None


def input_dataset(cfg: InputConfig, storage: Storage, since: dt.datetime | None = None,
                  listing_cpus: float = 0.25, page_blocks: bool = False) -> Inputs:
    """The inputs as a dataset of URIs; nothing is listed or read on the driver.

    prefix: listed in Ray tasks (:mod:`jobs.score.listing`), objects modified after ``since``
    only; manifest: read by Ray; tar: one row per shard (a few thousand at most, listed
    here), expanded to images by the decode step.

    ``page_blocks`` (prefix only): one block per listing page (at most
    :data:`jobs.score.listing.PAGE_SIZE` URIs) instead of Ray's default split of each listing task's output into
    ``DataContext.read_op_min_num_blocks`` (200) blocks. A resumable run asks for it: Ray's checkpoint filter
    runs one actor task per block right after the listing, and each actor task waited about 0.4 s to be
    scheduled on a 2-CPU Ray (measured from Ray Data's operator metrics), so 200 blocks of a few URIs each
    made a resumed run of 1,500 images 2.7x slower than a full one. The blocks are also the unit of a
    resumable run's write tasks, so of what a dead run leaves committed.
    """
    if cfg.kind == "prefix":
        listing = ObjectListing(cfg.uri, cfg.extensions, storage, since=since,
                                target_ranges=max(16, 4 * int(ray.cluster_resources().get("CPU", 4))))
        # one read task per range (get_read_tasks caps at the parallelism), so no split factor: blocks are pages
        blocks = {"override_num_blocks": len(listing.ranges)} if page_blocks else {}
        return Inputs(ray.data.read_datasource(listing, num_cpus=listing_cpus, **blocks), listing)
    if cfg.kind == "manifest":
        arrow_fs, path = storage.arrow(cfg.uri)
        if not storage.exists(cfg.uri):
            raise InputError(f"manifest does not exist: {redact_uri(cfg.uri)}")
        if path.endswith(".csv"):  # a blank line is a line: it gets its invalid_uri row (pyarrow would drop it)
            options = pa_csv.ParseOptions(ignore_empty_lines=False)
            ds = ray.data.read_csv(path, filesystem=arrow_fs, parse_options=options)
            with arrow_fs.open_input_stream(path) as stream:  # counted in a stream, never held
                lines = sum(b.num_rows for b in pa_csv.open_csv(stream, parse_options=options))
        else:
            ds = read_parquet(path, arrow_fs)
            lines = pads.dataset(path, filesystem=arrow_fs, format="parquet").count_rows()  # footers only
        schema = ds.schema()
        if schema is None:  # a CSV with a header and no line: an empty night, as a Parquet manifest without rows
            return Inputs(ray.data.from_arrow(pa.table({"uri": pa.array([], pa.string())})), expected=0)
        if cfg.uri_column not in schema.names:
            raise InputError(f"manifest {redact_uri(cfg.uri)} has no column {cfg.uri_column!r} (input.uri_column)")
        ds = ds.select_columns([cfg.uri_column])
        if cfg.uri_column != "uri":
            ds = ds.rename_columns({cfg.uri_column: "uri"})
        return Inputs(ds, expected=lines)
    shards = list_objects(cfg.uri, [".tar"], storage)
    if not shards:
        raise InputError(f"no .tar objects under {redact_uri(cfg.uri)}")
    return Inputs(ray.data.from_arrow(pa.table({"uri": shards})).repartition(len(shards)), expected=len(shards))


def _executor(concurrency: int) -> ThreadPoolExecutor:
    """One pool per process and size, reused by every batch a worker process handles."""
    with _pool_lock:
        pool = _pools.get(concurrency)
        if pool is None:
            pool = _pools[concurrency] = ThreadPoolExecutor(concurrency, thread_name_prefix="clipn-fetch")
        return pool


async def _read(fs, path: str, limit: asyncio.Semaphore) -> bytes:
    async with limit:
        return await fs._cat_file(path)


_limits: dict[tuple[int, int], asyncio.Semaphore] = {}


def _limit(fs, concurrency: int) -> asyncio.Semaphore:
    """The semaphore bounding reads in flight on ``fs``'s event loop (created on that loop)."""
    key = (id(fs.loop), concurrency)
    with _pool_lock:
        if key not in _limits:
            _limits[key] = fsspec.asyn.sync(fs.loop, _new_semaphore, concurrency)
        return _limits[key]


async def _new_semaphore(concurrency: int) -> asyncio.Semaphore:
    return asyncio.Semaphore(concurrency)


def start_fetch(uris: list, storage: Storage, concurrency: int, scope: UriScope | None = None) -> list[Future]:
    """Start reading every URI; one future per URI, in input order, resolving to its bytes or raising its read
    error. Up to ``concurrency`` reads are in flight per filesystem (one GET per S3 object, no HEAD).

    With a ``scope`` (manifest inputs: :mod:`clipn_core.uri_scope`), a value it refuses (null, relative, another
    store, ...) is never opened: its future raises :class:`~clipn_core.uri_scope.InvalidUriError`.

    Async filesystems (s3fs, gcsfs) read on their own event loop, the cheapest on CPU; the others in
    a thread pool. URIs are taken literally: no glob expansion, so keys holding ``?``, ``*``, ``[``
    or ``#`` are read as they are.
    """
    futures: list[Future] = []
    for uri in uris:
        try:
            if scope is not None:
                scope.check(uri)
            fs, path = storage.object_reader(uri)
        except Exception as e:  # noqa: BLE001 - an unusable URI is that row's read error
            failed: Future = Future()
            failed.set_exception(e)
            futures.append(failed)
            continue
        if getattr(fs, "async_impl", False):
            futures.append(asyncio.run_coroutine_threadsafe(_read(fs, path, _limit(fs, concurrency)), fs.loop))
        else:
            futures.append(_executor(concurrency).submit(fs.cat_file, path))
    return futures


def read_status(error: Exception) -> str:
    """The row status of a URI whose fetch raised ``error``: ``invalid_uri`` when it was refused unfetched."""
    return STATUS_INVALID_URI if isinstance(error, InvalidUriError) else STATUS_READ_ERROR


def fetch(uris: list, storage: Storage, concurrency: int, scope: UriScope | None = None) -> list[bytes | Exception]:
    """Bytes of every URI, or the exception that stopped its read, in input order (:func:`start_fetch`)."""
    out: list[bytes | Exception] = []
    for future in start_fetch(uris, storage, concurrency, scope):
        try:
            out.append(future.result())
        except Exception as e:  # noqa: BLE001 - recorded in the row, never dropped
            out.append(e)
    return out


def fetch_batch(batch: dict, storage: Storage, concurrency: int, scope: UriScope | None = None) -> dict[str, np.ndarray]:
    """I/O step: one row per URI: ``uri``, ``byte_size`` (-1 when unread), ``status`` (``ok``, ``read_error``
    or ``invalid_uri``: refused by ``scope``, never fetched), ``error`` and ``data`` (the object's bytes; empty
    when unread)."""
    values = list(batch["uri"])
    uris = [uri_text(u) for u in values]
    size, status, error, data = [], [], [], []
    for got in fetch(values, storage, concurrency, scope):
        if isinstance(got, Exception):
            size.append(-1)
            status.append(read_status(got))
            error.append(f"{type(got).__name__}: {got}")
            data.append(b"")
        else:
            size.append(len(got))
            status.append(STATUS_OK)
            error.append("")
            data.append(got)
    return {"uri": np.array(uris, dtype=object), "byte_size": np.array(size, dtype=np.int64),
            "status": np.array(status, dtype=object), "error": np.array(error, dtype=object),
            "data": np.array(data, dtype=object)}
