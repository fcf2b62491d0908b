"""``clipn history``'s config, and the drift rule it shares with the scoring job's ``alerts:`` section."""

from __future__ import annotations

from pydantic import Field, model_validator

from schemas.common import StorageConfig, StrictModel
from schemas.drift import DriftRule
from schemas.score_config import IcebergConfig


class HistoryJobConfig(StrictModel):
    """``clipn history``: one line per night of an output (Parquet folder or Iceberg table), a plot, a drift check."""

    output: str | None = Field(None, description="Parquet output root (the scoring job's output.uri)")
    iceberg: IcebergConfig | None = Field(None, description="an Iceberg table instead (the scoring job's output.iceberg)")
    check: bool = Field(False, description="exit 1 with one line per finding when the latest night leaves the band of "
                        "the nights before it (rule.*)")
    plot: str | None = Field(None, description="write a PNG of the nights' OOD shares, error shares and score medians here")
    score: str = Field("atd", description="the score whose 5/50/95 % quantiles the table and the plot show")
    rule: DriftRule = Field(default_factory=DriftRule)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _one_output(self):
        if (self.output is None) == (self.iceberg is None):
            raise ValueError("give exactly one of output (a Parquet folder) or iceberg (a table)")
        return self
