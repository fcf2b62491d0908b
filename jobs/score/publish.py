"""Publish: the output layout, staging, the staged rows' statistics and the atomic-as-possible publish.

``<root>/run_date=YYYY-MM-DD/part-*.parquet`` + ``_manifest.json`` + ``_SUCCESS`` (last).
A run writes under ``<root>/_staging/<run_id>/`` (ignored by pyarrow, Spark and
DuckDB globs because of the leading underscore) and only then replaces the partition:
remove the old ``_SUCCESS``, remove the old files, move the staged files in, write the
manifest, write ``_SUCCESS``. Ray's writer appends; this is what makes reruns
idempotent and failed runs invisible.

A live run refreshes ``_staging/<run_id>/_heartbeat`` every minute (:class:`Heartbeat`);
a driver killed mid-run leaves its staging folder behind, and the next run's
:func:`sweep_staging` deletes staging folders whose heartbeat is older than
``output.staging_max_age_h``, never a live one.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter

import pyarrow.compute as pc
import pyarrow.dataset as pads
from ray.data.datasource import FilenameProvider

from clipn_core.storage import Storage
from schemas.manifest import ScoreManifest
from schemas.status import STATUS_OK

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
HEARTBEAT = "_heartbeat"
HEARTBEAT_EVERY_S = 60.0
log = logging.getLogger("clipn.score")


def partition_path(root: str, run_date: dt.date) -> str:
    return f"{root.rstrip('/')}/run_date={run_date.isoformat()}"


def staging_root(root: str) -> str:
    return f"{root.rstrip('/')}/_staging"


def staging_path(root: str, run_id: str) -> str:
    return f"{staging_root(root)}/{run_id}"


class PartFilenames(FilenameProvider):
    """``part-<write>-<task>.parquet`` names, unique per write so reruns never collide."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.parquet"


def staged_stats(staged: str, storage: Storage) -> dict:
    """Counts by status and OOD rates of the staged files, streamed column batches (bounded memory)."""
    from clipn_core.scores import (
        SCORES,  # not at module level: write workers unpickle PartFilenames from here
    )
    from schemas.output import OUTPUT_SCHEMA, ood_column

    fs, path = storage.fs(staged)
    flags = ["is_ood"] + [ood_column(n) for n, s in SCORES.items() if s.threshold_free]
    if not fs.exists(path):  # every input skipped: Ray wrote no file
        return {"rows": 0, "files": 0, "by_status": {}, "ood_rate": {f: None for f in flags}}
    dataset = pads.dataset(path, filesystem=storage.arrow(staged)[0], format="parquet", schema=OUTPUT_SCHEMA)
    status: Counter = Counter()
    flagged: Counter = Counter()
    files = 0
    for frag in dataset.get_fragments():
        files += 1
        for batch in frag.to_batches(columns=["status", *flags]):
            counts = pc.value_counts(batch.column("status"))
            status.update({v["values"]: v["counts"] for v in counts.to_pylist()})
            for f in flags:
                flagged[f] += pc.sum(batch.column(f)).as_py() or 0
    ok = status.get(STATUS_OK, 0)
    return {
        "rows": sum(status.values()),
        "files": files,
        "by_status": dict(sorted(status.items())),
        "ood_rate": {f: (flagged[f] / ok if ok else None) for f in flags},
    }


def publish(root: str, run_date: dt.date, staged: str, manifest: ScoreManifest, storage: Storage) -> str:
    """Replace the run_date partition with the staged files; manifest then _SUCCESS last. Returns the partition URI."""
    fs, final = storage.fs(partition_path(root, run_date))
    _, staged_p = storage.fs(staged)
    if fs.exists(f"{final}/{SUCCESS}"):
        fs.rm(f"{final}/{SUCCESS}")
    if fs.exists(final):
        fs.rm(final, recursive=True)
    fs.makedirs(final, exist_ok=True)
    staged_files = sorted(fs.find(staged_p)) if fs.exists(staged_p) else []  # none when every input was skipped
    for src in staged_files:
        if src.endswith(".parquet"):
            fs.mv(src, f"{final}/{src.rsplit('/', 1)[-1]}")
    fs.pipe_file(f"{final}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())
    fs.pipe_file(f"{final}/{SUCCESS}", b"")
    storage.remove_tree(staged)
    return partition_path(root, run_date)



class Heartbeat:
    """Context manager: writes ``<staged>/_heartbeat`` now and every ``every_s`` seconds until exit, so that
    :func:`sweep_staging` can tell a live run's staging from a dead one's (the object's own modification
    time, the store's clock, is what counts)."""

    def __init__(self, staged: str, storage: Storage, every_s: float = HEARTBEAT_EVERY_S):
        self.uri, self.storage, self.every_s = f"{staged}/{HEARTBEAT}", storage, every_s
        self._stop = threading.Event()

    def _beat(self) -> None:
        self.storage.write_bytes(self.uri, dt.datetime.now(dt.timezone.utc).isoformat().encode())

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._beat()
            except Exception as e:  # noqa: BLE001 - a missed beat only makes the sweep more careful next time
                log.warning("could not refresh %s: %s", self.uri, e)

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread = threading.Thread(target=self._run, name="staging-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _last_sign_of_life(fs, folder: str) -> dt.datetime | None:
    """The heartbeat's modification time, or (staging from before heartbeats) the newest file's; None if empty."""
    times = []
    for info in fs.find(folder, detail=True).values():
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
        if mtime is None:
            continue
        if not isinstance(mtime, dt.datetime):
            mtime = dt.datetime.fromtimestamp(float(mtime), dt.timezone.utc)
        if info["name"].rstrip("/").endswith(f"/{HEARTBEAT}"):
            return mtime
        times.append(mtime)
    return max(times) if times else None


def sweep_staging(root: str, storage: Storage, max_age: dt.timedelta, live_run_id: str) -> list[str]:
    """Delete ``<root>/_staging/<run>/`` folders of dead runs (no sign of life for ``max_age``); returns the
    run ids removed. The current run's folder and any folder whose heartbeat is recent are left alone."""
    fs, path = storage.fs(staging_root(root))
    if not fs.exists(path):
        return []
    now = dt.datetime.now(dt.timezone.utc)
    removed = []
    for folder in fs.ls(path, detail=False):
        run_id = folder.rstrip("/").rsplit("/", 1)[-1]
        if run_id == live_run_id:
            continue
        seen = _last_sign_of_life(fs, folder)
        if seen is None or now - seen < max_age:  # alive, or a folder being created this instant
            continue
        fs.rm(folder, recursive=True)
        removed.append(run_id)
        log.info("removed the staging of dead run %s (last sign of life %s)", run_id, seen.isoformat())
    return removed

