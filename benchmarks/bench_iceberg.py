"""Idempotent nightly commits to Iceberg: delete-by-filter + add_files (the job's) against Ray's upsert.

A night of N synthetic output rows is committed, then the same night again (a rerun that must replace
it); for N and 2N rows. Each rerun is timed, with the driver's RSS growth during it, and the table is
checked to hold exactly one copy of the night. Local SQLite catalog and file warehouse.

Usage: python benchmarks/bench_iceberg.py [--n 50000]
(Ray's Iceberg writer needs ``pyiceberg-core`` for partition transforms: ``pip install pyiceberg-core``.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from benchmarks.bench_throughput import PeakRss  # noqa: E402

DAY = dt.date(2026, 11, 24)


def night_rows(n: int, run_id: str) -> pa.Table:
    """``n`` rows shaped like a night of the scoring job (one model, one class set)."""
    import numpy as np

    from jobs.score.iceberg import night, table_schema

    schema = table_schema()
    rng = np.random.default_rng(0)
    cols = {}
    for f in schema:
        if f.name == "uri":
            cols[f.name] = pa.array([f"s3://lake/img_{i:08d}.jpg" for i in range(n)])
        elif f.name == "status":
            cols[f.name] = pa.array(["ok"] * n)
        elif f.name in ("model_id", "class_set_hash", "run_id"):
            cols[f.name] = pa.array([{"model_id": "m" * 64, "class_set_hash": "c" * 16, "run_id": run_id}[f.name]] * n)
        elif f.name == "scored_at":
            cols[f.name] = pa.array([dt.datetime.now(dt.timezone.utc)] * n, f.type)
        elif f.name == "run_date":
            cols[f.name] = pa.array([night(DAY)] * n, f.type)
        elif pa.types.is_floating(f.type):
            cols[f.name] = pa.array(rng.random(n, dtype=np.float32), f.type)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=schema)


def ours(cfg, storage, n: int, blocks: int, first: bool) -> None:
    """The job's publish: Ray writes the files into the table's location, one transaction replaces the night."""
    import ray

    from jobs.score.iceberg import commit_night, data_location, load_table
    from schemas.manifest import ScoreManifest

    table = load_table(cfg, storage, create=True)
    run_id = uuid.uuid4().hex[:12]
    staged = data_location(table.location(), DAY, run_id)
    arrow_fs, path = storage.arrow(staged)
    ray.data.from_arrow(night_rows(n, run_id)).repartition(blocks).write_parquet(path, filesystem=arrow_fs)
    fs, p = storage.fs(staged)
    files = [f"file://{f}" for f in sorted(fs.find(p)) if f.endswith(".parquet")]
    manifest = ScoreManifest(schema_version=1, run_id=run_id, run_date=DAY, partition="", model_id="m" * 64,
                             class_set_hash="c" * 16, classes=[], templates=[], rows=n, files=len(files),
                             by_status={"ok": n}, ood_rate={}, timings_s={}, config={})
    commit_night(cfg, storage, files, manifest)


def ray_upsert(cfg, storage, n: int, blocks: int, first: bool) -> None:
    """Ray's ``write_iceberg`` upsert on (uri, model_id, class_set_hash); the first night appends (Ray 2.60's
    upsert cannot scan a table without a snapshot: "Cannot scan unknown ref=main")."""
    import ray
    from ray.data import SaveMode

    from jobs.score.iceberg import catalog_properties, load_table

    load_table(cfg, storage, create=True)
    ray.data.from_arrow(night_rows(n, uuid.uuid4().hex[:12])).repartition(blocks).write_iceberg(
        cfg.table, catalog_kwargs={"name": cfg.catalog, **catalog_properties(cfg, storage)},
        mode=SaveMode.APPEND if first else SaveMode.UPSERT,
        upsert_kwargs=None if first else {"join_cols": ["uri", "model_id", "class_set_hash"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--blocks", type=int, default=20)
    args = ap.parse_args()
    import ray

    from jobs.score.iceberg import load_table
    from schemas.common import StorageConfig
    from schemas.score_config import IcebergConfig

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    storage = StorageConfig().bind()
    results = []
    for name, method in (("delete + add_files (the job's)", ours), ("Ray write_iceberg UPSERT", ray_upsert)):
        for n in (args.n, 2 * args.n):
            root = Path(tempfile.mkdtemp(prefix="clipn_ice_"))
            cfg = IcebergConfig(table=f"bench.t{uuid.uuid4().hex[:6]}", uri=f"sqlite:///{root / 'c.db'}",
                                warehouse=f"file://{root / 'wh'}")
            method(cfg, storage, n, args.blocks, first=True)  # the first night
            with PeakRss() as rss:
                t = time.perf_counter()
                method(cfg, storage, n, args.blocks, first=False)  # the rerun: must replace, not duplicate
                seconds = time.perf_counter() - t
            table = load_table(cfg, storage, create=False)
            rows = len(table.scan(selected_fields=("uri",)).to_arrow())
            files = len(list(table.scan().plan_files()))
            results.append((name, n, seconds, rss.growth_mb, rows, files, len(table.metadata.snapshots)))
            shutil.rmtree(root, ignore_errors=True)
    ray.shutdown()
    print(f"\nmachine: {os.cpu_count()} CPUs; local SQLite catalog and file warehouse; a night of N rows committed, "
          "then rerun")
    print("| method | rows N | rerun s | driver RSS growth in the rerun | rows after | data files | snapshots |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, seconds, growth, rows, files, snaps in results:
        print(f"| {name} | {n:,} | {seconds:.1f} | {growth:.0f} MB | {rows:,} | {files} | {snaps} |")


if __name__ == "__main__":
    main()
