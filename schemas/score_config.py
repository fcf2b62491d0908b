"""Config of the scoring job (``clipn score``). Extra fields are forbidden everywhere.

The CLI derives its flags from these models (``--runtime.batch_size 64``), and
``--set runtime.batch_size=64`` / ``--config score.yaml`` fill the same fields.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, PositiveFloat, field_validator, model_validator

from clipn_core.errors import redact_uri
from clipn_core.named_sets import CLASS_SETS
from clipn_core.scores import SCORES
from clipn_core.uri_scope import prefix_problem
from schemas.common import (
    PRETRAINED_CONFIG_HELP,
    TEMPLATES_HELP,
    FileExtensions,
    StorageConfig,
    StrictModel,
)
from schemas.drift import AlertsConfig

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"]


class InputConfig(StrictModel):
    kind: Literal["prefix", "manifest", "tar"] = Field(
        "prefix", description="prefix: image objects under a URI; manifest: Parquet/CSV listing URIs; tar: WebDataset shards"
    )
    uri: str = Field(..., description="prefix URI, manifest file URI, or folder/prefix of .tar shards")
    uri_column: str = Field("uri", description="manifest column holding image URIs")
    allowed_uri_prefixes: list[str] = Field(
        default_factory=list, description="manifest inputs: folders outside the manifest's own store that its lines "
        "may name (e.g. s3://other-bucket/images/); by default a line must be in the manifest's store (its protocol "
        "and bucket; the local filesystem for a local manifest), and any other line gets an invalid_uri row, unfetched")
    extensions: FileExtensions = Field(default_factory=lambda: list(IMAGE_EXTENSIONS), description="image file extensions (prefix and tar inputs)")
    since: Literal["last_run"] | dt.datetime | None = Field(
        None, description="prefix inputs: only objects modified after this time (UTC when no zone is given), or after "
        "the watermark of the last published run of this output (last_run)")
    since_margin_s: float = Field(3600.0, ge=0, description="since: last_run starts this many seconds before the "
                                  "previous night's listing began (its watermark, on the store's clock), so that "
                                  "clock offsets and uploads in progress are not missed; objects in that overlap "
                                  "that the previous night already holds are not scored again")

    @field_validator("allowed_uri_prefixes")
    @classmethod
    def _absolute_prefixes(cls, v: list[str]) -> list[str]:
        for prefix in v:
            reason = prefix_problem(prefix)
            if reason is not None:
                raise ValueError(f"input.allowed_uri_prefixes: {redact_uri(prefix)!r} is {reason}")
        return v

    @model_validator(mode="after")
    def _since_needs_a_listing(self):
        if self.allowed_uri_prefixes and self.kind != "manifest":
            raise ValueError("input.allowed_uri_prefixes needs kind: manifest (listed inputs never leave their prefix)")
        if self.since is not None and self.kind != "prefix":
            raise ValueError("input.since needs kind: prefix (a listing carries the objects' modification times)")
        if isinstance(self.since, dt.datetime) and self.since.tzinfo is None:
            self.since = self.since.replace(tzinfo=dt.timezone.utc)
        return self


class IcebergConfig(StrictModel):
    """An Apache Iceberg table as the output: one atomic commit per run, read by Spark, Trino, DuckDB, pyiceberg."""

    table: str = Field(..., pattern=r"^[^.\s]+(\.[^.\s]+)+$", description="table identifier, namespace.table")
    catalog: str = Field("default", description="pyiceberg catalog name, configured in .pyiceberg.yaml or "
                         "PYICEBERG_CATALOG__<NAME>__... variables; unconfigured: the local SQLite catalog below")
    uri: str | None = Field(None, description="local default catalog: its SQLAlchemy URI, e.g. sqlite:///catalog.db")
    warehouse: str | None = Field(None, description="local default catalog: the warehouse, a folder (file://...) or "
                                  "an s3:// prefix (reached with the storage settings)")


class OutputConfig(StrictModel):
    uri: str | None = Field(None, description="Parquet output root; partitions are <uri>/run_date=YYYY-MM-DD/")
    iceberg: IcebergConfig | None = Field(None, description="an Iceberg table instead of the Parquet folder")
    run_date: dt.date | None = Field(None, description="partition date (default: today, UTC)")
    embeddings: bool = Field(False, description="also write the normalised image embedding (float16 list; float32 "
                             "in Iceberg, which has no half floats)")
    skip_scored: bool = Field(False, description="skip URIs already scored ok in other partitions with the same model id and class set")
    retry_nights: int = Field(3, ge=0, description="a URI whose row failed transiently (read_error: schemas/status.py) "
                              "is scored again on up to this many following nights, also below the since: last_run "
                              "watermark (0: never); with skip_scored a permanent failure is skipped like an ok row "
                              "unless its object was modified after the night that failed on it began listing")
    staging_max_age_h: float = Field(24.0, ge=0.1, description="at start, delete staging folders of dead runs "
                                     "whose heartbeat is older than this (hours); a live run's never is")
    lease_ttl_s: float = Field(900.0, gt=0, description="one run per output and night: a run holds a lease on its "
                               "night, refreshed every min(60, ttl/4) s; a lease not refreshed for this many seconds "
                               "(the store's clock) belongs to a dead run and is broken by the next run of the night")
    take_over_lease: str | None = Field(None, description="run id of a run known to be dead (the one a refused run "
                                        "names): take its lease at once instead of waiting lease_ttl_s")
    resume: bool = Field(False, description="beta, opt-in (Ray Data's checkpointing is beta in Ray 2.60): a rerun "
                         "of the same command (config and run date) after a dead run keeps the rows that run "
                         "staged and scores only the rest (prefix inputs into a Parquet folder; blocks and write "
                         "files of one listing page: jobs.score.resume, README Resume)")
    lake_bank: bool = Field(False, description="build a lake bank (image proxies of the surest OOD and ID ok rows) for "
                            "the next night's clipn_neg_lake, and use the latest earlier one (needs embeddings and a "
                            "calibration: lake_bank.calibration or decision.calibration; settings under lake_bank)")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.uri is None) == (self.iceberg is None):
            raise ValueError("give exactly one of output.uri (a Parquet folder) or output.iceberg (a table)")
        return self


class ModelConfig(StrictModel):
    checkpoint: str | None = Field(None, description="CLIPN checkpoint URI (.safetensors with its .json sidecar)")
    architecture: str | None = Field(None, description="open_clip architecture (or its model config file, local or "
                                      "s3://, .json) when no checkpoint is given (untrained no tower)")
    pretrained: str | None = Field(None, description="base CLIP weights: open_clip tag, file or s3:// URI")
    pretrained_config: str | None = Field(None, description=PRETRAINED_CONFIG_HELP)
    seed: int = Field(0, description="seed of random init when no weights are given (tests, benchmarks)")

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.checkpoint) == bool(self.architecture):
            raise ValueError("give exactly one of model.checkpoint or model.architecture")
        if self.checkpoint and not self.checkpoint.endswith(".safetensors"):
            raise ValueError("model.checkpoint must end with .safetensors")
        if self.checkpoint and (self.pretrained or self.pretrained_config):
            raise ValueError("model.pretrained and model.pretrained_config go with model.architecture; a checkpoint "
                             "records its base weights and their configuration")
        return self


class ClassesConfig(StrictModel):
    names: list[str] | None = Field(None, description="inline ID class names")
    file: str | None = Field(None, description="URI of a text file with one ID class name per line")
    set: str | None = Field(
        None, description="a named class set: " + "; ".join(f"{k}: {v.description}" for k, v in CLASS_SETS.items()))

    @field_validator("set")
    @classmethod
    def _known_set(cls, v: str | None) -> str | None:
        if v is not None and v not in CLASS_SETS:
            raise ValueError(f"unknown class set {v!r}; named sets: {sorted(CLASS_SETS)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.names, self.file, self.set)) != 1:
            raise ValueError("give exactly one of classes.names, classes.file or classes.set")
        return self


THRESHOLD_FREE = tuple(n for n, s in SCORES.items() if s.threshold_free)


class DecisionConfig(StrictModel):
    rule: str = Field("atd", description=f"which decision fills is_ood: a threshold-free rule ({', '.join(THRESHOLD_FREE)}) "
                      "or threshold")
    score: str | None = Field(None, description="registered score for rule=threshold (e.g. mcm)")
    threshold: float | None = Field(None, description="is_ood = score < threshold (rule=threshold)")
    calibration: str | None = Field(None, description="calibration.json the threshold comes from (clipn calibrate): "
                                    "checked against the run's model, class set and logit scale, recorded in "
                                    "the manifest")

    @model_validator(mode="after")
    def _threshold_needs_score(self):
        if self.rule not in (*THRESHOLD_FREE, "threshold"):
            raise ValueError(f"decision.rule must be one of {[*THRESHOLD_FREE, 'threshold']}, got {self.rule!r}")
        if self.rule == "threshold":
            if self.score not in SCORES or self.threshold is None:
                raise ValueError(f"rule=threshold needs score (one of {sorted(SCORES)}) and threshold")
        elif self.score is not None or self.threshold is not None or self.calibration is not None:
            raise ValueError("score, threshold and calibration are only used with rule=threshold")
        return self


class NegativesConfig(StrictModel):
    """Negative labels mined from a lexicon (NegLabel): the words farthest from the ID classes, scored against
    beside them (scores neglabel, clipn_neg and clipn_neg_lake). Mined once per model and class set, then cached."""

    enabled: bool = Field(True, description="mine negative labels (off: the neglabel, clipn_neg and clipn_neg_lake "
                          "columns are null)")
    lexicon: str = Field("wordfreq", description="wordfreq (shipped: frequent English words) or a file URI, one word per line")
    count: int = Field(10_000, ge=1, description="negative labels kept (M)")
    synonym_bound: float = Field(0.9, gt=0, le=1, description="drop words whose cosine to an ID class exceeds this "
                                 "(near-synonyms and sub-categories of ID classes)")
    template: str = Field("a photo of a {}.", description="prompt the words are encoded with (one {})")
    groups: int = Field(100, ge=1, description="NegLabel groups the negatives are split into (score averaged over them)")
    bank: str | None = Field(None, description="lake bank file (.safetensors) for clipn_neg_lake; the scoring job with "
                             "output.lake_bank uses its latest own bank when this is unset")


class LakeBankConfig(StrictModel):
    """How a night's lake bank is built (``output.lake_bank``; :mod:`clipn_core.lake_bank`): its OOD proxies come
    only from rows the evidence flags, and only when the flags' purity bound, from the evidence's known rate of
    flagging ID images, reaches ``min_purity``."""

    quantile: float = Field(0.1, gt=0, le=0.5, description="share of the night's ok rows at each end of the ATD "
                            "score that proxies come from (lowest: OOD, highest: ID)")
    clusters: int = Field(128, ge=1, description="most centroids (proxies) per side")
    max_rows: int = Field(50_000, ge=1, description="ok rows read into the bank at most, sampled by a hash of "
                          "their URI (the same rows whatever the file order)")
    min_ood_rows: int = Field(4, ge=1, description="fewer flagged rows than this in the lowest quantile leave the "
                              "OOD side empty (4: the clustering's rows per centroid)")
    min_purity: float = Field(0.5, ge=0, le=1, description="OOD proxies only when at least this share of the "
                              "flagged rows is OOD even if every row of the night were ID: 1 - p n / f, with n rows, "
                              "f flagged, p the evidence's share of flagged ID images in its calibration")
    calibration: str | None = Field(None, description="calibration.json (clipn calibrate) giving p, the share of ID "
                                    "images ATD's rule flags (default: decision.calibration); with a calibrated "
                                    "threshold decision on a bank-free score and no other file given here, the "
                                    "evidence is that decision (is_ood) and p the share its threshold flags")


class ScoringOptions(StrictModel):
    """How images become scores: shared by the scoring job, ``clipn evaluate`` and ``clipn calibrate``, so an
    evaluated or calibrated setup scores exactly as the nightly job would."""

    def resolve_logit_scale(self, model_scale: float) -> float:
        """The scale the scores use: the model's own (``logit_scale: model``) or the configured number."""
        return model_scale if self.logit_scale == "model" else float(self.logit_scale)


    preprocess: Literal["fast", "exact"] = Field(
        "fast", description="fast: JPEG decoded at reduced scale (never below the model size) and only the crop resampled; "
        "exact: bit-identical to open_clip's eval transform")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="autocast on GPU (CPU runs fp32)")
    logit_scale: Literal["model"] | PositiveFloat = Field(
        "model", description="logit scale s of the scores: model (the base CLIP's learned logit_scale.exp(): 100 for "
        "OpenAI's CLIP) or a number")
    mcm_temperature: float = Field(1.0, gt=0, description="MCM softmax temperature")
    cache_dir: str | None = Field(None, description="local cache of downloaded weights, class heads and mined "
                                  "negative labels (default: $CLIPN_CACHE_DIR or ~/.cache/clipn_lake)")


