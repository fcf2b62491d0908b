"""Retry what failed, and only that: what the earlier nights' rows say about each URI.

A URI's rows of the published nights (same model id and class set; :func:`history`) give it one
verdict (:func:`verdicts`), by the class of each row's status (:mod:`schemas.status`):

* **retry**: its latest rows failed transiently (``read_error``) on at most ``output.retry_nights``
  nights since its last ok or permanent row: it is scored tonight, also below the ``since``
  watermark (the pipeline adds it back to the inputs) and also when an overlap night holds it;
* with ``skip_scored``, **skip** (``skip_until``, seconds since the epoch): scored ok on some night
  (inf: whatever its modification time), or its latest row is a permanent failure or a transient
  one retried on ``retry_nights`` nights already: skipped unless the object was modified after the
  listing of that row's night began (its watermark; inf when the inputs carry no modification time:
  manifest lines and tar members, which the job cannot see change without reading them);
* an overlap night of ``since`` (:mod:`jobs.score.incremental`) holds the URI: skipped unless modified
  after that night's listing began.

Rows of every source share one schema (:data:`SOURCE`), so the verdicts are one fold per URI: in one
task over the broadcast rows when they are few, in a hash-partitioned ``groupby("uri")`` otherwise.
After the night is staged, :func:`outcome` counts the rows re-scored for a retry and those now ok.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from clipn_core.storage import Storage
from jobs.parquet_read import read_parquet
from jobs.score.publish import night_files, published_nights, staged_files
from schemas.status import STATUS_OK, TRANSIENT_STATUSES

KIND_OK, KIND_PERMANENT, KIND_TRANSIENT, KIND_OVERLAP = 0, 1, 2, 3
SKIP_UNTIL = "skip_until"  # seconds since the epoch (inf: whatever the modification time; null: not skipped)
RETRY = "retry"  # True: a transient failure to score again tonight
SOURCE = pa.schema([pa.field("uri", pa.string()), pa.field("night", pa.int32()), pa.field("at", pa.float64()),
                    pa.field("kind", pa.int8())])
"""A source row: a URI, its night (days since 0001-01-01), that night's watermark (epoch seconds; -inf when unknown:
the object counts as changed) and what the row says (``KIND_*``)."""
VERDICT = pa.schema([pa.field("uri", pa.string()), pa.field(SKIP_UNTIL, pa.float64()), pa.field(RETRY, pa.bool_())])


@dataclass(frozen=True)
class RetryRules:
    """How a URI's rows become its verdict: ``retry_nights`` (nights a transient failure is retried; 0: never),
    ``skip_done`` (``skip_scored``: ok and permanently failed rows skip their URI), ``changes_visible`` (the inputs
    carry a modification time, so a permanent failure is skipped only until its object changes)."""

    retry_nights: int = 0
    skip_done: bool = True
    changes_visible: bool = True


def kinds(status: pa.Array) -> pa.Array:
    """int8 ``KIND_*`` of each status: ok, transient, else permanent (a status this version does not know too)."""
    ok = pc.equal(status, STATUS_OK)
    transient = pc.is_in(status, value_set=pa.array(sorted(TRANSIENT_STATUSES), pa.string()))
    return pc.if_else(ok, pa.scalar(KIND_OK, pa.int8()),
                      pc.if_else(transient, pa.scalar(KIND_TRANSIENT, pa.int8()), pa.scalar(KIND_PERMANENT, pa.int8())))


def source_rows(uris: pa.Array, night: int, at: float, kind: int) -> pa.Table:
    """:data:`SOURCE` rows of ``uris``, all of one night, watermark and kind."""
    n = len(uris)
    return pa.table([uris.cast(pa.string()), pa.array([night] * n, pa.int32()), pa.array([at] * n, pa.float64()),
                     pa.array([kind] * n, pa.int8())], schema=SOURCE)


def _history_rows(batch: pa.Table, nights: dict[str, tuple[int, float]]) -> pa.Table:
    """Rows of published files (``uri``, ``status``, ``path``) -> :data:`SOURCE`, the night from the partition
    folder (``run_date=YYYY-MM-DD``) that holds the file."""
    folders = [p.rstrip("/").rsplit("/", 2)[-2] for p in batch.column("path").to_pylist()]
    return pa.table([batch.column("uri").cast(pa.string()), pa.array([nights[f][0] for f in folders], pa.int32()),
                     pa.array([nights[f][1] for f in folders], pa.float64()), kinds(batch.column("status"))],
                    schema=SOURCE)


def history(root: str, run_date: dt.date, model_id: str, class_set_hash: str, storage: Storage,
            last: int | None = None) -> ray.data.Dataset | None:
    """:data:`SOURCE` rows of every row with this model and class set in the published nights of ``root`` other than
    ``run_date`` (``last``: only the latest ``last`` nights before it), read by Ray, never on the driver; None when
    there is no such night."""
    found = published_nights(root, storage, exclude=run_date)
    if last is not None:
        found = sorted((n for n in found if n[1].run_date < run_date), key=lambda n: n[1].run_date)[-last:] if last else []
    found = [(part, m) for part, m in found if m.model_id == model_id and m.class_set_hash == class_set_hash]
    fs, _ = storage.fs(root)
    files = [f for part, m in found for f in night_files(fs, part, m)]
    if not files:
        return None
    nights = {part.rsplit("/", 1)[-1]: (m.run_date.toordinal(), m.watermark.timestamp() if m.watermark else -math.inf)
              for part, m in found}
    ds = read_parquet(files, storage.arrow(root)[0], partitioning=None, include_paths=True)
    ds = ds.select_columns(["uri", "model_id", "class_set_hash", "status", "path"]).filter(expr=(col("model_id") == model_id) & (col("class_set_hash") == class_set_hash))
    return ds.map_batches(_history_rows, batch_format="pyarrow", batch_size=None, fn_kwargs={"nights": nights})


def verdict(rows: list[tuple[int, float, int]], rules: RetryRules) -> tuple[float | None, bool]:
    """(skip_until, retry) of one URI from its source rows ``(night, at, kind)``: see the module's rules."""
    settled = max((n for n, _, k in rows if k in (KIND_OK, KIND_PERMANENT)), default=None)
    failed = {n for n, _, k in rows if k == KIND_TRANSIENT and (settled is None or n > settled)}
    if failed and len(failed) <= rules.retry_nights:
        return None, True
    untils = [at for _, at, k in rows if k == KIND_OVERLAP]
    if rules.skip_done:
        if any(k == KIND_OK for _, _, k in rows):
            untils.append(math.inf)
        else:  # its latest row failed for good (permanently, or transiently on retry_nights nights already)
            failures = [(n, at) for n, at, k in rows if k in (KIND_PERMANENT, KIND_TRANSIENT)]
            if failures:
                untils.append(max(failures)[1] if rules.changes_visible else math.inf)
    return (max(untils) if untils else None), False


