"""The Iceberg output target: rows read back through pyiceberg, idempotent nights, schema evolution, the S3
warehouse, skip_scored and since from the table, and snapshot expiry."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

import clipn_core as cc
from jobs.demo import world
from jobs.score import run
from jobs.score.iceberg import RUN_DATE, iceberg_schema, load_table, night, table_schema
from schemas.score_config import IcebergConfig, ScoreJobConfig
from tests.iceberg_rows import night_file as _night_file

pytestmark = pytest.mark.slow
DAY = dt.date(2026, 11, 20)
CLASSES = ["circle", "square", "triangle"]


def _lake(root, n: int, start: int = 0, broken: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (root / f"img{i:03d}.jpg").write_bytes(world.encode(world.render(world.SHAPES[i % 8], "green", i, 40)))
    if broken:
        (root / "broken.jpg").write_bytes(b"not an image")


def _cfg(lake, iceberg: dict, ckpt: str, day: dt.date, storage: dict | None = None, bank_calibration: str | None = None,
         **output) -> ScoreJobConfig:
    return ScoreJobConfig.model_validate({
        "input": {"uri": str(lake)}, "output": {"iceberg": iceberg, "run_date": str(day), **output},
        "model": {"checkpoint": ckpt}, "classes": {"names": CLASSES}, "storage": storage or {},
        "lake_bank": {"calibration": bank_calibration}, "runtime": {"batch_size": 8, "decode_batch_size": 8}})


def _local(tmp_path) -> dict:
    return {"table": "lake.ood_flags", "uri": f"sqlite:///{tmp_path / 'catalog.db'}", "warehouse": f"file://{tmp_path / 'wh'}"}


def _rows(cfg: dict, storage: dict | None = None) -> list[dict]:
    from jobs.score.iceberg import load_table as load
    from schemas.common import StorageConfig

    table = load(IcebergConfig(**cfg), StorageConfig(**(storage or {})).bind(), create=False)
    return table.scan().to_arrow().to_pylist()


def test_a_night_reads_back_through_pyiceberg_row_for_row_like_the_parquet_target(tmp_path, ckpt, ray_local):
    lake = tmp_path / "lake"
    _lake(lake, 12)
    ice = _local(tmp_path)
    manifest = run(_cfg(lake, ice, ckpt, DAY))
    parquet = run(ScoreJobConfig.model_validate({**_cfg(lake, ice, ckpt, DAY).model_dump(mode="json"),
                                                 "output": {"uri": str(tmp_path / "pq"), "run_date": str(DAY)}}))
    rows = {r["uri"]: r for r in _rows(ice)}
    want = {r["uri"]: r for r in pads.dataset(parquet.partition, format="parquet").to_table().to_pylist()}
    assert sorted(rows) == sorted(want) and len(rows) == 13 == manifest.rows
    for uri, r in want.items():  # every row and column, as the Parquet target wrote them
        got = rows[uri]
        assert got["status"] == r["status"] and got["predicted_class"] == r["predicted_class"], uri
        for name in cc.SCORES:
            want_score = r[f"score_{name}"]
            if want_score is None:  # not an image: null in both
                assert got[f"score_{name}"] is None, (uri, name)
            else:
                assert got[f"score_{name}"] == pytest.approx(want_score, rel=1e-5, abs=1e-6), (uri, name)
        assert got[RUN_DATE] == night(DAY) and got["model_id"] == manifest.model_id
    table = load_table(IcebergConfig(**ice), ScoreJobConfig.model_fields["storage"].default_factory().bind(), False)
    assert [f.name for f in table.spec().fields] == ["run_day", "model_id"]
    props = table.current_snapshot().summary.additional_properties
    assert props["clipn.run_id"] == manifest.run_id and props["clipn.status.ok"] == "12"
    assert props["clipn.status.not_an_image"] == "1" and props["clipn.model_id"] == manifest.model_id
    assert manifest.partition.startswith("lake.ood_flags")
    files = [p for p in (tmp_path / "wh").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith("_")]  # only data and metadata beside the table


def test_a_rerun_replaces_the_night_and_other_nights_stay(tmp_path, ckpt, ray_local):
    from tests.bank_calibration import calibrate, id_sample

    lake = tmp_path / "lake"
    _lake(lake, 6)
    ice = _local(tmp_path)
    cal = calibrate(ckpt, CLASSES, id_sample(tmp_path / "id", CLASSES), tmp_path / "cal")
    first = run(_cfg(lake, ice, ckpt, DAY, bank_calibration=cal, embeddings=True, lake_bank=True))
    second = run(_cfg(lake, ice, ckpt, DAY + dt.timedelta(days=1), bank_calibration=cal, embeddings=True,
                      lake_bank=True))
    # the lake bank: built by a night, found by the next through the snapshots, kept beside the table
    assert second.lake_bank_used == first.lake_bank_built and ".clipn-banks/" in first.lake_bank_built
    assert not first.lake_bank_built.startswith(str(tmp_path / "wh" / "lake" / "ood_flags") + "/")
    # the night's snapshot carries what its Parquet manifest would about the bank
    summary = load_table(IcebergConfig(**ice), ScoreJobConfig.model_fields["storage"].default_factory().bind(),
                         False).current_snapshot().summary.additional_properties
    assert json.loads(summary["clipn.lake_bank_meta"]) == second.lake_bank_meta
    assert second.lake_bank_meta["calibration_id"] == json.loads(Path(cal).read_text())["id"]
    assert (summary["clipn.lake_bank_used"], summary["clipn.lake_bank_built"]) == (first.lake_bank_built,
                                                                                   second.lake_bank_built)
    again = run(_cfg(lake, ice, ckpt, DAY))
    rows = _rows(ice)
    by_night = {}
    for r in rows:
        by_night.setdefault(r[RUN_DATE].date(), []).append(r)
    assert {d: len(v) for d, v in by_night.items()} == {DAY: 7, DAY + dt.timedelta(days=1): 7}  # no duplicates
    assert {r["run_id"] for r in by_night[DAY]} == {again.run_id} != {first.run_id}
    # snapshot expiry: the maintenance the README documents keeps only what is current
    from schemas.common import StorageConfig

    table = load_table(IcebergConfig(**ice), StorageConfig().bind(), create=False)
    before = len(table.metadata.snapshots)
    table.maintenance.expire_snapshots().older_than(dt.datetime.now(dt.timezone.utc)).commit()
    table = table.refresh()
    assert len(table.metadata.snapshots) < before and len(table.scan().to_arrow()) == 14


def test_a_new_score_column_evolves_the_table_without_rewriting_old_data(tmp_path, ckpt, ray_local):
    """An older release's table lacks the newest score column: the job adds it; old rows read null."""
    from pyiceberg.catalog import load_catalog

    ice = _local(tmp_path)
    catalog = load_catalog("default", type="sql", uri=ice["uri"], warehouse=ice["warehouse"])
    catalog.create_namespace("lake")
    old_schema = pa.schema([f for f in table_schema() if f.name != "score_clipn_neg_lake"])
    table = catalog.create_table("lake.ood_flags", schema=old_schema)
    old_row = {f.name: None for f in old_schema}
    old_row.update(uri="s3://old/x.jpg", status="ok", model_id="older", class_set_hash="h", run_id="r0",
                   scored_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), run_date=night(DAY - dt.timedelta(days=30)))
    table.append(pa.Table.from_pylist([old_row], schema=old_schema))
    old_files = {f.file.file_path for f in table.scan().plan_files()}
    lake = tmp_path / "lake"
    _lake(lake, 4)
    run(_cfg(lake, ice, ckpt, DAY))
    table = table.refresh()
    assert table.schema().find_field("score_clipn_neg_lake")  # evolved
    assert old_files <= {f.file.file_path for f in table.scan().plan_files()}  # the old file, not rewritten
    rows = {r["uri"]: r for r in table.scan().to_arrow().to_pylist()}
    assert rows["s3://old/x.jpg"]["score_clipn_neg_lake"] is None and len(rows) == 1 + 5
    assert any(r["score_clipn_neg_lake"] is not None for r in rows.values())
    assert len(iceberg_schema().fields) == len(table_schema())


