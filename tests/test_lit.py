"""Stage lit (locked-image tuning): config checks, strict image weights, the EfficientNet-Lite0 key mapping, a frozen
tower that stays bit-identical while the text tower learns, features computed once per image, and a base the clipn
stage and the scoring build take. In-process (no Ray): the job's Ray path is the clip stage's."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import open_clip
import pydantic
import pytest
import safetensors.torch
import timm
import torch

import clipn_core as cc
from clipn_core.efficientnet_lite import LITE0_STAGE_REPEATS, lite0_to_timm
from clipn_core.images import split_preprocessor
from clipn_core.lit import split_image_tower
from clipn_core.training import image_id, text_id, warmup_cosine
from clipn_core.weights import create_base_clip, load_state_dict_strict
from jobs.cli import main as cli_main
from jobs.demo import world
from jobs.train.stages import STAGES, base_identity
from schemas.train_config import TrainJobConfig

ARCH = "test-lit-tiny"  # timm's tiny test_efficientnet under a 1-layer text tower, with a linear image head
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_model_pretrained": False, "timm_pool": "avg",
                   "timm_proj": "linear", "image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# sha256 of the sorted (key, shape) list of the real efficientnet-lite0-57934424.pth (296 tensors), read once from
# the PyPI wheel: the layout the mapping takes, checked here without the download
REAL_LITE0_LAYOUT_SHA256 = "2a24a0e162664a3d0c9fadf2e42ae0442e3c66e9f80e301d608ddc2b82cc10ff"


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    d = tmp_path_factory.mktemp("lit-configs")
    (d / f"{ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d)  # as a user adds an architecture: open_clip's public registry
    return ARCH


@pytest.fixture(scope="module")
def trunk_weights(arch, tmp_path_factory):
    """A seeded random test_efficientnet trunk's state dict, saved as .safetensors (the timm layout)."""
    torch.manual_seed(5)
    trunk = timm.create_model("test_efficientnet", num_classes=0, global_pool="avg")
    path = tmp_path_factory.mktemp("weights") / "trunk.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    return str(path), trunk.state_dict()


def lit_cfg(tmp_path, image_weights, **model) -> TrainJobConfig:
    return TrainJobConfig.model_validate({
        "stage": "lit", "data": {"uri": str(tmp_path / "pairs.parquet")},
        "model": {"architecture": ARCH, "image_weights": image_weights, **model},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "loop": {"steps": 40, "batch_size": 16},
        "run": {"name": "lit", "storage_path": str(tmp_path / "runs")},
        "output": {"checkpoint": str(tmp_path / "base.safetensors")},
    })


def _world(n_images: int):
    """(pixels uint8 [n, 3, 32, 32], captions, image ids) of coloured shapes, each image captioned once."""
    combos = [(s, c) for s in world.SHAPES[:4] for c in ("red", "blue")]
    images, captions = [], []
    for i in range(n_images):
        s, c = combos[i % len(combos)]
        images.append(world.encode(world.render(s, c, i, 32)))
        captions.append(f"a {c} {s}")
    return images, captions


# --- config -------------------------------------------------------------------------------------------------------

def test_lit_config_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(pydantic.ValidationError, match="stage lit needs model.image_weights"):
        lit_cfg(tmp_path, None)
    with pytest.raises(pydantic.ValidationError, match="leave model.pretrained unset"):
        lit_cfg(tmp_path, "w.safetensors", pretrained="base.safetensors")
    with pytest.raises(pydantic.ValidationError, match="model.image_weights is for stage lit"):
        TrainJobConfig.model_validate({**lit_cfg(tmp_path, "w.pt").model_dump(), "stage": "clip"})
    raw = lit_cfg(tmp_path, "w.pt").model_dump()
    raw["data"]["augment"] = True
    with pytest.raises(pydantic.ValidationError, match="never augments"):
        TrainJobConfig.model_validate(raw)
    cfg = lit_cfg(tmp_path, "w.pt")
    assert cfg.data.augment is False  # unset: the eval transform, and the dumped config round-trips
    assert TrainJobConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    # the CLI derives --stage lit from the config model and refuses the same config before any work
    assert cli_main(["train", "--stage", "lit", "--data.uri", "x.parquet", "--model.architecture", ARCH,
                     "--run.name", "x", "--run.storage_path", str(tmp_path / "runs"),
                     "--output.checkpoint", str(tmp_path / "o.safetensors")]) == 2
    assert "model.image_weights" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- image weights ------------------------------------------------------------------------------------------------

