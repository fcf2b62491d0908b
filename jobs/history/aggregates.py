"""A night's aggregates (:class:`schemas.manifest.NightAggregates`) from its rows, in mergeable partials.

:func:`partial` turns one Arrow table of output rows (a block, a record batch) into a small JSON-able dict:
rows by status, ok and flagged rows by predicted class, and per score a summary of at most
:data:`SUMMARY_POINTS` values taken at evenly spaced ranks of the sorted scores (each standing for
``n / len(values)`` scores). :func:`merge` adds the counts and reads each quantile off the merged summaries as
the inverse empirical CDF. The summary is exact while a partial holds at most ``SUMMARY_POINTS`` scores, and
otherwise off by at most ``1 / SUMMARY_POINTS`` of rank (each partial's points are at most that far apart in its
own rank; the errors do not add up across partials, since each is a fraction of its own rows).

Two ways to feed it, neither gathering rows on the driver: :func:`from_dataset` (Ray Data: one partial per
block, computed where the block is: the scoring job's for a large night) and :func:`from_files` (Arrow record
batches streamed one at a time: the scoring job's for a night of at most :data:`DRIVER_ROWS_MAX` rows, and
``clipn history``'s for an older night).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.manifest import QUANTILE_LEVELS, ClassAggregate, NightAggregates
from schemas.status import STATUS_OK

SUMMARY_POINTS = 1000
PARTIAL = "partial"  # the column of from_dataset's one-row blocks
# Up to this many rows a night is aggregated on the driver, one record batch at a time: a new Ray dataset costs
# seconds of start-up (3.4-4.2 s on the demo's 1,003-row nights, in their manifests' timings), the driver's pass
# a few columns of a few batches. Beyond, the blocks are aggregated where they are.
DRIVER_ROWS_MAX = 2_000_000


def score_names(schema: pa.Schema) -> list[str]:
    """The ``score_<name>`` columns of ``schema``, as names without the prefix (the registry's, in its order)."""
    return [f.name.removeprefix("score_") for f in schema if f.name.startswith("score_")]


def columns(schema: pa.Schema) -> list[str]:
    """The columns :func:`partial` reads."""
    return ["status", "predicted_class", "is_ood", *(f"score_{n}" for n in score_names(schema))]


def _summary(values: pa.ChunkedArray | pa.Array) -> dict:
    """{"n": scores, "v": up to SUMMARY_POINTS of them at evenly spaced ranks, ascending}, nulls and NaNs left out."""
    arr = np.asarray(pc.drop_null(values).to_numpy(zero_copy_only=False), dtype=np.float64)
    arr = np.sort(arr[~np.isnan(arr)])
    n = len(arr)
    if n > SUMMARY_POINTS:  # the midpoint of each of SUMMARY_POINTS equal rank slices
        arr = arr[((np.arange(SUMMARY_POINTS) + 0.5) * n / SUMMARY_POINTS).astype(np.int64)]
    return {"n": n, "v": arr.tolist()}


def partial(table: pa.Table | pa.RecordBatch) -> dict:
    """The partial aggregates of one table of output rows (it needs :func:`columns`; others are ignored)."""
    table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
    status = {v["values"]: v["counts"] for v in pc.value_counts(table.column("status")).to_pylist()}
    ok = table.filter(pc.equal(table.column("status"), STATUS_OK))
    by_class = {}
    if ok.num_rows:
        grouped = (ok.select(["predicted_class", "is_ood"])
                   .group_by("predicted_class").aggregate([([], "count_all"), ("is_ood", "sum")]))
        for name, n, flagged in zip(*(grouped.column(c).to_pylist()
                                      for c in ("predicted_class", "count_all", "is_ood_sum"))):
            by_class[name if name is not None else ""] = [n, int(flagged or 0)]
    return {"status": status, "classes": by_class,
            "scores": {name: _summary(table.column(f"score_{name}")) for name in score_names(table.schema)}}


def _quantiles(summaries: list[dict], levels: Iterable[float]) -> list[float | None]:
    values, weights = [], []
    for s in summaries:
        if s["n"]:
            values.append(np.asarray(s["v"], dtype=np.float64))
            weights.append(np.full(len(s["v"]), s["n"] / len(s["v"])))
    if not values:
        return [None for _ in levels]
    v, w = np.concatenate(values), np.concatenate(weights)
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(w[order])
    total = cum[-1]
    # inverse empirical CDF: the smallest value whose cumulative weight reaches q of the total
    out = []
    for q in levels:
        i = int(np.searchsorted(cum, q * total - 1e-9 * total, side="left"))
        out.append(float(v[min(i, len(v) - 1)]))
    return out


def merge(partials: Iterable[dict], levels: tuple[float, ...] = QUANTILE_LEVELS,
          computed_from: str = "job") -> NightAggregates:
    """The night's aggregates from its partials (none: an empty night)."""
    status: Counter = Counter()
    classes: dict[str, list[int]] = {}
    scores: dict[str, list[dict]] = {}
    for p in partials:
        status.update(p["status"])
        for name, (n, flagged) in p["classes"].items():
            c = classes.setdefault(name, [0, 0])
            c[0] += n
            c[1] += flagged
        for name, s in p["scores"].items():
            scores.setdefault(name, []).append(s)
    ok = status.get(STATUS_OK, 0)
    flagged = sum(c[1] for c in classes.values())
    return NightAggregates(
        rows=sum(status.values()), by_status=dict(sorted(status.items())), ood_share=flagged / ok if ok else None,
        by_class={k: ClassAggregate(ok=n, ood=f) for k, (n, f) in sorted(classes.items())},
        quantile_levels=list(levels), quantiles={k: _quantiles(v, levels) for k, v in scores.items()},
        computed_from=computed_from)


def _partial_block(block: pa.Table) -> pa.Table:
    return pa.table({PARTIAL: [json.dumps(partial(block))]})


def from_dataset(ds, computed_from: str = "job") -> NightAggregates:
    """Aggregates of a Ray dataset of output rows: one partial per block, computed in Ray tasks; only the
    partials (each at most a few hundred kB) reach the driver. The projection to :func:`columns` is pushed
    down into a Parquet read."""
    cols = columns(ds.schema().base_schema) if ds.schema() is not None else []
    if not cols:  # no file: an empty night
        return merge([], computed_from=computed_from)
    parts = ds.select_columns(cols).map_batches(_partial_block, batch_size=None, batch_format="pyarrow",
                                                num_cpus=0.1).take_all()
    return merge((json.loads(r[PARTIAL]) for r in parts), computed_from=computed_from)


def from_files(files: list[str], filesystem, computed_from: str = "rows") -> NightAggregates:
    """Aggregates of Parquet files of output rows, streamed one record batch at a time (bounded memory)."""
    import pyarrow.dataset as pads

    if not files:
        return merge([], computed_from=computed_from)
    dataset = pads.dataset(files, filesystem=filesystem, format="parquet")
    return merge((partial(b) for b in dataset.to_batches(columns=columns(dataset.schema)) if b.num_rows),
                 computed_from=computed_from)


def from_staged(staged: str, storage, rows: int, driver_rows_max: int = DRIVER_ROWS_MAX) -> NightAggregates:
    """The scoring job's: aggregates of a run's ``rows`` staged rows (``staged``: a folder URI; no file there: an
    empty night). Up to ``driver_rows_max`` rows they are streamed on the driver (:func:`from_files`), beyond
    with Ray Data (:func:`from_dataset`)."""
    from jobs.parquet_read import read_parquet
    from jobs.score.publish import (
        staged_files,  # what the publish moves in: no _checkpoint of a resumable run
    )

    fs, path = storage.fs(staged)
    files = staged_files(fs, path)
    if not files:
        return merge([])
    arrow_fs = storage.arrow(staged)[0]
    if rows <= driver_rows_max:
        return from_files(files, arrow_fs, computed_from="job")
    # no partitioning: an Iceberg run stages under .../run_date=<night>/, which is no column to add
    return from_dataset(read_parquet(files, arrow_fs, partitioning=None))
