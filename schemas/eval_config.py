"""Config of the evaluation job (``clipn evaluate``). Extra fields are forbidden everywhere.

The model and class sections are the scoring job's own models, so an evaluated setup
is exactly what the nightly job would run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.common import TEMPLATES_HELP, StorageConfig, StrictModel
from schemas.score_config import ClassesConfig, ModelConfig, NegativesConfig, ScoringOptions


class EvalDataConfig(StrictModel):
    """A labelled Parquet set: encoded images, an ID/OOD flag and (for ID accuracy) the ID class name."""

    uri: str = Field(..., description="Parquet file or folder (local or s3://) of the labelled ID and OOD images")
    image_column: str = Field("image", description="column of encoded image bytes")
    is_id_column: str = Field("is_id", description="boolean column: true for in-distribution images")
    # No default column name: a set has whatever label column it has, and guessing one would fail sets without it.
    label_column: str | None = Field(None, description="column of each ID image's class name, for ID accuracy "
                                     "(unset: no accuracy)")
    split_column: str | None = Field(
        None, description="string column naming each OOD image's split (e.g. near, far; ID rows' values are ignored): "
        "the report adds every score's metrics per split, that split's OOD images against all ID images "
        "(as OpenOOD v1.5 reports near and far OOD apart; unset: no splits)")
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit (width x height)")


class EvalOutputConfig(StrictModel):
    dir: str = Field(..., description="folder or s3:// prefix for report.md, report.json, roc.png, histograms.png")


class EvalRuntimeConfig(ScoringOptions):
    batch_size: int = Field(256, ge=1, description="images per model forward")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs")


class EvalJobConfig(StrictModel):
    """Evaluate every registered score on labelled ID and OOD images: AUROC, FPR95, AUPR, ID accuracy,
    CTW/ATD decision rates, ROC curves and score histograms."""

    data: EvalDataConfig
    model: ModelConfig
    classes: ClassesConfig
    templates: str | None = Field(None, description=TEMPLATES_HELP)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    output: EvalOutputConfig
    calibration: str | None = Field(None, description="calibration.json (clipn calibrate) whose thresholds to apply: "
                                    "the report gives the ID and OOD shares each flags")
    runtime: EvalRuntimeConfig = Field(default_factory=EvalRuntimeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
