"""Typed outputs of ``clipn evaluate`` (``report.json``) and ``clipn calibrate`` (``calibration.json``).

Like the run manifest, fields are only ever added and readers ignore those they do not
know. Percentages are in percent (0-100); shares are fractions (0-1).
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class _Report(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ModelRef(_Report):
    id: str = Field(description="model id: sha256 of the checkpoint weights (or the untrained model's identity)")
    checkpoint: str | None = None
    architecture: str | None = None


class ScoreMetrics(_Report):
    """Separation of ID (positive) from OOD by one score, in percent."""

    auroc: float
    fpr95: float = Field(description="share of OOD accepted while 95% of ID is kept")
    aupr_in: float
    aupr_out: float


class RuleRates(_Report):
    """Share (percent) of ID and of OOD images a decision flags as OOD."""

    id_flagged_ood: float
    ood_flagged_ood: float


class CalibratedRates(RuleRates):
    """A calibrated threshold's effect on a labelled set: ``score < threshold`` flags OOD."""

    score: str
    target: float = Field(description="share of ID images the threshold was calibrated to keep")
    threshold: float


class SplitMetrics(_Report):
    """One OOD split of a labelled set: its OOD images against all ID images."""

    ood: int = Field(description="OOD images of the split scored")
    scores: dict[str, ScoreMetrics]


class EvalData(_Report):
    uri: str
    rows: int
    id: int
    ood: int
    undecodable: int
    undecodable_rows: list[dict] = Field(default_factory=list, description="the first 20: row and status")


class EvalReport(_Report):
    """``clipn evaluate``: every registered score's separation of labelled ID and OOD images."""

    model: ModelRef
    logit_scale: float = Field(description="logit scale s the scores used")
    negatives_id: str | None = Field(None, description="identity of the negative labels the scores used (none: off)")
    bank_id: str | None = Field(None, description="identity of the lake bank clipn_neg_lake used (none: no bank)")
    preprocess: str
    classes: list[str]
    templates: dict
    class_set_hash: str
    data: EvalData
    scores: dict[str, ScoreMetrics]
    splits: dict[str, SplitMetrics] | None = Field(
        None, description="per OOD split (data.split_column, in order of first appearance): every score's metrics of "
        "that split's OOD images against all ID images; absent without a split column")
    decisions: dict[str, RuleRates] = Field(description="the threshold-free rules (CTW, ATD)")
    id_accuracy: float | None = Field(None, description="top-1 accuracy over the ID classes, percent")
    calibration: str | None = Field(None, description="id of the calibration whose thresholds were applied")
    calibrated: list[CalibratedRates] = Field(default_factory=list)
    files: list[str]
    seconds: float


class Threshold(_Report):
    """The threshold that keeps ``target`` of the ID sample (``score >= threshold`` is kept as ID)."""

    target: float = Field(description="share of ID images to keep, in (0, 1)")
    threshold: float
    ci_low: float = Field(description="bootstrap lower bound (2.5th percentile) of the threshold")
    ci_high: float = Field(description="bootstrap upper bound (97.5th percentile)")
    kept: float = Field(description="share of the sample the threshold keeps (ties may keep more than target)")
    tail: int = Field(description="sample images below the threshold: the estimate rests on these")


class SampleInfo(_Report):
    kind: str
    uri: str
    images: int = Field(description="ID images scored")
    undecodable: int


class CalibrationReport(_Report):
    """``clipn calibrate``: per registered score, the thresholds that keep target shares of ID images."""

    id: str = Field(description="content hash: the scoring job records it in its manifest")
    created_at: dt.datetime
    model_id: str
    class_set_hash: str
    logit_scale: float
    negatives_id: str | None = Field(None, description="identity of the negative labels the scores used (none: off)")
    bank_id: str | None = Field(None, description="identity of the lake bank clipn_neg_lake used (none: no bank)")
    preprocess: str
    classes: list[str]
    sample: SampleInfo
    bootstrap: dict = Field(description="resamples, seed and confidence of the intervals")
    thresholds: dict[str, list[Threshold]]
    id_flag_rates: dict[str, float] | None = Field(
        None, description="per threshold-free rule (ctw, atd), the share (0-1) of the ID sample's images it flags "
        "OOD: the lake bank's known false-flag rate of its evidence (clipn_core.lake_bank); absent from "
        "calibrations made before it was recorded")
    decision: dict = Field(description="a ready decision: block for the scoring job's config")

    def threshold(self, score: str, value: float) -> Threshold | None:
        """The calibrated threshold of ``score`` equal to ``value`` (to float rounding), if any."""
        for t in self.thresholds.get(score, []):
            if abs(t.threshold - value) <= 1e-9 * max(1.0, abs(value)):
                return t
        return None