def test_skip_scored_and_since_read_the_table(tmp_path, ckpt, ray_local):
    """skip_scored and since from the table; since without a margin, so that the watermark alone excludes (the
    margin is tested with the Parquet folder, through the same code)."""
    lake = tmp_path / "lake"
    _lake(lake, 5)
    ice = _local(tmp_path)
    first = run(_cfg(lake, ice, ckpt, DAY, skip_scored=True))
    _lake(lake, 2, start=100, broken=False)
    second = run(ScoreJobConfig.model_validate({
        **_cfg(lake, ice, ckpt, DAY + dt.timedelta(days=1), skip_scored=True).model_dump(mode="json"),
        "input": {"uri": str(lake), "since": "last_run", "since_margin_s": 0}}))
    assert second.since == first.watermark and second.excluded_by_watermark == 6
    night2 = [r for r in _rows(ice) if r[RUN_DATE] == night(DAY + dt.timedelta(days=1))]
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in night2) == ["img100.jpg", "img101.jpg"]
    third = run(_cfg(lake, ice, ckpt, DAY + dt.timedelta(days=2), skip_scored=True))
    # everything: the broken file is a permanent failure, its object unchanged since its night's watermark
    assert third.skipped_already_scored == 8 and third.rows == 0 and third.retried == 0
    # a night with nothing new commits an empty snapshot that records the run, and its watermark for the next
    fourth = run(ScoreJobConfig.model_validate({
        **_cfg(lake, ice, ckpt, DAY + dt.timedelta(days=3)).model_dump(mode="json"),
        "input": {"uri": str(lake), "since": "last_run", "since_margin_s": 0}}))
    table = load_table(IcebergConfig(**ice), ScoreJobConfig.model_fields["storage"].default_factory().bind(), False)
    assert fourth.rows == 0 and fourth.since == third.watermark and fourth.excluded_by_watermark == 8
    assert table.current_snapshot().summary.additional_properties["clipn.run_id"] == fourth.run_id
    assert len(table.scan().to_arrow()) == 5 + 1 + 2  # the nights before, untouched


