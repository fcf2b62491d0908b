"""Every step of publishing a night, on both targets, fails (raises) or dies (the process is killed) in turn.

For each failpoint, what a reader sees right after the failure must be the night's previous rows or its
new rows, whole, never neither and never a manifest or snapshot naming a file that is gone; and rerunning
the night must then give exactly a clean run's rows (uri, status, class, scores, flags), with nothing left
behind. The rows come from one clean run of the real job; each case stages a copy of them (as the job
stages its rows) and calls the publish step the job calls, in this process for ``raise`` and in a forked
child for ``kill``. Two cases more run the whole job through a failure and a rerun.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import re

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from pyiceberg.exceptions import CommitStateUnknownException

import clipn_core as cc
from clipn_core.errors import CommitUnknownError
from jobs import failpoints
from jobs.demo.world import World
from jobs.score import iceberg, publish
from jobs.score.targets import output_target, publish_or_abandon
from schemas.common import StorageConfig
from schemas.manifest import ScoreManifest
from schemas.output import OUTPUT_SCHEMA
from schemas.score_config import OutputConfig, ScoreJobConfig

pytestmark = pytest.mark.slow
DAY = dt.date(2026, 11, 24)
EARLIER = DAY - dt.timedelta(days=1)
BUCKET = "failpoints"
N_IMAGES = 9
OLD_ROWS = 4  # the night's previous version holds the first rows only, so a reader can tell it from the new one
COMPARED = ["uri", "status", "predicted_class", "predicted_index", *(f"score_{s}" for s in cc.SCORES), "ood_ctw",
            "ood_atd", "is_ood"]

# (failpoints, what a reader must see right after: the night's previous rows or its new ones)
PARQUET = [
    ("parquet.success_delete.before={}", "old"),
    ("parquet.success_delete.after={}", "old"),
    ("parquet.move.before={},at=2", "old"),
    ("parquet.move.after={},at=2", "old"),
    ("parquet.manifest.before={}", "old"),
    ("parquet.manifest.after={}", "new"),  # the manifest landed, then the run failed: it must keep the new files
    ("parquet.delete_old.before={}", "new"),
    ("parquet.delete_old.after={}", "new"),
    ("parquet.success.before={}", "new"),
    ("parquet.success.after={}", "new"),
    ("staging.delete.before={}", "new"),
    ("staging.delete.after={}", "new"),
]
ICEBERG = [
    ("iceberg.commit.before={}", "old"),
    ("iceberg.commit.after={}", "new"),
    ("iceberg.commit.unknown_after=raise;iceberg.refresh.before={}", "new"),
    ("iceberg.commit.unknown_after=raise;iceberg.refresh.after={}", "new"),
    ("iceberg.commit.unknown_before=raise;iceberg.refresh.before={}", "old"),
    ("iceberg.commit.unknown_before=raise;iceberg.refresh.after={}", "old"),
    ("iceberg.commit.before=raise;staging.delete.before={}", "old"),
    ("iceberg.commit.before=raise;staging.delete.after={}", "old"),
]
CASES = [
    *[("parquet", spec.format(action), seen) for spec, seen in PARQUET for action in ("raise", "kill")],
    # the failure handler's own steps failing too
    ("parquet", "parquet.move.after=raise,at=2;parquet.delete_old.before=raise", "old"),
    ("parquet", "parquet.manifest.after=raise;parquet.delete_old.before=raise", "new"),
    *[("iceberg", spec.format(action), seen) for spec, seen in ICEBERG for action in ("raise", "kill")],
    # an unknown commit state that the run resolves itself: no failure, the new night
    ("iceberg", "iceberg.commit.unknown_after=raise", "new"),
    ("iceberg", "iceberg.commit.unknown_before=raise,at=1", "new"),
    # no answer to any attempt: the run fails, keeping its files, and the night stays the old one
    ("iceberg", "iceberg.commit.unknown_before=raise", "old"),
]


def _case_id(case) -> str:
    return f"{case[0]}:{case[1]}"


@pytest.fixture(scope="module")
def clean(s3_server, ray_local, tmp_path_factory):
    """One clean run of the real job on a small lake in the loopback S3 server: the rows every case stages
    again, and the rows a rerun must equal."""
    import boto3

    from jobs.score import run

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "skip_instance_cache": True}
    World(seed=7).write_lake(f"s3://{BUCKET}/lake", N_IMAGES, opts)
    fsspec.filesystem("s3", **opts).pipe_file(f"{BUCKET}/lake/broken.jpg", b"not an image")
    model, spec = cc.build_clipn("clipn-tiny", seed=3)
    cc.save_checkpoint(model, spec, f"s3://{BUCKET}/models/clipn.safetensors", opts)
    cfg = ScoreJobConfig.model_validate({
        "input": {"uri": f"s3://{BUCKET}/lake"}, "output": {"uri": f"s3://{BUCKET}/clean", "run_date": str(DAY)},
        "model": {"checkpoint": f"s3://{BUCKET}/models/clipn.safetensors"}, "classes": {"names": list(World().id_shapes)},
        "templates": "world", "storage": {"endpoint_url": s3_server},
        "runtime": {"batch_size": 4, "decode_batch_size": 4}})
    manifest = run(cfg)
    storage = cfg.storage.bind()
    rows = _parquet_night(f"s3://{BUCKET}/clean", storage)
    assert len(rows) == N_IMAGES + 1 == manifest.rows
    return {"rows": rows, "manifest": manifest, "storage": cfg.storage, "tmp": tmp_path_factory.mktemp("fp"),
            "cfg": cfg}


# ------------------------------------------------------------------ targets, staging, readers


def _output(kind: str, clean, name: str) -> OutputConfig:
    if kind == "parquet":
        return OutputConfig(uri=f"s3://{BUCKET}/out/{name}", run_date=DAY)
    tmp = clean["tmp"]
    return OutputConfig(iceberg={"table": f"fp.{name}", "uri": f"sqlite:///{tmp / 'catalog.db'}",
                                 "warehouse": f"file://{tmp / 'wh'}"}, run_date=DAY)


def _stage(target, kind: str, clean, run_id: str, rows: pa.Table, day: dt.date = DAY) -> tuple[str, ScoreManifest]:
    """Stage ``rows`` as the job does (three files under the target's staging place, run_id set), and the
    manifest the job would publish with them."""
    storage = clean["storage"].bind()
    staged = target.staged(run_id, day)
    rows = rows.set_column(rows.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * len(rows)))
    fs, path = storage.fs(staged)
    fs.makedirs(path, exist_ok=True)
    sizes = [len(rows) // 3 + (i < len(rows) % 3) for i in range(3)]  # never an empty file, as Ray writes none
    for i in range(3):
        part = rows.slice(sum(sizes[:i]), sizes[i]).cast(OUTPUT_SCHEMA)
        part = iceberg.to_table_rows(part, day) if kind == "iceberg" else part
        with fs.open(f"{path}/part-{run_id}-{i:06d}.parquet", "wb") as f:
            pq.write_table(part, f)
    manifest = clean["manifest"].model_copy(update={
        "run_id": run_id, "run_date": day, "rows": len(rows), "files": 3, "partition": target.partition(day),
        "by_status": dict(sorted({s: rows["status"].to_pylist().count(s) for s in set(rows["status"].to_pylist())}.items()))})
    return staged, manifest


def _parquet_night(root: str, storage, day: dt.date = DAY) -> pa.Table | None:
    """The night as a reader of ours sees it: the files its manifest names (None when it is not published)."""
    fs, _ = storage.fs(root)
    nights = [(p, m) for p, m in publish.published_nights(root, storage) if m.run_date == day]
    if not nights:
        return None
    (part, manifest), = nights
    files = publish.night_files(fs, part, manifest)
    missing = [f for f in files if not fs.exists(f)]
    assert not missing, f"the manifest names files that are gone: {missing}"
    return pads.dataset(files, filesystem=storage.arrow(root)[0], format="parquet", schema=OUTPUT_SCHEMA,
                        partitioning=None).to_table().sort_by("uri")


def _iceberg_night(cfg, storage, day: dt.date = DAY) -> pa.Table | None:
    """The night in the table's current snapshot, after checking that every snapshot's files exist."""
    table = iceberg.load_table(cfg, storage, create=False)
    if table is None or table.current_snapshot() is None:
        return None
    for snap in table.metadata.snapshots:
        for task in table.scan(snapshot_id=snap.snapshot_id).plan_files():
            path = task.file.file_path
            assert os.path.exists(path.removeprefix("file://")), f"snapshot {snap.snapshot_id} references {path}, gone"
    rows = table.scan(row_filter=f"run_date = '{iceberg.night(day).isoformat()}'").to_arrow()
    return rows.sort_by("uri") if len(rows) else None


def _night(kind: str, out: OutputConfig, storage, day: dt.date = DAY) -> pa.Table | None:
    if kind == "parquet":
        return _parquet_night(out.uri, storage, day)
    return _iceberg_night(out.iceberg, storage, day)


def _assert_whole(seen: pa.Table | None, rows: pa.Table, run_id: str) -> None:
    assert seen is not None, f"no night where run {run_id}'s was expected"
    assert set(seen["run_id"].to_pylist()) == {run_id}, set(seen["run_id"].to_pylist())
    for column in COMPARED:
        assert seen[column].to_pylist() == rows[column].to_pylist(), column


def _leftovers(kind: str, out: OutputConfig, storage) -> list[str]:
    """What a finished publish must not leave: staging, and in a partition files its manifest does not name
    (Parquet); data files no snapshot references (Iceberg)."""
    if kind == "parquet":
        fs, root = storage.fs(out.uri)
        part = publish.partition_path(root, DAY)
        named = set(publish.read_manifest(fs, part).data_files)
        extra = [p for p in fs.ls(part, detail=False)
                 if p.rsplit("/", 1)[-1] not in named | {publish.MANIFEST, publish.SUCCESS}]
        assert fs.exists(f"{part}/{publish.SUCCESS}"), "no _SUCCESS after the rerun"
        return extra + (fs.find(publish.staging_root(root)) if fs.exists(publish.staging_root(root)) else [])
    table = iceberg.load_table(out.iceberg, storage, create=False)
    referenced = {t.file.file_path.removeprefix("file://") for s in table.metadata.snapshots
                  for t in table.scan(snapshot_id=s.snapshot_id).plan_files()}
    data = f"{table.location().removeprefix('file://')}/data"
    return [p for p in fsspec.filesystem("file").find(data) if p.endswith(".parquet") and p not in referenced]


# ------------------------------------------------------------------ a killed publish, in a forked child


def _publish_in_child(out_json: str, storage_json: str, staged: str, manifest_json: str, spec: str, env: dict) -> None:
    os.environ.update(env)
    os.environ[failpoints.ENV] = spec
    storage = StorageConfig.model_validate_json(storage_json).bind()
    target = output_target(OutputConfig.model_validate_json(out_json), storage)
    manifest = ScoreManifest.model_validate_json(manifest_json)
    publish_or_abandon(target, staged, manifest, manifest.run_date)
    os._exit(0)  # the failpoint did not kill us: the test sees it


@pytest.fixture(scope="module")
def forker():
    """A forkserver with the publish code imported once: a killed child costs a fork, not an interpreter."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["jobs.score.targets", __name__])
    return ctx


def _killed_publish(forker, out: OutputConfig, storage: StorageConfig, staged: str, manifest: ScoreManifest,
                    spec: str) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    child = forker.Process(target=_publish_in_child, args=(out.model_dump_json(), storage.model_dump_json(), staged,
                                                           manifest.model_dump_json(), spec, env))
    child.start()
    child.join(120)
    assert child.exitcode == failpoints.KILLED_EXIT, f"the failpoint did not kill the child (exit {child.exitcode})"


# ------------------------------------------------------------------ the test


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_a_publish_failing_at_any_step_keeps_a_whole_night_and_the_rerun_equals_a_clean_run(clean, forker, case,
                                                                                           monkeypatch):
    kind, spec, expected = case
    storage = clean["storage"].bind()
    rows = clean["rows"]
    out = _output(kind, clean, re.sub(r"[^a-z0-9]+", "_", f"{kind} {spec}").strip("_")[:100])
    monkeypatch.delenv(failpoints.ENV, raising=False)
    monkeypatch.setattr(iceberg.time, "sleep", lambda s: None)  # retries between commit attempts

    target = output_target(out, storage)
    if kind == "iceberg":  # another night in the same table, which no step may touch
        publish_or_abandon(target, *_stage(target, kind, clean, "earlier", rows, EARLIER), EARLIER)
    publish_or_abandon(target, *_stage(target, kind, clean, "old", rows.slice(0, OLD_ROWS)), DAY)

    # the failing run
    target = output_target(out, storage)
    staged, manifest = _stage(target, kind, clean, "new", rows)
    if "kill" in spec:
        _killed_publish(forker, out, clean["storage"], staged, manifest, spec)
    else:
        monkeypatch.setenv(failpoints.ENV, spec)
        resolved_itself = spec in ("iceberg.commit.unknown_after=raise", "iceberg.commit.unknown_before=raise,at=1")
        if resolved_itself:
            publish_or_abandon(target, staged, manifest, DAY)
        else:
            with pytest.raises((failpoints.FailpointError, CommitUnknownError, CommitStateUnknownException)):
                publish_or_abandon(target, staged, manifest, DAY)
        monkeypatch.delenv(failpoints.ENV)

    # (a) what a reader sees right after: one whole night, and no reference to a file that is gone
    seen = _night(kind, out, storage)
    if expected == "old":
        _assert_whole(seen, rows.slice(0, OLD_ROWS), "old")
    else:
        _assert_whole(seen, rows, "new")

    # (b) the rerun of the night (it finds the dead run's leftovers, as the job would, and sweeps them)
    target = output_target(out, storage)
    if kind == "parquet":
        publish.sweep_staging(out.uri, storage, dt.timedelta(hours=24), "rerun", dead=("new",))
    publish_or_abandon(target, *_stage(target, kind, clean, "rerun", rows), DAY)
    _assert_whole(_night(kind, out, storage), rows, "rerun")
    if kind == "iceberg":
        _assert_whole(_night(kind, out, storage, EARLIER), rows, "earlier")
    leftovers = _leftovers(kind, out, storage)
    if kind == "parquet" or expected == "old":
        # Iceberg keeps the files of a commit that may have landed (a snapshot may reference them) for the
        # table's orphan-file cleanup; a Parquet rerun leaves nothing
        keep_ok = kind == "iceberg" and ("unknown" in spec or "staging.delete" in spec or "kill" in spec)
        assert keep_ok or not leftovers, leftovers


@pytest.mark.parametrize("kind,spec", [("parquet", "parquet.manifest.after=raise"), ("iceberg", "iceberg.commit.after=raise")])
def test_the_job_failing_after_its_night_was_switched_keeps_it_and_the_rerun_equals_a_clean_run(clean, kind, spec,
                                                                                              monkeypatch):
    """The whole job, failing once its new night is visible (the manifest written, the commit landed): its
    failure handler must keep the new night's files; the lease is released; the rerun equals a clean run."""
    from jobs.score import run

    storage = clean["storage"].bind()
    rows = clean["rows"]
    out = _output(kind, clean, f"job_{kind}")
    target = output_target(out, storage)
    publish_or_abandon(target, *_stage(target, kind, clean, "old", rows.slice(0, OLD_ROWS)), DAY)
    data = clean["cfg"].model_dump(mode="json")
    data["output"] = out.model_dump(mode="json", exclude_none=True)

    monkeypatch.setenv(failpoints.ENV, spec)
    with pytest.raises(failpoints.FailpointError):
        run(ScoreJobConfig.model_validate({**data, "run_id": "failing"}))
    monkeypatch.delenv(failpoints.ENV)
    _assert_whole(_night(kind, out, storage), rows, "failing")
    leases = f"{out.uri}/_leases" if kind == "parquet" else f"{output_target(out, storage).root}.clipn-leases"
    fs, path = storage.fs(leases)
    assert not fs.exists(path) or not fs.find(path), "the failed run left its lease"

    run(ScoreJobConfig.model_validate({**data, "run_id": "rerun"}))
    _assert_whole(_night(kind, out, storage), rows, "rerun")
    if kind == "parquet":
        assert not _leftovers(kind, out, storage)


def test_a_night_published_before_manifests_named_their_files_is_read_then_replaced_whole(tmp_path, monkeypatch):
    """A partition from before ``data_files``: every file beside its manifest and ``_SUCCESS`` is the night.
    Readers of ours read it; a publish that dies before its switch leaves it whole; the next publish replaces it."""
    storage = StorageConfig().bind()
    root = str(tmp_path / "out")
    part = tmp_path / "out" / f"run_date={DAY}"
    part.mkdir(parents=True)
    old = pa.Table.from_pylist([{"uri": f"s3://b/{i}.jpg", "status": "ok", "run_id": "legacy"} for i in range(3)])
    pq.write_table(old.slice(0, 2), part / "part-a.parquet")
    pq.write_table(old.slice(2), part / "part-b.parquet")
    legacy = ScoreManifest(schema_version=1, run_id="legacy", run_date=DAY, partition=str(part), model_id="m",
                           class_set_hash="h", classes=[], templates=[], rows=3, files=2, by_status={"ok": 3},
                           ood_rate={}, timings_s={}, config={})
    (part / publish.MANIFEST).write_text(legacy.model_dump_json(exclude={"data_files"}))
    (part / publish.SUCCESS).write_text("")

    def night_uris() -> list[str]:
        (found, manifest), = publish.published_nights(root, storage)
        fs = storage.fs(root)[0]
        return sorted(pads.dataset(publish.night_files(fs, found, manifest), format="parquet").to_table()["uri"].to_pylist())

    assert night_uris() == ["s3://b/0.jpg", "s3://b/1.jpg", "s3://b/2.jpg"]
    staged = tmp_path / "out" / "_staging" / "new"
    staged.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"uri": "s3://b/new.jpg", "status": "ok", "run_id": "new"}]),
                   staged / "part-new.parquet")
    new = legacy.model_copy(update={"run_id": "new", "rows": 1, "files": 1})
    monkeypatch.setenv(failpoints.ENV, "parquet.manifest.before=raise")
    with pytest.raises(failpoints.FailpointError):
        publish.publish(root, DAY, str(staged), new, storage)
    assert night_uris() == ["s3://b/0.jpg", "s3://b/1.jpg", "s3://b/2.jpg"]  # the moved-in file is not the night's
    monkeypatch.delenv(failpoints.ENV)
    staged.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"uri": "s3://b/new.jpg", "status": "ok", "run_id": "new"}]),
                   staged / "part-new2.parquet")
    publish.publish(root, DAY, str(staged), new, storage)
    assert night_uris() == ["s3://b/new.jpg"]
    assert sorted(p.name for p in part.iterdir()) == ["_SUCCESS", "_manifest.json", "part-new2.parquet"]


