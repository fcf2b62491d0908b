"""Resume: a driver killed after some write tasks committed; the same command again keeps their rows, scores the
rest, and publishes what a clean run publishes (jobs.score.resume)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.demo.world import World
from jobs.failpoints import ENV as FAILPOINTS_ENV
from jobs.score import resume
from schemas.score_config import ScoreJobConfig

DAY = dt.date(2026, 11, 24)
N_IMAGES = 40
FOLDERS = 5
COMPARED = ["uri", "status", "predicted_class", "score_ctw", "score_atd", "score_mcm", "ood_ctw", "ood_atd", "is_ood"]


def _cfg(lake: str, out: str, **output) -> ScoreJobConfig:
    return ScoreJobConfig.model_validate({
        "input": {"kind": "prefix", "uri": lake},
        "output": {"uri": out, "run_date": str(DAY), "resume": True, **output},
        "model": {"architecture": "clipn-tiny", "seed": 3}, "classes": {"names": list(World().id_shapes)},
        "templates": "world", "negatives": {"enabled": False},
        # the session's Ray has 2 CPUs: the scorer takes half of one, so a resumed run has room for Ray's
        # checkpoint filter actor (one CPU) and a read task
        "runtime": {"batch_size": 4, "decode_batch_size": 4, "cpus_per_actor": 0.5},
    })


def _published(out: Path):
    part = out / f"run_date={DAY}"
    return pq.read_table(part).sort_by("uri")


def _committed(out: Path) -> list[Path]:
    """The committed checkpoint files of the run staging under ``out`` (Ray renames a write's pending file once its
    rows file is written)."""
    return [p for p in out.glob(f"_staging/*/{resume.CHECKPOINT}/*.parquet") if not p.name.endswith(".pending.parquet")]


# ------------------------------------------------------------------ the staging key (no Ray)


def test_the_staging_key_is_the_command_not_the_run(tmp_path):
    cfg = _cfg("/lake", str(tmp_path / "out"))
    key = resume.staging_key(cfg, DAY, "model", "classes")
    same = _cfg("/lake", str(tmp_path / "out"), take_over_lease="dead").model_copy(update={"run_id": "another"})
    assert resume.staging_key(same, DAY, "model", "classes") == key  # names of runs are not the command
    assert key.startswith(resume.KEY_PREFIX)
    others = [
        resume.staging_key(cfg, DAY + dt.timedelta(days=1), "model", "classes"),  # another night
        resume.staging_key(cfg, DAY, "model2", "classes"),  # a checkpoint changed in place
        resume.staging_key(cfg, DAY, "model", "classes2"),
        resume.staging_key(_cfg("/lake2", str(tmp_path / "out")), DAY, "model", "classes"),
        resume.staging_key(cfg.model_copy(update={"decision": cfg.decision.model_copy(update={"threshold": 0.9})}),
                           DAY, "model", "classes"),
    ]
    assert key not in others and len(set(others)) == len(others)


@pytest.mark.parametrize(("change", "why"), [
    ({"output": {"resume": False}}, "output.resume is off"),
    ({"input": {"kind": "tar"}}, "input.kind tar"),
    ({"input": {"kind": "manifest", "uri": "/lake/m.csv"}}, "input.kind manifest"),
])
def test_what_cannot_resume_says_why(tmp_path, change, why):
    data = _cfg("/lake", str(tmp_path / "out")).model_dump(mode="json")
    for section, values in change.items():
        data[section].update(values)
    assert why in resume.resumable(ScoreJobConfig.model_validate(data), hash_join=False)
    assert resume.resumable(_cfg("/lake", str(tmp_path / "out")), hash_join=False) is None
    assert "hash join" in resume.resumable(_cfg("/lake", str(tmp_path / "out")), hash_join=True)
    assert "needs 2" in resume.resumable(_cfg("/lake", str(tmp_path / "out")), hash_join=False, cluster_cpus=1.5)
    assert resume.resumable(_cfg("/lake", str(tmp_path / "out")), hash_join=False, cluster_cpus=2) is None


# ------------------------------------------------------------------ a killed driver, then the same command


@pytest.fixture(scope="module")
def lake(ray_local, tmp_path_factory) -> Path:
    # in folders, as a lake's date or shard prefixes are: a resumable run lists one block per folder page, and
    # each block is one write task, so a killed run leaves some of them committed
    root = tmp_path_factory.mktemp("resume") / "lake"
    for i in range(FOLDERS):
        World(seed=7 + i).write_lake(str(root / f"shard={i}"), N_IMAGES // FOLDERS)
    return root


def test_a_killed_driver_resumes_with_the_same_command_and_publishes_a_clean_runs_rows(lake, tmp_path, ray_local,
                                                                                       caplog):
    from jobs.score import run

    clean = run(_cfg(str(lake), str(tmp_path / "clean")))
    assert clean.resumed_rows == 0
    baseline = _published(tmp_path / "clean")

    out = tmp_path / "out"
    cfg_file = tmp_path / "score.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(str(lake), str(out)).model_copy(update={"run_id": "killed"})
                                       .model_dump(mode="json", exclude_none=True)))
    # the scorer stops at its 7th batch (never released): the 6 before it reach the writes, then the driver dies
    never = tmp_path / "never"
    env = {**os.environ, FAILPOINTS_ENV: f"score.scorer.batch=pause,at=7,until={never}",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "score", "--config", str(cfg_file)], env=env,
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(_committed(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no cleanup, no finally, its lease and staging stay behind
    killed_at = dt.datetime.now(dt.timezone.utc)
    _, err = proc.communicate(timeout=60)
    committed = _committed(out)
    assert len(committed) >= 2, err[-3000:]
    assert not (out / f"run_date={DAY}").exists()  # nothing published

    # the same command; take_over_lease names the dead run (its heartbeat is fresh) and is not part of the command
    from tests.test_reliability import _taking_over

    with caplog.at_level(logging.INFO, logger="clipn.score"):
        resumed = run(_taking_over(_cfg(str(lake), str(out)), "killed"))
    assert "committed ids loaded" in caplog.text  # by the driver-side loader, not Ray's own
    table = _published(out)
    assert table.select(COMPARED).to_pylist() == baseline.select(COMPARED).to_pylist()
    for col in ("score_ctw", "score_atd", "score_mcm"):
        np.testing.assert_array_equal(table[col].to_numpy(zero_copy_only=False),
                                      baseline[col].to_numpy(zero_copy_only=False))
    # the dead run's rows were kept, not scored again: they carry its run id, and the manifest counts them
    run_ids = table["run_id"].to_pylist()
    assert resumed.rows == N_IMAGES and 0 < resumed.resumed_rows < N_IMAGES
    assert run_ids.count("killed") == resumed.resumed_rows
    assert run_ids.count(resumed.run_id) == N_IMAGES - resumed.resumed_rows
    # the night's aggregates count the published rows, not the checkpoint's files beside the staged ones
    assert resumed.aggregates.rows == N_IMAGES and resumed.aggregates.by_status == resumed.by_status
    assert not (out / "_staging").exists() and not (out / "_leases").exists()  # publish removed the checkpoint too
    # the night's watermark is when the dead run began its listing: the kept rows were read after it, so an
    # object changed since then is listed again by the next since night
    assert resumed.watermark < killed_at


def test_a_changed_command_does_not_resume_another_commands_half_work(lake, tmp_path, ray_local):
    """A dead run's staging is another command's: a run with another config scores everything itself."""
    from jobs.score import publish, run

    out = tmp_path / "out"
    dead_cfg = _cfg(str(lake), str(out))
    # what a dead run of dead_cfg left: a committed write of half the lake (its real rows, from a clean run)
    run(_cfg(str(lake), str(tmp_path / "clean")))
    rows = _published(tmp_path / "clean").slice(0, N_IMAGES // 2)
    from jobs.scoring_setup import prepare

    setup, _ = prepare(dead_cfg.model, dead_cfg.classes, dead_cfg.templates, dead_cfg.runtime,
                       dead_cfg.storage.bind(), dead_cfg.negatives)
    key = resume.staging_key(dead_cfg, DAY, setup.model_id, setup.heads.class_set_hash)
    staged = Path(publish.staging_path(str(out), key))
    (staged / resume.ROWS).mkdir(parents=True)
    (staged / resume.CHECKPOINT).mkdir()
    pq.write_table(rows, staged / resume.ROWS / "part-dead-000000.parquet")
    pq.write_table(rows.select(["uri"]), staged / resume.CHECKPOINT / "part-dead-000000.parquet")

    other = _cfg(str(lake), str(out)).model_dump(mode="json")
    other["output"]["embeddings"] = True  # another output: another command
    manifest = run(ScoreJobConfig.model_validate(other))
    assert manifest.resumed_rows == 0 and manifest.rows == N_IMAGES
    assert staged.exists()  # left to the sweep (output.staging_max_age_h), never published by another command

    again = run(dead_cfg)  # the dead run's own command resumes it
    assert again.resumed_rows == N_IMAGES // 2 and again.rows == N_IMAGES
    assert not staged.exists()


def test_the_first_runs_listing_time_is_the_nights_watermark(tmp_path):
    from clipn_core.storage import Storage

    staged = resume.prepare(str(tmp_path / "staged"), Storage())
    first = dt.datetime(2026, 11, 24, 1, 0, tzinfo=dt.timezone.utc)
    assert staged.first_listing(Storage(), first) == first
    assert staged.first_listing(Storage(), first + dt.timedelta(hours=2)) == first  # the rerun lists later
    assert staged.first_listing(Storage(), first - dt.timedelta(hours=1)) == first - dt.timedelta(hours=1)


def test_a_resumable_run_lists_one_block_per_folder_page(lake, ray_local):
    """Ray's checkpoint filter runs one actor task per block after the listing: a resumable run's listing yields a
    block per page, not Ray's default split of each listing task into many blocks of a few URIs (a resumed run
    of 1,500 images was 2.7x slower than a full run with them)."""
    from jobs.score.read import input_dataset

    cfg = _cfg(str(lake), "/unused")
    paged = input_dataset(cfg.input, cfg.storage.bind(), page_blocks=True).dataset.materialize()
    ranges = FOLDERS + 1  # a listing range per folder and one for the (empty) top level
    assert paged.num_blocks() <= ranges and paged.count() == N_IMAGES
    split = input_dataset(cfg.input, cfg.storage.bind()).dataset.materialize()
    assert split.num_blocks() > 2 * ranges and split.count() == N_IMAGES


def test_a_since_night_with_nothing_to_retry_can_resume(lake, tmp_path, ray_local, caplog):
    """Under ``since: last_run`` every night after the first has earlier nights, but only transient failures to
    add back turn Ray's checkpoint filter off: a night without any must still be resumable."""
    from jobs.score import run

    def since_cfg(day: dt.date) -> ScoreJobConfig:
        data = _cfg(str(lake), str(tmp_path / "out"), run_date=str(day)).model_dump(mode="json")
        data["input"]["since"] = "last_run"
        return ScoreJobConfig.model_validate(data)

    first = run(since_cfg(DAY))
    assert first.by_status == {"ok": N_IMAGES}  # nothing failed: nothing to retry on the next night
    caplog.set_level(logging.INFO, logger="clipn.score")
    run(since_cfg(DAY + dt.timedelta(days=1)))
    assert not [r.message for r in caplog.records if "cannot resume" in r.message]


