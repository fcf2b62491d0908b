"""Config of ``clipn calibrate``: thresholds that keep target shares of ID images, from an ID sample only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from clipn_core.scores import SCORES
from schemas.common import TEMPLATES_HELP, FileExtensions, StorageConfig, StrictModel
from schemas.eval_config import EvalRuntimeConfig
from schemas.score_config import IMAGE_EXTENSIONS, ClassesConfig, ModelConfig, NegativesConfig


class CalibrationSampleConfig(StrictModel):
    """A labelled-ID sample: image objects under a prefix, a manifest of URIs, or the ID rows of an evaluation
    Parquet (``clipn evaluate``'s input)."""

    kind: Literal["prefix", "manifest", "eval"] = Field(
        "prefix", description="prefix: image objects under uri; manifest: Parquet/CSV of URIs; eval: the ID rows "
        "of an evaluation Parquet")
    uri: str = Field(..., description="the prefix, manifest or evaluation Parquet (local or s3://)")
    uri_column: str = Field("uri", description="manifest column holding image URIs")
    extensions: FileExtensions = Field(default_factory=lambda: list(IMAGE_EXTENSIONS), description="prefix: image extensions")
    image_column: str = Field("image", description="eval: column of encoded image bytes")
    is_id_column: str = Field("is_id", description="eval: boolean column, true for ID images (only those are used)")
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit (width x height)")
    fetch_concurrency: int = Field(32, ge=1, description="object reads in flight (prefix and manifest samples)")


class CalibrateOutputConfig(StrictModel):
    dir: str = Field(..., description="folder or s3:// prefix for calibration.json, calibration.md, "
                     "calibration.png and decision.yaml")


class CalibrateJobConfig(StrictModel):
    """Score an ID sample with the scoring job's own code and write, for every registered score, the thresholds
    that keep each target share of ID images (with bootstrap intervals), a ready decision: block and a report."""

    data: CalibrationSampleConfig
    model: ModelConfig
    classes: ClassesConfig
    templates: str | None = Field(None, description=TEMPLATES_HELP)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    targets: list[float] = Field(default_factory=lambda: [0.95, 0.99, 0.999],
                                 description="shares of ID images to keep, each in (0, 1)")
    decision_score: str = Field("atd", description="score of the ready decision: block (a registered score)")
    decision_target: float = Field(0.99, description="target of the ready decision: block (one of targets)")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples for the threshold intervals")
    seed: int = Field(0, description="seed of the bootstrap")
    output: CalibrateOutputConfig
    runtime: EvalRuntimeConfig = Field(default_factory=EvalRuntimeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("targets")
    @classmethod
    def _shares(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one target share")
        bad = [t for t in v if not 0.0 < t < 1.0]
        if bad:
            raise ValueError(f"target shares must be in (0, 1) (exclusive), got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _decision(self):
        if self.decision_score not in SCORES:
            raise ValueError(f"decision_score {self.decision_score!r} is not a registered score ({sorted(SCORES)})")
        if self.decision_target not in self.targets:
            raise ValueError(f"decision_target {self.decision_target} is not one of targets {self.targets}")
        return self
