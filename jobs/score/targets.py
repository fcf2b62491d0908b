"""Where a run's rows go: a Parquet folder (``output.uri``) or an Iceberg table (``output.iceberg``).

Both give the pipeline the same things, so it is written once: the night's lease, the sweep of
dead runs' leftovers, what marks a run alive while it writes, where to stage the run's files and
keep its lake bank, the previous watermark (``since``) and that night's URIs, the already-scored
URIs (``skip_scored``), the latest lake bank, the publish step, and what a failed run removes.
The Parquet folder publishes by moving files in and switching ``_manifest.json``
(:mod:`jobs.score.publish`); the Iceberg table by one catalog commit (:mod:`jobs.score.iceberg`).

The invariant both keep: a reader sees the night's previous rows or its new rows, each whole,
whatever step fails or dies; no file a published night (a manifest, a snapshot) references is
ever deleted by a failed run; and rerunning the night then gives what a clean run gives.
"""

from __future__ import annotations

import datetime as dt
import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import ray

from clipn_core.errors import redact_uri
from clipn_core.lake_bank import LakeBank, bank_from_bytes
from clipn_core.storage import Storage, with_protocol
from jobs.score import iceberg, incremental, lake_bank, publish, retry
from jobs.score.lease import NightLease
from schemas.manifest import ScoreManifest, Watermark
from schemas.score_config import OutputConfig

log = logging.getLogger("clipn.score")


class OutputTarget(Protocol):
    bank_root: str  # where lake banks are kept (jobs.score.lake_bank.bank_path)

    def lease(self, run_date: dt.date, run_id: str, ttl_s: float, take_over: str | None) -> NightLease:
        """The night's lease (:mod:`jobs.score.lease`), to hold from before the first write to the end."""

    def sweep(self, max_age: dt.timedelta, run_id: str) -> None:
        """Remove what dead runs left behind (never a live run's files), logging what went."""

    def guard(self, staged: str) -> AbstractContextManager:
        """Held while the run writes to ``staged``: what tells the sweep that the run is alive."""

    def staged(self, run_id: str, run_date: dt.date) -> str:
        """Where this run writes its files before publishing (never read by readers)."""

    def partition(self, run_date: dt.date) -> str:
        """What the manifest names as the published night."""

    def watermarks(self, run_date: dt.date) -> list[Watermark]:
        """The watermarks of the published nights other than ``run_date``."""

    def night_uris(self, nights: list[dt.date]) -> ray.data.Dataset | None:
        """Every URI the published ``nights`` hold, as a Ray dataset."""

    def history(self, run_date: dt.date, model_id: str, class_set_hash: str,
                last: int | None = None) -> ray.data.Dataset | None:
        """The rows of other nights with this model and class set, as :data:`jobs.score.retry.SOURCE` rows
        (``last``: of the latest ``last`` nights before ``run_date`` only)."""

    def latest_bank(self, run_date: dt.date, model_id: str, class_set_hash: str) -> tuple[str, LakeBank] | None:
        """(URI, bank) built by the latest earlier night with this model and class set."""

    def publish(self, staged: str, manifest: ScoreManifest, run_date: dt.date) -> ScoreManifest:
        """Make the staged files the night's rows, for readers atomically; returns the manifest published."""

    def abandon(self, staged: str, run_date: dt.date) -> None:
        """After a failure: remove what the run wrote that no reader uses, and nothing a reader may use."""


def publish_or_abandon(target: OutputTarget, staged: str, manifest: ScoreManifest, run_date: dt.date) -> ScoreManifest:
    """``target.publish``; on any failure ``target.abandon`` (a failure of its own is logged, never hides the
    first), then the first failure is raised."""
    try:
        return target.publish(staged, manifest, run_date)
    except BaseException:
        abandon_quietly(target, staged, run_date)
        raise


def abandon_quietly(target: OutputTarget, staged: str, run_date: dt.date) -> None:
    """``target.abandon``, logging its own failure (the caller is already raising the one that matters)."""
    try:
        target.abandon(staged, run_date)
    except Exception as e:  # noqa: BLE001 - logged; the run's own failure is what propagates
        log.warning("could not clean up after the failed run (%s: %s); the next run of the night does it",
                    type(e).__name__, redact_uri(str(e)))