def _manifest(run_id: str, day: dt.date, **over):
    from schemas.manifest import ScoreManifest

    return ScoreManifest(schema_version=1, run_id=run_id, run_date=day, partition="", model_id="m",
                         class_set_hash="h", classes=[], templates=[], rows=1, files=1, by_status={"ok": 1},
                         ood_rate={}, timings_s={}, config={}, **over)


def test_snapshot_expiry_keeps_the_watermark_and_the_lake_bank_pointer(tmp_path, ckpt, ray_local):
    """The table's properties, not its snapshots, carry what the next night needs: after another writer's
    commit and an expiry that leaves only that snapshot, the next night still lists only new objects and
    still finds the last lake bank."""
    from jobs.score import iceberg
    from schemas.common import StorageConfig

    lake = tmp_path / "lake"
    _lake(lake, 5)
    ice, storage = _local(tmp_path), StorageConfig().bind()

    def since_night(day):
        return ScoreJobConfig.model_validate({**_cfg(lake, ice, ckpt, day).model_dump(mode="json"),
                                              "input": {"uri": str(lake), "since": "last_run"}})

    first = run(since_night(DAY))
    # a night of another model that built a lake bank (committed directly: only its pointer matters here)
    iceberg.commit_night(IcebergConfig(**ice), storage, [_night_file(tmp_path / "b", "banked", ["s3://x/1.jpg"],
                                                                     DAY - dt.timedelta(days=1))],
                         _manifest("banked", DAY - dt.timedelta(days=1), lake_bank_built="s3://x/bank.safetensors"))
    table = load_table(IcebergConfig(**ice), storage, create=False)
    table.append(iceberg.table_schema().empty_table())  # another writer's commit: no clipn properties
    table.maintenance.expire_snapshots().older_than(dt.datetime.now(dt.timezone.utc)).commit()
    table = table.refresh()
    assert [s.summary.additional_properties.get("clipn.run_id") for s in table.metadata.snapshots] == [None]

    _lake(lake, 2, start=100, broken=False)
    second = run(since_night(DAY + dt.timedelta(days=1)))
    assert second.since == first.watermark - dt.timedelta(hours=1) and second.since_from_run == first.run_id
    night2 = [r for r in _rows(ice) if r[RUN_DATE] == night(DAY + dt.timedelta(days=1))]
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in night2) == ["img100.jpg", "img101.jpg"]
    assert iceberg.latest_bank_uri(IcebergConfig(**ice), storage, DAY + dt.timedelta(days=5), "m", "h") == \
        "s3://x/bank.safetensors"
    # so do the nights' aggregates (clipn history): the first night's outlived its snapshot
    from jobs.history.read import iceberg_nights

    nights = {n.run_date: n for n in iceberg_nights(IcebergConfig(**ice), storage)}
    assert nights[DAY].aggregates == first.aggregates and nights[DAY].run_id == first.run_id
    assert first.aggregates.rows == 6 and first.aggregates.by_status["ok"] == 5
    assert nights[DAY + dt.timedelta(days=1)].aggregates == second.aggregates and second.aggregates.rows == 2
    # the night committed without aggregates (and whose snapshot is gone): computed from its rows
    banked = nights[DAY - dt.timedelta(days=1)].aggregates
    assert banked.computed_from == "rows" and banked.by_status == {"ok": 1} and banked.ood_share == 0


