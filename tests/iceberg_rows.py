"""Test helper: Iceberg data files of a few rows, for commits made without running the job."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.score.iceberg import RUN_DATE, night, table_schema

DAY = dt.date(2026, 11, 20)


def night_file(folder: Path, run_id: str, uris: list[str], day: dt.date = DAY, model_id: str = "m",
               class_set_hash: str = "h") -> str:
    """One data file of a night's ``ok`` rows (scores null), as the job stages them; its ``file://`` URI."""
    schema = table_schema()
    rows = [{**{f.name: None for f in schema}, "uri": u, "status": "ok", "model_id": model_id,
             "class_set_hash": class_set_hash, "run_id": run_id, "scored_at": night(day), RUN_DATE: night(day)}
            for u in uris]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return f"file://{path}"
