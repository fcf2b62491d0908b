"""The scoring job's run manifest: ``_manifest.json`` of every published partition, and what ``run`` returns.

Fields are only ever added; readers ignore fields they do not know, so a newer
manifest stays readable by an older clipn-lake and the reverse.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class ScoreManifest(BaseModel):
    """What one scoring run did: identity of the model and class set, counts, rates, timings, config."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = Field(description="version of the output schema (schemas.output)")
    run_id: str
    run_date: dt.date
    partition: str = Field(description="URI of the published partition")
    model_id: str = Field(description="sha256 of the checkpoint weights (or the untrained model's identity)")
    class_set_hash: str = Field(description="hash of the ID class names and templates")
    logit_scale: float | None = Field(None, description="logit scale s the scores used (the model's own unless "
                                      "runtime.logit_scale gave a number)")
    negatives_id: str | None = Field(None, description="identity of the mined negative labels (none: off)")
    negatives_count: int = Field(0, description="negative labels the scores used")
    lake_bank_used: str | None = Field(None, description="lake bank clipn_neg_lake used (none: it equals clipn_neg)")
    lake_bank_id: str | None = Field(None, description="identity of that bank")
    lake_bank_built: str | None = Field(None, description="lake bank this run built for later nights")
    classes: list[str]
    templates: list[str]
    decision: dict | None = Field(None, description="the decision that filled is_ood")
    calibration_id: str | None = Field(None, description="id of the calibration the decision's threshold comes from")
    inputs_listed: int | None = Field(None, description="objects listed with a matching extension and not excluded "
                                      "by the watermark (prefix inputs; None for manifests and shards)")
    skipped_already_scored: int | None = Field(0, description="listed inputs left out because skip_scored found them "
                                               "scored ok (None when the input count is not known)")
    excluded_by_watermark: int = Field(0, description="objects left out because they were not modified after since")
    since: dt.datetime | None = Field(None, description="the watermark applied (input.since), UTC")
    since_from_run: str | None = Field(None, description="run id whose watermark was applied (since: last_run)")
    watermark: dt.datetime | None = Field(None, description="when this run's listing began (UTC): the next run's "
                                          "since with last_run")
    rows: int = Field(description="rows published: one per input image")
    files: int
    by_status: dict[str, int]
    ood_rate: dict[str, float | None] = Field(description="share of ok rows flagged OOD, per decision column")
    timings_s: dict[str, float]
    images_per_s: float | None = Field(None, description="rows per second of the read-to-write pipeline")
    config: dict = Field(description="the validated job config (never credentials: they are not config)")
