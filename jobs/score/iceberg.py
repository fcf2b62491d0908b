"""Publish to an Apache Iceberg table: one atomic catalog commit per run, idempotent per night.

The run's rows are written as Parquet data files straight into the table's location
(``<table>/data/run_date=<day>/<run_id>/``): until the commit, no snapshot references them, so
readers (Spark, Trino, DuckDB, pyiceberg) cannot see them. The commit is one transaction:

1. evolve the schema by name to the current output schema (a newly registered score is a
   new column; old data files are not rewritten, their rows read it as null);
2. delete the rows of the same night, model id and class set (a rerun replaces them);
3. add the run's data files;

with snapshot properties carrying what ``_manifest.json`` carries. Readers see the old
snapshot or the new one, never a mix. Two runs that commit at the same time conflict in
the catalog: the loser reloads the table and retries its transaction (its data files are
still there), up to :data:`COMMIT_ATTEMPTS` times, then fails naming the table.

The table's schema is the one Arrow output schema (:data:`schemas.output.OUTPUT_SCHEMA`),
with embeddings widened to float32 (Iceberg has no half floats), plus ``run_date`` (the
night, a UTC timestamp at midnight: Iceberg partitions are transforms of columns),
converted once with field ids; it is partitioned by ``day(run_date)`` and ``model_id``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from clipn_core.errors import CommitConflictError, InputError, redact_uri
from clipn_core.storage import Storage, is_remote
from schemas.manifest import ScoreManifest
from schemas.score_config import IcebergConfig

log = logging.getLogger("clipn.score")
COMMIT_ATTEMPTS = 8
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
    }
    return {k: v for k, v in props.items() if v != ""}


@dataclass(frozen=True)
class Commit:
    """What a commit did: the new snapshot, the attempts it took, the files added."""

    snapshot_id: int
    attempts: int
    files: int


def commit_night(cfg: IcebergConfig, storage: Storage, files: list[str], manifest: ScoreManifest) -> Commit:
    """Replace the night's rows for this model and class set with ``files``, in one transaction (module
    docstring); retried on a concurrent commit."""
    from pyiceberg.exceptions import CommitFailedException, ValidationException
    from pyiceberg.expressions import And, EqualTo

    rows_of_this_night = And(EqualTo(RUN_DATE, night(manifest.run_date).isoformat()),
                             And(EqualTo("model_id", manifest.model_id),
                                 EqualTo("class_set_hash", manifest.class_set_hash)))
    props = snapshot_properties(manifest)
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        table = load_table(cfg, storage, create=True)
        try:
            with table.transaction() as tx:
                with tx.update_schema() as update:
                    update.union_by_name(iceberg_schema())
                with warnings.catch_warnings():  # a first night has nothing to replace, which is no news
                    warnings.filterwarnings("ignore", "Delete operation did not match any records")
                    tx.delete(rows_of_this_night, snapshot_properties=props)
                if files:
                    tx.add_files(files, snapshot_properties=props)
                else:  # a night with nothing new still gets its snapshot, which records the run (and its watermark)
                    tx.append(table_schema().empty_table(), snapshot_properties=props)
            table = table.refresh()
            return Commit(table.current_snapshot().snapshot_id, attempt, len(files))
        # pyiceberg retries a refused commit itself, but then validates that no concurrent snapshot added
        # files matching our delete (they would survive it): that one must redo the whole transaction
        except (CommitFailedException, ValidationException) as e:
            if attempt == COMMIT_ATTEMPTS:
                raise CommitConflictError(f"Iceberg table {cfg.table}: gave up after {attempt} commits that lost to "
                                   f"concurrent writers: {e}") from e
            log.warning("commit to %s lost to a concurrent writer (%s); retrying", cfg.table, e)
            time.sleep(min(2.0, 0.1 * 2 ** attempt))
    raise AssertionError("unreachable")


def last_watermark(cfg: IcebergConfig, storage: Storage, run_date: dt.date) -> tuple[dt.datetime, str] | None:
    """(watermark, run id) of the latest run committed to the table for an earlier night, from its snapshots'
    properties, or None (no table, no such run)."""
    table = load_table(cfg, storage, create=False)
    if table is None:
        return None
    best = None
    for snap in table.metadata.snapshots:
        props = snap.summary.additional_properties if snap.summary else {}
        mark, day = props.get("clipn.watermark"), props.get("clipn.run_date")
        if mark and day and day < run_date.isoformat():
            value = dt.datetime.fromisoformat(mark)
            if best is None or value > best[0]:
                best = (value, props.get("clipn.run_id", ""))
    return best


def scored_uris(cfg: IcebergConfig, storage: Storage, run_date: dt.date, model_id: str, class_set_hash: str):
    """A Ray dataset of the URIs the table holds as scored ``ok`` by this model and class set on other nights
    (read by Ray, never on the driver), or None when there is no table yet."""
    import ray
    from ray.data.expressions import col, lit

    if load_table(cfg, storage, create=False) is None:
        return None
    rows = ray.data.read_iceberg(table_identifier=cfg.table,
                                 catalog_kwargs={"name": cfg.catalog, **catalog_properties(cfg, storage)})
    # Ray pushes the filter and projection down into the Iceberg scan (partition and file pruning)
    scored = ((col("model_id") == model_id) & (col("class_set_hash") == class_set_hash) & (col("status") == "ok")
              & (col(RUN_DATE) != lit(night(run_date))))
    return rows.filter(expr=scored).select_columns(["uri"])


def latest_bank_uri(cfg: IcebergConfig, storage: Storage, run_date: dt.date, model_id: str,
                    class_set_hash: str) -> str | None:
    """The lake bank built by the latest run of an earlier night with this model and class set (from the
    snapshots' properties), or None."""
    table = load_table(cfg, storage, create=False)
    if table is None:
        return None
    best: tuple[str, str] | None = None  # (night, bank URI)
    for snap in table.metadata.snapshots:
        props = snap.summary.additional_properties if snap.summary else {}
        day, bank = props.get("clipn.run_date"), props.get("clipn.lake_bank_built")
        if (bank and day and day < run_date.isoformat() and props.get("clipn.model_id") == model_id
                and props.get("clipn.class_set_hash") == class_set_hash and (best is None or day > best[0])):
            best = (day, bank)
    return best[1] if best else None