def test_image_weights_load_strictly_and_name_the_keys_at_fault(arch, trunk_weights, tmp_path):
    path, state = trunk_weights
    stage = STAGES["lit"](lit_cfg(tmp_path, path), {})
    locked, head = split_image_tower(stage.clip)
    assert all(torch.equal(locked.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in locked.parameters())
    assert all(p.requires_grad for p in head.parameters()) and stage.clip.text_projection.requires_grad

    bad = dict(state)
    dropped = sorted(bad)[0]
    del bad[dropped]
    bad["extra.weight"] = torch.zeros(1)
    bad_path = tmp_path / "bad.pt"
    torch.save(bad, bad_path)  # a torch file: read with weights_only
    with pytest.raises(cc.CheckpointKeyError, match="model.image_weights") as err:
        STAGES["lit"](lit_cfg(tmp_path, str(bad_path)), {})
    assert err.value.missing == [dropped] and err.value.unexpected == ["extra.weight"]
    with pytest.raises(cc.WeightsError, match="model.image_weights"):
        STAGES["lit"](lit_cfg(tmp_path, str(tmp_path / "missing.safetensors")), {})
    (tmp_path / "garbage.pt").write_bytes(b"not a state dict")
    with pytest.raises(cc.WeightsError, match="model.image_weights: .*garbage.pt is not a readable state dict"):
        STAGES["lit"](lit_cfg(tmp_path, str(tmp_path / "garbage.pt")), {})


def _timm_to_pypi_lite0(state: dict) -> dict:
    """timm tf_efficientnet_lite0 -> efficientnet-lite-pytorch names, written from that package's model.py
    (``_blocks`` numbered through the stages; stage 0 blocks have no ``_expand_conv``)."""
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    first = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    rest = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
            "conv_pwl": "_project_conv", "bn3": "_bn2"}
    offsets = np.cumsum((0, *LITE0_STAGE_REPEATS))
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            stage, j, module = int(parts[1]), int(parts[2]), parts[3]
            names = first if stage == 0 else rest
            out[".".join([f"_blocks.{offsets[stage] + j}", names[module], *parts[4:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def test_efficientnet_lite0_weights_map_onto_timm_exactly():
    torch.manual_seed(0)
    full = timm.create_model("tf_efficientnet_lite0")
    pypi = _timm_to_pypi_lite0(full.state_dict())
    layout = hashlib.sha256(json.dumps(sorted((k, list(v.shape)) for k, v in pypi.items())).encode()).hexdigest()
    assert len(pypi) == 296 and layout == REAL_LITE0_LAYOUT_SHA256  # the package's real layout

    fresh = timm.create_model("tf_efficientnet_lite0")
    load_state_dict_strict(fresh, lite0_to_timm(pypi, keep_classifier=True), "lite0")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in full.state_dict().items())
    trunk = timm.create_model("tf_efficientnet_lite0", num_classes=0)  # what the open_clip tower holds
    load_state_dict_strict(trunk, lite0_to_timm(pypi), "lite0")
    with pytest.raises(cc.CheckpointKeyError, match=r"_blocks\.16\._bn0\.weight"):
        lite0_to_timm({**pypi, "_blocks.16._bn0.weight": torch.zeros(1)})


def test_shipped_lite0_config_builds_timm_lite0_with_its_normalisation():
    clip, _, _ = create_base_clip("clipn-effnet-lite0", device="meta")
    locked, head = split_image_tower(clip)
    assert type(locked).__name__ == "EfficientNet" and len(list(head.parameters())) == 0
    assert clip.text_projection.shape[-1] == 1280 == locked.num_features  # the embedding is the trunk's feature
    pre = open_clip.get_model_preprocess_cfg(clip)
    assert tuple(pre["mean"]) == tuple(pre["std"]) == (0.5, 0.5, 0.5) and tuple(pre["size"]) == (224, 224)


# --- training -----------------------------------------------------------------------------------------------------

def test_lit_trains_text_on_a_frozen_tower_computing_each_image_once(arch, trunk_weights, tmp_path):
    path, _ = trunk_weights
    cfg = lit_cfg(tmp_path, path)
    stage = STAGES["lit"](cfg, {})
    locked = split_image_tower(stage.clip)[0]
    frozen = {k: v.clone() for k, v in locked.state_dict().items()}
    before = {k: v.clone() for k, v in stage.clip.state_dict().items()}
    images_seen = []
    locked.register_forward_hook(lambda m, inp, out: images_seen.append(inp[0].shape[0]))

    images, captions = _world(32)
    pre = split_preprocessor(stage.preprocess_cfg, is_train=False)
    pixels = torch.from_numpy(np.stack([pre.to_uint8(world.render(c.split()[2], c.split()[1], i, 32))
                                        for i, c in enumerate(captions)]))
    tokens = open_clip.SimpleTokenizer(context_length=stage.context_length)(captions)
    caption_ids = torch.tensor([text_id(c) for c in captions])
    ids = torch.tensor([image_id(b) for b in images])
    optimizer = stage.optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, cfg.loop.steps))
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(cfg.loop.steps):  # 20 epochs of 2 batches
        rows = torch.randperm(32, generator=gen)[:16] if step % 2 else torch.arange(16) + 16 * (step // 2 % 2)
        batch = {"pixels": pixels[rows], "tokens": tokens[rows], "caption_id": caption_ids[rows], "image_id": ids[rows]}
        losses.append(stage.step(stage.module, batch, step, optimizer, scheduler, None, None).loss)

    assert sum(images_seen) == len(stage.features) == 32  # each image through the frozen tower once, ever
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    for k, v in locked.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(v, frozen[k]), k
    moved = {k for k, v in stage.clip.state_dict().items() if not torch.equal(v, before[k])}
    assert {"text_projection", "logit_scale", "visual.head.proj.weight"} <= moved
    assert any(k.startswith("transformer.") for k in moved)
    assert not any(k.startswith("visual.trunk.") for k in moved)
    assert base_identity(cfg)["image_weights"] == path


def _feed(caches: dict, batches: list[torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor) -> None:
    """The same batches (rows of ``pixels`` / ``ids``) to every cache; each batch's features must be the same bits
    in every cache, on the pixels' device."""
    for rows in batches:
        got = {name: cache(ids[rows], pixels[rows], lambda p: p.float() / 255) for name, cache in caches.items()}
        for name, features in got.items():
            assert features.device == pixels.device and torch.equal(features, got["unbounded"]), name


def test_a_bounded_feature_cache_computes_what_it_cannot_hold_every_epoch_with_the_same_bits(caplog):
    """Issue 22 (5): the cache had no bound, so 5M domain images ran a worker out of memory. Bounded, it keeps
    the first images that fit and sends the rest through the tower again every epoch; 0 turns it off."""
    from clipn_core.feature_cache import ImageFeatureCache

    torch.manual_seed(0)
    trunk = timm.create_model("test_efficientnet", num_classes=0, global_pool="avg").eval()

    def tower(x):  # one image at a time: CPU kernels give an image's last bits by batch size (1 vs 2+ differ by
        return torch.cat([trunk(x[i:i + 1]) for i in range(len(x))])  # ~1e-9 here), which no cache can undo

    per_image = trunk.num_features * 4
    caches = {"unbounded": ImageFeatureCache(tower), "five images": ImageFeatureCache(tower, 5 * per_image + 3),
              "off": ImageFeatureCache(tower, 0)}
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=gen)
    ids = torch.arange(32) * 7919
    epochs = [torch.randperm(32, generator=gen).view(4, 8) for _ in range(3)]  # 3 epochs of 4 batches of 8
    with caplog.at_level("INFO", logger="clipn.train"):
        _feed(caches, [rows for epoch in epochs for rows in epoch], pixels, ids)
    unbounded, bounded, off = caches.values()
    assert (unbounded.computed, unbounded.hits, len(unbounded)) == (32, 64, 32)  # each image once, ever
    assert (bounded.computed, bounded.hits, len(bounded)) == (32 + 2 * 27, 2 * 5, 5)  # the 27 others every epoch
    assert bounded.bytes == 5 * per_image  # what fits, never past the bound
    assert (off.computed, off.hits, len(off), off.bytes) == (96, 0, 0, 0)
    full = [r.getMessage() for r in caplog.records if "feature cache full" in r.getMessage()]
    assert len(full) == 1 and "5 images" in full[0]  # once, for the bounded cache alone

    # an image twice in a batch, held or not, goes through the tower once and fills both rows
    held = next(i for i in range(32) if ids[i].item() in bounded._row)
    not_held = next(i for i in range(32) if ids[i].item() not in bounded._row)
    before = bounded.computed
    _feed(caches, [torch.tensor([held, not_held, held, not_held])], pixels, ids)
    assert bounded.computed == before + 1 and off.computed == 96 + 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_feature_cache_holds_a_gpu_towers_features_in_host_memory():
    from clipn_core.feature_cache import ImageFeatureCache

    tower = timm.create_model("test_efficientnet", num_classes=0, global_pool="avg").eval().cuda()
    cache = ImageFeatureCache(tower)
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    first = cache(torch.arange(8, device="cuda"), pixels, lambda p: p.float() / 255)
    again = cache(torch.arange(8, device="cuda"), pixels, lambda p: p.float() / 255)
    assert first.device.type == again.device.type == "cuda" and torch.equal(first, again)
    assert cache.hits == 8 and all(chunk.device.type == "cpu" for chunk in cache._chunks)


def test_the_lit_stage_bounds_its_feature_cache_from_the_config(arch, trunk_weights, tmp_path):
    path, _ = trunk_weights
    cfg = lit_cfg(tmp_path, path)
    assert cfg.loop.feature_cache_max_mb == 2000  # bounded unless told otherwise
    raw = cfg.model_dump(mode="json")
    raw["loop"]["feature_cache_max_mb"] = 0
    stage = STAGES["lit"](TrainJobConfig.model_validate(raw), {})
    assert stage.features.max_bytes == 0
    assert stage.counters() == {"feature_cache_hits": 0, "feature_cache_computed": 0}
    with pytest.raises(pydantic.ValidationError, match="feature_cache_max_mb"):
        TrainJobConfig.model_validate({**raw, "loop": {**raw["loop"], "feature_cache_max_mb": -1}})


def test_lit_base_is_taken_by_the_clipn_stage_and_the_scoring_build(arch, trunk_weights, tmp_path):
    path, _ = trunk_weights
    stage = STAGES["lit"](lit_cfg(tmp_path, path), {})
    base = str(tmp_path / "base.safetensors")
    stage.save_final(base, {})

    clipn_cfg = TrainJobConfig.model_validate({
        "data": {"uri": str(tmp_path / "pairs.parquet")},
        "model": {"architecture": ARCH, "pretrained": base, "pretrained_config": "plain", "num_prompts": 2},
        "run": {"name": "clipn", "storage_path": str(tmp_path / "runs")},
        "output": {"checkpoint": str(tmp_path / "clipn.safetensors")},
    })
    clipn = STAGES["clipn"](clipn_cfg, {})
    for k, v in stage.clip.state_dict().items():
        assert torch.equal(clipn.core.clip.state_dict()[k], v), k
    assert clipn.preprocess_cfg == stage.preprocess_cfg  # the tower's timm normalisation follows the base

    model_id = clipn.save_final(clipn_cfg.output.checkpoint, {})
    loaded, spec, loaded_id = cc.load_checkpoint(clipn_cfg.output.checkpoint)
    assert loaded_id == model_id and spec.base_weights["pretrained_config"] == "plain"
    x = torch.rand(3, 3, 32, 32)
    locked, head = split_image_tower(stage.clip)
    with torch.no_grad():
        want = torch.nn.functional.normalize(head(locked(x)), dim=-1)
        assert torch.allclose(loaded.encode_image(x), want, atol=1e-6)


def test_an_architecture_given_as_a_config_file_registers_itself_where_it_is_built(tmp_path):
    """A user's own tower as a config file: the process that builds it registers it (a Ray worker included), the
    build equals the same config registered by name, and the identity records the file as given."""
    from clipn_core.architectures import resolve_architecture

    name = "user-tower-from-file"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(TINY_CFG))
    assert open_clip.get_model_config(name) is None  # nothing registered it: as in a fresh worker
    clip, model_cfg, identity = create_base_clip(str(path), None, seed=3)
    assert open_clip.get_model_config(name) == TINY_CFG and model_cfg["vision_cfg"] == TINY_CFG["vision_cfg"]
    assert identity["architecture"] == str(path)
    again, _, _ = create_base_clip(name, None, seed=3)  # now by name: the same model
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in clip.state_dict().items())
    assert resolve_architecture(str(path)) == name  # registering the same file twice is harmless
    model, spec = cc.build_clipn(str(path), None, 2)
    assert spec.architecture == str(path)


