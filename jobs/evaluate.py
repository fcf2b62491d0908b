"""``clipn evaluate``: score labelled ID and OOD images with every registered score and write a report.

Runs in one process (no Ray): evaluation sets are thousands of images, not a lake.
The model, classes and templates are loaded exactly as the scoring job loads them,
and images go through the same decode and preprocess, so the figures describe what
the nightly job would do with that setup. Writes to ``output.dir``: ``report.json``,
``report.md``, ``roc.png``, ``histograms.png`` and ``scores.parquet`` (one row per
scored image: label, prediction, every score and decision).
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import clipn_core as cc
from clipn_core.errors import InputError, redact_uri
from clipn_core.images import DecodeError, SplitPreprocessor, split_preprocessor
from clipn_core.metrics import ood_metrics, top1_accuracy
from clipn_core.storage import Storage
from jobs.eval_report import histograms_png, markdown, roc_png
from jobs.inputs import checked_parquet
from jobs.score.scorer import load_model
from schemas.eval_config import EvalDataConfig, EvalJobConfig

log = logging.getLogger("clipn.evaluate")
REPORT_FILES = ("report.json", "report.md", "roc.png", "histograms.png", "scores.parquet")


def read_eval_set(cfg: EvalDataConfig, storage: Storage) -> pa.Table:
    """The labelled set with columns ``image``, ``is_id`` and (when configured) ``label``.

    Raises :class:`InputError` naming the URI or the config field at fault (missing
    path or column, wrong type, no ID or no OOD row).
    """
    wanted = {"image": ("data.image_column", cfg.image_column, (pa.binary(), pa.large_binary())),
              "is_id": ("data.is_id_column", cfg.is_id_column, (pa.bool_(),))}
    if cfg.label_column is not None:
        wanted["label"] = ("data.label_column", cfg.label_column, (pa.string(), pa.large_string()))
    ds = checked_parquet(cfg.uri, "data.uri", storage,
                         {field: (column, kinds) for field, column, kinds in wanted.values()})
    table = ds.to_table(columns=[c for _, c, _ in wanted.values()]).rename_columns(list(wanted))
    is_id = table["is_id"].fill_null(False).to_numpy(zero_copy_only=False)
    if table["is_id"].null_count:
        raise InputError(f"{redact_uri(cfg.uri)}: column {cfg.is_id_column!r} (data.is_id_column) has null values")
    if is_id.all() or not is_id.any():
        raise InputError(f"{redact_uri(cfg.uri)}: needs both ID and OOD images; found {int(is_id.sum())} ID "
                         f"and {int((~is_id).sum())} OOD ({cfg.is_id_column!r})")
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
        "scores": {name: ood_metrics(s[is_id], s[~is_id]).as_dict() for name, s in scores.items()},
        "decisions": {name: {"id_flagged_ood": float(100 * d[is_id].mean()),
                             "ood_flagged_ood": float(100 * d[~is_id].mean())} for name, d in decisions.items()},
        "id_accuracy": None,
    }
    if predicted is not None and labels is not None:
        out["id_accuracy"] = top1_accuracy(predicted[is_id], labels[is_id])
    return out


def _score_all(scorer: cc.BatchScorer, images: list, pre: SplitPreprocessor, batch_size: int, max_pixels: int):
    """Decode + score in batches; returns (kept row indices, predicted index, scores, decisions, undecodable)."""
    kept, undecodable = [], []
    preds, scores, decisions = [], {}, {}
    for start in range(0, len(images), batch_size):
        pixels, rows = [], []
        for i in range(start, min(start + batch_size, len(images))):
            out = pre.decode(images[i] or b"", max_pixels)
            if isinstance(out, DecodeError):
                undecodable.append({"row": i, "error": out.kind.value})
                continue
            pixels.append(out)
            rows.append(i)
        if not rows:
            continue
        out = scorer.score_pixels(torch.from_numpy(np.stack(pixels)))
        kept += rows
        preds.append(out.predicted_index)
        for name, v in out.scores.items():
            scores.setdefault(name, []).append(v)
        for name, v in out.decisions.items():
            decisions.setdefault(name, []).append(v)
        log.info("scored %d/%d images", min(start + batch_size, len(images)), len(images))
    cat = {k: np.concatenate(v) for k, v in scores.items()}
    return (np.array(kept, dtype=np.int64), np.concatenate(preds) if preds else np.zeros(0, np.int64), cat,
            {k: np.concatenate(v) for k, v in decisions.items()}, undecodable)


def run(cfg: EvalJobConfig) -> dict:
    """Evaluate; returns the report dict (also written as ``report.json`` under ``output.dir``)."""
    t0 = time.perf_counter()
    storage = cfg.storage.bind()
    rt = cfg.runtime
    if rt.device == "cuda" and not torch.cuda.is_available():
        raise cc.ModelConfigError("runtime.device is cuda but no CUDA device is visible")
    classes = cc.load_class_names(cfg.classes.names, cfg.classes.file, storage.options)
    templates = cc.load_templates(cfg.templates, storage.options)
    table = read_eval_set(cfg.data, storage)
    is_id_all = table["is_id"].to_numpy(zero_copy_only=False)
    labels_all = None
    if "label" in table.column_names:
        labels_all = _label_indices(table["label"].to_pylist(), is_id_all, classes, cfg.data.label_column)
    storage.check_writable(cfg.output.dir.rstrip("/"), "output.dir", probe="/.probe")

    model, model_id = load_model(cfg.model, storage, rt.cache_dir)
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), classes, templates)
    scorer = cc.BatchScorer(model, heads, rt.device, rt.precision, rt.logit_scale, rt.mcm_temperature)
    pre = split_preprocessor(model.preprocess_cfg, mode=rt.preprocess)
    log.info("evaluating model %s on %d images (%d ID), %d classes, %d templates", model_id[:16], len(table),
             int(is_id_all.sum()), len(classes), len(templates))
    kept, predicted, scores, decisions, undecodable = _score_all(
        scorer, table["image"].to_pylist(), pre, rt.batch_size, cfg.data.max_pixels)
    is_id = is_id_all[kept]
    if is_id.all() or not is_id.any():
        raise InputError(f"{redact_uri(cfg.data.uri)}: after leaving out {len(undecodable)} undecodable images "
                         "there are no ID or no OOD images left")
    labels = labels_all[kept] if labels_all is not None else None
    summary = summarize(scores, decisions, is_id, predicted if labels is not None else None, labels)
    report = {
        "model": {"id": model_id, "checkpoint": redact_uri(cfg.model.checkpoint) if cfg.model.checkpoint else None,
                  "architecture": cfg.model.architecture},
        "classes": list(classes),
        "templates": {"source": cfg.templates or "default", "count": len(templates)},
        "class_set_hash": heads.class_set_hash,
        "data": {"uri": redact_uri(cfg.data.uri), "rows": len(table), "id": int(is_id.sum()),
                 "ood": int((~is_id).sum()), "undecodable": len(undecodable), "undecodable_rows": undecodable[:20]},
        **summary,
        "files": list(REPORT_FILES),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write(cfg.output.dir, report, scores, decisions, is_id, kept, predicted, classes, table, storage)
    return report


def _write(out_dir: str, report: dict, scores, decisions, is_id, kept, predicted, classes, table, storage: Storage) -> None:
    root = out_dir.rstrip("/")
    per_image = {"row": kept, "is_id": is_id,
                 "predicted_class": [classes[i] for i in predicted]}
    if "label" in table.column_names:
        per_image["label"] = table["label"].take(pa.array(kept))
    per_image.update({f"score_{k}": v for k, v in scores.items()})
    per_image.update({f"is_ood_{k}": v for k, v in decisions.items()})
    buf = io.BytesIO()
    pq.write_table(pa.table(per_image), buf)
    auroc = {k: v["auroc"] for k, v in report["scores"].items()}
    # report.json last: its presence means the other files are complete
    storage.write_bytes(f"{root}/scores.parquet", buf.getvalue())
    storage.write_bytes(f"{root}/roc.png", roc_png(scores, is_id, auroc))
    storage.write_bytes(f"{root}/histograms.png", histograms_png(scores, is_id))
    storage.write_bytes(f"{root}/report.md", markdown(report).encode())
    storage.write_bytes(f"{root}/report.json", json.dumps(report, indent=2).encode())

