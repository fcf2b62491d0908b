"""Reading a calibration (``calibration.json`` of ``clipn calibrate``) and checking that it fits a run.

A threshold means something only for the model, class set and logit scale it was
calibrated with: the scoring job and ``clipn evaluate`` refuse any other, naming what
differs. Both packages use it (:mod:`jobs.score`, :mod:`jobs.evaluation`), so it belongs to
neither: the scoring job never imports the evaluation package.
"""

from __future__ import annotations

from pydantic import ValidationError

from clipn_core.errors import CalibrationError, StorageError, redact_uri
from clipn_core.scores import SCORES
from clipn_core.storage import Storage
from jobs.scoring_setup import ScoringSetup
from schemas.reports import CalibrationReport


def load_calibration(uri: str, storage: Storage) -> CalibrationReport:
    """The calibration at ``uri``; :class:`CalibrationError` naming the file when it cannot be read or parsed."""
    try:
        return CalibrationReport.model_validate_json(storage.read_bytes(uri))
    except StorageError as e:
        raise CalibrationError(f"calibration {redact_uri(uri)}: {e}") from e
    except ValidationError as e:
        raise CalibrationError(f"{redact_uri(uri)} is not a clipn calibration: {e.errors()[0]['msg']} "
                               f"({'.'.join(map(str, e.errors()[0]['loc']))})") from e


def check_fits(cal: CalibrationReport, uri: str, setup: ScoringSetup, score: str | None = None) -> None:
    """Raise :class:`CalibrationError` unless ``cal`` was made with this setup's model, class set and logit scale,
    and with its negative labels and lake bank where they matter: for every score when ``score`` is None (a
    report over all scores), else only when that score reads them (``needs_negatives`` / ``uses_bank`` in the
    score registry). A nightly decision on ``ctw`` therefore keeps its calibration while ``output.lake_bank``
    brings a new bank every night; one on ``clipn_neg_lake`` needs the bank it was calibrated with
    (``negatives.bank``)."""
    entry = SCORES[score] if score is not None else None
    mismatches = []
    if cal.model_id != setup.model_id:
        mismatches.append(f"model id {cal.model_id[:16]} vs the run's {setup.model_id[:16]}")
    if cal.class_set_hash != setup.heads.class_set_hash:
        mismatches.append(f"class set {cal.class_set_hash} vs the run's {setup.heads.class_set_hash} "
                          "(classes or templates differ)")
    if abs(cal.logit_scale - setup.logit_scale) > 1e-6 * max(1.0, setup.logit_scale):
        mismatches.append(f"logit scale {cal.logit_scale:g} vs the run's {setup.logit_scale:g}")
    if (entry is None or entry.needs_negatives) and cal.negatives_id != setup.negatives_id:
        mismatches.append(f"negative labels {cal.negatives_id} vs the run's {setup.negatives_id}")
    if (entry is None or entry.uses_bank) and cal.bank_id != setup.bank_id:
        mismatches.append(f"lake bank {cal.bank_id} vs the run's {setup.bank_id}"
                          + (f" ({score} reads the bank: set negatives.bank to the calibrated one)" if entry else ""))
    if mismatches:
        raise CalibrationError(f"calibration {redact_uri(uri)} ({cal.id}) does not fit this run: "
                               + "; ".join(mismatches))


def check_threshold(cal: CalibrationReport, uri: str, score: str, threshold: float) -> None:
    """Raise :class:`CalibrationError` unless ``threshold`` is one of ``cal``'s thresholds for ``score``."""
    if cal.threshold(score, threshold) is None:
        held = ", ".join(f"{t.threshold:.6g} ({t.target:g})" for t in cal.thresholds.get(score, []))
        raise CalibrationError(f"decision.threshold {threshold:g} is not one of calibration {redact_uri(uri)}'s "
                               f"thresholds for {score} ({held or 'none'})")