# ------------------------------------------------------------------ the checkpoint's ids, loaded on the driver

# URIs whose str order and UTF-8 byte order must agree: Ray's filter binary-searches Python strs in the sorted ids
_IDS = ["s3://b/Z.png", "s3://b/a.png", "s3://b/é.png", "s3://b/日本.png", "s3://b/z.png"]


def _checkpoint_with_an_unfinished_write(staged: Path) -> tuple[Path, Path]:
    """Two committed writes and one killed between its pending checkpoint and its rename; returns the dead write's
    rows file and pending file."""
    import pyarrow as pa

    rows, ckpt = staged / resume.ROWS, staged / resume.CHECKPOINT
    rows.mkdir(parents=True)
    ckpt.mkdir()
    for name, ids in (("part-a-000000", _IDS[3:]), ("part-a-000001", _IDS[:3])):
        pq.write_table(pa.table({"uri": ids}), ckpt / f"{name}.parquet")
        pq.write_table(pa.table({"uri": ids}), rows / f"{name}.parquet")
    pq.write_table(pa.table({"uri": ["s3://b/dead.png"]}), ckpt / "part-a-000002.pending.parquet")
    pq.write_table(pa.table({"uri": ["s3://b/dead.png"]}), rows / "part-a-000002.parquet")
    return rows / "part-a-000002.parquet", ckpt / "part-a-000002.pending.parquet"


