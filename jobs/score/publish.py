"""Publish: the Parquet folder's layout, staging, the staged rows' statistics, and a publish that never
loses a night.

``<root>/run_date=YYYY-MM-DD/part-*.parquet`` + ``_manifest.json`` + ``_SUCCESS``. A run writes
under ``<root>/_staging/<run_id>/`` (ignored by pyarrow, Spark and DuckDB globs because of the
leading underscore), then publishes:

1. remove ``_SUCCESS`` (the partition is about to change);
2. move the staged files in beside the old night's (names are unique per write, so nothing is
   overwritten);
3. write ``_manifest.json`` naming the new files (``data_files``), in one atomic write: **the
   switch**. Before it the manifest names the old night's files, after it the new night's, and
   every file it names exists;
4. delete the files the manifest does not name (the old night's), then write ``_SUCCESS``.

Readers of ours (:func:`published_nights`, :func:`night_files`: ``skip_scored``, ``since``, the
lake bank) read only the files the manifest names, so they see the old night or the new one,
whole, whatever step fails. A failed publish removes what it moved in but the manifest does not
name (:func:`reconcile`); a killed one leaves that to the next publish of the night. A reader
that globs the folder sees old and new files together between steps 2 and 4 (the publish
window), and a partition without ``_SUCCESS`` while a publish runs or after one was killed.

A live run refreshes ``_staging/<run_id>/_heartbeat`` every minute (:class:`Heartbeat`);
a driver killed mid-run leaves its staging folder behind, and the next run's
:func:`sweep_staging` deletes staging folders whose heartbeat is older than
``output.staging_max_age_h``, never a live one.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter

import pyarrow.compute as pc
import pyarrow.dataset as pads
from ray.data.datasource import FilenameProvider

from clipn_core.errors import redact_uri
from clipn_core.storage import Storage
from jobs.failpoints import around
from jobs.score import lease, store
from schemas.manifest import ScoreManifest
from schemas.status import STATUS_OK

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
HEARTBEAT = "_heartbeat"
HEARTBEAT_EVERY_S = lease.HEARTBEAT_EVERY_S
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


def read_manifest(fs, partition: str) -> ScoreManifest | None:
    """The ``_manifest.json`` of a partition folder (a path without protocol on ``fs``), or None if it has none."""
    try:
        raw = fs.cat_file(f"{partition}/{MANIFEST}")
    except FileNotFoundError:
        return None
    return ScoreManifest.model_validate_json(raw)


def published_nights(root: str, storage: Storage, exclude: dt.date | None = None) -> list[tuple[str, ScoreManifest]]:
    """(partition path without protocol, manifest) of every published night under ``root`` but ``exclude``'s,
    by date: one listing of the root and one manifest read per night.

    A night is published when its manifest names its files; a manifest from before manifests named them
    counts only beside ``_SUCCESS`` (its publish then replaced the whole folder)."""
    fs, path = storage.fs(root)
    if not fs.exists(path):
        return []
    nights = []
    for part in sorted(fs.ls(path, detail=False)):
        name = part.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("run_date=") or (exclude and name == f"run_date={exclude.isoformat()}"):
            continue
        manifest = read_manifest(fs, part)
        if manifest is None or (manifest.data_files is None and not fs.exists(f"{part}/{SUCCESS}")):
            continue  # never published, or by a publish that did not finish: not trusted
        nights.append((part.rstrip("/"), manifest))
    return nights


def night_files(fs, partition: str, manifest: ScoreManifest) -> list[str]:
    """Paths of the files of the night ``manifest`` describes: the ones it names (every ``.parquet`` file of
    the folder for a manifest from before manifests named them)."""
    if manifest.data_files is not None:
        return [f"{partition}/{name}" for name in manifest.data_files]
    return sorted(p for p in fs.ls(partition, detail=False) if p.endswith(".parquet"))


def reconcile(root: str, run_date: dt.date, storage: Storage, success: bool = True) -> None:
    """Make a partition folder what its manifest says: delete the files it does not name (the previous
    night's after a switch, what a failed or killed publish moved in before one), then write ``_SUCCESS``
    when ``success`` and every named file is there. Never deletes a named file; deletes nothing when the
    manifest cannot be read (the error propagates). Call it only while holding the night's lease."""
    fs, part = storage.fs(partition_path(root, run_date))
    manifest = read_manifest(fs, part)
    present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(part, detail=False)} if fs.exists(part) else set()
    data = {n for n in present if n.endswith(".parquet")}
    if manifest is not None and manifest.data_files is None:
        if not fs.exists(f"{part}/{SUCCESS}"):
            manifest = None  # an older publish that never finished: nothing here was published
        else:  # every file here is that night's: name them, so that what moves in next is told apart
            manifest = manifest.model_copy(update={"data_files": sorted(data)})
            store.put(storage, f"{partition_path(root, run_date)}/{MANIFEST}",
                      manifest.model_dump_json(indent=2).encode())
    named = set(manifest.data_files) if manifest is not None else set()
    temporary = {n for n in present if n.startswith(f"{MANIFEST}.")}  # a local manifest write cut short
    for name in sorted((data - named) | temporary):
        with around("parquet.delete_old"):
            fs.rm(f"{part}/{name}")
    if manifest is None:
        if SUCCESS in present:
            fs.rm(f"{part}/{SUCCESS}")
        lease.remove_empty_folder(fs, part)
        return
    missing = named - data
    if missing:
        log.error("the manifest of %s names files that are gone: %s; rerun the night", redact_uri(part), sorted(missing))
        return
    if success and SUCCESS not in present:
        with around("parquet.success"):
            fs.pipe_file(f"{part}/{SUCCESS}", b"")


