"""The nightly scoring job: object storage -> read + decode (CPU tasks) -> CLIPN scorer actors -> Parquet.

Usable as ``clipn score --config score.yaml`` or ``python -m jobs.score --config ...``
(a ``ray job submit`` entrypoint). Everything that can fail on configuration (classes,
templates, model, input listing) fails on the driver before any Ray work starts.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid

import numpy as np
import ray

import clipn_core as cc
from clipn_core.storage import is_remote, read_bytes
from jobs.faults import maybe_die, score_fault_from_env
from jobs.publish import (
    PartFilenames,
    arrow_filesystem,
    publish,
    remove_tree,
    scored_uris,
    staged_stats,
    staging_path,
)
from jobs.scorer import ScorerActor, load_model
from jobs.sources import input_dataset, read_decode_batch, read_tar_batch
from schemas.output import OUTPUT_SCHEMA_VERSION
from schemas.score_config import ClassesConfig, ScoreJobConfig

log = logging.getLogger("clipn.score")


def resolve_classes(classes: ClassesConfig, storage_options: dict) -> tuple[str, ...]:
    """Validated ID class names from the inline list or the class file (one per line)."""
    if classes.names is not None:
        return cc.validate_class_names(classes.names)
    try:
        text = read_bytes(classes.file, storage_options).decode("utf-8")
    except (cc.StorageError, UnicodeDecodeError) as e:
        raise cc.ClassListError(f"classes.file: {e}") from e
    return cc.validate_class_names([ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")])


def _drop_scored(batch: dict, done) -> dict:
    keep = np.array([u not in done for u in batch["uri"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def run(cfg: ScoreJobConfig) -> dict:
    """Run the job; returns the published manifest. Raises before Ray work on any setup error."""
    t0 = time.perf_counter()
    opts = cfg.storage.storage_options()
    run_id = cfg.run_id or uuid.uuid4().hex[:12]
    run_date = cfg.effective_run_date()
    rt = cfg.runtime

    # Driver-side setup: everything that can be wrong in the config fails here.
    fault = score_fault_from_env()
    classes = resolve_classes(cfg.classes, opts)
    templates = cc.load_templates(cfg.templates, opts)
    model, model_id = load_model(cfg.model, opts, rt.cache_dir)
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), classes, templates)
    preprocess_cfg = model.preprocess_cfg
    del model
    log.info("model %s, %d classes, %d templates, class set %s", model_id[:16], len(classes), len(templates),
             heads.class_set_hash)

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    in_fs, _ = arrow_filesystem(cfg.input.uri, opts)
    ds, n_inputs = input_dataset(cfg.input, opts, in_fs)
    done: set[str] = set()
    if cfg.output.skip_scored:
        done = scored_uris(cfg.output.uri, run_date, model_id, heads.class_set_hash, opts)
        log.info("skip_scored: %d URIs already scored", len(done))
    t_setup = time.perf_counter() - t0

    decode_kwargs = {"storage_options": opts, "preprocess_cfg": preprocess_cfg, "max_pixels": rt.max_pixels}
    if cfg.input.kind == "tar":
        ds = ds.map_batches(read_tar_batch, batch_size=1, num_cpus=rt.decode_cpus,
                            fn_kwargs={**decode_kwargs, "extensions": cfg.input.extensions})
    else:
        ds = ds.map_batches(read_decode_batch, batch_size=rt.decode_batch_size, num_cpus=rt.decode_cpus,
                            fn_kwargs={**decode_kwargs, "fault": fault})
    if done:
        ds = ds.map_batches(_drop_scored, fn_kwargs={"done": done}, batch_size=None)
    ds = ds.map_batches(
        ScorerActor,
        fn_constructor_kwargs={
            "model_cfg": cfg.model, "heads": heads, "runtime": rt, "decision": cfg.decision,
            "storage_options": opts, "run_id": run_id, "embeddings": cfg.output.embeddings, "fault": fault,
        },
        batch_size=rt.batch_size,
        compute=ray.data.ActorPoolStrategy(size=rt.pool_size),
        num_gpus=rt.gpus_per_actor,
        num_cpus=rt.cpus_per_actor,
        batch_format="numpy",
    )

    staged = staging_path(cfg.output.uri, run_id)
    out_fs, staged_p = arrow_filesystem(staged, opts)
    try:
        # Object stores have no directories; asking Ray to create one makes it delete a
        # non-existent one (FileNotFoundError) when every input was skipped.
        ds.write_parquet(staged_p, filesystem=out_fs, filename_provider=PartFilenames(),
                         try_create_dir=not is_remote(cfg.output.uri))
        t_score = time.perf_counter() - t0 - t_setup
        stats = staged_stats(staged, opts)
        if n_inputs is not None and not done and stats["rows"] != n_inputs:
            raise RuntimeError(f"wrote {stats['rows']} rows for {n_inputs} inputs; not publishing")
        maybe_die(fault, "driver")  # test hook: a driver crash with everything staged, nothing published
        manifest = {
            "schema_version": OUTPUT_SCHEMA_VERSION,
            "run_id": run_id,
            "run_date": run_date.isoformat(),
            "model_id": model_id,
            "class_set_hash": heads.class_set_hash,
            "classes": list(classes),
            "templates": list(templates),
            "inputs_listed": n_inputs,
            "skipped_already_scored": len(done) if done else 0,
            **stats,
            "timings_s": {"setup": round(t_setup, 3), "score_and_write": round(t_score, 3)},
            "images_per_s": round(stats["rows"] / t_score, 2) if t_score > 0 else None,
            "config": cfg.model_dump(mode="json"),
        }
        partition = publish(cfg.output.uri, run_date, staged, manifest, opts)
    except BaseException:
        remove_tree(staged, opts)
        raise
    manifest["partition"] = partition
    log.info("published %s: %d rows %s", partition, stats["rows"], stats["by_status"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["score", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