class ParquetFolder:
    """``<uri>/run_date=YYYY-MM-DD/`` partitions published with ``_manifest.json`` and ``_SUCCESS``."""

    def __init__(self, uri: str, storage: Storage):
        self.root, self.storage = uri, storage
        self.bank_root = uri
        self._lease: NightLease | None = None

    def lease(self, run_date, run_id, ttl_s, take_over):
        self._lease = NightLease(f"{self.root.rstrip('/')}/_leases", run_date, run_id, self.storage, ttl_s, take_over)
        return self._lease

    def sweep(self, max_age, run_id):
        dead = tuple(self._lease.broken) if self._lease else ()
        publish.sweep_staging(self.root, self.storage, max_age, run_id, dead=dead)

    def guard(self, staged):
        return publish.Heartbeat(staged, self.storage)

    def staged(self, run_id: str, run_date: dt.date) -> str:
        return publish.staging_path(self.root, run_id)

    def partition(self, run_date: dt.date) -> str:
        return publish.partition_path(self.root, run_date)

    def watermarks(self, run_date):
        return incremental.watermarks(self.root, run_date, self.storage)

    def night_uris(self, nights):
        return incremental.night_uris(self.root, nights, self.storage)

    def history(self, run_date, model_id, class_set_hash, last=None):
        return retry.history(self.root, run_date, model_id, class_set_hash, self.storage, last)

    def latest_bank(self, run_date, model_id, class_set_hash):
        return lake_bank.latest_bank(self.root, run_date, model_id, class_set_hash, self.storage)

    def publish(self, staged, manifest, run_date):
        return publish.publish(self.root, run_date, staged, manifest, self.storage)

    def abandon(self, staged, run_date):
        """Remove the staging; and, while this run still holds the night, what it moved into the partition that
        the manifest (as it stands now: a failed write may have landed) does not name."""
        if self._lease is None or self._lease.lost is None:
            publish.reconcile(self.root, run_date, self.storage)
        publish.remove_staging(staged, self.storage)


class IcebergTable:
    """Rows committed to an Iceberg table, one snapshot per run (:mod:`jobs.score.iceberg`)."""

    def __init__(self, cfg, storage: Storage):
        self.cfg, self.storage = cfg, storage
        # an unreachable catalog fails here, before any work; a missing table is created only when the run
        # stages its rows, after the setup checks on the driver, so a run refused there leaves no table
        self.table = iceberg.load_table(cfg, storage, create=False)
        self._commit: iceberg.NightCommit | None = None

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

    def lease(self, run_date, run_id, ttl_s, take_over):
        # beside the table like the banks: the table's own location belongs to its maintenance
        return NightLease(f"{self.root}.clipn-leases", run_date, run_id, self.storage, ttl_s, take_over)

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

    def watermarks(self, run_date):
        return iceberg.watermarks(self.cfg, self.storage, run_date)

    def night_uris(self, nights):
        return iceberg.night_uris(self.cfg, self.storage, nights)

    def history(self, run_date, model_id, class_set_hash, last=None):
        return iceberg.history(self.cfg, self.storage, run_date, model_id, class_set_hash, last)

    def latest_bank(self, run_date, model_id, class_set_hash):
        uri = iceberg.latest_bank_uri(self.cfg, self.storage, run_date, model_id, class_set_hash)
        return (uri, bank_from_bytes(self.storage.read_bytes(uri))) if uri else None

    def publish(self, staged, manifest, run_date):
        fs, path = self.storage.fs(staged)
        found = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.exists(path) else []
        files = [uri if "://" in uri else f"file://{uri}" for uri in (with_protocol(fs, p) for p in found)]
        self._commit = iceberg.NightCommit(self.cfg, self.storage, files, manifest)
        commit = self._commit.run()
        iceberg.log.info("committed snapshot %d to %s (%d files, %d attempt(s))", commit.snapshot_id, self.cfg.table,
                         commit.files, commit.attempts)
        return manifest

    def abandon(self, staged, run_date):
        """Delete the run's data files only when no commit could have landed (none sent, or every one refused
        for sure); otherwise keep them, as a snapshot may reference them."""
        commit = self._commit
        if commit is None or not commit.sent or commit.rejected:
            publish.remove_staging(staged, self.storage)
            return
        log.warning("kept the data files of run %s in %s: its commit %s; Iceberg's orphan-file cleanup removes "
                    "them if no snapshot references them", commit.manifest.run_id, redact_uri(staged),
                    "got no answer" if commit.unknown else "was sent")


def output_target(cfg: OutputConfig, storage: Storage) -> OutputTarget:
    """The configured target; an Iceberg catalog is reached (and a bad one refused) here."""
    return IcebergTable(cfg.iceberg, storage) if cfg.iceberg is not None else ParquetFolder(cfg.uri, storage)