def verdicts(table: pa.Table, rules: RetryRules) -> pa.Table:
    """:data:`SOURCE` rows (any URIs, any order) -> one :data:`VERDICT` row per URI."""
    by_uri: dict[str, list[tuple[int, float, int]]] = {}
    if table.num_rows:  # an empty block may come without the columns
        for uri, night, at, kind in zip(*(table.column(c).to_pylist() for c in SOURCE.names)):
            by_uri.setdefault(uri, []).append((night, at, kind))
    found = [(uri, *verdict(rows, rules)) for uri, rows in by_uri.items()]
    return pa.table([pa.array([f[i] for f in found], t) for i, t in enumerate(VERDICT.types)], schema=VERDICT)


@ray.remote(num_cpus=0.1)
def fold_blocks(rules: RetryRules, *blocks: pa.Table) -> pa.Table:
    """The verdicts of a few broadcast source blocks, in one task: no shuffle for a small set."""
    tables = [b.select(SOURCE.names).cast(SOURCE) for b in blocks if b.num_rows]
    return verdicts(pa.concat_tables(tables) if tables else SOURCE.empty_table(), rules)


def _outcome(batch: pa.Table, blocks: list | None = None) -> pa.Table:
    """One row (retried, healed) for a batch of staged rows: those whose URI is in the retry set (looked up in the
    broadcast ``blocks``, or all of them after the inner join) and of those the ok ones."""
    from jobs.score.incremental import _broadcast_lookup

    if blocks is not None:
        retry = _broadcast_lookup(blocks, lambda tables: {u for t in tables if t.num_rows
                                                          for u in t.column("uri").to_pylist()})
        batch = batch.filter(pa.array([u in retry for u in batch.column("uri").to_pylist()], pa.bool_()))
    healed = int(pc.sum(pc.equal(batch.column("status"), STATUS_OK)).as_py() or 0) if batch.num_rows else 0
    return pa.table({"retried": [batch.num_rows], "healed": [healed]})


def outcome(staged: str, storage: Storage, retried: ray.data.Dataset, broadcast_max_rows: int) -> tuple[int, int]:
    """(rows re-scored for a retry, of those now ok): the staged rows whose URI is in ``retried`` (a ``uri``
    dataset, one row per URI), read by Ray; the retry set broadcast when small, else an inner hash join."""
    from jobs.score.incremental import JOIN_PARTITIONS, _broadcastable

    retried, n, blocks = _broadcastable(retried.select_columns(["uri"]), broadcast_max_rows)
    if n == 0:
        return 0, 0
    files = staged_files(*storage.fs(staged))  # as the publish sees them, so no folder is listed twice
    rows = read_parquet(files, storage.arrow(staged)[0], partitioning=None).select_columns(["uri", "status"])
    if blocks is not None:
        counted = rows.map_batches(_outcome, batch_format="pyarrow", batch_size=None, num_cpus=0.1,
                                   fn_kwargs={"blocks": blocks})
    else:
        counted = rows.join(retried, join_type="inner", num_partitions=JOIN_PARTITIONS, on=("uri",)).map_batches(
            _outcome, batch_format="pyarrow", batch_size=None, num_cpus=0.1)
    found = counted.take_all()
    return sum(r["retried"] for r in found), sum(r["healed"] for r in found)
