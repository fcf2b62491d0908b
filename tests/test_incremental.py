"""Incremental nights: skip_scored by a skip join, the since watermark, empty nights and the staging sweep."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import types
from pathlib import Path

import pyarrow.dataset as pads
import pytest

import clipn_core as cc
from clipn_core.storage import Storage
from jobs.demo import world
from jobs.score import run
from jobs.score.publish import HEARTBEAT, Heartbeat, staging_path, sweep_staging
from schemas.score_config import ScoreJobConfig

pytestmark = pytest.mark.slow
DAY = dt.date(2026, 11, 10)
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for seed in (1, 2):
        model, spec = cc.build_clipn("clipn-tiny", seed=seed)
        out[seed] = str(root / f"m{seed}.safetensors")
        cc.save_checkpoint(model, spec, out[seed])
    return out


def _lake(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        data = b"broken" if name.startswith("bad") else world.encode(world.render(world.SHAPES[i % 8], "blue", i, 40))
        (root / name).write_bytes(data)


def _cfg(lake: Path, out: Path, ckpt: str, day: dt.date, **extra) -> ScoreJobConfig:
    data = {"input": {"uri": str(lake)}, "output": {"uri": str(out), "run_date": str(day)},
            "model": {"checkpoint": ckpt}, "classes": {"names": CLASSES},
            "runtime": {"batch_size": 8, "decode_batch_size": 8}}
    for key, value in extra.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    return ScoreJobConfig.model_validate(data)


def _uris(partition: str) -> list[str]:
    return sorted(pads.dataset(partition, format="parquet").to_table(columns=["uri"])["uri"].to_pylist())


def scored_set_oracle(out: Path, day: dt.date, model_id: str, class_set_hash: str) -> set[str]:
    """The driver-side set the job used to build (the behaviour the skip join must reproduce exactly), over the
    files each published night's manifest names: URIs scored ok, and (no object of the test is rewritten) those
    that failed permanently."""
    from schemas.status import PERMANENT_STATUSES

    done = set()
    for part in sorted(out.glob("run_date=*")):
        if part.name == f"run_date={day}" or not (part / "_manifest.json").exists():
            continue
        files = [str(part / f) for f in json.loads((part / "_manifest.json").read_text())["data_files"]]
        table = pads.dataset(files, format="parquet").to_table(columns=["uri", "model_id", "class_set_hash", "status"])
        for row in table.to_pylist():
            if (row["model_id"] == model_id and row["class_set_hash"] == class_set_hash
                    and (row["status"] == "ok" or row["status"] in PERMANENT_STATUSES)):
                done.add(row["uri"])
    return done


def test_skip_scored_equals_the_driver_side_set(tmp_path, checkpoints, ray_local):
    lake, out = tmp_path / "lake", tmp_path / "out"
    _lake(lake, [f"a{i}.jpg" for i in range(10)] + ["bad0.jpg"])
    first = run(_cfg(lake, out, checkpoints[1], DAY))
    # another model's night and an unpublished (crashed) night: neither counts as scored
    _lake(lake, [f"b{i}.jpg" for i in range(4)])
    run(_cfg(lake, out, checkpoints[2], DAY + dt.timedelta(days=1)))
    crashed = out / f"run_date={DAY + dt.timedelta(days=2)}"
    run(_cfg(lake, out, checkpoints[1], DAY + dt.timedelta(days=2)))
    (crashed / "_SUCCESS").unlink()  # a first publish that died before its manifest: files, nothing naming them
    (crashed / "_manifest.json").unlink()
    _lake(lake, [f"c{i}.jpg" for i in range(3)])

    night = DAY + dt.timedelta(days=3)
    expected_skip = scored_set_oracle(out, night, first.model_id, first.class_set_hash)
    manifest = run(_cfg(lake, out, checkpoints[1], night, output__skip_scored=True))
    everything = sorted(str(p) for p in lake.iterdir())
    assert _uris(manifest.partition) == sorted(set(everything) - expected_skip)
    # ok and permanently failed rows of the same model only
    assert expected_skip == {str(lake / f"a{i}.jpg") for i in range(10)} | {str(lake / "bad0.jpg")}
    assert manifest.inputs_listed == len(everything) and manifest.skipped_already_scored == len(expected_skip)
    assert manifest.rows == len(everything) - len(expected_skip)


@pytest.mark.parametrize("broadcast_max_rows", [-1, 100], ids=["hash join", "broadcast"])
def test_the_skip_join_counts_what_it_keeps_and_what_it_skips(ray_local, broadcast_max_rows):
    """skip_scored URIs are skipped whatever their time; an overlap night's URIs only when not modified after its
    listing began (a URI in several sources: the latest rule wins); an unknown time is kept; both sides are
    counted where the inputs are marked; the same whether the skip set is broadcast or hash-joined."""
    import pyarrow as pa
    import ray

    from jobs.score.counts import InputCounts
    from jobs.score.counts import totals as count_totals
    from jobs.score.incremental import skip_table, split_skipped

    w = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
    at = [w - dt.timedelta(hours=2), w - dt.timedelta(seconds=1), w, w + dt.timedelta(seconds=1), None, w, w]
    inputs = ray.data.from_arrow(pa.table({"uri": ["scored", "seen", "at", "rewritten", "unknown", "new", "both"],
                                           "modified": pa.array(at, pa.timestamp("us", tz="UTC"))}))
    scored = ray.data.from_arrow(pa.table({"uri": ["scored", "both", "elsewhere"]}))
    held = ray.data.from_arrow(pa.table({"uri": ["seen", "at", "rewritten", "unknown", "both"]}))
    counts = InputCounts.remote()
    table = skip_table(scored, [(held, w.timestamp())], broadcast_max_rows)
    assert table.rows == 8 and (table.blocks is not None) == (broadcast_max_rows >= 8)
    kept = split_skipped(inputs, table, counts)
    assert sorted(r["uri"] for r in kept.take_all()) == ["new", "rewritten", "unknown"]
    assert kept.schema().names == ["uri", "modified"]
    found, _ = count_totals(counts)
    assert (found["kept"], found["skipped"]) == (3, 4)


@pytest.mark.slow
def test_a_row_the_skip_join_loses_is_refused_not_published_as_skipped(tmp_path, checkpoints, ray_local,
                                                                       monkeypatch):
    """The skip count is counted where the join marks rows, not inferred from the rows left: a join that loses a
    row fails the row check and publishes nothing. (The hash join, forced: a broadcast lookup marks each input
    in the task that holds it and has no join to lose one.)"""
    import ray
    from ray.data.expressions import col

    lake, out = tmp_path / "lake", tmp_path / "out"
    _lake(lake, ["a.jpg", "b.jpg", "c.jpg"])
    run(_cfg(lake, out, checkpoints[1], DAY))
    _lake(lake, ["a.jpg", "b.jpg", "c.jpg", "new.jpg"])
    join = ray.data.Dataset.join

    def lossy(self, *args, **kwargs):
        return join(self, *args, **kwargs).filter(expr=col("uri") != str(lake / "new.jpg"))

    monkeypatch.setattr(ray.data.Dataset, "join", lossy)
    night = DAY + dt.timedelta(days=1)
    with pytest.raises(RuntimeError, match="the skip join kept 0 and skipped 3 of 4"):
        run(_cfg(lake, out, checkpoints[1], night, output__skip_scored=True, runtime__skip_broadcast_max_rows=0))
    assert not (out / f"run_date={night}").exists()


def _backdate(paths: list[Path], seconds: float) -> None:
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


def test_since_last_run_excludes_old_objects_and_scores_each_recent_one_once(tmp_path, checkpoints, ray_local):
    """The watermark excludes what is older than the margin; the margin lists recent objects again, and the
    nights that hold them keep them from being scored twice; a night with nothing new publishes empty; a rerun
    of a night sees what it saw."""
    lake, out = tmp_path / "lake", tmp_path / "out"
    hour = dt.timedelta(hours=1)
    _lake(lake, [f"old{i}.jpg" for i in range(4)] + ["recent0.jpg", "recent1.jpg"])
    _backdate([lake / f"old{i}.jpg" for i in range(4)], 2 * 3600)  # older than the default margin (1 h)
    first = run(_cfg(lake, out, checkpoints[1], DAY, input__since="last_run"))
    assert first.rows == 6 and first.since is None and first.watermark is not None

    _lake(lake, ["new0.jpg", "new1.png"])
    second = run(_cfg(lake, out, checkpoints[1], DAY + dt.timedelta(days=1), input__since="last_run"))
    assert _uris(second.partition) == sorted([str(lake / "new0.jpg"), str(lake / "new1.png")])
    assert second.since == first.watermark - hour and second.since_from_run == first.run_id
    assert second.since_overlap_nights == [DAY]
    # old: excluded; recent: listed again (in the margin) but held by the first night; new: scored
    assert (second.excluded_by_watermark, second.inputs_listed, second.skipped_already_scored) == (4, 4, 2)

    # nothing new: an empty, valid, published partition; the recent and new objects are held by earlier nights
    third = run(_cfg(lake, out, checkpoints[1], DAY + dt.timedelta(days=2), input__since="last_run"))
    assert (third.rows, third.excluded_by_watermark, third.skipped_already_scored) == (0, 4, 4)
    assert third.since == second.watermark - hour and third.since_overlap_nights == [DAY, DAY + dt.timedelta(days=1)]
    assert (Path(third.partition) / "_SUCCESS").exists() and (Path(third.partition) / "_manifest.json").exists()
    # a rerun of the second night sees what it saw the first time (the first night's watermark)
    again = run(_cfg(lake, out, checkpoints[1], DAY + dt.timedelta(days=1), input__since="last_run"))
    assert again.since == first.watermark - hour and _uris(again.partition) == _uris(second.partition)


def test_since_last_run_scores_again_an_object_rewritten_after_the_night_that_holds_it(tmp_path, checkpoints,
                                                                                      ray_local):
    """The overlap night holds the object's URI but an older version: a rewrite after its listing began is scored
    again; an unchanged object in the margin is not (it was scored in that very version)."""
    lake, out = tmp_path / "lake", tmp_path / "out"
    _lake(lake, ["kept.jpg", "rewritten.jpg"])
    _backdate([lake / "kept.jpg", lake / "rewritten.jpg"], 600)  # inside the margin: listed again on night 2
    first = run(_cfg(lake, out, checkpoints[1], DAY, input__since="last_run"))
    assert first.rows == 2
    _lake(lake, ["rewritten.jpg", "new.jpg"])  # written again after the first night's listing began
    second = run(_cfg(lake, out, checkpoints[1], DAY + dt.timedelta(days=1), input__since="last_run"))
    assert _uris(second.partition) == sorted([str(lake / "new.jpg"), str(lake / "rewritten.jpg")])
    assert (second.inputs_listed, second.skipped_already_scored, second.since_overlap_nights) == (3, 1, [DAY])


def test_a_driver_clock_hours_ahead_of_the_store_misses_no_object(tmp_path, checkpoints, ray_local, s3_bucket,
                                                                  monkeypatch):
    """The watermark is the store's clock when the listing began (the Date of its first request), so a
    driver whose clock runs three hours ahead still lists, the next night, what was written after."""
    from jobs.score import pipeline
    from jobs.score import store as store_module

    bucket, opts = s3_bucket
    fs = Storage(opts).fs(f"s3://{bucket}")[0]

    def put(names):
        for i, name in enumerate(names):
            fs.pipe_file(f"{bucket}/lake/{name}", world.encode(world.render(world.SHAPES[i % 8], "red", i, 40)))

    class Ahead(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + dt.timedelta(hours=3)

    skewed = types.SimpleNamespace(datetime=Ahead, date=dt.date, time=dt.time, timedelta=dt.timedelta,
                                   timezone=dt.timezone)
    for module in (pipeline, store_module):
        monkeypatch.setattr(module, "dt", skewed)

    def cfg(day):
        return ScoreJobConfig.model_validate({
            "input": {"uri": f"s3://{bucket}/lake", "since": "last_run"},
            "output": {"uri": str(tmp_path / "out"), "run_date": str(day)}, "model": {"checkpoint": checkpoints[1]},
            "classes": {"names": CLASSES}, "storage": {"endpoint_url": opts["client_kwargs"]["endpoint_url"]},
            "runtime": {"batch_size": 8, "decode_batch_size": 8}})

    put(["a.jpg", "b.jpg"])
    first = run(cfg(DAY))
    assert first.watermark < dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1)  # not the driver's clock
    put(["later.jpg"])
    second = run(cfg(DAY + dt.timedelta(days=1)))
    assert second.rows == 1 and _uris(second.partition) == [f"s3://{bucket}/lake/later.jpg"]


def test_the_staging_sweep_removes_dead_runs_and_never_a_live_one(tmp_path, checkpoints, ray_local):
    out = tmp_path / "out"
    storage = Storage({})
    dead, live, legacy = staging_path(str(out), "deadrun"), staging_path(str(out), "liverun"), staging_path(str(out), "oldrun")
    for folder in (dead, live, legacy):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "part-x.parquet").write_bytes(b"staged rows")
    (Path(dead) / HEARTBEAT).write_text("then")
    week_ago = time.time() - 7 * 24 * 3600
    for path in (Path(dead) / HEARTBEAT, Path(dead) / "part-x.parquet", Path(legacy) / "part-x.parquet"):
        os.utime(path, (week_ago, week_ago))
    with Heartbeat(live, storage, every_s=0.05):
        time.sleep(0.2)
        os.utime(Path(live) / "part-x.parquet", (week_ago, week_ago))  # old rows, but the run beats
        removed = sweep_staging(str(out), storage, dt.timedelta(hours=1), live_run_id="current")
    assert sorted(removed) == ["deadrun", "oldrun"]
    assert Path(live).exists() and not Path(dead).exists() and not Path(legacy).exists()
    # the job sweeps at its start, and leaves the young folder of another run alone
    lake = tmp_path / "lake"
    _lake(lake, ["x.jpg"])
    Path(dead).mkdir(parents=True)
    (Path(dead) / HEARTBEAT).write_text("then")
    os.utime(Path(dead) / HEARTBEAT, (week_ago, week_ago))
    run(_cfg(lake, out, checkpoints[1], DAY, output__staging_max_age_h=1.0))
    assert not Path(dead).exists() and Path(live).exists()


def test_a_failed_run_leaves_no_staging_lease_or_partition_behind(tmp_path, checkpoints, ray_local, monkeypatch):
    """A run that fails with its rows staged removes them, and the staging and lease folders it made; the
    empty staging folder of a run killed as it made it, two days ago, is swept too."""
    from jobs import failpoints

    lake, out = tmp_path / "lake", tmp_path / "out"
    _lake(lake, ["x.jpg", "y.jpg"])
    killed = Path(staging_path(str(out), "killed"))
    killed.mkdir(parents=True)
    _backdate([killed], 2 * 86400)
    monkeypatch.setenv(failpoints.ENV, "score.staged=raise")
    with pytest.raises(failpoints.FailpointError):
        run(_cfg(lake, out, checkpoints[1], DAY))
    assert list(out.iterdir()) == []
    fresh = tmp_path / "fresh" / "out"  # folders the failed run made for its lease are gone too
    with pytest.raises(failpoints.FailpointError):
        run(_cfg(lake, fresh, checkpoints[1], DAY))
    assert not fresh.parent.exists()


def test_a_night_builds_a_lake_bank_and_the_next_scores_with_it_whatever_the_order(tmp_path, checkpoints, ray_local):
    from tests.bank_calibration import calibrate, id_sample

    lake, out = tmp_path / "lake", tmp_path / "out"
    _lake(lake, [f"img{i:02d}.jpg" for i in range(48)])
    cache = str(tmp_path / "cache")
    cal = calibrate(checkpoints[1], CLASSES, id_sample(tmp_path / "id", CLASSES), tmp_path / "cal")
    first = run(_cfg(lake, out, checkpoints[1], DAY, output__embeddings=True, output__lake_bank=True,
                     runtime__cache_dir=cache, lake_bank__calibration=cal))
    assert first.lake_bank_built and first.lake_bank_used is None and Path(first.lake_bank_built).exists()
    # the untrained model's ATD is 0.5 on every image and its rule flags them all, ID images too (the calibration
    # says so): no row is evidence of ID or of OOD, so the bank is empty, and its meta (in the manifest) says why
    meta = first.lake_bank_meta
    assert meta["flagged_ood"] == meta["rows"] == 48 and meta["id_proxies"] == meta["ood_proxies"] == 0
    assert meta["id_flag_rate"] == 1.0 and meta["calibration_id"] == json.loads(Path(cal).read_text())["id"]
    assert "left unflagged by ood_atd" in meta["empty"] and "below min_purity" in meta["empty"]
    # a bank of proxies from the night's own embeddings, pinned with negatives.bank: the next night scores with it
    import torch
    import torch.nn.functional as F

    from clipn_core.lake_bank import LakeBank, bank_bytes

    rows = pads.dataset(first.partition, format="parquet").to_table(columns=["uri", "embedding"]).sort_by("uri")
    emb = F.normalize(torch.tensor(rows["embedding"].to_pylist(), dtype=torch.float32), dim=-1)
    pinned = LakeBank(emb[:4], emb[-4:], {})
    bank = tmp_path / "bank.safetensors"
    bank.write_bytes(bank_bytes(pinned))
    second = run(_cfg(lake, out, checkpoints[1], DAY + dt.timedelta(days=1), output__embeddings=True,
                      negatives__bank=str(bank), runtime__cache_dir=cache))
    assert second.lake_bank_used == str(bank) and second.lake_bank_id == pinned.id
    table = pads.dataset(second.partition, format="parquet").to_table().to_pylist()
    lake_scores = {r["uri"]: r["score_clipn_neg_lake"] for r in table}
    assert any(r["score_clipn_neg_lake"] != r["score_clipn_neg"] for r in table)  # the bank moved the score
    # the same bank, another partitioning and the reverse input order: the same score for every row
    manifest = tmp_path / "reversed.csv"
    manifest.write_text("uri\n" + "\n".join(sorted(lake_scores, reverse=True)) + "\n")
    other = run(ScoreJobConfig.model_validate({
        "input": {"kind": "manifest", "uri": str(manifest)}, "output": {"uri": str(tmp_path / "out2")},
        "model": {"checkpoint": checkpoints[1]}, "classes": {"names": CLASSES},
        "negatives": {"bank": str(bank)},
        "runtime": {"batch_size": 3, "decode_batch_size": 5, "cache_dir": cache}}))
    again = {r["uri"]: r["score_clipn_neg_lake"] for r in pads.dataset(other.partition, format="parquet").to_table().to_pylist()}
    assert other.lake_bank_id == second.lake_bank_id
    assert again.keys() == lake_scores.keys()
    for uri, value in lake_scores.items():
        assert again[uri] == pytest.approx(value, rel=1e-5, abs=1e-6), uri
