"""The scoring job's run manifest: ``_manifest.json`` of every published partition, and what ``run`` returns.

Fields are only ever added; readers ignore fields they do not know, so a newer
manifest stays readable by an older clipn-lake and the reverse.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class Watermark(BaseModel):
    """Where a night's listing began: what ``since: last_run`` starts the next night from."""

    model_config = ConfigDict(frozen=True)

    at: dt.datetime = Field(description="when the night's listing began, on the store's clock (UTC)")
    run_id: str = Field(description="the run that listed")
    run_date: dt.date = Field(description="its night: the output whose rows the next night leaves out again")


QUANTILE_LEVELS: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
"""Which quantiles of every score a night's aggregates keep (fractions of its ok rows)."""


class ClassAggregate(BaseModel):
    """One predicted class of a night: its ok rows and how many of them ``is_ood`` flagged."""

    model_config = ConfigDict(extra="ignore")

    ok: int = Field(description="ok rows predicted as this class")
    ood: int = Field(description="of those, rows flagged OOD (is_ood)")

    @property
    def ood_share(self) -> float | None:
        return self.ood / self.ok if self.ok else None


class NightAggregates(BaseModel):
    """Per-night aggregates of the published rows, what ``clipn history`` and its drift check read.

    Quantiles are of each ``score_<name>`` column over the night's rows with a score (ok rows), as the inverse
    empirical CDF of a mergeable summary (:mod:`jobs.history.aggregates`): exact while a night's Arrow block holds
    at most ``SUMMARY_POINTS`` scores, otherwise within 1/``SUMMARY_POINTS`` of rank."""

    model_config = ConfigDict(extra="ignore")

    rows: int = Field(description="rows of the night")
    by_status: dict[str, int] = Field(description="rows by status")
    ood_share: float | None = Field(description="share of ok rows flagged OOD (is_ood); None without ok rows")
    by_class: dict[str, ClassAggregate] = Field(default_factory=dict, description="ok rows by predicted class")
    quantile_levels: list[float] = Field(default_factory=lambda: list(QUANTILE_LEVELS))
    quantiles: dict[str, list[float | None]] = Field(
        default_factory=dict, description="score name (without score_) -> its value at each of quantile_levels "
        "(None: no row had that score)")
    computed_from: str = Field("job", description="job: recorded by the scoring run; rows: computed later from the "
                               "published rows (a night whose manifest predates aggregates)")

    @property
    def error_share(self) -> float | None:
        """Share of rows whose status is not ok (None for an empty night)."""
        return 1 - self.by_status.get("ok", 0) / self.rows if self.rows else None


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
    lake_bank_used: str | None = Field(None, description="lake bank found for this night (none, or an empty bank: clipn_neg_lake "
                                                 "equals clipn_neg)")
    lake_bank_id: str | None = Field(None, description="identity of that bank; none when it is empty (no proxies, "
                                                     "its lake_bank_meta says why)")
    lake_bank_built: str | None = Field(None, description="lake bank this run built for later nights")
    lake_bank_meta: dict | None = Field(None, description="how that bank was built (clipn_core.lake_bank.build_bank's "
                                        "meta): rows, the evidence column, rows flagged OOD, rows and proxies of each "
                                        "side, and why it is empty when it is (None: no bank built)")
    classes: list[str]
    templates: list[str]
    decision: dict | None = Field(None, description="the decision that filled is_ood")
    calibration_id: str | None = Field(None, description="id of the calibration the decision's threshold comes from")
    inputs_listed: int | None = Field(None, description="inputs listed, each counted where it was read: prefix: "
                                      "objects with a matching extension not excluded by the watermark; manifest: "
                                      "lines; tar: members with a matching extension (a torn or unreadable shard's "
                                      "rest: one). rows + skipped_already_scored = inputs_listed + retry_added "
                                      "(None in manifests written before manifests and shards were counted)")
    skipped_already_scored: int | None = Field(0, description="listed inputs left out because skip_scored found them "
                                               "scored ok, or because an overlap night of since holds them unmodified since its listing; counted "
                                               "as what the skip join removed (tar: members not read)")
    retried: int | None = Field(0, description="rows re-scored because an earlier night's row for the URI (same "
                                "model and class set) failed transiently (output.retry_nights); None when not "
                                "tracked (neither skip_scored nor since: last_run: every input is scored every night)")
    healed: int | None = Field(0, description="of the retried rows, those now ok")
    retry_added: int = Field(0, description="inputs added back below the since watermark to retry a transient "
                             "failure (not listed tonight): rows + skipped_already_scored = inputs_listed + retry_added")
    excluded_by_watermark: int = Field(0, description="objects left out because they were not modified after since")
    left_out: dict[str, int] = Field(default_factory=dict, description="what was met but is not an input, by "
                                     "reason: extension (a name without one of input.extensions: objects under a "
                                     "prefix, tar members), watermark (= excluded_by_watermark), unencodable_name "
                                     "(not UTF-8), unreadable_folder (a folder that could not be listed), not_a_file "
                                     "(FIFOs, sockets, devices, links to folders), duplicate_member (a tar member "
                                     "whose name an earlier member of its shard has); a manifest's lines are all "
                                     "inputs")
    since: dt.datetime | None = Field(None, description="the watermark applied (input.since), UTC: with last_run, "
                                      "the previous night's watermark minus input.since_margin_s")
    since_from_run: str | None = Field(None, description="run id whose watermark was applied (since: last_run)")
    since_overlap_nights: list[dt.date] = Field(default_factory=list, description="nights whose rows this night "
                                                "did not score again: those that may hold objects modified after "
                                                "since (since: last_run)")
    watermark: dt.datetime | None = Field(None, description="when this run's listing began, on the store's clock "
                                          "(UTC): the next run's since with last_run")
    rows: int = Field(description="rows published: one per input image")
    resumed_rows: int = Field(0, description="of those, rows a dead run of the same command staged and this run "
                              "kept instead of scoring again (output.resume); rows - resumed_rows were scored")
    files: int
    data_files: list[str] | None = Field(None, description="Parquet folder: the night's files, relative to its "
                                         "partition folder; readers read these and nothing else (None for an Iceberg "
                                         "table, and in manifests written before this field, whose folder held "
                                         "only the night's files)")
    by_status: dict[str, int]
    ood_rate: dict[str, float | None] = Field(description="share of ok rows flagged OOD, per decision column")
    timings_s: dict[str, float]
    images_per_s: float | None = Field(None, description="rows per second of the read-to-write pipeline")
    config: dict = Field(description="the validated job config (never credentials: they are not config)")
    aggregates: NightAggregates | None = Field(None, description="the night's aggregates (None in manifests written "
                                               "before them: clipn history computes them from the rows)")
    alerts: list[str] | None = Field(None, description="drift findings of the alerts: check run at the job's end, one "
                                     "line each (None: the check did not run)")
