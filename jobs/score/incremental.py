"""Incremental nights: what a run leaves out and why, without holding per-object state on the driver.

* ``output.skip_scored``: URIs already scored ``ok`` with the same model id and class set in
  another published partition of this output are dropped before any object is fetched
  (:func:`split_skipped`): by a broadcast lookup when the skip set holds at most
  ``runtime.skip_broadcast_max_rows`` URIs, else by a Ray Data left outer join on ``uri``
  (hash-partitioned across workers). The driver only lists the published partitions (one per
  night) and never holds the skip set.
* ``input.since``: only objects modified after a watermark are listed. ``last_run`` takes
  the latest watermark of the published nights of this output before this one (a
  ``_manifest.json`` ``watermark``: when its listing began, on the store's clock) minus
  ``input.since_margin_s``, and leaves out the objects that the nights listed since then
  already hold as they were when their listing began (the overlap the margin lists again);
  an object modified after that is scored again. A rerun of a night sees what that night saw.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from clipn_core.storage import Storage
from jobs.parquet_read import read_parquet
from jobs.score.listing import MODIFIED
from jobs.score.publish import night_files, published_nights
from jobs.score.retry import (
    KIND_OK,
    KIND_OVERLAP,
    RETRY,
    SKIP_UNTIL,
    RetryRules,
    fold_blocks,
    source_rows,
    verdicts,
)
from schemas.manifest import Watermark

log = logging.getLogger("clipn.score")
# Hash partitions of the skip join: each is joined on its own, so the scored set never has to fit one
# worker; more than the workers a lake night needs only costs empty tasks.
JOIN_PARTITIONS = 16


def watermarks(root: str, run_date: dt.date, storage: Storage) -> list[Watermark]:
    """The watermarks of the published nights of ``root`` other than ``run_date`` (their manifests')."""
    return [Watermark(at=m.watermark, run_id=m.run_id, run_date=m.run_date)
            for _, m in published_nights(root, storage, exclude=run_date) if m.watermark is not None]


def night_uris(root: str, nights: list[dt.date], storage: Storage) -> ray.data.Dataset | None:
    """A dataset of every URI the published ``nights`` hold (any status and model), or None when none is
    published: what the overlap of ``since`` must not score again."""
    fs, _ = storage.fs(root)
    files = [f for part, m in published_nights(root, storage) if m.run_date in nights for f in night_files(fs, part, m)]
    if not files:
        return None
    return read_parquet(files, storage.arrow(root)[0], partitioning=None).select_columns(["uri"])


@dataclass(frozen=True)
class SkipTable:
    """What a night may skip or must retry: ``verdicts``, one :data:`~jobs.score.retry.VERDICT` row per URI of the
    sources (``uri``, ``skip_until``, ``retry``), in Ray's object store; ``blocks``: its ObjectRefs when it is small
    enough to broadcast to every marking task, else None (:func:`split_skipped` joins it). ``rows`` counts the
    source rows."""

    rows: int
    verdicts: ray.data.Dataset
    blocks: list | None = None  # ObjectRefs of pyarrow Tables

    def retry_uris(self) -> ray.data.Dataset:
        """The URIs to score again tonight for a transient failure (a ``uri`` column)."""
        return self.verdicts.map_batches(_uris_where, batch_format="pyarrow", batch_size=None, num_cpus=0.1,
                                         fn_kwargs={"column": RETRY, "value": True})

    def retry_count(self) -> int:
        """How many URIs :meth:`retry_uris` holds (one small Ray pass over the materialised verdicts)."""
        return self.retry_uris().count()

    def done_uris(self) -> ray.data.Dataset:
        """The URIs skipped whatever their modification time (a ``uri`` column): what tar reads leave unread."""
        return self.verdicts.map_batches(_uris_where, batch_format="pyarrow", batch_size=None, num_cpus=0.1,
                                         fn_kwargs={"column": SKIP_UNTIL, "value": float("inf")})


def _uris_where(batch: pa.Table, column: str, value) -> pa.Table:
    """The ``uri`` column of the verdict rows whose ``column`` equals ``value`` (null: no)."""
    if batch.num_rows == 0:  # an empty block may come without the columns
        return pa.table({"uri": pa.array([], pa.string())})
    return batch.filter(pc.fill_null(pc.equal(batch.column(column), value), False)).select(["uri"])


def skip_table(scored: ray.data.Dataset | None, overlap: list[tuple[ray.data.Dataset, float]],
               broadcast_max_rows: int, history: ray.data.Dataset | None = None,
               rules: RetryRules | None = None) -> SkipTable | None:
    """What the night may skip or must retry, or None when there is no source: ``scored``, URIs found scored ok
    (a ``uri`` column: skipped whatever their modification time); ``history``, the earlier nights' rows
    (:func:`jobs.score.retry.history`, given verdicts by ``rules``: retry, skip, skip until changed); and, per
    overlap night of ``since`` (its URIs, its watermark in epoch seconds), the URIs it holds, skipped only when not
    modified after that night's listing began (it scored that very version).

    The sources are read once by Ray into its object store (never onto the driver); their row count, known
    from the blocks' metadata, picks the way: at most ``broadcast_max_rows`` rows (and always none) are folded
    into verdicts by one task and broadcast to the tasks that mark the inputs (no shuffle: a hash shuffle starts
    aggregator actors, seconds per night on a small cluster); more are grouped by URI, hash-partitioned, folded
    per URI, for :func:`split_skipped`'s join."""
    parts = [] if scored is None else [scored.map_batches(_sources, batch_format="pyarrow", batch_size=None,
                                                          fn_kwargs={"at": float("inf"), "kind": KIND_OK})]
    if history is not None:
        parts.append(history)
    parts += [held.map_batches(_sources, batch_format="pyarrow", batch_size=None,
                               fn_kwargs={"at": at, "kind": KIND_OVERLAP})
              for held, at in overlap if held is not None]
    if not parts:
        return None
    rules = rules or RetryRules()  # skip what scored ok, retry nothing: skip_table before retries
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    union, rows, blocks = _broadcastable(union, broadcast_max_rows)
    if blocks is not None:
        folded = fold_blocks.remote(rules, *blocks)
        return SkipTable(rows=rows, verdicts=ray.data.from_arrow_refs([folded]), blocks=[folded])
    grouped = union.groupby("uri", num_partitions=JOIN_PARTITIONS).map_groups(
        verdicts, batch_format="pyarrow", fn_kwargs={"rules": rules})
    return SkipTable(rows=rows, verdicts=grouped.materialize())


def _sources(batch: pa.Table, at: float, kind: int) -> pa.Table:
    return source_rows(batch.column("uri"), 0, at, kind)


def _broadcastable(ds: ray.data.Dataset, max_rows: int) -> tuple[ray.data.Dataset, int, list | None]:
    """(``ds`` materialized in Ray's object store, its rows from the blocks' metadata, the ObjectRefs of its Arrow
    blocks when it holds at most ``max_rows`` rows (always when none: nothing to shuffle), else None)."""
    ds = ds.materialize()
    rows = ds.count()
    return ds, rows, ds.to_arrow_refs() if rows <= max(max_rows, 0) else None


# A marking task's lookup of the broadcast skip set, built once per worker process and reused by the tasks it
# runs next (keyed by the blocks' object ids; one entry, so a long-lived worker holds one night's set at most).
_LOOKUP: dict[tuple[str, ...], dict] = {}


def _broadcast_lookup(blocks: list, value) -> dict:
    """{key: value(row)} of the broadcast blocks, cached per process; ``value`` folds a key's rows."""
    key = tuple(ref.hex() for ref in blocks)
    if key not in _LOOKUP:
        _LOOKUP.clear()
        _LOOKUP[key] = value(ray.get(blocks) if blocks else [])
    return _LOOKUP[key]


def _verdict_lookup(tables: list[pa.Table]) -> dict[str, tuple[float | None, bool]]:
    found: dict[str, tuple[float | None, bool]] = {}
    for table in tables:
        if table.num_rows:  # an empty block may come without the columns
            found.update(zip(table.column("uri").to_pylist(),
                             zip(table.column(SKIP_UNTIL).to_pylist(), table.column(RETRY).to_pylist())))
    return found


ADDED_COLUMN = "retry_added"  # an input added back to retry a transient failure (not listed tonight)


def _added_inputs(batch: pa.Table) -> pa.Table:
    """Retry URIs as a listing's inputs (``since`` lists prefixes: ``uri``, ``modified`` null: not listed) with the
    added flag."""
    n = batch.num_rows
    uris = batch.column("uri").cast(pa.string()) if n else pa.array([], pa.string())
    return pa.table({"uri": uris, "modified": pa.nulls(n, MODIFIED), ADDED_COLUMN: pa.array([True] * n, pa.bool_()),
                     SKIP_UNTIL: pa.nulls(n, pa.float64()), RETRY: pa.array([True] * n, pa.bool_())})


def split_skipped(inputs: ray.data.Dataset, table: SkipTable, counts, add_retries: bool = False) -> ray.data.Dataset:
    """``inputs`` without what :func:`skip_table` says to skip: each input is marked with its verdict
    (looked up in the broadcast set, or by a hash-partitioned left outer join on ``uri``), then a stage counts
    what it keeps and what it removes (``kept``, ``skipped`` in ``counts``, keyed by the batch's URIs) and drops
    the removed rows. Counting both sides lets the row check find a row the join lost or duplicated (kept +
    skipped = listed), instead of inferring the skips.

    ``add_retries`` (``since``: what is below the watermark is not listed): the retry URIs join the inputs (their
    ``modified`` null), counted as ``retry_added``; a retry URI that is listed too is scored once, as the added
    row, its listed row counted ``relisted`` (kept + skipped + relisted = listed)."""
    from jobs.score.counts import KEPT, RELISTED, RETRY_ADDED, SKIPPED, batch_key


    def mark(batch: pa.Table, blocks: list | None = None) -> pa.Table:
        uris = batch.column("uri").to_pylist()
        if blocks is not None:  # the broadcast set: look each input up
            lookup = _broadcast_lookup(blocks, _verdict_lookup)
            found = [lookup.get(u, (None, None)) for u in uris]
            batch = batch.append_column(SKIP_UNTIL, pa.array([f[0] for f in found], pa.float64()))
            batch = batch.append_column(RETRY, pa.array([f[1] for f in found], pa.bool_()))
        for name, kind in ((SKIP_UNTIL, pa.float64()), (RETRY, pa.bool_())):
            if name not in batch.column_names:  # a join partition whose skip side was empty: nothing matched
                batch = batch.append_column(name, pa.nulls(batch.num_rows, kind))
        until = batch.column(SKIP_UNTIL)
        skip = pc.fill_null(pc.equal(until, float("inf")), False)
        if "modified" in batch.column_names:  # a listing's LastModified: skip only what the night saw as it is
            seconds = pc.divide(pc.cast(pc.cast(batch.column("modified"), pa.timestamp("us", tz="UTC")),
                                        pa.int64()).cast(pa.float64()), 1e6)
            skip = pc.or_(skip, pc.fill_null(pc.less_equal(seconds, until), False))
        none = pa.array([False] * batch.num_rows, pa.bool_())
        added = pc.fill_null(batch.column(ADDED_COLUMN), False) if ADDED_COLUMN in batch.column_names else none
        relisted = pc.and_(pc.fill_null(batch.column(RETRY), False), pc.invert(added)) if add_retries else none
        removed = pc.or_(skip, relisted)
        kept = pc.and_(pc.invert(added), pc.invert(removed))
        n_kept, n_skip, n_relisted, n_added = (int(pc.sum(x).as_py() or 0) for x in (kept, skip, relisted, added))
        if batch.num_rows:
            keys = [f"{u}\0added" if a else u for u, a in zip(uris, added.to_pylist())]
            ray.get(counts.report.remote(batch_key("skip", keys), {
                KEPT: n_kept, SKIPPED: n_skip, RELISTED: n_relisted,
                RETRY_ADDED: n_added}))
        drop = [c for c in (SKIP_UNTIL, RETRY, ADDED_COLUMN) if c in batch.column_names]
        return batch.filter(pc.invert(removed)).drop_columns(drop)

    if table.blocks is not None:
        marked = inputs.map_batches(mark, batch_format="pyarrow", batch_size=None, num_cpus=0.1,
                                    fn_kwargs={"blocks": table.blocks})
    else:
        joined = inputs.join(table.verdicts, join_type="left_outer", num_partitions=JOIN_PARTITIONS, on=("uri",))
        marked = joined.map_batches(mark, batch_format="pyarrow", batch_size=None, num_cpus=0.1)
    if not add_retries:
        return marked
    # the added rows' verdict is known (retry): marked and counted without a lookup or a join
    added = table.retry_uris().map_batches(_added_inputs, batch_format="pyarrow", batch_size=None, num_cpus=0.1)
    return marked.union(added.map_batches(mark, batch_format="pyarrow", batch_size=None, num_cpus=0.1))


def attach_member_skips(shards: ray.data.Dataset, scored: ray.data.Dataset,
                        broadcast_max_rows: int) -> ray.data.Dataset:
    """Tar inputs: ``shards`` (a ``uri`` column of shard URIs) with a ``skip`` column, per shard the member
    names whose URI ``<shard>#<member>`` is in ``scored`` (None when there is none), for the read task to
    leave out without decoding them.

    The scored members are read once by Ray into its object store (the driver never holds the scored set);
    at most ``broadcast_max_rows`` of them are broadcast to the tasks that attach them to the listed shards,
    more are grouped with the shards by shard in one hash shuffle, where each listed shard carries itself into
    its group. Either way every listed shard comes out once, and shards that are not listed tonight come out
    not at all, even when ``scored`` is empty.
    """
    members, _, blocks = _broadcastable(
        scored.map_batches(_shard_and_member, batch_format="pyarrow", batch_size=None), broadcast_max_rows)
    if blocks is not None:
        return shards.map_batches(_attach_broadcast, batch_format="pyarrow", batch_size=None,
                                  fn_kwargs={"blocks": blocks})
    listed = shards.map_batches(_listed_shard, batch_format="pyarrow", batch_size=None)
    return listed.union(members).groupby("uri", num_partitions=JOIN_PARTITIONS).map_groups(
        _member_list, batch_format="pyarrow")


_SKIPS = pa.schema([pa.field("uri", pa.string()), pa.field("skip", pa.list_(pa.string()))])


def _members_by_shard(tables: list[pa.Table]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for table in tables:
        if table.num_rows == 0:  # an empty block may come without the columns
            continue
        for shard, member in zip(table.column("uri").to_pylist(), table.column("member").to_pylist()):
            found.setdefault(shard, set()).add(member)
    return found


def _attach_broadcast(batch: pa.Table, blocks: list) -> pa.Table:
    lookup = _broadcast_lookup(blocks, _members_by_shard)
    uris = batch.column("uri").cast(pa.string()).to_pylist()
    return pa.table([pa.array(uris, pa.string()), pa.array([sorted(lookup[u]) if u in lookup else None for u in uris],
                                                          pa.list_(pa.string()))], schema=_SKIPS)


_MEMBERS = pa.schema([pa.field("uri", pa.string()), pa.field("member", pa.string()), pa.field("listed", pa.bool_())])


def _listed_shard(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.table([batch.column("uri").cast(pa.string()), pa.nulls(n, pa.string()), pa.array([True] * n)],
                    schema=_MEMBERS)


def _shard_and_member(batch: pa.Table) -> pa.Table:
    """``<shard>#<member>`` URIs as (``uri`` = shard, ``member``). Shard keys end in ``.tar`` and either part
    may hold ``#``, so the split is at the first ``.tar#``; other URIs name no member and are dropped."""
    shards, members = [], []
    for uri in batch.column("uri").to_pylist():
        cut = (uri or "").lower().find(".tar#")
        if cut >= 0:
            shards.append(uri[:cut + 4])
            members.append(uri[cut + 5:])
    return pa.table([pa.array(shards, pa.string()), pa.array(members, pa.string()),
                     pa.array([False] * len(shards))], schema=_MEMBERS)


def _member_list(group: pa.Table) -> pa.Table:
    """One shard's group -> one row (``uri``, ``skip``) when the shard is listed, else none."""
    if not any(group.column("listed").to_pylist()):
        return _SKIPS.empty_table()
    members = sorted({m for m in group.column("member").to_pylist() if m is not None})
    return pa.table([pa.array([group.column("uri")[0].as_py()], pa.string()),
                     pa.array([members or None], pa.list_(pa.string()))], schema=_SKIPS)
