"""Read: the nights of an output and their aggregates, from what the scoring job recorded, or computed from the
night's rows when it recorded none (a night published before aggregates existed).

A Parquet folder: each published night's ``_manifest.json`` (:func:`jobs.score.publish.published_nights`).
An Iceberg table: the ``clipn.aggregates.<night>`` table properties (:mod:`jobs.score.iceberg`), and for the
other nights with rows (the table's ``run_day`` partitions) a scan of the night's rows.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from clipn_core.storage import Storage
from jobs.history import aggregates as agg
from schemas.manifest import NightAggregates


@dataclass(frozen=True)
class Night:
    """One published night: its date, the run that published it (empty when unknown), its aggregates, and the
    model that scored it (``<model id>/<class set hash>``, empty when unknown: the drift check compares a night
    with nights of its own model only)."""

    run_date: dt.date
    run_id: str
    aggregates: NightAggregates
    model: str = ""


def model_key(model_id: str, class_set_hash: str) -> str:
    """What a night's drift is compared within: the model and its class set (:attr:`Night.model`)."""
    return f"{model_id}/{class_set_hash}"


def parquet_nights(root: str, storage: Storage, exclude: dt.date | None = None) -> list[Night]:
    """The published nights under a Parquet output root but ``exclude``'s, by date."""
    from jobs.score.publish import night_files, published_nights

    fs, _ = storage.fs(root)
    arrow_fs, _ = storage.arrow(root)
    out = []
    for part, manifest in published_nights(root, storage, exclude):
        found = manifest.aggregates
        if found is None:
            found = agg.from_files(night_files(fs, part, manifest), arrow_fs)
        out.append(Night(manifest.run_date, manifest.run_id, found, model_key(manifest.model_id, manifest.class_set_hash)))
    return out


def iceberg_nights(cfg, storage: Storage, exclude: dt.date | None = None) -> list[Night]:
    """The nights committed to an Iceberg table (``cfg``: an IcebergConfig) but ``exclude``'s, by date; none
    without a table."""
    from jobs.score.iceberg import AGGREGATES_PROP, RUN_DATE, _snapshot_nights, load_table, night

    table = load_table(cfg, storage, create=False)
    if table is None:
        return []
    found: dict[dt.date, Night] = {}
    runs: dict[dt.date, str] = {}
    models: dict[dt.date, str] = {}
    # every night with rows (a table created but never committed to has none: pyiceberg cannot inspect it)
    partitions = table.inspect.partitions().column("partition").to_pylist() if table.current_snapshot() else []
    for part in partitions:
        day = part.get("run_day")
        if day is not None:  # the day transform's value: a date, or days since the epoch
            runs[day if isinstance(day, dt.date) else dt.date(1970, 1, 1) + dt.timedelta(days=day)] = ""
    for props in _snapshot_nights(table):  # their runs, where the snapshots are still there (latest last)
        if props.get("clipn.run_date"):
            day = dt.date.fromisoformat(props["clipn.run_date"])
            runs[day] = props.get("clipn.run_id", "")
            if props.get("clipn.model_id"):
                models[day] = model_key(props["clipn.model_id"], props.get("clipn.class_set_hash", ""))
    for key, value in table.properties.items():
        if key.startswith(AGGREGATES_PROP):
            day = dt.date.fromisoformat(key[len(AGGREGATES_PROP):])
            record = json.loads(value)
            found[day] = Night(day, record.get("run_id", ""), NightAggregates.model_validate(record["aggregates"]),
                               record.get("model", ""))
    for day, run_id in runs.items():
        if day not in found:  # committed before aggregates were recorded: from its rows, one batch at a time
            scan = table.scan(row_filter=f"{RUN_DATE} = '{night(day).isoformat()}'")
            reader = scan.to_arrow_batch_reader()
            wanted = agg.columns(reader.schema)
            found[day] = Night(day, run_id, agg.merge((agg.partial(b.select(wanted)) for b in reader if b.num_rows),
                                                      computed_from="rows"), models.get(day, ""))
    return [n for d, n in sorted(found.items()) if d != exclude]


def output_nights(output, storage: Storage, exclude: dt.date | None = None) -> list[Night]:
    """The nights of the scoring job's output (``output``: its OutputConfig, a Parquet folder or a table) but
    ``exclude``'s."""
    if output.iceberg is not None:
        return iceberg_nights(output.iceberg, storage, exclude)
    return parquet_nights(output.uri, storage, exclude)