def test_the_failpoint_spec_is_checked():
    with pytest.raises(failpoints.FailpointError, match="unknown failpoint"):
        failpoints.parse("parquet.mvoe.before=raise")
    with pytest.raises(failpoints.FailpointError, match="action"):
        failpoints.parse("parquet.move.before=explode")
    with pytest.raises(failpoints.FailpointError, match="until"):
        failpoints.parse("lease.acquired=pause")
    fp = failpoints.parse("train.step=kill,step=5,rank=1,once=/tmp/m,wait=2")["train.step"]
    assert (fp.action, fp.context, fp.once, fp.wait_s) == ("kill", {"step": "5", "rank": "1"}, "/tmp/m", 2.0)


def test_a_failpoint_fires_where_and_when_its_spec_says(tmp_path, monkeypatch):
    marker = tmp_path / "once"
    monkeypatch.setenv(failpoints.ENV, f"parquet.move.before=raise,at=2;train.step=raise,rank=1,once={marker}")
    failpoints.hit("parquet.move.before")  # first move: carries on
    with pytest.raises(failpoints.FailpointError):
        failpoints.hit("parquet.move.before")
    failpoints.hit("parquet.move.before")  # third: carries on
    failpoints.hit("train.step", step=1, rank=0)  # another rank
    with pytest.raises(failpoints.FailpointError):
        failpoints.hit("train.step", step=1, rank=1)
    failpoints.hit("train.step", step=2, rank=1)  # once: the marker is there now
    assert marker.exists()
    assert failpoints.runtime_env() == {"env_vars": {failpoints.ENV: os.environ[failpoints.ENV]}}
    monkeypatch.delenv(failpoints.ENV)
    assert failpoints.ray_remote_args() == {} and failpoints.runtime_env() == {}
    failpoints.hit("parquet.move.before")  # nothing set: nothing happens