def test_a_nights_snapshot_carries_its_lake_bank_like_the_parquet_manifest(tmp_path):
    from jobs.score import iceberg
    from schemas.common import StorageConfig

    cfg, storage = IcebergConfig(**_local(tmp_path)), StorageConfig().bind()
    meta = {"rows": 40, "evidence": "ood_atd", "id_flag_rate": 0.03, "calibration_id": "c0ffee", "purity_bound": 0.85,
            "empty": None}
    manifest = _manifest("r0", DAY, lake_bank_used="s3://x/bank-before.safetensors", lake_bank_id="b4",
                         lake_bank_built="s3://x/bank.safetensors", lake_bank_meta=meta)
    iceberg.commit_night(cfg, storage, [_night_file(tmp_path / "n0", "r0", ["s3://x/0.jpg"], DAY)], manifest)
    props = load_table(cfg, storage, create=False).current_snapshot().summary.additional_properties
    assert json.loads(props["clipn.lake_bank_meta"]) == meta
    assert (props["clipn.lake_bank_used"], props["clipn.lake_bank_id"], props["clipn.lake_bank_built"]) == (
        "s3://x/bank-before.safetensors", "b4", "s3://x/bank.safetensors")
    # a night without a bank carries none of it
    iceberg.commit_night(cfg, storage, [_night_file(tmp_path / "n1", "r1", ["s3://x/1.jpg"], DAY)],
                         _manifest("r1", DAY))
    props = load_table(cfg, storage, create=False).current_snapshot().summary.additional_properties
    assert not any(k.startswith("clipn.lake_bank") for k in props)


def test_the_night_properties_keep_the_latest_nights(tmp_path, monkeypatch):
    from jobs.score import iceberg
    from schemas.common import StorageConfig

    monkeypatch.setattr(iceberg, "NIGHTS_KEPT", 2)
    cfg, storage = IcebergConfig(**_local(tmp_path)), StorageConfig().bind()
    mark = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    for i in range(3):
        day = DAY + dt.timedelta(days=i)
        iceberg.commit_night(cfg, storage, [_night_file(tmp_path / f"n{i}", f"r{i}", [f"s3://x/{i}.jpg"], day)],
                             _manifest(f"r{i}", day, watermark=mark + dt.timedelta(days=i),
                                       lake_bank_built=f"s3://x/bank{i}.safetensors"))
    props = load_table(cfg, storage, create=False).properties
    kept = sorted(k for k in props if k.startswith(("clipn.watermark.", "clipn.lake-bank.")))
    assert kept == [f"clipn.lake-bank.{DAY + dt.timedelta(days=i)}.m.h" for i in (1, 2)] + \
        [f"clipn.watermark.{DAY + dt.timedelta(days=i)}" for i in (1, 2)]
    assert [w.run_id for w in iceberg.watermarks(cfg, storage, DAY + dt.timedelta(days=9))] == ["r0", "r1", "r2"]


def test_an_s3_warehouse_on_the_loopback_server(tmp_path, ckpt, ray_local, s3_bucket):
    bucket, opts = s3_bucket
    lake = tmp_path / "lake"
    _lake(lake, 5)
    ice = {"table": "lake.flags", "uri": f"sqlite:///{tmp_path / 'catalog.db'}", "warehouse": f"s3://{bucket}/wh"}
    storage = {"endpoint_url": opts["client_kwargs"]["endpoint_url"], "region": "us-east-1"}
    manifest = run(_cfg(lake, ice, ckpt, DAY, storage))
    rows = _rows(ice, storage)
    assert len(rows) == manifest.rows == 6 and {r["status"] for r in rows} == {"ok", "not_an_image"}
    fs = fsspec.filesystem("s3", **opts)
    assert any(p.endswith(".parquet") for p in fs.find(f"{bucket}/wh"))


