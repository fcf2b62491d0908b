"""The training job with Ray Train on the session's local Ray (2 CPUs, gloo), data and checkpoints on loopback S3."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import clipn_core as cc
from clipn_core.errors import InputError
from jobs.cli import main as cli_main
from jobs.demo import world
from jobs.failpoints import ENV as FAILPOINTS_ENV
from jobs.score import run as run_score
from jobs.train import TrainingError, run
from schemas.score_config import ScoreJobConfig
from schemas.train_config import TrainJobConfig

pytestmark = pytest.mark.slow
TINY = "clipn-tiny"


def make_pairs(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """``n`` (JPEG bytes, caption) pairs of coloured shapes, deterministic for ``seed``."""
    combos = itertools.cycle(itertools.product(world.SHAPES, world.COLOURS))
    return [(world.encode(world.render(s, c, seed * 100_000 + i, 32)), f"a {c} {s}")
            for i, (s, c) in zip(range(n), combos)]


def pairs_table(pairs) -> pa.Table:
    return pa.table({"image": pa.array([p[0] for p in pairs], pa.binary()), "caption": [p[1] for p in pairs]})


def train_cfg(data_uri: str, tmp, name: str, **over) -> dict:
    cfg = {
        "data": {"kind": "parquet", "uri": data_uri, "decode_batch_size": 64},
        "model": {"architecture": TINY, "num_prompts": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "loop": {"steps": 12, "batch_size": 16, "checkpoint_every": 4, "log_every": 4},
        "run": {"name": name, "storage_path": str(tmp / "runs"), "num_workers": 2, "cpus_per_worker": 0.5},
        "output": {"checkpoint": str(tmp / "out" / f"{name}.safetensors")},
    }
    for dotted, value in over.items():
        *parents, leaf = dotted.split("__")
        d = cfg
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return cfg


def history(uri: str, opts: dict | None = None) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(uri.replace(".safetensors", ".metrics.jsonl"), **(opts or {}))
    return [json.loads(ln) for ln in fs.cat_file(path).decode().splitlines()]


@pytest.fixture(scope="module")
def s3_run(s3_server, ray_local, tmp_path_factory):
    """One 2-worker run with data, run storage and final checkpoint on the loopback S3 server."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="train")
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "skip_instance_cache": True}
    fs = fsspec.filesystem("s3", **opts)
    buf = io.BytesIO()
    pq.write_table(pairs_table(make_pairs(320)), buf)
    fs.pipe_file("train/pairs/part-0.parquet", buf.getvalue())
    tmp = tmp_path_factory.mktemp("s3run")
    cfg = TrainJobConfig.model_validate(train_cfg(
        "s3://train/pairs", tmp, "s3run",
        run__storage_path="s3://train/runs", run__num_to_keep=2,
        output__checkpoint="s3://train/models/clipn.safetensors",
        storage={"endpoint_url": s3_server},
    ))
    summary = run(cfg)
    return {"cfg": cfg, "summary": summary, "fs": fs, "opts": opts, "tmp": tmp}


def test_two_workers_loss_decreases_and_frozen_towers_stay_bit_identical(s3_run):
    steps = history(s3_run["summary"]["checkpoint"], s3_run["opts"])
    assert [h["step"] for h in steps] == list(range(1, 13))
    assert all(h["global_batch"] == 32 for h in steps)  # 16 per worker x 2 workers, gathered
    first, last = sum(h["loss"] for h in steps[:3]) / 3, sum(h["loss"] for h in steps[-3:]) / 3
    assert last < first - 0.3, (first, last)

    trained, _, model_id = cc.load_checkpoint("s3://train/models/clipn.safetensors", s3_run["opts"])
    assert model_id == s3_run["summary"]["model_id"]
    fresh, _ = cc.build_clipn(TINY, num_prompts=4, seed=0)
    for (name, a), (_, b) in zip(trained.clip.state_dict().items(), fresh.clip.state_dict().items()):
        assert torch.equal(a, b), f"frozen {name} changed"
    moved = [n for (n, a), (_, b) in zip(trained.no_tower.state_dict().items(), fresh.no_tower.state_dict().items())
             if not torch.equal(a, b)]
    assert "prompts" in moved and any(n.startswith("transformer.") for n in moved)


