"""Publish to an Apache Iceberg table: one atomic catalog commit per run, idempotent per night.

The run's rows are written as Parquet data files straight into the table's location
(``<table>/data/run_date=<day>/<run_id>/``): until the commit, no snapshot references them, so
readers (Spark, Trino, DuckDB, pyiceberg) cannot see them. The commit is one transaction:

1. evolve the schema by name to the current output schema (a newly registered score is a
   new column; old data files are not rewritten, their rows read it as null);
2. delete the rows of the same night, model id and class set (a rerun replaces them);
3. add the run's data files;
4. set the night's watermark, lake bank and aggregates as table properties (``clipn.watermark.<night>``,
   ``clipn.lake-bank.<night>.<model>.<class set>``, ``clipn.aggregates.<night>``), which neither snapshot
   expiry nor orphan-file cleanup ever removes (a file beside the table would be an orphan to the latter);

with snapshot properties carrying what ``_manifest.json`` carries. Readers see the old
snapshot or the new one, never a mix. Two runs that commit at the same time conflict in
the catalog: the loser reloads the table and retries its transaction (its data files are
still there), up to :data:`COMMIT_ATTEMPTS` times, then fails naming the table.

A commit whose answer is lost (a REST catalog's 500/502/504, ``CommitStateUnknownException``)
may have landed: the run looks for a snapshot carrying its run id, and commits again only if
there is none. A run's data files are deleted after a failure only when no commit was sent or
every one sent was refused for sure (:class:`NightCommit`); otherwise they stay, since a
snapshot may reference them, for the table's orphan-file cleanup.

The table's schema is the one Arrow output schema (:data:`schemas.output.OUTPUT_SCHEMA`),
with embeddings widened to float32 (Iceberg has no half floats), plus ``run_date`` (the
night, a UTC timestamp at midnight: Iceberg partitions are transforms of columns),
converted once with field ids; it is partitioned by ``day(run_date)`` and ``model_id``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from clipn_core.errors import CommitConflictError, CommitUnknownError, InputError, redact_uri
from clipn_core.storage import Storage, is_remote
from jobs import failpoints
from jobs.history.read import model_key
from schemas.manifest import ScoreManifest, Watermark
from schemas.score_config import IcebergConfig

log = logging.getLogger("clipn.score")
COMMIT_ATTEMPTS = 8
# table properties, which snapshot expiry leaves alone: a night's watermark and the lake banks it built
WATERMARK_PROP = "clipn.watermark."
BANK_PROP = "clipn.lake-bank."
NIGHTS_KEPT = 400
# a night's aggregates (clipn history, the drift check), in the table's properties: every commit rewrites the
# table metadata that holds them (~1-2 kB a night, + ~40 B a class), so only the latest nights keep theirs;
# clipn history computes an older night's from its rows
AGGREGATES_PROP = "clipn.aggregates."
AGGREGATE_NIGHTS_KEPT = 60
RUN_DATE = "run_date"
# pyiceberg's own S3 file IO for the local default catalog: s3fs, with botocore's retries, as the jobs use
_FSSPEC_IO = "pyiceberg.io.fsspec.FsspecFileIO"


def table_schema() -> pa.Schema:
    """The Arrow schema of the table's rows: the output schema with embeddings as float32 (Iceberg has no half
    floats), plus ``run_date`` (timestamp, UTC)."""
    from schemas.output import OUTPUT_SCHEMA

    fields = [pa.field(f.name, pa.list_(pa.float32()), f.nullable) if f.name == "embedding" else f
              for f in OUTPUT_SCHEMA]
    return pa.schema([*fields, pa.field(RUN_DATE, pa.timestamp("us", tz="UTC"), nullable=False)])


def to_table_rows(batch: pa.Table, run_date: dt.date) -> pa.Table:
    """Output rows -> the table's rows (:func:`table_schema`): embeddings widened, ``run_date`` added."""
    schema = table_schema()
    n = len(batch)
    columns = [batch.column(f.name).cast(f.type) for f in schema if f.name != RUN_DATE]
    columns.append(pa.array([night(run_date)] * n, schema.field(RUN_DATE).type))
    return pa.Table.from_arrays(columns, schema=schema)


