"""Test helper: a small scored night built without Ray, published the way the scoring job publishes it (a Parquet
folder with its manifest, or an Iceberg commit), for ``clipn review``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipn_core.scores import SCORES
from clipn_core.storage import Storage
from jobs.demo import world
from schemas.manifest import ScoreManifest
from schemas.output import OUTPUT_SCHEMA, ood_column, score_column

DAY = dt.date(2026, 11, 25)
ODD_CLASS = "<b>&amp; \"odd\" class</b>"
CLASSES = ["circle", "square", ODD_CLASS]


def night_rows(lake: Path, n: int = 30, run_id: str = "run-1") -> tuple[list[dict], list[str]]:
    """``n`` ok rows over images written to ``lake`` (their ATD scores spread over [0, 1], flagged below 0.3), one
    ok row whose image has since been deleted, one ``not_an_image`` row; (rows, the deleted row's URI)."""
    lake.mkdir(parents=True, exist_ok=True)
    rows = []
    base = {f.name: None for f in OUTPUT_SCHEMA}
    when = dt.datetime(2026, 11, 25, 3, tzinfo=dt.timezone.utc)
    for i in range(n + 1):
        path = lake / f"img {i:03d}&<x>.jpg"  # a URI that needs escaping
        path.write_bytes(world.encode(world.render(world.SHAPES[i % 8], "red", i, 48)))
        score = (i + 0.5) / (n + 1)
        row = {**base, "uri": str(path), "byte_size": path.stat().st_size, "status": "ok", "error": "",
               "predicted_class": CLASSES[i % 3], "predicted_index": i % 3, "predicted_prob": 0.5,
               "model_id": "m", "class_set_hash": "h", "run_id": run_id, "scored_at": when,
               "is_ood": score < 0.3}
        for name, s in SCORES.items():
            row[score_column(name)] = score
            if s.threshold_free:
                row[ood_column(name)] = score < 0.3
        rows.append(row)
    gone = rows[0]["uri"]
    Path(gone).unlink()  # scored, then deleted from the lake: the page must say so, not crash
    rows.append({**base, "uri": str(lake / "broken.jpg"), "byte_size": 3, "status": "not_an_image",
                 "error": "not a recognised image format", "model_id": "m", "class_set_hash": "h",
                 "run_id": run_id, "scored_at": when})
    return rows, gone


def manifest(rows: list[dict], partition: str, run_id: str = "run-1") -> ScoreManifest:
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return ScoreManifest(schema_version=1, run_id=run_id, run_date=DAY, partition=partition, model_id="m",
                         class_set_hash="h", classes=CLASSES, templates=["a photo of a {}."],
                         decision={"rule": "atd", "score": None, "threshold": None, "calibration": None},
                         rows=len(rows), files=1, by_status=by_status, ood_rate={"is_ood": None}, timings_s={},
                         config={"input": {"kind": "prefix"}})


def publish_parquet_night(root: Path, rows: list[dict], storage: Storage | None = None) -> None:
    """Stage ``rows`` as one Parquet file and publish them as the night ``DAY`` under ``root``
    (:func:`jobs.score.publish.publish`: files moved in, manifest naming them, ``_SUCCESS``)."""
    from jobs.score.publish import partition_path, publish, staging_path

    storage = storage or Storage()
    staged = staging_path(str(root), "run-1")
    Path(staged).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), f"{staged}/part-x-000000.parquet")
    publish(str(root), DAY, staged, manifest(rows, partition_path(str(root), DAY)), storage)


def commit_iceberg_night(iceberg_cfg, folder: Path, rows: list[dict], storage: Storage | None = None) -> None:
    """Commit ``rows`` as the night ``DAY`` of the Iceberg table ``iceberg_cfg`` (:func:`jobs.score.iceberg.commit_night`)."""
    from jobs.score.iceberg import commit_night, to_table_rows

    storage = storage or Storage()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run-1.parquet"
    pq.write_table(to_table_rows(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), DAY), path)
    commit_night(iceberg_cfg, storage, [f"file://{path}"], manifest(rows, iceberg_cfg.table))
