"""Weights: base-weight resolution, CLIPN checkpoint round trips, original-checkpoint import, strictness."""

import copy
import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import clipn_core as cc
from clipn_core.errors import CheckpointKeyError, ModelConfigError, WeightsError
from clipn_core.model import CLIPN
from clipn_core.storage import sha256_file
from clipn_core.weights import create_base_clip, load_state_dict_strict, original_key_to_ours

TEXTS = ["a red circle", "a photo of a blue square", "green star"]


def _trained_like(tiny, seed=5, num_prompts=16):
    """A CLIPN whose no tower and prompts differ from the yes tower (as after training)."""
    base, spec, tok = tiny
    model = CLIPN(copy.deepcopy(base.clip), num_prompts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.no_tower.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval(), spec, tok


def _features(model, tok):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = tok(TEXTS)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(t), model.encode_text_no(t)


def _assert_same_features(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_save_load_round_trip_local(tiny, tmp_path):
    model, spec, tok = _trained_like(tiny)
    uri = str(tmp_path / "ckpt" / "clipn.safetensors")
    digest = cc.save_checkpoint(model, spec, uri)
    loaded, spec2, model_id = cc.load_checkpoint(uri)
    assert model_id == digest
    assert spec2.architecture == "clipn-tiny" and spec2.num_prompts == 16
    _assert_same_features(_features(model, tok), _features(loaded, tok))
    sidecar = json.loads((tmp_path / "ckpt" / "clipn.json").read_text())
    assert sidecar["format_version"] == 1 and sidecar["base_weights"]["architecture"] == "clipn-tiny"


def test_save_load_round_trip_s3(tiny, s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    model, spec, tok = _trained_like(tiny, seed=6)
    uri = f"s3://{bucket}/models/clipn.safetensors"
    cc.save_checkpoint(model, spec, uri, storage_options=opts)
    loaded, _, _ = cc.load_checkpoint(uri, storage_options=opts, cache_dir=str(tmp_path / "cache"))
    _assert_same_features(_features(model, tok), _features(loaded, tok))
    # base CLIP weights without a sidecar are recognised from their header on S3 too (ranged reads)
    base = f"s3://{bucket}/models/base.safetensors"
    cc.save_base_clip(model.clip, base, storage_options=opts)
    with pytest.raises(WeightsError, match="model.checkpoint: .*base.safetensors is base CLIP weights"):
        cc.load_checkpoint(base, storage_options=opts, cache_dir=str(tmp_path / "cache"))


def _original_forward_no(state, text, num_heads):
    """The original CLIPN eval path for the no tower, written from its source (mean prompt, argmax pool)."""
    from open_clip.transformer import Transformer

    width = state["ln_final_no.weight"].shape[0]
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer_no.resblocks.")})
    tr = Transformer(width, layers, num_heads)
    tr.load_state_dict({k[len("transformer_no."):]: v for k, v in state.items() if k.startswith("transformer_no.")})
    ctx = state["positional_embedding_no"].shape[0]
    mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
    x = F.embedding(text, state["token_embedding_no.weight"]) + state["positional_embedding_no"]
    x = x + state["prompt_no"].mean(dim=0, keepdim=True)
    x = tr(x, attn_mask=mask)
    x = F.layer_norm(x, (width,), state["ln_final_no.weight"], state["ln_final_no.bias"])
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ state["text_projection_no"]
    return F.normalize(x, dim=-1)


def _original_layout(model):
    """Re-lay our weights under the original CLIPN key names with DDP's ``module.`` prefix."""
    ours_to_orig = {}
    for k in model.state_dict():
        if k.startswith("clip."):
            ours_to_orig[k] = k[len("clip."):]
    names = {
        "no_tower.transformer.": "transformer_no.", "no_tower.token_embedding.": "token_embedding_no.",
        "no_tower.positional_embedding": "positional_embedding_no", "no_tower.ln_final.": "ln_final_no.",
        "no_tower.text_projection": "text_projection_no", "no_tower.prompts": "prompt_no",
    }
    for k in model.state_dict():
        for ours, orig in names.items():
            if k.startswith(ours):
                ours_to_orig[k] = orig + k[len(ours):]
    state = {"module." + ours_to_orig[k]: v.clone() for k, v in model.state_dict().items()}
    return state, ours_to_orig


def test_import_original_checkpoint_gives_identical_features(tiny, tmp_path):
    model, _, tok = _trained_like(tiny, seed=7)
    state, mapping = _original_layout(model)
    assert all(original_key_to_ours(o) == k for k, o in mapping.items())
    path = tmp_path / "epoch_10.pt"
    torch.save({"epoch": 10, "state_dict": state}, path)
    imported, spec = cc.import_original_checkpoint(str(path), architecture="clipn-tiny", pretrained_config="plain")
    assert spec.num_prompts == 16 and spec.base_weights["pretrained_config"] == "plain"
    _assert_same_features(_features(model, tok), _features(imported, tok))
    plain = {k[len("module."):]: v for k, v in state.items()}
    t = tok(TEXTS)
    with torch.no_grad():
        reference = _original_forward_no(plain, t, num_heads=2)
        ours = imported.encode_text_no(t)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_import_original_states_the_base_configuration_it_assumes(tiny, tmp_path):
    """The original code trains over ViT-B-16 / laion2b_s34b_b88k (GELU): the default, recorded in the sidecar;
    another architecture must name its own."""
    import inspect

    from schemas.import_config import ImportJobConfig

    default = inspect.signature(cc.import_original_checkpoint).parameters
    assert (default["architecture"].default, default["pretrained_config"].default) == ("ViT-B-16", "laion2b_s34b_b88k")
    assert ImportJobConfig(checkpoint="x.pt", output="y.safetensors").pretrained_config == "laion2b_s34b_b88k"
    model, _, _ = _trained_like(tiny, seed=7)
    state, _ = _original_layout(model)
    torch.save({"state_dict": state}, tmp_path / "o.pt")
    with pytest.raises(ModelConfigError, match="pretrained_config: open_clip has no pretrained tag 'laion2b_s34b_b88k' "
                                               "for clipn-tiny"):
        cc.import_original_checkpoint(str(tmp_path / "o.pt"), architecture="clipn-tiny")


def test_import_original_rejects_wrong_keys_and_pickles(tiny, tmp_path):
    model, _, _ = _trained_like(tiny)
    state, _ = _original_layout(model)
    bad = dict(state)
    bad.pop("module.ln_final_no.bias")
    bad["module.extra_head.weight"] = torch.zeros(2)
    bad["module.prompt_no"] = torch.zeros(16, 77, 64)  # original ViT-B context 77 vs tiny's 32
    torch.save({"state_dict": bad}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointKeyError) as info:
        cc.import_original_checkpoint(str(tmp_path / "bad.pt"), architecture="clipn-tiny", pretrained_config="plain")
    msg = str(info.value)
    assert "no_tower.ln_final.bias" in msg and "clip.extra_head.weight" in msg and "no_tower.prompts" in msg
    assert info.value.mismatched[0][1] == (16, 77, 64)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": state, "hook": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights_only"):
        cc.import_original_checkpoint(str(tmp_path / "evil.pt"), architecture="clipn-tiny", pretrained_config="plain")


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(tiny):
    model, _, _ = _trained_like(tiny)
    state = dict(model.state_dict())
    state.pop("no_tower.prompts")
    state["bogus.weight"] = torch.zeros(1)
    state["clip.ln_final.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointKeyError) as info:
        load_state_dict_strict(model, state, "mem://x")
    assert info.value.missing == ["no_tower.prompts"]
    assert info.value.unexpected == ["bogus.weight"]
    assert info.value.mismatched == [("clip.ln_final.weight", (3,), (64,))]


def test_corrupt_missing_and_mismatched_checkpoints(tiny, tmp_path):
    model, spec, _ = _trained_like(tiny)
    uri = tmp_path / "c.safetensors"
    cc.save_checkpoint(model, spec, str(uri))
    # a CLIPN checkpoint copied without its sidecar: named as one, with the field
    (tmp_path / "lost.safetensors").write_bytes(uri.read_bytes())
    with pytest.raises(WeightsError, match=r"model\.checkpoint: .*lost\.safetensors is a CLIPN checkpoint without "
                       "its sidecar"):
        cc.load_checkpoint(str(tmp_path / "lost.safetensors"))
    # corrupt bytes: the sha256 in the sidecar no longer matches
    data = bytearray(uri.read_bytes())
    data[len(data) // 2] ^= 0xFF
    uri.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt"):
        cc.load_checkpoint(str(uri))
    # truncated file whose sidecar agrees (written by a crashed tool): unreadable safetensors
    side = json.loads((tmp_path / "c.json").read_text())
    uri.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    import hashlib

    side["sha256"] = hashlib.sha256(uri.read_bytes()).hexdigest()
    (tmp_path / "c.json").write_text(json.dumps(side))
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        cc.load_checkpoint(str(uri))
    # missing sidecar / missing weights
    with pytest.raises(WeightsError, match="model.checkpoint: checkpoint sidecar missing"):
        cc.load_checkpoint(str(tmp_path / "nothing.safetensors"))
    (tmp_path / "orphan.json").write_text((tmp_path / "c.json").read_text())
    with pytest.raises(WeightsError, match="not found"):
        cc.load_checkpoint(str(tmp_path / "orphan.safetensors"))
    with pytest.raises(WeightsError, match=".safetensors"):
        cc.load_checkpoint(str(tmp_path / "c.pt"))
    # weights of another shape than the sidecar says (num_prompts 4 vs 16)
    small, small_spec, _ = _trained_like(tiny, num_prompts=4)
    cc.save_checkpoint(small, small_spec, str(tmp_path / "s.safetensors"))
    side = json.loads((tmp_path / "s.json").read_text())
    side["num_prompts"] = 16
    (tmp_path / "s.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointKeyError, match="no_tower.prompts"):
        cc.load_checkpoint(str(tmp_path / "s.safetensors"))


@pytest.fixture(scope="module")
def base_clip_file(tmp_path_factory):
    """Base CLIP weights as the clip and lit stages write them (no sidecar)."""
    clip, _, _ = create_base_clip("clipn-tiny", seed=2)
    path = tmp_path_factory.mktemp("base") / "lit.safetensors"
    cc.save_base_clip(clip, str(path))
    return str(path)


@pytest.mark.parametrize("entry", ["load_checkpoint", "evaluate", "calibrate", "score"])
def test_base_clip_weights_given_as_model_checkpoint_say_what_they_are_and_how_to_pass_them(
        entry, base_clip_file, tmp_path, capsys):
    """Issue 22 (6): the lit and clip stages' output given as model.checkpoint failed with 'checkpoint sidecar
    missing or unreadable: not found: .../lit.json', naming neither the field nor the fix."""
    from jobs.cli import main as cli_main
    from jobs.demo.world import World, encode, render

    out = tmp_path / "out"
    if entry == "load_checkpoint":
        with pytest.raises(WeightsError) as caught:
            cc.load_checkpoint(base_clip_file)
        err = [str(caught.value)]
    else:
        world = World(seed=3)
        data = world.write_parquet(world.eval_table(4, 4), str(tmp_path / "eval.parquet"))
        lake = tmp_path / "lake"
        lake.mkdir()
        (lake / "a.jpg").write_bytes(encode(render("circle", "red", 0, 32)))
        args = {"evaluate": ["evaluate", "--data.uri", data, "--output.dir", str(out), "--templates", "world"],
                "calibrate": ["calibrate", "--data.kind", "eval", "--data.uri", data, "--output.dir", str(out),
                              "--templates", "world"],
                "score": ["score", "--input.uri", str(lake), "--output.uri", str(out)]}[entry]
        assert cli_main([*args, "--model.checkpoint", base_clip_file,
                         "--classes.names", json.dumps(list(world.id_shapes))]) == 1
        err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in (f"model.checkpoint: {base_clip_file} is base CLIP weights", "not a CLIPN checkpoint",
                   "--stage clipn", "model.pretrained,", "model.architecture", "model.pretrained_config: plain"):
        assert needle in err[0], (needle, err[0])
    assert not out.exists()  # nothing written, not even an empty folder (the output is probed after the model)


def test_base_weights_from_file_s3_and_hf_hub(tiny, tmp_path, s3_bucket):
    reference, cfg, _ = create_base_clip("clipn-tiny", seed=11)
    ref_state = reference.state_dict()
    path = tmp_path / "base.pt"
    torch.save(ref_state, path)

    def same(clip):
        return all(torch.equal(ref_state[k], v) for k, v in clip.state_dict().items())

    from_file, _, ident = create_base_clip("clipn-tiny", pretrained=str(path))
    assert same(from_file) and ident["sha256"] and ident["pretrained"] == str(path)

    import fsspec

    bucket, opts = s3_bucket
    with fsspec.open(f"s3://{bucket}/base/base.pt", "wb", **opts) as f:
        f.write(path.read_bytes())
    from_s3, _, ident = create_base_clip("clipn-tiny", f"s3://{bucket}/base/base.pt", opts, str(tmp_path / "cache"))
    assert same(from_s3) and ident["pretrained"] == f"s3://{bucket}/base/base.pt"

    # hf-hub: a local Hugging Face cache laid out as the hub client writes it (HF_HUB_OFFLINE=1)
    repo = tmp_path / "hf" / "models--acme--tiny-clip"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref_state.items()}, snap / "open_clip_model.safetensors")
    model, spec = cc.build_clipn("hf-hub:acme/tiny-clip", cache_dir=str(tmp_path / "hf"))
    assert same(model.clip) and list(spec.preprocess_cfg["mean"]) == [0.5] * 3


def test_bad_architecture_and_weights_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="unknown architecture"):
        cc.build_clipn("no-such-arch")
    with pytest.raises(WeightsError, match="not-a-tag"):
        cc.build_clipn("clipn-tiny", pretrained="not-a-tag")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.pt"):
        cc.build_clipn("clipn-tiny", pretrained=str(tmp_path / "junk.pt"))


def test_random_init_is_seeded_and_no_tower_starts_as_yes_tower():
    a, _ = cc.build_clipn("clipn-tiny", seed=3)
    b, _ = cc.build_clipn("clipn-tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    tok = cc.get_tokenizer(a)
    t = tok(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_text(t), a.encode_text_no(t))
    assert a.no_tower.prompts.shape == (16, 32, 64) and a.no_tower.prompts.abs().sum() == 0


@pytest.mark.slow
def test_import_original_through_the_cli_then_score_like_the_library(tiny, tmp_path, ray_local, capsys):
    """A released-layout .pt -> clipn import-original -> clipn score gives the library import's scores."""
    import json

    import pyarrow.dataset as pads

    from jobs.cli import main as cli_main
    from jobs.demo import world

    model, _, _ = _trained_like(tiny, seed=9)
    with torch.no_grad():
        model.clip.logit_scale.fill_(4.60546875)  # as OpenAI's CLIP stores it: scale 100
    state, _ = _original_layout(model)
    pt = tmp_path / "clipn_cc3m.pt"
    torch.save({"epoch": 10, "state_dict": state}, pt)
    out = tmp_path / "imported.safetensors"
    assert cli_main(["import-original", "--checkpoint", str(pt), "--architecture", "clipn-tiny", "--pretrained_config", "plain",
                     "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "logit scale 100.00" in printed.out and "No pretrained weights" not in printed.err + printed.out
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["num_prompts"] == 16 and sidecar["logit_scale"] == 100.0
    assert sidecar["base_weights"]["sha256"] == sha256_file(pt) and sidecar["preprocess_cfg"]["size"] == [32, 32]

    lake = tmp_path / "lake"
    lake.mkdir()
    images = {f"{s}.jpg": world.encode(world.render(s, "red", i, 32)) for i, s in enumerate(world.SHAPES)}
    for name, data in images.items():
        (lake / name).write_bytes(data)
    classes = ["circle", "square", "triangle"]
    assert cli_main(["score", "--input.uri", str(lake), "--output.uri", str(tmp_path / "out"),
                     "--model.checkpoint", str(out), "--classes.names", json.dumps(classes),
                     "--runtime.preprocess", "exact"]) == 0
    rows = {r["uri"].rsplit("/", 1)[-1]: r
            for r in pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table().to_pylist()}
    library, _ = cc.import_original_checkpoint(str(pt), architecture="clipn-tiny", pretrained_config="plain")
    heads = cc.build_class_heads(library, cc.get_tokenizer(library), classes, cc.load_templates())
    tf = cc.image_transform(library.preprocess_cfg)
    names = list(images)
    direct = cc.BatchScorer(library, heads)(torch.stack([cc.decode_image(images[n], tf).tensor for n in names]))
    assert set(direct.scores) == {n for n, s in cc.SCORES.items() if not s.needs_negatives}
    for i, name in enumerate(names):
        for score in direct.scores:  # the library scorer here has no negative labels; the job's columns agree
            assert rows[name][f"score_{score}"] == pytest.approx(float(direct.scores[score][i]), rel=1e-4, abs=1e-5)


def test_import_original_refuses_a_pt_that_is_not_a_clipn_checkpoint(tmp_path, capsys):
    from jobs.cli import main as cli_main

    pt = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2, 3)}}, pt)
    out = tmp_path / "out" / "x.safetensors"
    assert cli_main(["import-original", "--checkpoint", str(pt), "--architecture", "clipn-tiny", "--pretrained_config", "plain",
                     "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an original CLIPN checkpoint" in err[0] and "resnet.pt" in err[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()