def test_checkpoints_on_s3_keep_the_latest_and_hold_the_full_state(s3_run):
    fs = s3_run["fs"]
    ckpts = sorted(p for p in fs.ls("train/runs/s3run")
                   if p.rsplit("/", 1)[-1].startswith("checkpoint_") and not p.endswith(".json"))
    assert len(ckpts) == 2  # num_to_keep
    states = [json.loads(fs.cat_file(f"{c}/state.json")) for c in ckpts]
    assert sorted(s["step"] for s in states) == [8, 12]
    for c in ckpts:
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(c)}
        assert {"trained.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "metrics.jsonl"} <= names
    latest = max(states, key=lambda s: s["step"])
    assert latest["batch_in_epoch"] > 0 and latest["epoch"] >= 0 and latest["samples"] == 12 * 32


def test_final_checkpoint_loads_in_the_score_job(s3_run):
    fs = s3_run["fs"]
    for i, (data, _) in enumerate(make_pairs(6, seed=7)):
        fs.pipe_file(f"train/lake/img_{i}.jpg", data)
    manifest = run_score(ScoreJobConfig.model_validate({
        "input": {"uri": "s3://train/lake"},
        "output": {"uri": "s3://train/scores"},
        "model": {"checkpoint": s3_run["summary"]["checkpoint"]},
        "classes": {"names": ["circle", "square", "triangle"]},
        "storage": {"endpoint_url": s3_run["cfg"].storage.endpoint_url},
        "runtime": {"batch_size": 8},
    }))
    assert manifest.rows == 6 and manifest.by_status == {"ok": 6}
    assert manifest.model_id == s3_run["summary"]["model_id"]


def _first_step_in_process(cfg: TrainJobConfig, pairs) -> dict:
    """The job's first step on all of ``pairs`` as one batch in this process (what one worker computes, without
    Ray): the job's decode, its stage, its schedule."""
    from clipn_core.training import warmup_cosine
    from jobs.train.data import decode_pairs_batch
    from jobs.train.stages import STAGES

    stage = STAGES[cfg.stage](cfg, {})
    rows = decode_pairs_batch({"image": [p[0] for p in pairs], "caption": [p[1] for p in pairs]},
                              stage.preprocess_cfg, stage.context_length, cfg.data.augment, cfg.data.max_pixels)
    assert rows["ok"].all()
    batch = {k: torch.from_numpy(rows[k]) for k in ("pixels", "tokens", "caption_id", "sample_id")}
    optimizer = stage.optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.loop.steps))
    metrics = stage.step(stage.module, batch, 0, optimizer, scheduler, None, None)
    return {**metrics.as_dict(), "global_batch": len(pairs)}


