"""Templates and class sets that are what they say: open_clip's own ImageNet sets, the original code's files."""

from __future__ import annotations

import json

import open_clip
import pyarrow.dataset as pads
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)

import clipn_core as cc
from clipn_core.errors import ClassListError, TemplateError
from clipn_core.named_sets import disambiguate
from jobs.cli import main as cli_main
from jobs.demo import world
from schemas.score_config import ClassesConfig


def test_openai_imagenet_templates_are_open_clips_eighty():
    assert cc.load_templates("openai-imagenet") == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    assert len(cc.load_templates("openai-imagenet")) == 80
    assert cc.load_templates("openai-imagenet-simple") == tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
    # the short default set is what its description says: 12 photo templates
    assert len(cc.load_templates()) == len(cc.load_templates("default")) == 12
    with pytest.raises(TemplateError, match="named sets: .*openai-imagenet"):
        cc.load_templates("openai")


def test_the_imagenet_class_set_keeps_imagenets_order_with_suffixed_repeats():
    names = cc.load_class_names(class_set="imagenet")
    assert len(names) == 1000
    renamed = {i: n for i, n in enumerate(names) if n != IMAGENET_CLASSNAMES[i]}
    assert renamed == {744: "missile (2)", 837: "sunglasses (2)"}
    assert names[657] == "missile" and names[836] == "sunglasses"
    assert disambiguate(["a", "B", "b", "A", "b"]) == ("a", "B", "b (2)", "A (2)", "b (3)")
    assert disambiguate(["x", "y"]) == ("x", "y")
    with pytest.raises(ClassListError, match="exactly one"):
        cc.load_class_names(["cat"], class_set="imagenet")
    assert ClassesConfig(set="imagenet").set == "imagenet"
    with pytest.raises(ValueError, match="unknown class set 'imagenet21k'"):
        ClassesConfig(set="imagenet21k")
    with pytest.raises(ValueError, match="exactly one of classes.names, classes.file or classes.set"):
        ClassesConfig(set="imagenet", names=["cat"])


def test_imagenet_heads_equal_open_clips_zero_shot_classifier(tiny):
    """Our yes heads for ImageNet names and the 80 templates are open_clip's own zero-shot classifier weights."""
    model, _, tok = tiny
    names = cc.load_class_names(class_set="imagenet")[:40]
    heads = cc.build_class_heads(model, tok, names, cc.load_templates("openai-imagenet"))
    reference = open_clip.build_zero_shot_classifier(model.clip, tok, IMAGENET_CLASSNAMES[:40], OPENAI_IMAGENET_TEMPLATES,
                                                     num_classes_per_batch=8, device="cpu", use_tqdm=False)
    torch.testing.assert_close(heads.yes, reference.T, atol=2e-6, rtol=0)


def test_the_whole_imagenet_set_through_the_jobs_setup_gives_open_clips_heads():
    """All 1,000 classes through the setup every job uses: the suffixed repeats' prompts say the name itself, so
    their heads are open_clip's and equal their twins'."""
    from clipn_core.storage import Storage
    from jobs.scoring_setup import prepare
    from schemas.score_config import ModelConfig, ScoringOptions

    setup, model = prepare(ModelConfig(architecture="clipn-tiny"), ClassesConfig(set="imagenet"),
                           "openai-imagenet-simple", ScoringOptions(), Storage({}))
    assert setup.classes[744] == "missile (2)" and setup.heads.class_names[837] == "sunglasses (2)"
    reference = open_clip.build_zero_shot_classifier(model.clip, cc.get_tokenizer(model), IMAGENET_CLASSNAMES,
                                                     SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=100,
                                                     device="cpu", use_tqdm=False)
    torch.testing.assert_close(setup.heads.yes, reference.T, atol=2e-6, rtol=0)
    torch.testing.assert_close(setup.heads.yes[744], setup.heads.yes[657])
    torch.testing.assert_close(setup.heads.no[837], setup.heads.no[836])


def _original_template_file(path) -> list[str]:
    """128 templates in the original CLIPN code's file shape: each line in literal single quotes, CRLF line
    ends, no newline after the last line."""
    base = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    extra = [f"a {adj} snapshot of {det} {{}}." for adj in ("blurry", "dark", "clean", "weird", "nice", "big")
             for det in ("a", "the", "one", "my", "this", "that", "some", "our")]
    lines = [f"'{t}'" for t in (base + extra)[:128]]
    assert len(set(lines)) == 128
    path.write_bytes("\r\n".join(lines).encode())
    return lines