def iceberg_schema():
    """The table schema as an Iceberg schema: field ids 1..n in output-schema order, then the list elements'
    (converted once)."""
    from pyiceberg.io.pyarrow import pyarrow_to_schema
    from pyiceberg.table.name_mapping import MappedField, NameMapping

    fields = table_schema()
    next_id = len(fields) + 1
    mapped = []
    for i, f in enumerate(fields):
        children = []
        if pa.types.is_list(f.type):
            children, next_id = [MappedField(field_id=next_id, names=["element"])], next_id + 1
        mapped.append(MappedField(field_id=i + 1, names=[f.name], fields=children))
    return pyarrow_to_schema(fields, name_mapping=NameMapping(mapped))


def night(run_date: dt.date) -> dt.datetime:
    """The ``run_date`` column's value for a night: midnight UTC."""
    return dt.datetime.combine(run_date, dt.time(), tzinfo=dt.timezone.utc)


def catalog_properties(cfg: IcebergConfig, storage: Storage) -> dict[str, str]:
    """Properties for ``pyiceberg.catalog.load_catalog(cfg.catalog, ...)``.

    A catalog configured the way pyiceberg users configure it (``.pyiceberg.yaml`` or
    ``PYICEBERG_CATALOG__<NAME>__...``) is used as it is. Otherwise the local default: a SQLite
    catalog at ``cfg.uri`` (default: ``catalog.db`` in a local warehouse) with its warehouse at
    ``cfg.warehouse`` (a folder or an ``s3://`` prefix, reached with the job's storage settings;
    credentials stay in the environment).
    """
    from pyiceberg.utils.config import Config

    if Config().get_catalog_config(cfg.catalog) is not None:
        return {}
    if not cfg.warehouse:
        raise InputError(f"output.iceberg.catalog {cfg.catalog!r} is not configured (.pyiceberg.yaml or "
                         f"PYICEBERG_CATALOG__{cfg.catalog.upper()}__...) and output.iceberg.warehouse is not set for "
                         "the local SQLite catalog")
    uri = cfg.uri
    if uri is None:
        if is_remote(cfg.warehouse):
            raise InputError(f"output.iceberg.uri: the local catalog's database cannot live in the object store "
                             f"warehouse {redact_uri(cfg.warehouse)}; give a local sqlite:///... URI")
        uri = f"sqlite:///{cfg.warehouse.removeprefix('file://').rstrip('/')}/catalog.db"
    props = {"type": "sql", "uri": uri, "warehouse": cfg.warehouse, "py-io-impl": _FSSPEC_IO}
    client = storage.options.get("client_kwargs", {})
    if client.get("endpoint_url"):
        props["s3.endpoint"] = client["endpoint_url"]
    if client.get("region_name"):
        props["s3.region"] = client["region_name"]
    return props


