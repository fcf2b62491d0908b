"""The scoring job's lake bank (``output.lake_bank``): where a night's bank is kept, which earlier one a night
uses, which OOD flags it learns from and how often those flag ID images, and building it from the staged rows.

After a night, the surest OOD ``ok`` rows that the evidence flags OOD and the surest ID ones left unflagged
give their embeddings to a bank of image proxies (:mod:`clipn_core.lake_bank`), stored beside the output
under the model id and class set; the next night scores ``clipn_neg_lake`` with the latest one.

The evidence's rate of flagging ID images, ``p``, gates the OOD proxies, so it must be known: it comes from a
calibration on an ID sample (``clipn calibrate``), checked against the run's model, class set and logit scale
like a decision's calibration. With a calibrated threshold decision on a score that does not read the bank
(and no other calibration named in ``lake_bank.calibration``) the evidence is that decision, ``is_ood``, and
``p`` the share of the calibration's sample its threshold flags (``1 - kept``); otherwise it is ATD's
threshold-free rule, ``ood_atd``, and ``p`` the share of the sample that rule flags (a threshold on
``clipn_neg_lake`` would feed the bank its own verdicts, a hand-set threshold has no known rate, and CTW's
rule is not the score the proxies are ranked by).
"""

from __future__ import annotations

import datetime as dt

from clipn_core.errors import CalibrationError, redact_uri
from clipn_core.lake_bank import Evidence, LakeBank, bank_from_bytes, build_bank, keep_for_bank
from clipn_core.storage import Storage
from jobs.calibration import check_fits, check_threshold
from jobs.score.publish import published_nights
from jobs.scoring_setup import ScoringSetup
from schemas.manifest import ScoreManifest
from schemas.reports import CalibrationReport
from schemas.score_config import DecisionConfig, LakeBankConfig, ScoreJobConfig
from schemas.status import STATUS_OK

ATD_RULE = "atd"


def bank_path(root: str, model_id: str, class_set_hash: str, run_id: str) -> str:
    """Where a run's lake bank is kept: beside the output, keyed by model id and class set, versioned by run."""
    return f"{root.rstrip('/')}/_banks/{model_id[:16]}-{class_set_hash}/{run_id}.safetensors"


def latest_bank(root: str, run_date: dt.date, model_id: str, class_set_hash: str,
                storage: Storage) -> tuple[str, LakeBank] | None:
    """(URI, bank) built by the latest published night of ``root`` before ``run_date`` with the same model and
    class set, or None. Reads one manifest per published night."""
    best: ScoreManifest | None = None
    for _, manifest in published_nights(root, storage, exclude=run_date):
        if (manifest.run_date < run_date and manifest.lake_bank_built and manifest.model_id == model_id
                and manifest.class_set_hash == class_set_hash and (best is None or manifest.run_date > best.run_date)):
            best = manifest
    if best is None:
        return None
    return best.lake_bank_built, bank_from_bytes(storage.read_bytes(best.lake_bank_built))


def evidence_column(decision: DecisionConfig, calibration: str | None) -> str:
    """The output column whose OOD flags the bank learns from, for the job's ``decision`` and the bank's
    ``calibration`` (:meth:`ScoreJobConfig.bank_calibration`): ``is_ood`` when the decision is a threshold
    calibrated in that very file on a score that does not read the bank, else ``ood_atd``."""
    from clipn_core.scores import SCORES
    from schemas.output import ood_column

    if (decision.rule == "threshold" and decision.calibration is not None and calibration == decision.calibration
            and not SCORES[decision.score].uses_bank):
        return "is_ood"
    return ood_column(ATD_RULE)


def bank_evidence(cfg: ScoreJobConfig, setup: ScoringSetup, cal: CalibrationReport) -> Evidence:
    """The evidence of this run's lake bank, with its ID flag rate from ``cal``, the bank's calibration
    (:meth:`ScoreJobConfig.bank_calibration`, read by the caller before the model is built), which must fit the run
    (:func:`jobs.calibration.check_fits`). Raises :class:`CalibrationError` naming the file when it does not fit,
    does not hold the decision's threshold, or (ATD's rule) predates the rules' rates (rerun ``clipn calibrate``);
    ValueError when the config names no calibration (its validation prevents that)."""
    uri = cfg.bank_calibration()
    if uri is None:
        raise ValueError("output.lake_bank needs lake_bank.calibration or decision.calibration")
    column = evidence_column(cfg.decision, uri)
    if column == "is_ood":
        d = cfg.decision
        check_fits(cal, uri, setup, d.score)
        check_threshold(cal, uri, d.score, d.threshold)
        return Evidence(column, 1.0 - cal.threshold(d.score, d.threshold).kept, cal.id, cal.sample.images)
    check_fits(cal, uri, setup, ATD_RULE)
    rate = (cal.id_flag_rates or {}).get(ATD_RULE)
    if rate is None:
        raise CalibrationError(f"calibration {redact_uri(uri)} ({cal.id}) does not record the share of ID images "
                               "ATD's rule flags, which output.lake_bank needs (lake_bank.calibration, else "
                               "decision.calibration): it predates that record; rerun clipn calibrate")
    return Evidence(column, rate, cal.id, cal.sample.images)


def build_lake_bank(staged: str, storage: Storage, ok_rows: int, evidence: Evidence,
                    settings: LakeBankConfig) -> LakeBank:
    """A lake bank from a run's staged rows (``ok`` rows' embeddings, ATD scores and the ``evidence`` column's OOD
    flags), reading at most ``settings.max_rows`` of them, chosen by a hash of their URI (so the same rows
    whatever the file order). A row whose flag is null counts as not flagged."""
    import numpy as np
    import pyarrow.dataset as pads

    from schemas.output import OUTPUT_SCHEMA

    rate = min(1.0, settings.max_rows / max(1, ok_rows))
    feats, scores, flags, uris = [], [], [], []
    dataset = pads.dataset(storage.fs(staged)[1], filesystem=storage.arrow(staged)[0], format="parquet",
                           schema=OUTPUT_SCHEMA)
    for batch in dataset.to_batches(columns=["uri", "status", "score_atd", evidence.column, "embedding"],
                                    filter=pads.field("status") == STATUS_OK):
        for uri, score, flag, emb in zip(batch.column("uri").to_pylist(), batch.column("score_atd").to_pylist(),
                                         batch.column(evidence.column).to_pylist(),
                                         batch.column("embedding").to_pylist()):
            if emb is not None and score is not None and keep_for_bank(uri, rate):
                feats.append(np.asarray(emb, dtype=np.float32))
                scores.append(score)
                flags.append(bool(flag))
                uris.append(uri)
    bank = build_bank(np.stack(feats) if feats else np.zeros((0, 0), np.float32), np.asarray(scores),
                      np.asarray(flags, dtype=bool), uris, evidence, quantile=settings.quantile,
                      clusters=settings.clusters, min_ood_rows=settings.min_ood_rows,
                      min_purity=settings.min_purity)
    bank.meta["max_rows"] = settings.max_rows
    return bank