def _original_heads(model, file, class_names):
    """The original code's merge_yes_no_feature, from its source: readlines(), strip only "\\n", format, tokenize one
    template at a time, encode with both towers, normalise, sum over templates, normalise."""
    with open(file) as f:  # as the original opens it: text mode, universal newlines
        prompts = f.readlines()
    yes_total = no_total = 0
    with torch.no_grad():
        for prompt in prompts:
            tokens = torch.cat([open_clip.tokenize(prompt.replace("\n", "").format(n), model.context_length)
                                for n in class_names])
            yes_total = yes_total + F.normalize(model.encode_text(tokens), dim=-1)
            no_total = no_total + F.normalize(model.encode_text_no(tokens), dim=-1)
    return F.normalize(yes_total, dim=-1), F.normalize(no_total, dim=-1)


def test_an_original_clipn_template_file_as_is_gives_the_original_heads(tiny, tmp_path):
    model, _, tok = tiny
    with torch.no_grad():  # a no tower that differs from the yes tower, as after training
        trained = type(model)(model.clip, model.no_tower.num_prompts)
        g = torch.Generator().manual_seed(4)
        for p in trained.no_tower.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path / "prompt.txt"
    lines = _original_template_file(path)
    templates = cc.load_templates(str(path))
    assert templates == tuple(lines) and all(t.startswith("'") and t.endswith("'") for t in templates)
    classes = ["goldfish", "tabby cat", "missile (2)"]
    heads = cc.build_class_heads(trained.eval(), tok, classes, templates)
    yes, no = _original_heads(trained.eval(), path, classes)
    torch.testing.assert_close(heads.yes, yes, atol=2e-6, rtol=0)
    torch.testing.assert_close(heads.no, no, atol=2e-6, rtol=0)
    unquoted = cc.build_class_heads(trained, tok, classes, [t.strip("'") for t in templates])
    assert not torch.allclose(unquoted.yes, yes, atol=1e-4)  # the quotes are part of what the original encodes


# The jobs take open_clip's short ImageNet template set: the same named-set path as the 80 templates (whose
# prompts and heads the tests above check against open_clip) at a tenth of the encoding (1,000 classes x 80
# templates took ~25 s of the fast suite in evaluate and calibrate, ~15 s of the scoring job's).
IMAGENET_ARGS = ["--classes.set", "imagenet", "--templates", "openai-imagenet-simple", "--negatives.enabled", "false"]


@pytest.fixture(scope="module")
def imagenet_setup(tmp_path_factory, tiny):
    """A tiny checkpoint, a small local lake and an evaluation Parquet; the ImageNet setup's class set hash."""
    root = tmp_path_factory.mktemp("imagenet")
    model, spec, tok = tiny
    ckpt = str(root / "tiny.safetensors")
    cc.save_checkpoint(model, spec, ckpt)
    lake = root / "lake"
    lake.mkdir()
    for i, shape in enumerate(world.SHAPES[:4]):
        (lake / f"{shape}.jpg").write_bytes(world.encode(world.render(shape, "red", i, 48)))
    w = world.World(seed=5)
    eval_uri = w.write_parquet(w.eval_table(12, 8), str(root / "eval.parquet"))
    names = cc.load_class_names(class_set="imagenet")
    return {"root": root, "ckpt": ckpt, "lake": lake, "eval": eval_uri, "names": names,
            "hash": cc.class_set_hash(names, cc.load_templates("openai-imagenet-simple"))}


@pytest.mark.slow
def test_clipn_score_with_the_imagenet_class_set_and_templates(imagenet_setup, ray_local, capsys):
    s = imagenet_setup
    out = s["root"] / "scores"
    assert cli_main(["score", "--input.uri", str(s["lake"]), "--output.uri", str(out), "--output.run_date",
                     "2026-11-30", "--model.checkpoint", s["ckpt"], *IMAGENET_ARGS]) == 0
    rows = pads.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert 0 <= r["predicted_index"] < 1000 and r["predicted_class"] == s["names"][r["predicted_index"]]
        assert r["class_set_hash"] == s["hash"]
    manifest = json.loads((out / "run_date=2026-11-30" / "_manifest.json").read_text())
    assert manifest["classes"] == list(s["names"]) and manifest["templates"] == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]


def test_clipn_evaluate_and_calibrate_with_the_imagenet_class_set_and_templates(imagenet_setup, capsys):
    s = imagenet_setup
    report_dir = s["root"] / "report"
    assert cli_main(["evaluate", "--data.uri", s["eval"], "--data.label_column", "null", "--model.checkpoint",
                     s["ckpt"], "--output.dir", str(report_dir), *IMAGENET_ARGS]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["classes"] == list(s["names"]) and report["class_set_hash"] == s["hash"]
    assert report["templates"] == {"source": "openai-imagenet-simple", "count": len(SIMPLE_IMAGENET_TEMPLATES)}
    cal_dir = s["root"] / "cal"
    assert cli_main(["calibrate", "--data.kind", "eval", "--data.uri", s["eval"], "--model.checkpoint", s["ckpt"],
                     "--output.dir", str(cal_dir), "--bootstrap", "20", *IMAGENET_ARGS]) == 0
    calibration = json.loads((cal_dir / "calibration.json").read_text())
    assert calibration["class_set_hash"] == s["hash"]