def publish(root: str, run_date: dt.date, staged: str, manifest: ScoreManifest, storage: Storage) -> ScoreManifest:
    """Make the staged files the run_date partition (module docstring) and remove the staging; returns the
    manifest as published (``data_files`` set). Call it only while holding the night's lease."""
    fs, part = storage.fs(partition_path(root, run_date))
    _, staged_p = storage.fs(staged)
    reconcile(root, run_date, storage, success=False)  # a killed publish of this night left files: they go first
    sources = staged_files(fs, staged_p)
    published = manifest.model_copy(update={"data_files": [p.rsplit("/", 1)[-1] for p in sources]})
    if fs.exists(f"{part}/{SUCCESS}"):
        with around("parquet.success_delete"):
            fs.rm(f"{part}/{SUCCESS}")
    fs.makedirs(part, exist_ok=True)
    for src, name in zip(sources, published.data_files):
        with around("parquet.move"):
            fs.mv(src, f"{part}/{name}")
    with around("parquet.manifest"):
        store.put(storage, f"{partition_path(root, run_date)}/{MANIFEST}", published.model_dump_json(indent=2).encode())
    reconcile(root, run_date, storage)
    remove_staging(staged, storage)
    return published


def staged_files(fs, staged_p: str) -> list[str]:
    """The staged rows files (paths without protocol), sorted; not what a ``_``-named folder holds (a resumable
    run's ``_checkpoint``: :mod:`jobs.score.resume`), which pyarrow's discovery and readers skip too."""
    if not fs.exists(staged_p):
        return []
    root = staged_p.rstrip("/")
    return sorted(p for p in fs.find(staged_p) if p.endswith(".parquet") and "/_" not in p[len(root):])


def remove_staging(staged: str, storage: Storage) -> None:
    """Delete a run's staged files, and the staging folder's parent if that leaves it empty (local folders)."""
    fs, path = storage.fs(staged)
    with around("staging.delete"):
        if fs.exists(path):
            fs.rm(path, recursive=True)
    lease.remove_empty_folder(fs, path.rstrip("/").rsplit("/", 1)[0])


class Heartbeat(lease.Heartbeat):
    """Context manager: writes ``<staged>/_heartbeat`` now and every ``every_s`` seconds until exit, so that
    :func:`sweep_staging` can tell a live run's staging from a dead one's (the object's own modification
    time, the store's clock, is what counts)."""

    def __init__(self, staged: str, storage: Storage, every_s: float = HEARTBEAT_EVERY_S):
        uri = f"{staged}/{HEARTBEAT}"
        super().__init__(lambda: storage.write_bytes(uri, dt.datetime.now(dt.timezone.utc).isoformat().encode()),
                         every_s, uri)


def _mtime(info: dict) -> dt.datetime | None:
    mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
    if mtime is None or isinstance(mtime, dt.datetime):
        return mtime
    return dt.datetime.fromtimestamp(float(mtime), dt.timezone.utc)


def _last_sign_of_life(fs, folder: str) -> dt.datetime | None:
    """The heartbeat's modification time, or (staging from before heartbeats) the newest file's, or for an empty
    folder (a run killed as it made it) the folder's own; None when the store keeps no time for it."""
    times = []
    for info in fs.find(folder, detail=True).values():
        mtime = _mtime(info)
        if mtime is None:
            continue
        if info["name"].rstrip("/").endswith(f"/{HEARTBEAT}"):
            return mtime
        times.append(mtime)
    return max(times) if times else _mtime(fs.info(folder))


def sweep_staging(root: str, storage: Storage, max_age: dt.timedelta, live_run_id: str,
                  dead: tuple[str, ...] = ()) -> list[str]:
    """Delete ``<root>/_staging/<run>/`` folders of dead runs: no sign of life for ``max_age`` on the store's
    clock, or a run in ``dead`` (whose lease this run broke); returns the run ids removed, and removes the
    ``_staging`` folder itself once empty. The current run's folder and any folder whose heartbeat is recent
    are left alone."""
    fs, path = storage.fs(staging_root(root))
    if not fs.exists(path):
        return []
    now = store.store_now(storage, staging_root(root))
    removed = []
    for folder in fs.ls(path, detail=False):
        run_id = folder.rstrip("/").rsplit("/", 1)[-1]
        if run_id == live_run_id:
            continue
        seen = _last_sign_of_life(fs, folder)
        if run_id not in dead and (seen is None or now - seen < max_age):  # alive, or being created this instant
            continue
        fs.rm(folder, recursive=True)
        removed.append(run_id)
        log.info("removed the staging of dead run %s (last sign of life %s)", run_id,
                 seen.isoformat() if seen else "unknown")
    lease.remove_empty_folder(fs, path)
    return removed