def test_one_and_two_workers_take_the_same_first_step(ray_local, tmp_path):
    """Same global batch of 16 pairs: 1 worker x 16 or 2 workers x 8 give the same loss and gradient norm.

    The 1-worker side is the job's step in this process (a 1-worker job adds no gathering: the Ray Train runs of
    the rerun and storage-fault tests take that path), which saves a second Ray Train run."""
    pairs = make_pairs(16)
    pq.write_table(pairs_table(pairs), tmp_path / "pairs.parquet")
    common = {"data__augment": False, "loop__steps": 1, "loop__log_every": 1, "optim__warmup_steps": 0,
              "optim__grad_clip_norm": None}
    two_cfg = TrainJobConfig.model_validate(train_cfg(
        str(tmp_path / "pairs.parquet"), tmp_path, "w2", loop__batch_size=8, run__num_workers=2, **common))
    one_cfg = TrainJobConfig.model_validate(train_cfg(
        str(tmp_path / "pairs.parquet"), tmp_path, "w1", loop__batch_size=16, run__num_workers=1, **common))
    (two,) = history(run(two_cfg)["checkpoint"])
    one = _first_step_in_process(one_cfg, pairs)
    assert one["global_batch"] == two["global_batch"] == 16
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["itbo"] == pytest.approx(one["itbo"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert one["grad_norm"] > 0


def _write_shards(folder, pairs_per_shard: int, shards: int) -> int:
    """WebDataset shards as img2dataset writes them, plus bad samples; returns the number of bad samples."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(pairs_per_shard * shards)
    bad = 0
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for i in range(pairs_per_shard):
                key = f"{s:05d}{i:04d}"
                image, caption = pairs[s * pairs_per_shard + i]
                if i == 0:  # undecodable image
                    image, bad = b"\xff\xd8 not really a jpeg", bad + 1
                if i == 1:  # caption missing
                    add(f"{key}.jpg", image)
                    bad += 1
                    continue
                add(f"{key}.jpg", image)
                add(f"{key}.txt", caption.encode())
    (folder / "99999.tar").write_bytes(b"this is a torn shard")
    return bad + 1


def test_worker_killed_mid_run_resumes_from_its_checkpoint(ray_local, tmp_path, monkeypatch):
    bad = _write_shards(tmp_path / "shards", 40, 4)
    marker = tmp_path / "killed"
    # rank 1 dies after step 5, once, as soon as Ray Train has registered what it reported (no sleep: a loaded
    # machine must not decide which checkpoint the restart finds)
    monkeypatch.setenv(FAILPOINTS_ENV, f"train.step=kill,step=5,rank=1,once={marker}")
    cfg = TrainJobConfig.model_validate(train_cfg(
        str(tmp_path / "shards"), tmp_path, "crash", data__kind="webdataset",
        loop__steps=8, loop__batch_size=8, loop__checkpoint_every=3, run__max_failures=1,
    ))
    summary = run(cfg)
    assert marker.exists()  # the fault fired: rank 1 died after step 5
    assert summary["steps"] == 8 and summary["restarts"] == 1
    steps = history(summary["checkpoint"])
    assert [h["step"] for h in steps] == list(range(1, 9))  # steps 4-5 redone once, never duplicated
    assert [h["restarts"] for h in steps] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert 0 < summary["skipped_pairs"]
    assert bad == 9


def test_rerun_with_the_same_name_resumes(ray_local, tmp_path, monkeypatch):
    pq.write_table(pairs_table(make_pairs(96)), tmp_path / "pairs.parquet")
    marker = tmp_path / "killed"
    base = train_cfg(str(tmp_path / "pairs.parquet"), tmp_path, "rerun", loop__steps=6, loop__batch_size=8,
                     loop__checkpoint_every=2, run__max_failures=0, run__num_workers=1, run__cpus_per_worker=1)
    # killed right after step 3: the step-2 checkpoint it reported was registered first (the failpoint waits for
    # that, not for a guessed time), so the rerun resumes from it
    monkeypatch.setenv(FAILPOINTS_ENV, f"train.step=kill,step=3,rank=0,once={marker}")
    with pytest.raises(TrainingError, match="rerun"):
        run(TrainJobConfig.model_validate(base))
    assert marker.exists() and not (tmp_path / "out" / "rerun.safetensors").exists()
    monkeypatch.delenv(FAILPOINTS_ENV)
    summary = run(TrainJobConfig.model_validate(base))
    assert summary["steps"] == 6 and summary["restarts"] == 1
    assert [h["step"] for h in history(summary["checkpoint"])] == [1, 2, 3, 4, 5, 6]


def test_bad_config_fails_before_any_ray_work(tmp_path, capsys):
    pq.write_table(pa.table({"img": [b"x"], "caption": ["c"]}), tmp_path / "p.parquet")
    common = ["--model.architecture", TINY, "--run.name", "x", "--run.storage_path", str(tmp_path / "runs"),
              "--output.checkpoint", str(tmp_path / "o.safetensors")]
    assert cli_main(["train", "--data.uri", str(tmp_path / "p.parquet"), *common, "--optim.warmup_steps", "5",
                     "--loop.steps", "5"]) == 2
    assert "optim.warmup_steps" in capsys.readouterr().err
    assert cli_main(["train", "--data.uri", str(tmp_path / "p.parquet"), *common, "--set", "loop.bogus=1"]) == 2
    assert "loop.bogus" in capsys.readouterr().err
    assert cli_main(["train", "--set", "data.uri=x", *common[:-1], str(tmp_path / "o.pt")]) == 2
    assert "output.checkpoint" in capsys.readouterr().err
    with pytest.raises(InputError, match="data.image_column"):
        run(TrainJobConfig.model_validate(train_cfg(str(tmp_path / "p.parquet"), tmp_path, "x")))
    with pytest.raises(InputError, match="does not exist"):
        run(TrainJobConfig.model_validate(train_cfg(str(tmp_path / "missing"), tmp_path, "x")))
    with pytest.raises(cc.ModelConfigError, match="no-such-arch"):
        run(TrainJobConfig.model_validate(train_cfg(str(tmp_path / "p.parquet"), tmp_path, "x",
                                                    model__architecture="no-such-arch")))
    assert not (tmp_path / "runs").exists()