def test_duckdb_reads_a_night_through_its_manifest(tmp_path, clean, forker):
    """A night republished while a killed publish left the next version's files beside it: DuckDB reading the
    files the manifest names sees the night once; a glob of the folder sees both (the publish window)."""
    import duckdb  # in the dev extra: a missing reader must fail the test, not skip it

    storage = StorageConfig().bind()
    out = OutputConfig(uri=str(tmp_path / "out"), run_date=DAY)
    rows = clean["rows"]
    target = output_target(out, storage)
    publish_or_abandon(target, *_stage(target, "parquet", clean, "first", rows), DAY)
    target = output_target(out, storage)
    staged, manifest = _stage(target, "parquet", clean, "second", rows)
    _killed_publish(forker, out, StorageConfig(), staged, manifest,
                    "parquet.manifest.before=kill")
    part = publish.partition_path(str(tmp_path / "out"), DAY)
    con = duckdb.connect()
    con.execute(f"set variable night = (select list('{part}/' || f) from "
                f"(select unnest(data_files) as f from read_json_auto('{part}/_manifest.json')))")
    got = con.execute("select uri, run_id from read_parquet(getvariable('night')) order by uri").fetchall()
    assert got == [(u, "first") for u in rows["uri"].to_pylist()]
    globbed = con.execute(f"select count(*) from read_parquet('{part}/*.parquet')").fetchone()[0]
    assert globbed == 2 * len(rows)  # what a glob reader sees until the rerun
    assert json.loads((tmp_path / "out" / f"run_date={DAY}" / "_manifest.json").read_text())["run_id"] == "first"
