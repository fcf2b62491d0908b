"""The training job: image-text pairs -> CPU decode (Ray Data) -> TorchTrainer workers -> CLIPN checkpoint.

Usable as ``clipn train --config train.yaml`` or ``python -m jobs train --config ...``
(a ``ray job submit`` entrypoint). Everything that can be wrong in the configuration
(data location and columns, base model and weights, output URI) fails on the driver
before any Ray work starts. Rerunning with the same ``run.name`` and
``run.storage_path`` resumes from the run's latest checkpoint; a worker failure
restarts the worker group from it (up to ``run.max_failures`` times).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from clipn_core.errors import redact_uri
from clipn_core.storage import is_remote
from jobs import failpoints
from jobs.train.data import decode_pairs_batch, pairs_dataset, resolve_source
from jobs.train.loop import train_loop_per_worker
from jobs.train.stages import STAGES
from jobs.train.trainer import Trainer
from schemas.train_config import TrainJobConfig

log = logging.getLogger("clipn.train")


class TrainingError(RuntimeError):
    """The training run failed after setup (a worker error that exhausted ``run.max_failures``)."""


def run_config(cfg: TrainJobConfig) -> RunConfig:
    """Ray Train's RunConfig for the job: storage (local folder or object store), checkpoints kept, failures."""
    storage_path, storage_fs = os.path.abspath(cfg.run.storage_path), None
    if is_remote(cfg.run.storage_path):
        storage_fs, storage_path = cfg.storage.bind().arrow(cfg.run.storage_path)
    return RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        logging_config=LoggingConfig(log_level=cfg.run.log_level),
        worker_runtime_env=failpoints.runtime_env(),
    )


def run(cfg: TrainJobConfig) -> dict:
    """Train; returns the summary of rank 0 (final checkpoint URI, model id, steps, last metrics, run path)."""
    t0 = time.perf_counter()
    failpoints.check()
    storage = cfg.storage.bind()
    # Driver-side setup: a wrong architecture, weights URI or data location fails here.
    stage = STAGES[cfg.stage](cfg, storage.options)
    preprocess_cfg, context_length = stage.preprocess_cfg, stage.context_length
    n_trainable = sum(p.numel() for p in stage.params)
    del stage
    storage.check_writable(cfg.output.checkpoint, "output.checkpoint")
    source = resolve_source(cfg.data, storage)

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    if not sys.stdout.isatty():
        # The training data runs in Ray Train's split coordinator: with Ray's tqdm its progress bars come back
        # to a non-terminal driver as thousands of redraw lines; Ray Data then logs a line per stage instead.
        ray.data.DataContext.get_current().use_ray_tqdm = False
    ds = pairs_dataset(cfg.data, source, storage)
    ds = ds.map_batches(
        decode_pairs_batch, batch_size=cfg.data.decode_batch_size, num_cpus=cfg.data.decode_cpus,
        fn_kwargs={"preprocess_cfg": preprocess_cfg, "context_length": context_length,
                   "augment": cfg.data.augment, "max_pixels": cfg.data.max_pixels},
    )
    if cfg.stage == "lit":
        log.info("stage lit: frozen image features computed once per image and kept in each worker's memory; "
                 "no image augmentation")
    log.info("training stage %s of %s (%d trainable parameters) on %s with %d worker(s), global batch %d, %d steps",
             cfg.stage, cfg.model.architecture, n_trainable, redact_uri(cfg.data.uri), cfg.run.num_workers,
             cfg.loop.batch_size * cfg.run.num_workers, cfg.loop.steps)
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=run_config(cfg),
        datasets={"train": ds},
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training run {cfg.run.name!r} failed: {e}") from e
    summary = dict(result.return_value or {})
    summary["run_path"] = redact_uri(result.path)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary

