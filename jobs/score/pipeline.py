"""Assembly of the nightly scoring job: setup on the driver, then read -> decode -> score -> write -> publish.

Everything that can be wrong in the configuration (classes, templates, model, input
listing) fails on the driver before any Ray work starts and before anything is written.
Then the run takes its night's lease (:mod:`jobs.score.lease`: a second run of the same
night stops here), and nothing is materialised or collected on the driver: Ray Data
streams the rows from the read tasks through the scorer actors into staged Parquet,
which is then published with its manifest. A failure at any step leaves the night's
previous rows readable (:mod:`jobs.score.targets`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass

import ray

from clipn_core.device_plan import DevicePlan
from clipn_core.errors import DriftAlertError, InputError, redact_uri
from clipn_core.images import split_preprocessor
from clipn_core.lake_bank import bank_bytes
from clipn_core.storage import Storage, is_remote
from clipn_core.uri_scope import UriScope
from jobs import failpoints
from jobs.calibration import check_fits, check_threshold, load_calibration
from jobs.history.aggregates import from_staged
from jobs.history.check import check as check_drift
from jobs.history.read import Night, model_key, output_nights
from jobs.score import resume
from jobs.score.counts import KEPT, LISTED, RELISTED, RETRY_ADDED, SKIPPED, InputCounts
from jobs.score.counts import totals as count_totals
from jobs.score.decode import DecodeSettings, read_decode_batch, read_tar_batch
from jobs.score.iceberg import to_table_rows
from jobs.score.incremental import attach_member_skips, skip_table, split_skipped
from jobs.score.lake_bank import bank_evidence, bank_path, build_lake_bank
from jobs.score.metrics import RunMetrics
from jobs.score.publish import PartFilenames, staged_stats
from jobs.score.read import Inputs, input_dataset
from jobs.score.retry import RetryRules, outcome
from jobs.score.scorer import ScorerActor
from jobs.score.targets import OutputTarget, abandon_quietly, output_target, publish_or_abandon
from jobs.scoring_setup import ScoringSetup, prepare
from schemas.manifest import NightAggregates, ScoreManifest, Watermark
from schemas.output import OUTPUT_SCHEMA_VERSION
from schemas.reports import CalibrationReport
from schemas.score_config import ScoreJobConfig
from schemas.status import LEFT_OUT_REASONS

log = logging.getLogger("clipn.score")
# Parquet writes of score rows are light; Ray's default of one whole CPU per write task
# starves the decode tasks on small machines.
WRITE_CPUS = 0.1


def read_calibrations(cfg: ScoreJobConfig, storage: Storage) -> dict[str, CalibrationReport]:
    """The calibrations the run names (``decision.calibration``; with ``output.lake_bank`` the bank's), by URI,
    read before the model, heads and negative labels are built, so a missing or malformed file fails first
    (:class:`~clipn_core.CalibrationError` naming it)."""
    uris = (cfg.decision.calibration, cfg.bank_calibration() if cfg.output.lake_bank else None)
    return {uri: load_calibration(uri, storage) for uri in dict.fromkeys(uris) if uri is not None}


def check_decision(cfg: ScoreJobConfig, setup: ScoringSetup, calibrations: dict[str, CalibrationReport]) -> str | None:
    """The id of the decision's calibration (read by :func:`read_calibrations`) after checking that it fits this
    run and holds the threshold (a :class:`~clipn_core.CalibrationError` naming the mismatch otherwise); None
    without one."""
    d = cfg.decision
    if d.calibration is None:
        return None
    cal = calibrations[d.calibration]
    check_fits(cal, d.calibration, setup, d.score)
    check_threshold(cal, d.calibration, d.score, d.threshold)
    return cal.id


@dataclass(frozen=True)
class Since:
    """What ``input.since`` resolved to: list objects modified after ``after``; with ``last_run`` also the
    watermark it comes from and the nights whose rows must not be scored again (``overlap_marks``: their
    watermarks, ``overlap``: their dates)."""

    after: dt.datetime | None = None
    source: Watermark | None = None
    overlap_marks: tuple[Watermark, ...] = ()

    @property
    def overlap(self) -> tuple[dt.date, ...]:
        return tuple(sorted(w.run_date for w in self.overlap_marks))


def resolve_since(cfg: ScoreJobConfig, target: OutputTarget, run_date: dt.date) -> Since:
    """``input.since`` for this night: a given time; or with ``last_run`` the latest watermark of the nights
    before this one minus ``input.since_margin_s``, and as overlap the nights whose listing began less than
    two margins before that time (they may hold objects this night lists again: those modified in the
    margin, and those written while a listing ran); or nothing."""
    if cfg.input.since != "last_run":
        return Since(after=cfg.input.since)
    marks = target.watermarks(run_date)
    earlier = [w for w in marks if w.run_date < run_date]
    if not earlier:
        return Since()
    source = max(earlier, key=lambda w: w.at)
    margin = dt.timedelta(seconds=cfg.input.since_margin_s)
    after = source.at - margin
    return Since(after, source, tuple(sorted((w for w in marks if w.at >= after - margin), key=lambda w: w.run_date)))


def score_rows(ds: ray.data.Dataset, cfg: ScoreJobConfig, setup: ScoringSetup, storage: Storage,
               run_id: str, counts: InputCounts) -> ray.data.Dataset:
    """URIs -> output rows: read + decode tasks (or fetch only, when the scorer decodes), then the actor pool."""
    rt = cfg.runtime
    forward = failpoints.ray_remote_args()  # workers see the driver's failpoints (none in production)
    settings = DecodeSettings(setup.preprocess_cfg, rt.preprocess, rt.decode, rt.max_pixels)
    # a manifest's lines are data: each is checked against the input's store before it may be fetched
    scope = (UriScope.for_manifest(cfg.input.uri, cfg.input.allowed_uri_prefixes)
             if cfg.input.kind == "manifest" else None)
    if rt.decode == "device" and not DevicePlan(split_preprocessor(setup.preprocess_cfg,
                                                                   mode=rt.preprocess)).decodes_on_device:
        log.warning("runtime.decode: device decodes JPEGs on the device only with runtime.preprocess: fast and a "
                    "shortest-side square bicubic/bilinear geometry (this run: preprocess %s, %s): every image is "
                    "decoded in the read tasks, as with decode: cpu", rt.preprocess,
                    {k: setup.preprocess_cfg.get(k) for k in ("size", "resize_mode", "interpolation")})
    if cfg.input.kind == "tar":
        ds = ds.map_batches(read_tar_batch, batch_size=1, num_cpus=rt.decode_cpus, **forward,
                            fn_kwargs={"storage": storage, "settings": settings, "extensions": cfg.input.extensions,
                                       "rows_per_batch": rt.decode_batch_size, "counts": counts,
                                       "metrics": RunMetrics(run_id)})
    else:  # with decode: device the tasks decode only what the device decoder does not take
        ds = ds.map_batches(read_decode_batch, batch_size=rt.decode_batch_size, num_cpus=rt.decode_cpus, **forward,
                            fn_kwargs={"storage": storage, "settings": settings, "concurrency": rt.fetch_concurrency,
                                       "scope": scope, "metrics": RunMetrics(run_id)})
    concurrency = rt.scorer_concurrency()
    return ds.map_batches(
        ScorerActor,
        fn_constructor_kwargs={
            "model_cfg": cfg.model, "heads": setup.heads, "runtime": rt, "decision": cfg.decision,
            "storage": storage, "run_id": run_id, "embeddings": cfg.output.embeddings,
            "logit_scale": setup.logit_scale, "scoring": setup.scorer_kwargs(),
        },
        batch_size=rt.batch_size,
        # Ray Data's own pipelining: calls run at once in the actor's threads (each on its own CUDA stream)
        compute=ray.data.ActorPoolStrategy(min_size=rt.pool_size, max_size=rt.pool_max_size or rt.pool_size,
                                           max_concurrent_calls_per_actor=concurrency,
                                           enable_true_multi_threading=concurrency > 1),
        num_gpus=rt.gpus_per_actor,
        num_cpus=rt.cpus_per_actor,
        batch_format="numpy",
        **forward,
    )


def skip_sets(cfg: ScoreJobConfig, target: OutputTarget, setup: ScoringSetup, run_date: dt.date,
              since: Since) -> tuple[ray.data.Dataset | None, RetryRules]:
    """The earlier nights' rows this night's skips and retries come from (:mod:`jobs.score.retry`), as one Ray
    dataset (or None), and the rules that turn them into verdicts: with ``skip_scored`` every other night's rows
    (ok and permanently failed URIs are skipped, transient failures retried); with ``since: last_run`` alone the
    latest ``retry_nights + 1`` nights' (their transient failures are added back below the watermark); else none
    (every input is listed and scored every night: a failure is retried by that). The ``since`` overlap is
    :func:`skip_table`'s."""
    out = cfg.output
    rules = RetryRules(out.retry_nights, skip_done=out.skip_scored, changes_visible=cfg.input.kind == "prefix")
    model_id, class_set = setup.model_id, setup.heads.class_set_hash
    if out.skip_scored:
        return target.history(run_date, model_id, class_set), rules
    if since.source is not None and out.retry_nights:
        return target.history(run_date, model_id, class_set, last=out.retry_nights + 1), rules
    return None, rules


def row_check(cfg: ScoreJobConfig, inputs: Inputs, counts: InputCounts, skipping: bool,
              rows: int, resumed: int = 0) -> tuple[int, int, int, dict[str, int], int]:
    """(inputs listed, excluded by the watermark, skipped, left out by reason, retry inputs added back) once the rows
    are staged, after checking that rows written + skipped = listed + added back, each counted where it happens
    (:mod:`counts`; what is met
    but is not an input is in ``left out``, by reason):
    objects by the listing, manifest lines on the driver, tar members by their read tasks, skips by
    counting what the skip join kept (prefix, manifest) or the members the read tasks left unread (tar).
    ``resumed``: rows a dead run of the command staged, which Ray's checkpoint filter removed before the skip join.

    Raises :class:`InputError` when a prefix lists nothing, and RuntimeError naming the counts when they do
    not add up (lost or duplicated rows): the caller abandons the staged rows and publishes nothing.
    """
    found, left_out = count_totals(counts)
    if inputs.listing is not None:
        listed, excluded = inputs.listing.totals()
        left_out = {**inputs.listing.left_out(), **left_out}
        if listed == 0 and not excluded:
            raise InputError(f"no {'/'.join(cfg.input.extensions)} objects under {redact_uri(cfg.input.uri)}")
    elif cfg.input.kind == "manifest":  # its lines, counted on the driver (a duplicated line is a line)
        listed, excluded = inputs.expected, 0
    else:  # tar members, counted by the read tasks, each of which must have reported its shard
        listed, excluded = found.get(LISTED, 0), 0
        if found.get("shards", 0) != inputs.expected:
            raise RuntimeError(f"row check failed: {found.get('shards', 0)} of {inputs.expected} shards were read; "
                               "not publishing")
    skipped = found.get(SKIPPED, 0) if cfg.input.kind == "tar" or skipping else 0
    relisted = found.get(RELISTED, 0)  # listed and added back for a retry: scored once, as the added row
    added = found.get(RETRY_ADDED, 0) - relisted
    if skipping and found.get(KEPT, 0) + skipped + relisted + resumed != listed:
        raise RuntimeError(f"row check failed: the skip join kept {found.get(KEPT, 0)} and skipped {skipped} of "
                           f"{listed} inputs listed ({relisted} scored as retries, {resumed} resumed); not publishing")
    left_out = {reason: left_out.get(reason, 0) for reason in LEFT_OUT_REASONS}  # every reason, every kind
    expected = listed - skipped + added
    if rows != expected or skipped < 0 or added < 0:
        raise RuntimeError(f"row check failed: wrote {rows} rows, expected {expected} = {listed} inputs listed - "
                           f"{skipped} skipped + {added} retries added back; not publishing")
    return listed, excluded, skipped, left_out, added


def run(cfg: ScoreJobConfig) -> ScoreManifest:
    """Run the job; returns the published manifest. Raises before any Ray work or write on a setup error, and
    :class:`~clipn_core.errors.LeaseHeldError` (writing nothing) when another live run holds the night."""
    t0 = time.perf_counter()
    failpoints.check()
    storage = cfg.storage.bind()
    run_id = cfg.run_id or uuid.uuid4().hex[:12]
    run_date = cfg.effective_run_date()

    target = output_target(cfg.output, storage)  # an unreachable catalog fails before the model work
    calibrations = read_calibrations(cfg, storage)
    setup, _ = prepare(cfg.model, cfg.classes, cfg.templates, cfg.runtime, storage, cfg.negatives)
    bank_used = cfg.negatives.bank
    if cfg.output.lake_bank and bank_used is None:
        found = target.latest_bank(run_date, setup.model_id, setup.heads.class_set_hash)
        if found is not None:
            bank_used, bank = found
            setup = dataclasses.replace(setup, bank=bank)
    calibration_id = check_decision(cfg, setup, calibrations)
    evidence = bank_evidence(cfg, setup, calibrations[cfg.bank_calibration()]) if cfg.output.lake_bank else None
    log.info("model %s, logit scale %.2f, %d classes, %d templates, class set %s", setup.model_id[:16],
             setup.logit_scale, len(setup.classes), len(setup.templates), setup.heads.class_set_hash)
    since = resolve_since(cfg, target, run_date)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    # plans the listing: a missing or empty input fails here; a run that may resume lists in page-sized blocks
    inputs = input_dataset(cfg.input, storage, since.after, page_blocks=cfg.output.resume)
    # the next night's since: when this listing began, on the store's clock
    watermark = inputs.listing.started_at if inputs.listing else dt.datetime.now(dt.timezone.utc)
    with target.lease(run_date, run_id, cfg.output.lease_ttl_s, cfg.output.take_over_lease) as lease:
        # a listing's counts actor takes the later stages' reports too (each actor is a worker process to start)
        counts = inputs.listing.counts if inputs.listing is not None else InputCounts.remote()
        ds = inputs.dataset
        history, rules = skip_sets(cfg, target, setup, run_date, since)
        overlap = [] if cfg.input.kind == "tar" else [(target.night_uris([m.run_date]), m.at.timestamp())
                                                      for m in since.overlap_marks]
        table = skip_table(None, overlap, cfg.runtime.skip_broadcast_max_rows, history, rules)
        skipping = False
        # since: what to retry is not listed, so it is added back; only when there is some, because the added
        # rows come from Ray's object store, not from a Ray read, and Ray then turns its checkpoint filter off
        add_retries = since.source is not None and history is not None and table is not None and table.retry_count() > 0
        if table is not None and cfg.input.kind == "tar":  # members are skipped in the read task, unread
            ds = attach_member_skips(ds, table.done_uris(), cfg.runtime.skip_broadcast_max_rows)
        elif table is not None:  # one join marks what to skip (and adds back what to retry); both sides are counted
            ds, skipping = split_skipped(ds, table, counts, add_retries=add_retries), True
        why_not = resume.resumable(cfg, hash_join=skipping and table.blocks is None, add_retries=skipping and add_retries,
                                   cluster_cpus=ray.cluster_resources().get("CPU", 0.0))
        # a resumable run stages under its command's key, so that a rerun of the command finds what it left
        stage_as = run_id if why_not else resume.staging_key(cfg, run_date, setup.model_id, setup.heads.class_set_hash)
        if why_not and cfg.output.resume:
            log.info("this run cannot resume a dead run of its command: %s", why_not)
        target.sweep(dt.timedelta(hours=cfg.output.staging_max_age_h), stage_as)
        staged = target.staged(stage_as, run_date)
        t_setup = time.perf_counter() - t0
        with target.guard(staged):
            try:
                out_fs, staged_p = storage.arrow(staged)
                # Object stores have no directories; asking Ray to create one makes it delete a
                # non-existent one (FileNotFoundError) when every input was skipped.
                rows = score_rows(ds, cfg, setup, storage, run_id, counts)
                if cfg.output.iceberg is not None:  # the table's rows: + run_date, embeddings as float32
                    rows = rows.map_batches(to_table_rows, batch_format="pyarrow", fn_kwargs={"run_date": run_date},
                                            num_cpus=WRITE_CPUS)
                resuming = None if why_not else resume.prepare(staged, storage)
                if resuming is not None:  # Ray filters the staged URIs after the listing and checkpoints each write
                    watermark = resuming.first_listing(storage, watermark)
                    rows.context.checkpoint_config = resuming.checkpoint
                    staged_p = storage.arrow(resuming.rows_dir)[1]
                try:
                    rows.write_parquet(staged_p, filesystem=out_fs, filename_provider=PartFilenames(),
                                       try_create_dir=not is_remote(staged), ray_remote_args={"num_cpus": WRITE_CPUS})
                finally:  # the context may be shared with later datasets of this process
                    rows.context.checkpoint_config = None
                t_score = time.perf_counter() - t0 - t_setup
                resumed = resuming.resumed_rows(storage) if resuming is not None else 0
                stats = staged_stats(staged, storage)
                listed, excluded, skipped, left_out, added = row_check(cfg, inputs, counts, skipping, stats["rows"],
                                                                       resumed)
                retried = healed = None  # not tracked without either: every input is listed and scored every night
                if cfg.output.skip_scored or cfg.input.since == "last_run":
                    retried, healed = (outcome(staged, storage, table.retry_uris(), cfg.runtime.skip_broadcast_max_rows)
                                       if table is not None and history is not None and stats["rows"] else (0, 0))
                bank_built = bank_meta = None
                if cfg.output.lake_bank:
                    bank_built = bank_path(target.bank_root, setup.model_id, setup.heads.class_set_hash, run_id)
                    built = build_lake_bank(staged, storage, stats["by_status"].get("ok", 0), evidence,
                                            cfg.lake_bank)
                    bank_meta = built.meta
                    log.info("lake bank %s: %d ID and %d OOD proxies from %d rows%s", bank_built, len(built.id_proxies),
                             len(built.ood_proxies), built.meta["rows"],
                             f" (empty: {built.meta['empty']})" if built.meta.get("empty") else "")
                    storage.write_bytes(bank_built, bank_bytes(built))
                t_aggregates = time.perf_counter()
                aggregates = from_staged(staged, storage, stats["rows"])
                alerts = drift_alerts(cfg, storage, run_date, run_id, aggregates,
                                      model_key(setup.model_id, setup.heads.class_set_hash))
                t_aggregates = time.perf_counter() - t_aggregates
                failpoints.hit("score.staged")  # a driver crash with everything staged, nothing published
                manifest = ScoreManifest(
                    schema_version=OUTPUT_SCHEMA_VERSION, run_id=run_id, run_date=run_date,
                    partition=target.partition(run_date), model_id=setup.model_id,
                    class_set_hash=setup.heads.class_set_hash, logit_scale=setup.logit_scale,
                    negatives_id=setup.negatives_id, negatives_count=len(setup.negatives or ()),
                    classes=list(setup.classes), templates=list(setup.templates), inputs_listed=listed,
                    skipped_already_scored=skipped, excluded_by_watermark=excluded, since=since.after,
                    retried=retried, healed=healed, retry_added=added,
                    left_out=left_out,
                    since_from_run=since.source.run_id if since.source else None,
                    since_overlap_nights=list(since.overlap), watermark=watermark,
                    decision=cfg.decision.model_dump(mode="json"), calibration_id=calibration_id,
                    lake_bank_used=bank_used, lake_bank_id=setup.bank_id, lake_bank_built=bank_built,
                    lake_bank_meta=bank_meta,
                    **stats, resumed_rows=resumed,
                    timings_s={"setup": round(t_setup, 3), "score_and_write": round(t_score, 3),
                               "aggregates_and_alerts": round(t_aggregates, 3)},
                    images_per_s=round((stats["rows"] - resumed) / t_score, 2) if t_score > 0 else None,
                    config=cfg.model_dump(mode="json"), aggregates=aggregates, alerts=alerts,
                )
                lease.check()  # a run whose lease was taken over (heartbeat lost) must not publish
            except BaseException:
                abandon_quietly(target, staged, run_date)
                raise
            published = publish_or_abandon(target, staged, manifest, run_date)
    log.info("published %s: %d rows %s%s", published.partition, stats["rows"], stats["by_status"],
             f" ({resumed} resumed from a dead run's staging)" if resumed else "")
    if alerts and cfg.alerts.fail:
        raise DriftAlertError(f"night {run_date} of {published.partition} is published with {len(alerts)} drift "
                              f"finding(s) (alerts.fail): " + "; ".join(alerts))
    return published


def drift_alerts(cfg: ScoreJobConfig, storage: Storage, run_date: dt.date, run_id: str,
                 aggregates: NightAggregates, model: str) -> list[str] | None:
    """The ``alerts:`` check of this night's aggregates against the output's earlier nights of the same ``model``
    (:func:`jobs.history.read.model_key`; None when off); each finding is also logged as a warning."""
    if cfg.alerts is None:
        return None
    earlier = [n for n in output_nights(cfg.output, storage, exclude=run_date) if n.run_date < run_date]
    findings = check_drift([*earlier, Night(run_date, run_id, aggregates, model)], cfg.alerts)
    for line in findings:
        log.warning("drift: %s", line)
    return findings