class RuntimeConfig(ScoringOptions):
    batch_size: int = Field(64, ge=1, description="images per model forward on a scorer actor")
    decode_batch_size: int = Field(32, ge=1, description="images per read+decode task batch")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per read+decode task (differs from cpus_per_actor so Ray keeps decoding out of the scorer actors)")
    fetch_concurrency: int = Field(32, ge=1, description="object reads in flight per read task (one GET per object)")
    decode: Literal["cpu", "device"] = Field(
        "cpu", description="cpu: decode and resize in CPU tasks, ship uint8 pixels; device: ship plain JPEGs encoded, "
        "the scorer decodes them in batches on its device (nvJPEG on CUDA); the read tasks decode everything else")
    pool_size: int = Field(1, ge=1, description="number of scorer actors (the least, with pool_max_size)")
    pool_max_size: int | None = Field(None, ge=1, description="autoscale the scorer pool between pool_size and this "
                                      "many actors (Ray Data's ActorPoolStrategy min_size/max_size); none: a fixed pool")
    actor_concurrency: int | None = Field(
        None, ge=1, description="batches a scorer actor works on at once, each on its own CUDA stream: while one runs "
        "on the device the next is copied in and the last one's rows are built (Ray Data's "
        "max_concurrent_calls_per_actor); none: 3 with a GPU (1 with compile), 1 without")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per scorer actor (0 on CPU machines)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per scorer actor")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of a scorer on CPU (default: Ray's, "
                                      "one per reserved CPU)")
    compile: bool = Field(False, description="torch.compile the image tower (pays off on long GPU runs)")
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit (width x height)")
    skip_broadcast_max_rows: int = Field(
        200_000, ge=0, description="skip_scored / since overlap: a skip set of at most this many URIs is broadcast to "
        "the tasks that mark the inputs (each worker holds it, ~100 bytes a URI); a larger one is hash-joined (a "
        "shuffle, seconds of start-up, any size)")

    @model_validator(mode="after")
    def _pool_bounds(self):
        if self.pool_max_size is not None and self.pool_max_size < self.pool_size:
            raise ValueError(f"runtime.pool_max_size ({self.pool_max_size}) must be at least runtime.pool_size "
                             f"({self.pool_size})")
        return self

    def scorer_concurrency(self) -> int:
        """Batches a scorer actor works on at once: ``actor_concurrency``, by default 3 with a GPU (copy in,
        forward, rows out) and 1 without (the calls would share the same cores) or with ``compile`` (calls that
        compile at once in threads have not been tried)."""
        if self.actor_concurrency is not None:
            return self.actor_concurrency
        return 3 if self.gpus_per_actor > 0 and not self.compile else 1