def test_a_commit_that_keeps_losing_fails_naming_the_table(tmp_path, monkeypatch):
    from pyiceberg.exceptions import CommitFailedException
    from pyiceberg.table import Transaction

    from jobs.score import iceberg
    from schemas.common import StorageConfig
    from schemas.manifest import ScoreManifest

    cfg, storage = IcebergConfig(**_local(tmp_path)), StorageConfig().bind()
    m = ScoreManifest(schema_version=1, run_id="r1", run_date=DAY, partition="", model_id="m", class_set_hash="h",
                      classes=[], templates=[], rows=1, files=1, by_status={"ok": 1}, ood_rate={}, timings_s={},
                      config={})
    iceberg.commit_night(cfg, storage, [_night_file(tmp_path / "w1", "r1", ["s3://x/1.jpg"])], m)

    def always_beaten(self):
        raise CommitFailedException("another writer committed first")

    monkeypatch.setattr(Transaction, "commit_transaction", always_beaten)
    monkeypatch.setattr(iceberg, "COMMIT_ATTEMPTS", 3)
    monkeypatch.setattr(iceberg.time, "sleep", lambda s: None)
    with pytest.raises(cc.CommitConflictError, match="lake.ood_flags.*3 commits"):
        iceberg.commit_night(cfg, storage, [_night_file(tmp_path / "w2", "r2", ["s3://x/1.jpg"])],
                             m.model_copy(update={"run_id": "r2"}))
    monkeypatch.undo()
    rows = load_table(cfg, storage, create=False).scan().to_arrow().to_pylist()
    assert [(r["uri"], r["run_id"]) for r in rows] == [("s3://x/1.jpg", "r1")]  # the last good night stands


def test_a_commit_whose_lost_answer_lands_late_is_found_not_added_twice(tmp_path, monkeypatch):
    """A REST catalog's 5xx answer to a commit that lands only after the run looked for it: the retry must find the
    run's snapshot first, not add the same files again (pyiceberg refuses that: "already referenced")."""
    from jobs import failpoints
    from jobs.score import iceberg
    from schemas.common import StorageConfig

    cfg, storage = IcebergConfig(**_local(tmp_path)), StorageConfig().bind()
    real, looks = iceberg._run_snapshot, []

    def late(table, run_id):  # the first look happens before the landed commit is visible
        looks.append(run_id)
        return None if len(looks) == 1 else real(table, run_id)

    monkeypatch.setattr(iceberg, "_run_snapshot", late)
    monkeypatch.setattr(iceberg.time, "sleep", lambda s: None)
    monkeypatch.setenv(failpoints.ENV, "iceberg.commit.unknown_after=raise,at=1")
    iceberg.commit_night(cfg, storage, [_night_file(tmp_path / "w1", "r1", ["s3://x/1.jpg", "s3://x/2.jpg"])],
                         _manifest("r1", DAY))
    monkeypatch.delenv(failpoints.ENV)
    table = load_table(cfg, storage, create=False)
    rows = table.scan().to_arrow().to_pylist()
    assert sorted(r["uri"] for r in rows) == ["s3://x/1.jpg", "s3://x/2.jpg"] and len(looks) >= 2
    assert real(table, "r1") is not None


def test_the_local_default_catalog_and_its_clear_errors(tmp_path):
    from schemas.common import StorageConfig

    storage = StorageConfig().bind()
    folder = tmp_path / "not" / "yet" / "wh"  # a plain folder that does not exist yet: catalog.db goes inside it
    table = load_table(IcebergConfig(table="lake.flags", warehouse=str(folder)), storage, create=True)
    assert (folder / "catalog.db").is_file() and str(folder) in table.location()
    with pytest.raises(cc.InputError, match="output.iceberg.warehouse is not set"):
        load_table(IcebergConfig(table="lake.flags", catalog="nowhere"), storage, create=True)
    with pytest.raises(cc.InputError, match="output.iceberg.uri"):
        load_table(IcebergConfig(table="lake.flags", warehouse="s3://bucket/wh"), storage, create=True)


def test_a_run_refused_at_setup_creates_no_table(tmp_path, ckpt, ray_local):
    ice = _local(tmp_path)
    with pytest.raises(cc.InputError, match="missing"):
        run(_cfg(tmp_path / "missing", ice, ckpt, DAY))
    from schemas.common import StorageConfig

    assert load_table(IcebergConfig(**ice), StorageConfig().bind(), create=False) is None