def test_the_driver_loads_committed_ids_sorted_and_removes_an_unfinished_writes_rows(tmp_path):
    import pyarrow.fs as pafs

    from jobs.score.checkpoint_ids import committed_ids, remove_pending

    staged = tmp_path / "staged"
    dead_rows, pending = _checkpoint_with_an_unfinished_write(staged)
    fs = pafs.LocalFileSystem()
    ckpt, rows = str(staged / resume.CHECKPOINT), str(staged / resume.ROWS)
    assert remove_pending(fs, ckpt, fs, rows) == 1
    assert not dead_rows.exists() and not pending.exists()  # two-phase commit: its rows are not kept
    assert sorted(p.name for p in (staged / resume.ROWS).iterdir()) == ["part-a-000000.parquet", "part-a-000001.parquet"]
    assert committed_ids(fs, ckpt, "uri").to_pylist() == sorted(_IDS)  # Python's order, the pending file's id absent
    assert remove_pending(fs, ckpt, fs, rows) == 0
    assert committed_ids(fs, str(tmp_path / "none"), "uri") is None


def test_a_write_that_committed_then_ran_again_and_died_is_scored_again(tmp_path):
    """A committed checkpoint beside a pending one of the same name (the task committed, its worker died, Ray ran it
    again and the driver died during that run): its rows file may be half rewritten, so its ids are not committed."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from jobs.score.checkpoint_ids import committed_ids, remove_pending

    staged = tmp_path / "staged"
    _checkpoint_with_an_unfinished_write(staged)
    ckpt, rows = staged / resume.CHECKPOINT, staged / resume.ROWS
    pq.write_table(pa.table({"uri": _IDS[:3]}), ckpt / "part-a-000001.pending.parquet")  # the rerun of write 1
    fs = pafs.LocalFileSystem()
    assert remove_pending(fs, str(ckpt), fs, str(rows)) == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["part-a-000000.parquet"]
    assert sorted(p.name for p in rows.iterdir()) == ["part-a-000000.parquet"]
    assert committed_ids(fs, str(ckpt), "uri").to_pylist() == sorted(_IDS[3:])


def test_a_checkpoint_file_without_ids_is_an_error_naming_the_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs

    from clipn_core.errors import StorageError
    from jobs.score.checkpoint_ids import committed_ids

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    pq.write_table(pa.table({"uri": _IDS}), ckpt / "part-a-000000.parquet")
    pq.write_table(pa.table({"other": ["x"]}), ckpt / "part-a-000001.parquet")  # read with the first file's schema
    with pytest.raises(StorageError, match=f"{ckpt}.*1 null 'uri'"):
        committed_ids(pafs.LocalFileSystem(), str(ckpt), "uri")


def test_rays_filter_drops_the_committed_ids_the_driver_loaded(tmp_path, ray_local):
    """Through Ray's own interfaces: the manager Ray plans the write with, and Ray's filter fed by its result; and
    the same ids and the same files left as Ray's own manager gives on a copy of the folder."""
    import shutil

    import pyarrow as pa
    from ray.data.checkpoint import CheckpointConfig, NumpyArrayBasedCheckpointFilter
    from ray.data.checkpoint.checkpoint_filter import IdColumnCheckpointManager
    from ray.data.context import DataContext

    from clipn_core.storage import Storage

    staged = tmp_path / "staged"
    dead_rows, _ = _checkpoint_with_an_unfinished_write(staged)
    shutil.copytree(staged, tmp_path / "rays")
    config = resume.prepare(str(staged), Storage()).checkpoint
    manager = config.checkpoint_manager_cls(checkpoint_config=config, data_context=DataContext.get_current())
    ref, size = manager.load_checkpoint(str(staged / resume.ROWS), config.filesystem)
    assert not dead_rows.exists() and size > 0

    rays_config = CheckpointConfig(resume.ID_COLUMN, str(tmp_path / "rays" / resume.CHECKPOINT),
                                   delete_checkpoint_on_success=False)
    rays = IdColumnCheckpointManager(checkpoint_config=rays_config, data_context=DataContext.get_current())
    rays_ref, _ = rays.load_checkpoint(str(tmp_path / "rays" / resume.ROWS), rays_config.filesystem)
    assert ray_local.get(ref).tolist() == ray_local.get(rays_ref).tolist() == sorted(_IDS)
    for folder in (resume.ROWS, resume.CHECKPOINT):
        assert sorted(p.name for p in (staged / folder).iterdir()) == \
            sorted(p.name for p in (tmp_path / "rays" / folder).iterdir())
    listed = pa.table({"uri": ["s3://b/new.png", *_IDS, "s3://b/dead.png"]})
    kept = NumpyArrayBasedCheckpointFilter(config, ref).filter_rows_for_block(listed)
    assert kept["uri"].to_pylist() == ["s3://b/new.png", "s3://b/dead.png"]  # the dead write's URI is scored again