class ScoreJobConfig(StrictModel):
    """The nightly scoring job: inputs -> CLIPN scores -> Parquet partition."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    classes: ClassesConfig
    templates: str | None = Field(None, description=TEMPLATES_HELP)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    lake_bank: LakeBankConfig = Field(default_factory=LakeBankConfig, description="the lake bank's settings "
                                      "(with output.lake_bank)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    run_id: str | None = Field(None, description="identifier of this run (default: random)")
    alerts: AlertsConfig | None = Field(None, description="drift check at the job's end (schemas.drift; none: off)")

    @model_validator(mode="after")
    def _lake_bank_needs(self):
        if self.output.lake_bank and not (self.output.embeddings and self.negatives.enabled):
            raise ValueError("output.lake_bank needs output.embeddings: true and negatives.enabled: true")
        if self.output.lake_bank and self.bank_calibration() is None:
            raise ValueError("output.lake_bank needs a calibration (lake_bank.calibration, or decision.calibration): "
                             "the bank takes OOD proxies from rows its evidence flags, and how often that evidence "
                             "flags ID images must be known (clipn calibrate on an ID sample)")
        return self

    def bank_calibration(self) -> str | None:
        """The calibration the lake bank's evidence rate comes from: ``lake_bank.calibration``, else
        ``decision.calibration``, else None."""
        return self.lake_bank.calibration or self.decision.calibration

    @model_validator(mode="after")
    def _decision_scores_exist(self):
        needs = self.decision.score if self.decision.rule == "threshold" else self.decision.rule
        if SCORES[needs].needs_negatives and not self.negatives.enabled:
            raise ValueError(f"decision uses {needs}, which needs negatives.enabled: true")
        return self

    def effective_run_date(self) -> dt.date:
        return self.output.run_date or dt.datetime.now(dt.timezone.utc).date()
