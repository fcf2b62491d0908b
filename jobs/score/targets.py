"""Where a run's rows go: a Parquet folder (``output.uri``) or an Iceberg table (``output.iceberg``).

Both give the pipeline the same things, so it is written once: the sweep of dead runs'
leftovers, what marks a run alive while it writes, where to stage the run's files and keep its
lake bank, the previous watermark (``since``), the already-scored URIs (``skip_scored``), the
latest lake bank, and the publish step. The Parquet folder publishes by moving files and writing
``_manifest.json`` then ``_SUCCESS``; the Iceberg table by one catalog commit
(:mod:`jobs.score.iceberg`).
"""

from __future__ import annotations

import datetime as dt
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import ray

from clipn_core.lake_bank import LakeBank, bank_from_bytes
from clipn_core.storage import Storage, with_protocol
from jobs.score import iceberg, incremental, publish
from schemas.manifest import ScoreManifest
from schemas.score_config import OutputConfig


class OutputTarget(Protocol):
    bank_root: str  # where lake banks are kept (jobs.score.incremental.bank_path)

    def sweep(self, max_age: dt.timedelta, run_id: str) -> None:
        """Remove what dead runs left behind (never a live run's files), logging what went."""

    def guard(self, staged: str) -> AbstractContextManager:
        """Held while the run writes to ``staged``: what tells the sweep that the run is alive."""

    def staged(self, run_id: str, run_date: dt.date) -> str:
        """Where this run writes its files before publishing (never read by readers)."""

    def partition(self, run_date: dt.date) -> str:
        """What the manifest names as the published night."""

    def last_watermark(self, run_date: dt.date) -> tuple[dt.datetime, str] | None:
        """(watermark, run id) of the latest published run of an earlier night."""

    def scored_uris(self, run_date: dt.date, model_id: str, class_set_hash: str) -> ray.data.Dataset | None:
        """URIs scored ok with this model and class set on other nights, as a Ray dataset."""

    def latest_bank(self, run_date: dt.date, model_id: str, class_set_hash: str) -> tuple[str, LakeBank] | None:
        """(URI, bank) built by the latest earlier night with this model and class set."""

    def publish(self, staged: str, manifest: ScoreManifest, run_date: dt.date) -> None:
        """Make the staged files the night's rows, atomically where the store allows."""


class ParquetFolder:
    """``<uri>/run_date=YYYY-MM-DD/`` partitions published with ``_manifest.json`` and ``_SUCCESS``."""

    def __init__(self, uri: str, storage: Storage):
        self.root, self.storage = uri, storage
        self.bank_root = uri

    def sweep(self, max_age, run_id):
        publish.sweep_staging(self.root, self.storage, max_age, run_id)

    def guard(self, staged):
        return publish.Heartbeat(staged, self.storage)

    def staged(self, run_id: str, run_date: dt.date) -> str:
        return publish.staging_path(self.root, run_id)

    def partition(self, run_date: dt.date) -> str:
        return publish.partition_path(self.root, run_date)

    def last_watermark(self, run_date):
        return incremental.last_watermark(self.root, run_date, self.storage)

    def scored_uris(self, run_date, model_id, class_set_hash):
        return incremental.scored_uris(self.root, run_date, model_id, class_set_hash, self.storage)

    def latest_bank(self, run_date, model_id, class_set_hash):
        return incremental.latest_bank(self.root, run_date, model_id, class_set_hash, self.storage)

    def publish(self, staged, manifest, run_date):
        publish.publish(self.root, run_date, staged, manifest, self.storage)


class IcebergTable:
    """Rows committed to an Iceberg table, one snapshot per run (:mod:`jobs.score.iceberg`)."""

    def __init__(self, cfg, storage: Storage):
        self.cfg, self.storage = cfg, storage
        # an unreachable catalog fails here, before any work; a missing table is created only when the run
        # stages its rows, after the setup checks on the driver, so a run refused there leaves no table
        self.table = iceberg.load_table(cfg, storage, create=False)

    @property
    def root(self) -> str:
        """The table's location (the table is created here the first time)."""
        if self.table is None:
            self.table = iceberg.load_table(self.cfg, self.storage, create=True)
        return self.table.location().rstrip("/")

    @property
    def bank_root(self) -> str:
        # beside the table, not inside it: orphan-file maintenance deletes every file under the table's
        # location that no snapshot references, which a lake bank never is
        return f"{self.root}.clipn-banks"

    def sweep(self, max_age, run_id):
        """Nothing: a dead run's files sit unreferenced in the table's data folder, where readers never see
        them; removing them is the table's orphan-file maintenance (README, Output targets), because only
        the catalog knows which files a snapshot still references."""

    def guard(self, staged):
        return nullcontext()  # nothing sweeps a table's data folder (sweep), so no heartbeat is needed

    def staged(self, run_id: str, run_date: dt.date) -> str:
        return iceberg.data_location(self.root, run_date, run_id)

    def partition(self, run_date: dt.date) -> str:
        return f"{self.cfg.table} ({iceberg.RUN_DATE} = {run_date.isoformat()})"

    def last_watermark(self, run_date):
        return iceberg.last_watermark(self.cfg, self.storage, run_date)

    def scored_uris(self, run_date, model_id, class_set_hash):
        return iceberg.scored_uris(self.cfg, self.storage, run_date, model_id, class_set_hash)

    def latest_bank(self, run_date, model_id, class_set_hash):
        uri = iceberg.latest_bank_uri(self.cfg, self.storage, run_date, model_id, class_set_hash)
        return (uri, bank_from_bytes(self.storage.read_bytes(uri))) if uri else None

    def publish(self, staged, manifest, run_date):
        fs, path = self.storage.fs(staged)
        found = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.exists(path) else []
        files = [uri if "://" in uri else f"file://{uri}" for uri in (with_protocol(fs, p) for p in found)]
        commit = iceberg.commit_night(self.cfg, self.storage, files, manifest)
        iceberg.log.info("committed snapshot %d to %s (%d files, %d attempt(s))", commit.snapshot_id, self.cfg.table,
                         commit.files, commit.attempts)


def output_target(cfg: OutputConfig, storage: Storage) -> OutputTarget:
    """The configured target; an Iceberg catalog is reached (and a bad one refused) here."""
    return IcebergTable(cfg.iceberg, storage) if cfg.iceberg is not None else ParquetFolder(cfg.uri, storage)