def load_table(cfg: IcebergConfig, storage: Storage, create: bool):
    """The configured table (created, with its namespace, partitioned by day(run_date) and model_id, when
    ``create`` and missing); :class:`InputError` naming the table or catalog when it cannot be reached."""
    from pyiceberg.catalog import load_catalog
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import DayTransform, IdentityTransform

    try:
        props = catalog_properties(cfg, storage)
        if create and props.get("uri", "").startswith("sqlite:///"):  # SQLite creates the file, not its folder
            Path(props["uri"].removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        catalog = load_catalog(cfg.catalog, **props)
        try:
            return catalog.load_table(cfg.table)
        except NoSuchTableError:
            if not create:
                return None
        namespace = cfg.table.rsplit(".", 1)[0]
        try:
            catalog.create_namespace(namespace)
        except NamespaceAlreadyExistsError:
            pass
        schema = iceberg_schema()
        spec = PartitionSpec(
            PartitionField(source_id=schema.find_field(RUN_DATE).field_id, field_id=1000, transform=DayTransform(),
                           name="run_day"),
            PartitionField(source_id=schema.find_field("model_id").field_id, field_id=1001,
                           transform=IdentityTransform(), name="model_id"))
        return catalog.create_table_if_not_exists(cfg.table, schema=schema, partition_spec=spec)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing catalog, a bad URI, no access: one clear line
        raise InputError(f"cannot open Iceberg table {cfg.table} in catalog {cfg.catalog!r}: "
                         f"{type(e).__name__}: {redact_uri(str(e))}") from e


def data_location(table_location: str, run_date: dt.date, run_id: str) -> str:
    """Where a run writes its data files: inside the table's location, invisible until committed."""
    return f"{table_location.rstrip('/')}/data/{RUN_DATE}={run_date.isoformat()}/{run_id}"


def snapshot_properties(manifest: ScoreManifest) -> dict[str, str]:
    """What ``_manifest.json`` carries, as string snapshot properties (``clipn.*``)."""
    props = {
        "clipn.run_id": manifest.run_id, "clipn.run_date": manifest.run_date.isoformat(),
        "clipn.model_id": manifest.model_id, "clipn.class_set_hash": manifest.class_set_hash,
        "clipn.logit_scale": f"{manifest.logit_scale:g}" if manifest.logit_scale is not None else "",
        "clipn.rows": str(manifest.rows),
        **{f"clipn.status.{k}": str(v) for k, v in manifest.by_status.items()},
        "clipn.watermark": manifest.watermark.isoformat() if manifest.watermark else "",
        "clipn.negatives_id": manifest.negatives_id or "", "clipn.calibration_id": manifest.calibration_id or "",
        "clipn.lake_bank_built": manifest.lake_bank_built or "",
        "clipn.lake_bank_used": manifest.lake_bank_used or "", "clipn.lake_bank_id": manifest.lake_bank_id or "",
        "clipn.lake_bank_meta": json.dumps(manifest.lake_bank_meta, sort_keys=True) if manifest.lake_bank_meta else "",
        "clipn.decision": json.dumps(manifest.decision, sort_keys=True) if manifest.decision else "",
    }
    return {k: v for k, v in props.items() if v != ""}


@dataclass(frozen=True)
class Commit:
    """What a commit did: the new snapshot, the attempts it took, the files added."""

    snapshot_id: int
    attempts: int
    files: int


def _unknown() -> BaseException:
    from pyiceberg.exceptions import CommitStateUnknownException

    return CommitStateUnknownException("failpoint: the catalog's answer to the commit was lost")


def _run_snapshot(table, run_id: str) -> int | None:
    """The id of a snapshot the run ``run_id`` committed (its ``clipn.run_id`` property), or None."""
    for snap in table.metadata.snapshots:
        if snap.summary and snap.summary.additional_properties.get("clipn.run_id") == run_id:
            return snap.snapshot_id
    return None


def night_properties(table, manifest: ScoreManifest) -> tuple[dict[str, str], list[str]]:
    """(table properties to set, to remove) for a night's commit: its watermark and lake bank, kept in the table's
    properties, which snapshot expiry never removes, for the :data:`NIGHTS_KEPT` latest nights, and its aggregates
    for the :data:`AGGREGATE_NIGHTS_KEPT` latest."""
    day = manifest.run_date.isoformat()
    props = {}
    if manifest.watermark is not None:
        props[f"{WATERMARK_PROP}{day}"] = json.dumps({"at": manifest.watermark.isoformat(), "run_id": manifest.run_id})
    if manifest.lake_bank_built:
        props[f"{BANK_PROP}{day}.{manifest.model_id[:16]}.{manifest.class_set_hash}"] = manifest.lake_bank_built
    if manifest.aggregates is not None:
        props[f"{AGGREGATES_PROP}{day}"] = json.dumps({"run_id": manifest.run_id,
                                                       "model": model_key(manifest.model_id, manifest.class_set_hash),
                                                       "aggregates": manifest.aggregates.model_dump(mode="json")},
                                                      separators=(",", ":"))
    nights = sorted({k[len(WATERMARK_PROP):] for k in table.properties if k.startswith(WATERMARK_PROP)} | {day})
    old = set(nights[:-NIGHTS_KEPT])
    aggregated = sorted({k[len(AGGREGATES_PROP):] for k in table.properties if k.startswith(AGGREGATES_PROP)}
                        | ({day} if manifest.aggregates is not None else set()))
    old_aggregates = set(aggregated[:-AGGREGATE_NIGHTS_KEPT])
    drop = [k for k in table.properties
            if (k.startswith(WATERMARK_PROP) and k[len(WATERMARK_PROP):] in old)
            or (k.startswith(BANK_PROP) and k[len(BANK_PROP):].split(".", 1)[0] in old)
            or (k.startswith(AGGREGATES_PROP) and k[len(AGGREGATES_PROP):] in old_aggregates)]
    return props, drop


class NightCommit:
    """One run's commit of its night (module docstring), and what is known of whether it landed.

    ``sent``: a commit request may have reached the catalog; ``unknown``: an answer was lost, so it may have
    landed although no snapshot of the run was found; ``rejected``: every request sent was refused for sure
    (``CommitFailedException`` / ``ValidationException``), so none landed. Its data files may be deleted
    only when nothing was sent or everything sent was rejected."""

    def __init__(self, cfg: IcebergConfig, storage: Storage, files: list[str], manifest: ScoreManifest):
        self.cfg, self.storage, self.files, self.manifest = cfg, storage, files, manifest
        self.sent = self.unknown = self.rejected = False
        self._requests = 0  # commit requests sent

    def _resolve(self) -> int | None:
        """After an unknown answer: the run's snapshot id if the commit landed, None if not (yet); raises
        :class:`CommitUnknownError` when the table cannot be read to tell."""
        try:
            failpoints.hit("iceberg.refresh.before")
            table = load_table(self.cfg, self.storage, create=False)
            failpoints.hit("iceberg.refresh.after")
        except Exception as e:  # noqa: BLE001 - re-raised typed: the commit's fate stays unknown
            raise CommitUnknownError(
                f"Iceberg table {self.cfg.table}: the commit of run {self.manifest.run_id} got no answer and the "
                f"table could not be read to tell whether it landed ({type(e).__name__}: {redact_uri(str(e))}); its "
                "data files are kept (Iceberg's orphan-file cleanup removes them if no snapshot references them)") from e
        return _run_snapshot(table, self.manifest.run_id) if table is not None else None

    def run(self) -> Commit:
        """Commit, retried on a concurrent commit and resolved by the run id on an unknown answer; raises
        :class:`CommitConflictError` (nothing landed) or :class:`CommitUnknownError` (it may have landed)."""
        from pyiceberg.exceptions import (
            CommitFailedException,
            CommitStateUnknownException,
            ValidationException,
        )
        from pyiceberg.expressions import And, EqualTo

        manifest = self.manifest
        rows_of_this_night = And(EqualTo(RUN_DATE, night(manifest.run_date).isoformat()),
                                 And(EqualTo("model_id", manifest.model_id),
                                     EqualTo("class_set_hash", manifest.class_set_hash)))
        props = snapshot_properties(manifest)
        definite = 0  # sent requests refused for sure
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = load_table(self.cfg, self.storage, create=True)
            if self.unknown:  # an unanswered request may have landed since it was looked for: never add twice
                found = _run_snapshot(table, manifest.run_id)
                if found is not None:
                    log.info("the commit of run %s had landed late (snapshot %d)", manifest.run_id, found)
                    return Commit(found, attempt - 1, len(self.files))
            tx = table.transaction()
            with tx.update_schema() as update:
                update.union_by_name(iceberg_schema())
            with warnings.catch_warnings():  # a first night has nothing to replace, which is no news
                warnings.filterwarnings("ignore", "Delete operation did not match any records")
                tx.delete(rows_of_this_night, snapshot_properties=props)
            if self.files:
                tx.add_files(self.files, snapshot_properties=props)
            else:  # a night with nothing new still gets its snapshot, which records the run (and its watermark)
                tx.append(table_schema().empty_table(), snapshot_properties=props)
            keep, drop = night_properties(table, manifest)
            if keep:
                tx.set_properties(keep)
            if drop:
                tx.remove_properties(*drop)
            try:
                failpoints.hit("iceberg.commit.before")
                self.sent, self.rejected = True, False
                self._requests += 1
                failpoints.hit("iceberg.commit.unknown_before", error=_unknown)
                table = tx.commit_transaction()
                failpoints.hit("iceberg.commit.unknown_after", error=_unknown)
                failpoints.hit("iceberg.commit.after")
                return Commit(table.current_snapshot().snapshot_id, attempt, len(self.files))
            # pyiceberg retries a refused commit itself, but then validates that no concurrent snapshot added
            # files matching our delete (they would survive it): that one must redo the whole transaction
            except (CommitFailedException, ValidationException) as e:
                definite += 1
                self.rejected = definite == self._requests and not self.unknown
                if attempt == COMMIT_ATTEMPTS:
                    error = CommitUnknownError if self.unknown else CommitConflictError
                    raise error(f"Iceberg table {self.cfg.table}: gave up after {attempt} commits that lost to "
                                f"concurrent writers: {e}") from e
                log.warning("commit to %s lost to a concurrent writer (%s); retrying", self.cfg.table, e)
            # a 500/502/504 from a REST catalog: the commit may have landed. Its snapshots carry the run id;
            # when none does, committing again is safe: a late copy of the first request carries the same
            # requirements, which the catalog refuses once the table has moved on
            except CommitStateUnknownException as e:
                self.unknown, self.rejected = True, False
                log.warning("commit of run %s to %s got no answer (%s); looking for its snapshot", manifest.run_id,
                            self.cfg.table, e)
                found = self._resolve()
                if found is not None:
                    log.info("the commit of run %s had landed (snapshot %d)", manifest.run_id, found)
                    return Commit(found, attempt, len(self.files))
                if attempt == COMMIT_ATTEMPTS:
                    raise CommitUnknownError(f"Iceberg table {self.cfg.table}: {attempt} commits of run "
                                             f"{manifest.run_id} got no answer and none of its snapshots is there; "
                                             "its data files are kept") from e
            time.sleep(min(2.0, 0.1 * 2 ** attempt))
        raise AssertionError("unreachable")


def commit_night(cfg: IcebergConfig, storage: Storage, files: list[str], manifest: ScoreManifest) -> Commit:
    """Replace the night's rows for this model and class set with ``files``, in one transaction (module
    docstring): :meth:`NightCommit.run`."""
    return NightCommit(cfg, storage, files, manifest).run()


def _snapshot_nights(table) -> list[dict[str, str]]:
    """The ``clipn.*`` properties of the table's snapshots (what tables written before the night properties
    kept, and only there)."""
    return [snap.summary.additional_properties for snap in table.metadata.snapshots if snap.summary]


def watermarks(cfg: IcebergConfig, storage: Storage, run_date: dt.date) -> list[Watermark]:
    """The watermarks of the nights committed to the table other than ``run_date``: from the table's
    properties, and its snapshots' for tables written before those (none without a table)."""
    table = load_table(cfg, storage, create=False)
    if table is None:
        return []
    found: dict[dt.date, Watermark] = {}
    for props in _snapshot_nights(table):
        if props.get("clipn.watermark") and props.get("clipn.run_date"):
            mark = Watermark(at=dt.datetime.fromisoformat(props["clipn.watermark"]), run_id=props.get("clipn.run_id", ""),
                             run_date=dt.date.fromisoformat(props["clipn.run_date"]))
            found[mark.run_date] = max(found.get(mark.run_date, mark), mark, key=lambda w: w.at)
    for key, value in table.properties.items():  # the night's latest run: these win over the snapshots'
        if key.startswith(WATERMARK_PROP):
            mark = json.loads(value)
            day = dt.date.fromisoformat(key[len(WATERMARK_PROP):])
            found[day] = Watermark(at=dt.datetime.fromisoformat(mark["at"]), run_id=mark["run_id"], run_date=day)
    return [w for day, w in sorted(found.items()) if day != run_date]


def history(cfg: IcebergConfig, storage: Storage, run_date: dt.date, model_id: str, class_set_hash: str,
            last: int | None = None):
    """:data:`jobs.score.retry.SOURCE` rows of the table's rows with this model and class set on nights other than
    ``run_date`` (``last``: only the latest ``last`` nights before it), each with its night's watermark (-inf
    when the table kept none), read by Ray (the filter pushed into the scan); None when there is no table or no
    such night."""
    import ray
    from ray.data.expressions import col, lit

    if load_table(cfg, storage, create=False) is None:
        return None
    marks = {w.run_date: w.at.timestamp() for w in watermarks(cfg, storage, run_date)}
    where = ((col("model_id") == model_id) & (col("class_set_hash") == class_set_hash)
             & (col(RUN_DATE) != lit(night(run_date))))
    if last is not None:
        nights = sorted(d for d in marks if d < run_date)[-last:] if last else []
        if not nights:
            return None
        where = where & col(RUN_DATE).is_in([night(d) for d in nights])
    rows = ray.data.read_iceberg(table_identifier=cfg.table,
                                 catalog_kwargs={"name": cfg.catalog, **catalog_properties(cfg, storage)})
    return rows.filter(expr=where).select_columns(["uri", "status", RUN_DATE]).map_batches(
        _history_rows, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"marks": {d.toordinal(): at for d, at in marks.items()}})


