"""``clipn calibrate``: operating points from in-distribution images only.

Reads a labelled-ID sample (a prefix, a manifest of URIs or the ID rows of an evaluation
Parquet), scores it in this process with the scoring job's own setup, decode and scorer
(:mod:`jobs.scoring_setup`, :mod:`jobs.evaluation.local_scoring`), and writes to ``output.dir``:

* ``calibration.json`` (:class:`schemas.reports.CalibrationReport`, written last): for every
  registered score and target share, the threshold keeping that share of ID images
  (:mod:`clipn_core.calibration`), its bootstrap interval and the tail it rests on, with
  the model id, class set and logit scale it is valid for; and per threshold-free rule
  (CTW, ATD) the share of the sample it flags OOD (the lake bank's evidence rate);
* ``decision.yaml``: a ready ``decision:`` block for the scoring job's config;
* ``calibration.md`` and ``calibration.png`` (ID score histograms, thresholds marked).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import yaml

from clipn_core.calibration import bootstrap_interval, id_threshold
from clipn_core.errors import InputError, redact_uri
from clipn_core.storage import Storage
from jobs.evaluation.local_scoring import batch_scorer, score_images
from jobs.evaluation.report import calibration_markdown, calibration_png
from jobs.inputs import checked_parquet, list_objects
from jobs.score.read import fetch
from jobs.scoring_setup import prepare
from schemas.calibrate_config import CalibrateJobConfig, CalibrationSampleConfig
from schemas.reports import CalibrationReport, SampleInfo, Threshold

log = logging.getLogger("clipn.calibrate")
FILES = ("calibration.json", "decision.yaml", "calibration.md", "calibration.png")
THIN_TAIL = 10  # a threshold resting on fewer sample images below it is flagged as unstable in the report


def _sample_uris(cfg: CalibrationSampleConfig, storage: Storage) -> list[str]:
    """The sample's image URIs: listed under a prefix, or read from a manifest's ``uri_column`` (a sample is
    thousands of images, so here, not in Ray)."""
    if cfg.kind == "prefix":
        return list_objects(cfg.uri, cfg.extensions, storage)
    if not storage.exists(cfg.uri):
        raise InputError(f"data.uri does not exist: {redact_uri(cfg.uri)}")
    arrow_fs, path = storage.arrow(cfg.uri)
    ds = pads.dataset(path, filesystem=arrow_fs, format="csv" if path.endswith(".csv") else "parquet")
    if cfg.uri_column not in ds.schema.names:
        raise InputError(f"manifest {redact_uri(cfg.uri)} has no column {cfg.uri_column!r} (data.uri_column)")
    return [str(u) for u in ds.to_table(columns=[cfg.uri_column])[cfg.uri_column].to_pylist() if u]


def _fetched(uris: list[str], storage: Storage, concurrency: int, chunk: int = 256) -> Iterator[bytes | Exception]:
    for start in range(0, len(uris), chunk):
        yield from fetch(uris[start:start + chunk], storage, concurrency)


def read_sample(cfg: CalibrationSampleConfig, storage: Storage) -> tuple[int, Iterator[bytes | Exception]]:
    """(number of images, their encoded bytes as they are read) of the ID sample; :class:`InputError` naming the
    URI or field when it is missing, malformed or empty."""
    if cfg.kind == "eval":
        ds = checked_parquet(cfg.uri, "data.uri", storage, {
            "data.image_column": (cfg.image_column, (pa.binary(), pa.large_binary())),
            "data.is_id_column": (cfg.is_id_column, (pa.bool_(),))})
        table = ds.to_table(columns=[cfg.image_column, cfg.is_id_column])
        images = table.filter(pc.fill_null(table[cfg.is_id_column], False))[cfg.image_column].to_pylist()
        if not images:
            raise InputError(f"{redact_uri(cfg.uri)} holds no ID rows ({cfg.is_id_column!r} is never true): "
                             "an empty ID sample")
        return len(images), iter(images)
    uris = _sample_uris(cfg, storage)
    if not uris:
        raise InputError(f"the ID sample at {redact_uri(cfg.uri)} is empty (data.uri)")
    return len(uris), _fetched(uris, storage, cfg.fetch_concurrency)


def thresholds(scores, targets: list[float], resamples: int, seed: int) -> list[Threshold]:
    """Every target's threshold for one score's ID values, with its bootstrap interval."""
    out = []
    for target in targets:
        value, kept, tail = id_threshold(scores, target)
        low, high = bootstrap_interval(scores, target, resamples, seed)
        out.append(Threshold(target=target, threshold=value, ci_low=low, ci_high=high, kept=kept, tail=tail))
    return out


def run(cfg: CalibrateJobConfig) -> CalibrationReport:
    """Calibrate; returns the report (also written as ``calibration.json`` under ``output.dir``)."""
    storage = cfg.storage.bind()
    rt = cfg.runtime
    setup, model = prepare(cfg.model, cfg.classes, cfg.templates, rt, storage, cfg.negatives)
    count, images = read_sample(cfg.data, storage)
    root = cfg.output.dir.rstrip("/")
    storage.check_writable(root, "output.dir", probe="/.probe")
    log.info("calibrating model %s (logit scale %.2f) on %d ID images, targets %s", setup.model_id[:16],
             setup.logit_scale, count, cfg.targets)
    result = score_images(batch_scorer(model, setup, rt, rt.device), setup, rt, images, rt.batch_size,
                          cfg.data.max_pixels, total=count)
    if not len(result.kept):
        raise InputError(f"none of the {count} images of the ID sample at {redact_uri(cfg.data.uri)} could be "
                         "read and decoded: an empty ID sample")
    per_score = {name: thresholds(values, cfg.targets, cfg.bootstrap, cfg.seed) for name, values in result.scores.items()}
    chosen = next(t for t in per_score[cfg.decision_score] if t.target == cfg.decision_target)
    flag_rates = {name: float(flags.mean()) for name, flags in result.decisions.items()}
    content = {"model_id": setup.model_id, "class_set_hash": setup.heads.class_set_hash,
               "logit_scale": setup.logit_scale, "negatives_id": setup.negatives_id, "bank_id": setup.bank_id,
               "preprocess": rt.preprocess,
               "sample": [redact_uri(cfg.data.uri), len(result.kept)],
               "thresholds": {k: [t.model_dump() for t in v] for k, v in per_score.items()},
               "id_flag_rates": flag_rates}
    cal_id = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    report = CalibrationReport(
        id=cal_id, created_at=dt.datetime.now(dt.timezone.utc), model_id=setup.model_id,
        class_set_hash=setup.heads.class_set_hash, logit_scale=setup.logit_scale, negatives_id=setup.negatives_id,
        bank_id=setup.bank_id, preprocess=rt.preprocess,
        classes=list(setup.classes),
        sample=SampleInfo(kind=cfg.data.kind, uri=redact_uri(cfg.data.uri), images=len(result.kept),
                          undecodable=len(result.undecodable)),
        bootstrap={"resamples": cfg.bootstrap, "seed": cfg.seed, "confidence": 0.95},
        thresholds=per_score, id_flag_rates=flag_rates,
        decision={"rule": "threshold", "score": cfg.decision_score, "threshold": chosen.threshold,
                  "calibration": f"{root}/calibration.json"},
    )
    decision = yaml.safe_dump({"decision": report.decision}, sort_keys=False)
    header = (f"# keeps {cfg.decision_target:.1%} of ID images ({cfg.decision_score} >= {chosen.threshold:.6g}); "
              f"calibration {cal_id}, model {setup.model_id[:16]}, logit scale {setup.logit_scale:g}\n")
    storage.write_bytes(f"{root}/decision.yaml", (header + decision).encode())
    storage.write_bytes(f"{root}/calibration.png", calibration_png(result.scores, per_score))
    storage.write_bytes(f"{root}/calibration.md", calibration_markdown(report, THIN_TAIL).encode())
    storage.write_bytes(f"{root}/calibration.json", report.model_dump_json(indent=2).encode())  # last: complete
    return report
