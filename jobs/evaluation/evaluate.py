"""``clipn evaluate``: score labelled ID and OOD images with every registered score and write a report.

Runs in one process (no Ray): evaluation sets are thousands of images, not a lake.
The model, classes and templates are loaded exactly as the scoring job loads them,
and images go through the same decode and preprocess, so the figures describe what
the nightly job would do with that setup. Writes to ``output.dir``: ``report.json``
(:class:`schemas.reports.EvalReport`), ``report.md``, ``roc.png``, ``histograms.png``
and ``scores.parquet`` (one row per scored image: label, prediction, every score and
decision). With ``calibration``, the report adds the ID and OOD shares each calibrated
threshold flags. With ``data.split_column`` the report also gives every score's metrics per OOD split
(e.g. near and far OOD: each split's OOD images against all ID images).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipn_core.errors import InputError, redact_uri
from clipn_core.heads import load_class_names
from clipn_core.metrics import ood_metrics, top1_accuracy
from clipn_core.storage import Storage
from jobs.calibration import check_fits, load_calibration
from jobs.evaluation.local_scoring import LocalScores, batch_scorer, score_images
from jobs.evaluation.report import histograms_png, markdown, roc_png
from jobs.inputs import checked_parquet
from jobs.scoring_setup import prepare
from schemas.eval_config import EvalDataConfig, EvalJobConfig
from schemas.reports import (
    CalibratedRates,
    CalibrationReport,
    EvalData,
    EvalReport,
    ModelRef,
    RuleRates,
    ScoreMetrics,
    SplitMetrics,
)

log = logging.getLogger("clipn.evaluate")
REPORT_FILES = ("report.json", "report.md", "roc.png", "histograms.png", "scores.parquet")


def read_eval_set(cfg: EvalDataConfig, storage: Storage) -> pa.Table:
    """The labelled set with columns ``image``, ``is_id`` and (when configured) ``label`` and ``split``.

    Raises :class:`InputError` naming the URI or the config field at fault (missing
    path or column, wrong type, no ID or no OOD row, an OOD row without a split).
    """
    wanted = {"image": ("data.image_column", cfg.image_column, (pa.binary(), pa.large_binary())),
              "is_id": ("data.is_id_column", cfg.is_id_column, (pa.bool_(),))}
    if cfg.label_column is not None:
        wanted["label"] = ("data.label_column", cfg.label_column, (pa.string(), pa.large_string()))
    if cfg.split_column is not None:
        wanted["split"] = ("data.split_column", cfg.split_column, (pa.string(), pa.large_string()))
    ds = checked_parquet(cfg.uri, "data.uri", storage,
                         {field: (column, kinds) for field, column, kinds in wanted.values()})
    table = ds.to_table(columns=[c for _, c, _ in wanted.values()]).rename_columns(list(wanted))
    is_id = table["is_id"].fill_null(False).to_numpy(zero_copy_only=False)
    if table["is_id"].null_count:
        raise InputError(f"{redact_uri(cfg.uri)}: column {cfg.is_id_column!r} (data.is_id_column) has null values")
    if is_id.all() or not is_id.any():
        raise InputError(f"{redact_uri(cfg.uri)}: needs both ID and OOD images; found {int(is_id.sum())} ID "
                         f"and {int((~is_id).sum())} OOD ({cfg.is_id_column!r})")
    if "split" in table.column_names:
        splits = table["split"].to_pylist()
        unnamed = [i for i, (s, ok) in enumerate(zip(splits, is_id)) if not ok and not s]
        if unnamed:
            raise InputError(f"{redact_uri(cfg.uri)}: OOD rows {unnamed[:5]} have no split in column "
                             f"{cfg.split_column!r} (data.split_column)")
    return table


def _label_indices(labels: list, is_id: np.ndarray, classes: tuple[str, ...], column: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(lab) for lab, ok in zip(labels, is_id) if ok and lab not in index})
    if unknown:
        raise InputError(f"ID labels {unknown[:5]} in column {column!r} (data.label_column) are not in the class list")
    return np.array([index.get(lab, -1) for lab in labels])


def summarize(scores: dict[str, np.ndarray], decisions: dict[str, np.ndarray], is_id: np.ndarray,
              predicted: np.ndarray | None = None, labels: np.ndarray | None = None) -> dict:
    """Metrics of one evaluation (percent): per score AUROC / FPR95 / AUPR-In / AUPR-Out (ID positive),
    per threshold-free rule the share of ID and of OOD images it flags as OOD, and top-1 ID accuracy
    when ``predicted`` and ``labels`` (class indices of the images) are given."""
    out = {
        "scores": {name: ScoreMetrics(**ood_metrics(s[is_id], s[~is_id]).as_dict()) for name, s in scores.items()},
        "decisions": {name: _rates(d, is_id) for name, d in decisions.items()},
        "id_accuracy": None,
    }
    if predicted is not None and labels is not None:
        out["id_accuracy"] = top1_accuracy(predicted[is_id], labels[is_id])
    return out


def split_metrics(scores: dict[str, np.ndarray], is_id: np.ndarray, splits: list) -> dict[str, SplitMetrics]:
    """Per OOD split (``splits[i]``: row i's split name; ID rows' are ignored), in order of first appearance among
    the OOD rows: every score's metrics of that split's OOD rows against all ID rows."""
    names = list(dict.fromkeys(s for s, ok in zip(splits, is_id) if not ok))
    split_of = np.array(splits, dtype=object)
    out = {}
    for name in names:
        ood = ~is_id & (split_of == name)
        out[name] = SplitMetrics(ood=int(ood.sum()), scores={
            k: ScoreMetrics(**ood_metrics(s[is_id], s[ood]).as_dict()) for k, s in scores.items()})
    return out


def _rates(flagged: np.ndarray, is_id: np.ndarray) -> RuleRates:
    return RuleRates(id_flagged_ood=float(100 * flagged[is_id].mean()), ood_flagged_ood=float(100 * flagged[~is_id].mean()))


def calibrated_rates(cal: CalibrationReport, scores: dict[str, np.ndarray], is_id: np.ndarray) -> list[CalibratedRates]:
    """Every calibrated threshold applied to this labelled set (``score < threshold`` flags OOD)."""
    out = []
    for name, thresholds in cal.thresholds.items():
        if name not in scores:
            continue
        for t in thresholds:
            rates = _rates(scores[name] < t.threshold, is_id)
            out.append(CalibratedRates(score=name, target=t.target, threshold=t.threshold, **rates.model_dump()))
    return out


def run(cfg: EvalJobConfig) -> EvalReport:
    """Evaluate; returns the report (also written as ``report.json`` under ``output.dir``)."""
    t0 = time.perf_counter()
    storage = cfg.storage.bind()
    rt = cfg.runtime
    table = read_eval_set(cfg.data, storage)
    is_id_all = table["is_id"].to_numpy(zero_copy_only=False)
    labels_all = None
    if "label" in table.column_names:  # labels and calibration are read before the model, heads and negatives
        classes = load_class_names(cfg.classes.names, cfg.classes.file, storage.options, cfg.classes.set)
        labels_all = _label_indices(table["label"].to_pylist(), is_id_all, classes, cfg.data.label_column)
    calibration = load_calibration(cfg.calibration, storage) if cfg.calibration else None
    setup, model = prepare(cfg.model, cfg.classes, cfg.templates, rt, storage, cfg.negatives)
    storage.check_writable(cfg.output.dir.rstrip("/"), "output.dir", probe="/.probe")
    if calibration is not None:
        check_fits(calibration, cfg.calibration, setup)

    scorer = batch_scorer(model, setup, rt, rt.device)
    log.info("evaluating model %s (logit scale %.2f) on %d images (%d ID), %d classes, %d templates",
             setup.model_id[:16], setup.logit_scale, len(table), int(is_id_all.sum()), len(setup.classes),
             len(setup.templates))
    result = score_images(scorer, setup, rt, table["image"].to_pylist(), rt.batch_size, cfg.data.max_pixels,
                          total=len(table))
    is_id = is_id_all[result.kept]
    if is_id.all() or not is_id.any():
        raise InputError(f"{redact_uri(cfg.data.uri)}: after leaving out {len(result.undecodable)} undecodable "
                         "images there are no ID or no OOD images left")
    labels = labels_all[result.kept] if labels_all is not None else None
    summary = summarize(result.scores, result.decisions, is_id, result.predicted if labels is not None else None,
                        labels)
    splits = None
    if "split" in table.column_names:
        splits = split_metrics(result.scores, is_id, table["split"].take(pa.array(result.kept)).to_pylist())
    report = EvalReport(
        model=ModelRef(id=setup.model_id, checkpoint=redact_uri(cfg.model.checkpoint) if cfg.model.checkpoint else None,
                       architecture=cfg.model.architecture),
        logit_scale=setup.logit_scale, negatives_id=setup.negatives_id, bank_id=setup.bank_id,
        preprocess=rt.preprocess,
        classes=list(setup.classes),
        templates={"source": cfg.templates or "default", "count": len(setup.templates)},
        class_set_hash=setup.heads.class_set_hash,
        data=EvalData(uri=redact_uri(cfg.data.uri), rows=len(table), id=int(is_id.sum()), ood=int((~is_id).sum()),
                      undecodable=len(result.undecodable), undecodable_rows=result.undecodable[:20]),
        **summary,
        splits=splits,
        calibration=calibration.id if calibration else None,
        calibrated=calibrated_rates(calibration, result.scores, is_id) if calibration else [],
        files=list(REPORT_FILES), seconds=round(time.perf_counter() - t0, 1),
    )
    _write(cfg.output.dir, report, result, is_id, setup.classes, table, storage)
    return report


def _write(out_dir: str, report: EvalReport, result: LocalScores, is_id, classes, table, storage: Storage) -> None:
    root = out_dir.rstrip("/")
    per_image = {"row": result.kept, "is_id": is_id, "predicted_class": [classes[i] for i in result.predicted]}
    for column in ("label", "split"):
        if column in table.column_names:
            per_image[column] = table[column].take(pa.array(result.kept))
    per_image.update({f"score_{k}": v for k, v in result.scores.items()})
    per_image.update({f"is_ood_{k}": v for k, v in result.decisions.items()})
    buf = io.BytesIO()
    pq.write_table(pa.table(per_image), buf)
    auroc = {k: v.auroc for k, v in report.scores.items()}
    # report.json last: its presence means the other files are complete
    storage.write_bytes(f"{root}/scores.parquet", buf.getvalue())
    storage.write_bytes(f"{root}/roc.png", roc_png(result.scores, is_id, auroc))
    storage.write_bytes(f"{root}/histograms.png", histograms_png(result.scores, is_id))
    storage.write_bytes(f"{root}/report.md", markdown(report).encode())
    # without a split column the report is as it was before splits existed
    storage.write_bytes(f"{root}/report.json", report.model_dump_json(
        indent=2, exclude={"splits"} if report.splits is None else None).encode())