@pytest.mark.parametrize("case", ["missing", "not json", "no vision_cfg", "not an object", "built-in name",
                                  "same name, other file"])
def test_a_bad_architecture_config_file_fails_naming_the_file(case, tmp_path):
    name = {"built-in name": "ViT-B-16", "same name, other file": "user-tower-twice"}.get(case, "user-tower-bad")
    path = tmp_path / case.replace(" ", "-").replace(",", "") / f"{name}.json"
    path.parent.mkdir()
    body = {"missing": None, "not json": "{embed_dim: 16", "not an object": "[1, 2]",
            "no vision_cfg": json.dumps({k: v for k, v in TINY_CFG.items() if k != "vision_cfg"})}.get(
        case, json.dumps(TINY_CFG))
    if case == "same name, other file":  # another file of that name registered first, with another config
        first = tmp_path / "first" / f"{name}.json"
        first.parent.mkdir()
        first.write_text(json.dumps({**TINY_CFG, "embed_dim": 8}))
        create_base_clip(str(first), None)
    if body is not None:
        path.write_text(body)
    before = open_clip.get_model_config(name)
    with pytest.raises(cc.ModelConfigError, match="model.architecture: .*" + str(path).replace(".", r"\.")):
        create_base_clip(str(path), None)
    assert open_clip.get_model_config(name) == before  # nothing was replaced


def test_a_config_file_naming_an_unknown_timm_model_fails_naming_the_file(tmp_path):
    path = tmp_path / "user-tower-typo.json"
    path.write_text(json.dumps({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "timm_model_name": "no_such_net"}}))
    with pytest.raises(cc.WeightsError, match=f"cannot build {path}.*no_such_net"):
        create_base_clip(str(path), None)
