"""Select: a published night's rows (Parquet folder or Iceberg table, read as the rest of the project reads them)
and the three sections of the review page.

* **most OOD**: the ``ok`` rows with the lowest decision score (ID scores: higher = more ID);
* **borderline**: the ``ok`` rows closest to the decision threshold, on both sides of it;
* **kept sample**: a seeded random sample of the ``ok`` rows the decision kept (``is_ood`` false).

Sections never share a row: each takes from what the ones before it left. The threshold is the decision's own
for ``rule: threshold``; the threshold-free rules (CTW, ATD) decide per image without one, so the page uses the
score value that best separates the night's ``is_ood`` flags (fewest rows on the wrong side), which is where the
decision changes on that night's data.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from clipn_core.errors import InputError, redact_uri
from clipn_core.storage import Storage
from schemas.output import score_column
from schemas.review_config import ReviewConfig
from schemas.status import STATUS_OK

# what the page shows of a row; every score column is added from the registry
BASE_COLUMNS = ("uri", "status", "error", "predicted_class", "predicted_prob", "is_ood")


@dataclass(frozen=True)
class Night:
    """A night's rows and what scored them. ``rows``: one Arrow row per input (the columns of
    :data:`BASE_COLUMNS` and every ``score_*`` column); ``decision``: the decision block that filled ``is_ood``
    (``rule``, ``score``, ``threshold``), None when the output did not record it; ``source``: where it was read
    (credentials removed)."""

    run_date: dt.date
    rows: pa.Table
    decision: dict | None
    source: str
    run_id: str | None = None


@dataclass(frozen=True)
class Section:
    """One section of the page: ``key`` (its HTML id), ``title``, ``note`` (how it was chosen) and its rows (dicts
    of :data:`BASE_COLUMNS` plus ``scores``: score name -> value, and ``score``: the ranking score's value)."""

    key: str
    title: str
    note: str
    rows: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Selection:
    """The page's content: the ranking score's name, the threshold used (and whether it is the decision's own or
    fitted), the ok rows' scores and flags (float64 / bool arrays [N ok]) for the histogram, rows by status, and
    the three sections."""

    score: str
    threshold: float | None
    threshold_fitted: bool
    ok_scores: np.ndarray
    ok_flags: np.ndarray
    by_status: dict[str, int]
    sections: list[Section]


def _columns(available: list[str]) -> list[str]:
    from clipn_core.scores import SCORES

    wanted = [*BASE_COLUMNS, *(score_column(n) for n in SCORES)]
    return [c for c in wanted if c in available]


def read_parquet_night(root: str, run_date: dt.date, storage: Storage) -> Night:
    """The night's rows from a Parquet folder output: the files its manifest names
    (:func:`jobs.score.publish.published_nights`, :func:`~jobs.score.publish.night_files`); :class:`InputError`
    naming the folder when the night is not published there."""
    from jobs.score.publish import night_files, partition_path, published_nights

    fs, _ = storage.fs(root)
    want = storage.fs(partition_path(root, run_date))[1].rstrip("/")
    found = [(part, m) for part, m in published_nights(root, storage) if part == want]
    if not found:
        raise InputError(f"output {redact_uri(root)}: no published night {run_date.isoformat()} (no manifest naming "
                         "its files); run clipn score for it first")
    part, manifest = found[0]
    files = night_files(fs, part, manifest)
    arrow_fs = storage.arrow(root)[0]
    dataset = pads.dataset(files, filesystem=arrow_fs, format="parquet")
    rows = dataset.to_table(columns=_columns(dataset.schema.names))
    return Night(run_date, rows, manifest.decision, redact_uri(partition_path(root, run_date)), manifest.run_id)


def read_iceberg_night(cfg: ReviewConfig, storage: Storage) -> Night:
    """The night's rows from an Iceberg table output: the rows of the latest run committed for the night (its
    model and class set, from its snapshot's ``clipn.*`` properties), read with a pyiceberg scan filtered on the
    ``run_date`` partition; :class:`InputError` naming the table when it or the night is missing."""
    from pyiceberg.expressions import And, EqualTo

    from jobs.score.iceberg import RUN_DATE, load_table, night

    table = load_table(cfg.iceberg, storage, create=False)
    if table is None:
        raise InputError(f"iceberg.table {cfg.iceberg.table}: no such table in catalog {cfg.iceberg.catalog!r}")
    day = cfg.run_date.isoformat()
    runs = [s for s in table.metadata.snapshots  # snapshots are in commit order: the last one of the night wins
            if s.summary and s.summary.additional_properties.get("clipn.run_date") == day]
    if not runs:
        raise InputError(f"iceberg.table {cfg.iceberg.table}: no run committed for night {day}")
    props = runs[-1].summary.additional_properties
    decision = json.loads(props["clipn.decision"]) if props.get("clipn.decision") else None
    where = And(EqualTo(RUN_DATE, night(cfg.run_date).isoformat()),
                And(EqualTo("model_id", props["clipn.model_id"]), EqualTo("class_set_hash", props["clipn.class_set_hash"])))
    names = [f.name for f in table.schema().fields]
    rows = table.scan(row_filter=where, selected_fields=tuple(_columns(names))).to_arrow()
    return Night(cfg.run_date, rows, decision, f"Iceberg table {cfg.iceberg.table}", props.get("clipn.run_id"))


def read_night(cfg: ReviewConfig, storage: Storage) -> Night:
    """The night ``cfg`` names, from whichever output it names."""
    if cfg.iceberg is not None:
        return read_iceberg_night(cfg, storage)
    return read_parquet_night(cfg.output, cfg.run_date, storage)


def ranking_score(cfg: ReviewConfig, night: Night) -> tuple[str, float | None]:
    """(score name the page ranks by, the decision's threshold on it or None): ``cfg.score``, else the decision's
    (its ``score`` for ``rule: threshold``, the rule's own score for CTW and ATD); :class:`InputError` naming
    ``score`` when neither is known."""
    decision = night.decision or {}
    rule = decision.get("rule")
    own = decision.get("score") if rule == "threshold" else rule
    name = cfg.score or own
    if name is None:
        raise InputError(f"{night.source}: the night does not record its decision; give score (e.g. --score atd)")
    threshold = decision.get("threshold") if rule == "threshold" and name == own else None
    return name, threshold


def fitted_threshold(scores: np.ndarray, flags: np.ndarray) -> float | None:
    """The score value ``t`` for which ``score < t`` disagrees with ``flags`` (bool [N], True = OOD) on the fewest
    rows (ties: the lowest such cut), halfway between the two scores it falls between; None for no rows.
    ``scores``: float [N]."""
    if len(scores) == 0:
        return None
    order = np.argsort(scores, kind="stable")
    s, f = scores[order], flags[order].astype(np.int64)
    # cut i: the i lowest rows called OOD. Wrong: kept rows below the cut + flagged rows at or above it
    below_kept = np.concatenate([[0], np.cumsum(1 - f)])
    above_flagged = f.sum() - np.concatenate([[0], np.cumsum(f)])
    i = int(np.argmin(below_kept + above_flagged))
    if i == 0:
        return float(s[0])
    if i == len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float((s[i - 1] + s[i]) / 2)


def _row(table: pa.Table, i: int, score: str) -> dict:
    row = {c: table.column(c)[i].as_py() for c in table.column_names}
    row["scores"] = {c[len("score_"):]: v for c, v in row.items() if c.startswith("score_") and v is not None}
    row["score"] = row["scores"].get(score)
    return row


def select(cfg: ReviewConfig, night: Night) -> Selection:
    """The three sections of ``night`` (module docstring), ``cfg.per_section`` rows each at most."""
    score, threshold = ranking_score(cfg, night)
    rows = night.rows
    column = score_column(score)
    if column not in rows.column_names:
        raise InputError(f"{night.source}: the night has no column {column} (score {score!r})")
    status = rows.column("status")
    by_status = {v["values"]: v["counts"] for v in pc.value_counts(status).to_pylist()} if len(rows) else {}
    ok = rows.filter(pc.and_(pc.equal(status, STATUS_OK), pc.is_valid(rows.column(column))))
    values = ok.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    flags = pc.fill_null(ok.column("is_ood"), False).to_numpy(zero_copy_only=False).astype(bool)
    fitted = threshold is None
    if fitted:
        threshold = fitted_threshold(values, flags)
    n = cfg.per_section
    left = np.ones(len(ok), dtype=bool)

    def take(candidates: np.ndarray) -> list[dict]:
        chosen = [int(i) for i in candidates if left[i]][:n]
        left[chosen] = False
        return [_row(ok, i, score) for i in chosen]

    order = np.argsort(values, kind="stable")
    most_ood = take(order[flags[order]])
    near = np.argsort(np.abs(values - threshold), kind="stable") if threshold is not None else np.array([], int)
    borderline = take(near)
    kept = np.flatnonzero(~flags & left)
    sample = np.random.default_rng(cfg.seed).permutation(kept) if len(kept) else kept
    kept_rows = take(np.sort(sample[:n]))
    how = "fitted to the night's flags" if fitted else "the decision's"
    t = f"{threshold:.4g}" if threshold is not None else "none"
    sections = [
        Section("most-ood", "Most OOD", f"up to {n} flagged images, the lowest {score} scores", most_ood),
        Section("borderline", "Borderline", f"up to {n} images whose {score} score is closest to the threshold "
                f"{t} ({how}), on both sides", borderline),
        Section("kept", "Kept sample", f"up to {n} kept (ID) images drawn at random (seed {cfg.seed})", kept_rows),
    ]
    return Selection(score, threshold, fitted, values, flags, dict(sorted(by_status.items())), sections)
