"""Config of the review page (``clipn review``). Extra fields are forbidden everywhere.

``clipn review --output s3://b/scores --run-date 2026-11-25 --out review`` (a Parquet folder output) or
``--iceberg.table ns.table ...`` (an Iceberg table output): the CLI derives its flags from this model.
"""

from __future__ import annotations

import datetime as dt

from pydantic import Field, model_validator

from clipn_core.scores import SCORES
from schemas.common import StorageConfig, StrictModel
from schemas.score_config import IcebergConfig


class ReviewConfig(StrictModel):
    """One static HTML page (plus thumbnails) of a scored night: the most OOD images, the borderline ones around
    the decision threshold and a seeded random sample of kept images, grouped by predicted class, under the
    night's score histogram."""

    output: str | None = Field(None, description="the scoring job's Parquet output root (output.uri)")
    iceberg: IcebergConfig | None = Field(None, description="the scoring job's Iceberg table (output.iceberg) "
                                          "instead of a Parquet folder")
    run_date: dt.date = Field(..., description="the night to review")
    out: str = Field("review", description="local folder the page (index.html), its thumbnails and histogram go to")
    per_section: int = Field(24, ge=1, le=1000, description="images per section (most OOD, borderline, kept sample)")
    seed: int = Field(0, description="seed of the kept images' random sample (same seed, same sample)")
    score: str | None = Field(None, description="registered score the page ranks by (default: the night's "
                              "decision's; a table written before decisions were recorded needs it)")
    thumbnail_px: int = Field(160, ge=16, le=1024, description="longest side of a thumbnail, pixels")
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit (width x height) of an image "
                            "read back for its thumbnail")
    fetch_concurrency: int = Field(16, ge=1, description="image reads in flight")
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _one_output(self):
        if (self.output is None) == (self.iceberg is None):
            raise ValueError("give exactly one of output (a Parquet folder) and iceberg.table (an Iceberg table)")
        if self.score is not None and self.score not in SCORES:
            raise ValueError(f"score must be one of {list(SCORES)}, got {self.score!r}")
        return self