def _history_rows(batch: pa.Table, marks: dict[int, float]) -> pa.Table:
    from jobs.score.retry import SOURCE, kinds

    nights = [v.date().toordinal() for v in batch.column(RUN_DATE).to_pylist()]
    return pa.table([batch.column("uri").cast(pa.string()), pa.array(nights, pa.int32()),
                     pa.array([marks.get(n, float("-inf")) for n in nights], pa.float64()),
                     kinds(batch.column("status"))], schema=SOURCE)


def night_uris(cfg: IcebergConfig, storage: Storage, nights: list[dt.date]):
    """A Ray dataset of every URI the table holds for ``nights`` (any status and model), or None when there is
    no table: what the overlap of ``since`` must not score again."""
    import ray
    from ray.data.expressions import col

    if not nights or load_table(cfg, storage, create=False) is None:
        return None
    rows = ray.data.read_iceberg(table_identifier=cfg.table,
                                 catalog_kwargs={"name": cfg.catalog, **catalog_properties(cfg, storage)})
    return rows.filter(expr=col(RUN_DATE).is_in([night(d) for d in nights])).select_columns(["uri"])


def latest_bank_uri(cfg: IcebergConfig, storage: Storage, run_date: dt.date, model_id: str,
                    class_set_hash: str) -> str | None:
    """The lake bank built by the latest night before ``run_date`` with this model and class set (the table's
    properties, and its snapshots' for tables written before those), or None."""
    table = load_table(cfg, storage, create=False)
    if table is None:
        return None
    found: list[tuple[str, str]] = []  # (night, bank URI)
    suffix = f".{model_id[:16]}.{class_set_hash}"
    for key, value in table.properties.items():
        if key.startswith(BANK_PROP) and key.endswith(suffix):
            found.append((key[len(BANK_PROP):-len(suffix)], value))
    for props in _snapshot_nights(table):
        day, bank = props.get("clipn.run_date"), props.get("clipn.lake_bank_built")
        if bank and day and props.get("clipn.model_id") == model_id and props.get("clipn.class_set_hash") == class_set_hash:
            found.append((day, bank))
    earlier = [f for f in found if f[0] < run_date.isoformat()]
    return max(earlier)[1] if earlier else None
