"""Publish: the output layout, staging, the staged rows' statistics and the atomic-as-possible publish.

``<root>/run_date=YYYY-MM-DD/part-*.parquet`` + ``_manifest.json`` + ``_SUCCESS`` (last).
A run writes under ``<root>/_staging/<run_id>/`` (ignored by pyarrow, Spark and
DuckDB globs because of the leading underscore) and only then replaces the partition:
remove the old ``_SUCCESS``, remove the old files, move the staged files in, write the
manifest, write ``_SUCCESS``. Ray's writer appends; this is what makes reruns
idempotent and failed runs invisible.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pyarrow.compute as pc
import pyarrow.dataset as pads
from ray.data.datasource import FilenameProvider

from clipn_core.storage import Storage
from schemas.manifest import ScoreManifest
from schemas.status import STATUS_OK

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"


def partition_path(root: str, run_date: dt.date) -> str:
    return f"{root.rstrip('/')}/run_date={run_date.isoformat()}"


def staging_path(root: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/_staging/{run_id}"


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


def scored_uris(root: str, run_date: dt.date, model_id: str, class_set_hash: str, storage: Storage) -> set[str]:
    """URIs scored ok in published partitions other than ``run_date`` with the same model and class set."""
    from schemas.output import OUTPUT_SCHEMA

    fs, path = storage.fs(root)
    if not fs.exists(path):
        return set()
    done = set()
    for part in fs.ls(path, detail=False):
        name = part.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("run_date=") or name == f"run_date={run_date.isoformat()}":
            continue
        if not fs.exists(f"{part}/{SUCCESS}"):
            continue  # never published: not trusted
        dataset = pads.dataset(part, filesystem=storage.arrow(root)[0], format="parquet", schema=OUTPUT_SCHEMA)
        flt = ((pads.field("model_id") == model_id) & (pads.field("class_set_hash") == class_set_hash)
               & (pads.field("status") == STATUS_OK))
        for batch in dataset.to_batches(columns=["uri"], filter=flt):
            done.update(batch.column("uri").to_pylist())
    return done
