"""The per-worker training loop of ``clipn train`` (runs inside Ray Train's TorchTrainer workers).

Each worker builds the same seeded model for the configured stage
(:mod:`jobs.train.stages`: the CLIPN no tower, or a whole base CLIP), takes its shard
of the pair dataset (``get_dataset_shard``) and runs the stage's step. Every
``checkpoint_every`` steps rank 0 writes a Ray Train checkpoint: the trained weights,
optimiser, scheduler (and fp16 scaler) state, the step, the data position (epoch,
batches consumed in it) and the metrics history. A restarted or rerun run resumes
from the latest one. At the last step rank 0 writes the stage's final weights and the
metrics as JSON lines beside them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import safetensors.torch
import torch
import torch.distributed as dist

import clipn_core as cc
from clipn_core.errors import redact_uri
from clipn_core.storage import write_bytes
from clipn_core.training import warmup_cosine
from clipn_core.weights import load_state_dict_strict
from jobs import failpoints
from jobs.train.stages import STAGES, base_identity
from schemas.train_config import TrainJobConfig

log = logging.getLogger("clipn.train")

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TRAINED_FILE = "trained.safetensors"
_COLLECT_BATCH = 1024


class TrainDataError(RuntimeError):
    """The training data yields no usable batch (too few decodable pairs for batch_size x workers)."""


def metrics_uri(checkpoint_uri: str) -> str:
    """``x.safetensors`` -> ``x.metrics.jsonl`` (the per-step metrics of the run that wrote it)."""
    return checkpoint_uri[: -len(".safetensors")] + ".metrics.jsonl"


def _rank_counts(n_ok: int, n_bad: int, device) -> tuple[int, int, int]:
    """(min usable rows over ranks, total usable rows, total skipped rows) of this step's batches."""
    t = torch.tensor([n_ok, n_bad], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        stacked = torch.stack(parts).cpu()
        return int(stacked[:, 0].min()), int(stacked[:, 0].sum()), int(stacked[:, 1].sum())
    return n_ok, n_ok, n_bad


class ShardBatches:
    """This worker's batches, epoch after epoch: streamed from its Ray Data shard (decoded anew each
    epoch), or with ``cache`` decoded once, kept in memory and reshuffled per (seed, epoch, rank).

    Both yield dicts of CPU tensors with exactly ``batch_size`` rows (the partial batch is
    dropped, so every worker runs the same number of steps per epoch on equal shards).
    """

    def __init__(self, shard, batch_size: int, cache: bool, seed: int, rank: int):
        self.shard, self.batch_size, self.cache, self.seed, self.rank = shard, batch_size, cache, seed, rank
        self._rows: dict[str, torch.Tensor] | None = None

    def _collect(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self.shard.iter_torch_batches(batch_size=_COLLECT_BATCH):
            for k, v in batch.items():
                parts.setdefault(k, []).append(v)
        if not parts:
            return {}
        rows = {k: torch.cat(v) for k, v in parts.items()}
        log.info("rank %d: cached %d decoded pairs (%.1f MB)", self.rank, len(rows["ok"]),
                 sum(v.numel() * v.element_size() for v in rows.values()) / 1e6)
        return rows

    def epoch(self, epoch: int):
        """Iterator over the batches of ``epoch``."""
        if not self.cache:
            yield from self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True)
            return
        if self._rows is None:
            self._rows = self._collect()
        n = len(self._rows["ok"]) if self._rows else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            (self.seed * 1_000_003 + epoch) * 1_009 + self.rank))
        for start in range(0, n - self.batch_size + 1, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield {k: v[idx] for k, v in self._rows.items()}


def _save_ray_checkpoint(trained, optimizer, scheduler, scaler, state: dict, history: list[dict]) -> str:
    d = tempfile.mkdtemp(prefix="clipn-ckpt-")
    weights = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}
    safetensors.torch.save_file(weights, os.path.join(d, _TRAINED_FILE))
    torch.save(optimizer.state_dict(), os.path.join(d, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(d, "scheduler.pt"))
    if scaler is not None:
        torch.save(scaler.state_dict(), os.path.join(d, "scaler.pt"))
    Path(d, "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    Path(d, "state.json").write_text(json.dumps(state, indent=2))
    return d


def _report(metrics: dict, parts: list[str], counters: list[str], state: dict, rank: int, total_steps: int,
            checkpoint_dir: str | None) -> None:
    """Report ``metrics`` to Ray Train from every rank (a collective); rank 0 attaches ``checkpoint_dir``
    when it wrote one, which is removed once Ray Train has persisted it."""
    if rank == 0:
        log.info("step %d/%d loss %.4f (%s) lr %.2e grad %.3f %.1f samples/s, skipped pairs %d%s",
                 metrics["step"], total_steps, metrics["loss"], " ".join(f"{k} {metrics[k]:.4f}" for k in parts),
                 metrics["lr"],
                 metrics["grad_norm"], metrics["samples_per_s"], state["skipped_pairs"],
                 "".join(f", {k.replace('_', ' ')} {metrics[k]}" for k in counters))
    if checkpoint_dir is None:
        ray.train.report(metrics)
        return
    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _reports_processed() -> None:
    """Block until Ray Train's controller has processed every report of this worker so far (the checkpoints
    among them registered: the latest is what a restart or a rerun with the same name resumes from)."""
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _restore(ckpt: ray.train.Checkpoint, trained, optimizer, scheduler, scaler, identity: dict) -> tuple[dict, list]:
    with ckpt.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        if state["base"] != identity:
            raise cc.WeightsError(
                f"run checkpoint was trained on base {state['base']}, the config asks for {identity}; "
                "use another run.name for another stage or base model"
            )
        load_state_dict_strict(trained, safetensors.torch.load_file(os.path.join(d, _TRAINED_FILE)),
                               f"run checkpoint {_TRAINED_FILE}")
        optimizer.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
        scheduler.load_state_dict(torch.load(os.path.join(d, "scheduler.pt"), weights_only=True))
        if scaler is not None and os.path.exists(os.path.join(d, "scaler.pt")):
            scaler.load_state_dict(torch.load(os.path.join(d, "scaler.pt"), weights_only=True))
        history = [json.loads(ln) for ln in Path(d, "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return state, history


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train entry point. ``config``: ``{"cfg": TrainJobConfig as JSON dict}``.

    Returns (rank 0) a summary: final checkpoint URI, model id (sha256 of the weights), steps, last metrics.
    """
    cfg = TrainJobConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    opts = cfg.storage.storage_options()
    loop, optim = cfg.loop, cfg.optim

    stage = STAGES[cfg.stage](cfg, opts)
    model = ray.train.torch.prepare_model(stage.module)  # moves to the device; DDP when there are several workers
    optimizer = stage.optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(optim.warmup_steps, loop.steps))
    on_gpu = device.type == "cuda"
    autocast = _AUTOCAST.get(loop.precision) if on_gpu else None
    scaler = torch.amp.GradScaler("cuda") if autocast is torch.float16 else None
    identity = base_identity(cfg)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_pairs": 0, "skipped_batches": 0,
             "samples": 0, "restarts": 0, "base": identity}
    history: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state, history = _restore(ckpt, stage.trained, optimizer, scheduler, scaler, identity)
        state["restarts"] += 1
        if rank == 0:
            log.info("resumed at step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batch_in_epoch"])

    batches = ShardBatches(ray.train.get_dataset_shard("train"), loop.batch_size, cfg.data.cache_decoded,
                           loop.seed, rank)
    skip = state["batch_in_epoch"]
    t_last = time.perf_counter()
    while state["step"] < loop.steps:
        batches_seen, steps_this_epoch = 0, 0
        for i, batch in enumerate(batches.epoch(state["epoch"])):
            batches_seen += 1
            if i < skip:  # data position: batches of this epoch already trained on before the restart
                continue
            ok = batch["ok"].bool()
            min_ok, n_global, n_bad = _rank_counts(int(ok.sum()), int((~ok).sum()), device)
            state["skipped_pairs"] += n_bad
            state["batch_in_epoch"] = i + 1
            if min_ok == 0:  # a rank has nothing usable: every rank skips this step together
                state["skipped_batches"] += 1
                continue
            usable = {k: batch[k][ok].to(device) for k in ("pixels", "tokens", "caption_id", "sample_id", "image_id")}
            step_metrics = stage.step(model, usable, state["step"], optimizer, scheduler, autocast, scaler)
            steps_this_epoch += 1
            state["step"] += 1
            state["samples"] += n_global
            step = state["step"]
            now = time.perf_counter()
            history.append({"step": step, "epoch": state["epoch"], **step_metrics.as_dict(), "global_batch": n_global,
                            "samples_per_s": n_global / max(now - t_last, 1e-9),  # data wait included
                            "skipped_pairs": state["skipped_pairs"], "restarts": state["restarts"],
                            **stage.counters()})
            t_last = now
            is_last, is_ckpt = step >= loop.steps, step % loop.checkpoint_every == 0
            if is_last or is_ckpt or step % loop.log_every == 0:
                folder = (_save_ray_checkpoint(stage.trained, optimizer, scheduler, scaler, state, history)
                          if (is_last or is_ckpt) and rank == 0 else None)
                _report(history[-1], list(step_metrics.parts), list(stage.counters()), state, rank, loop.steps,
                        folder)
            # Ray Train registers a reported checkpoint when its controller next polls the workers: a fault here
            # first waits for that, so it models a crash after the checkpoint was registered on any machine
            failpoints.hit("train.step", settle=_reports_processed, step=step, rank=rank)
            if is_last:
                break
        else:  # the epoch ran out
            if batches_seen == 0:
                raise TrainDataError(
                    f"an epoch gave worker {rank} no batch of {loop.batch_size} pairs; the data needs at least "
                    f"loop.batch_size x run.num_workers = {loop.batch_size * world} pairs"
                )
            if steps_this_epoch == 0 and skip == 0:
                raise TrainDataError("a whole epoch gave no step: every batch had a worker without one decodable pair")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            skip = 0

    if rank != 0:
        return None
    model_id = stage.save_final(cfg.output.checkpoint, opts)
    write_bytes(metrics_uri(cfg.output.checkpoint), "".join(json.dumps(h) + "\n" for h in history).encode(), opts)
    log.info("final %s weights %s (sha256 %s)", cfg.stage, redact_uri(cfg.output.checkpoint), model_id[:16])
    return {"checkpoint": cfg.output.checkpoint, "model_id": model_id, "steps": state["step"],
            "skipped_pairs": state["skipped_pairs"], "restarts": state["restarts"],
            "last": history[-1] if history else None}
