"""Class heads (W_yes, W_no), templates, class lists, the no-prompt sampling and batch inference."""

import copy
import math

import numpy as np
import pytest
import torch

import clipn_core as cc
from clipn_core.errors import ClassListError, TemplateError
from clipn_core.heads import parse_templates
from clipn_core.model import CLIPN, encode_texts

CLASSES = ["circle", "square", "triangle", "star", "ring"]
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} shape.")


def test_heads_shape_norm_determinism_and_chunking(tiny):
    model, _, tok = tiny
    a = cc.build_class_heads(model, tok, CLASSES, TEMPLATES, batch_size=256)
    b = cc.build_class_heads(model, tok, CLASSES, TEMPLATES, batch_size=3)  # one class per chunk
    assert a.yes.shape == a.no.shape == (5, 64)
    torch.testing.assert_close(a.yes.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(a.yes, b.yes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.no, b.no, atol=1e-6, rtol=1e-5)
    assert a.class_set_hash == b.class_set_hash
    assert a.class_set_hash != cc.build_class_heads(model, tok, CLASSES[:4], TEMPLATES).class_set_hash


def test_heads_follow_the_design_formula(tiny):
    model, _, tok = tiny
    heads = cc.build_class_heads(model, tok, ["star"], TEMPLATES)
    with torch.no_grad():
        per_template = model.encode_text(tok([t.format("star") for t in TEMPLATES]))
    expected = torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1)
    torch.testing.assert_close(heads.yes[0], expected, atol=1e-6, rtol=1e-5)


def test_thousands_of_classes(tiny):
    model, _, tok = tiny
    names = [f"class {i}" for i in range(2000)]
    heads = cc.build_class_heads(model, tok, names, ("a {}",), batch_size=512)
    assert heads.yes.shape == (2000, 64)


def test_class_list_and_template_errors(tmp_path):
    with pytest.raises(ClassListError, match="empty"):
        cc.validate_class_names([])
    with pytest.raises(ClassListError, match="'Cat'"):
        cc.validate_class_names(["cat", "dog", "Cat"])
    with pytest.raises(ClassListError, match="blank"):
        cc.validate_class_names(["cat", "  "])
    with pytest.raises(TemplateError, match="t.txt:2"):
        parse_templates("a {}\nno placeholder\n", "t.txt")
    with pytest.raises(TemplateError, match="no templates"):
        parse_templates("# only a comment\n", "t.txt")
    with pytest.raises(TemplateError, match="duplicated"):
        parse_templates("a {}\na {}\n", "t.txt")
    f = tmp_path / "mine.txt"
    f.write_text("# mine\nan image of a {}\n")
    assert cc.load_templates(str(f)) == ("an image of a {}",)
    assert len(cc.load_templates()) >= 10
    with pytest.raises(TemplateError, match="cannot read"):
        cc.load_templates(str(tmp_path / "missing.txt"))


def test_prompt_sampling_train_vs_eval(tiny):
    base, _, tok = tiny
    model = CLIPN(copy.deepcopy(base.clip), num_prompts=4)
    with torch.no_grad():
        model.no_tower.prompts.normal_(std=0.5)
    t = tok(["a red circle"] * 64)
    model.eval()
    with torch.no_grad():
        e1, e2 = model.encode_text_no(t), model.encode_text_no(t)
    torch.testing.assert_close(e1, e2)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        tr = model.encode_text_no(t)
    distinct = torch.unique(tr.round(decimals=4), dim=0).shape[0]
    assert distinct == 5  # K prompts + their mean, 64 draws
    assert any(torch.allclose(row, e1[0], atol=1e-5) for row in tr)  # the mean prompt is one choice


def test_batch_scorer_matches_registry(tiny):
    model, _, tok = tiny
    heads = cc.build_class_heads(model, tok, CLASSES, TEMPLATES)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = cc.BatchScorer(model, heads)(images)
    with torch.no_grad():
        feats = model.encode_image(images)
    ref = cc.compute_scores(cc.ScoreInputs(feats, heads.yes, heads.no, logit_scale=model.logit_scale))
    for name, r in ref.items():
        torch.testing.assert_close(torch.from_numpy(out.scores[name]), r.id_score)
    assert set(out.decisions) == {"ctw", "atd"} and out.embeddings.shape == (6, 64)
    assert out.predicted_index.shape == (6,)


def test_scores_use_the_base_clips_own_logit_scale():
    """An OpenAI-style base CLIP (learned scale 100) scores exactly as the old constant 100 did; a model that
    learned another scale (the demo's tiny CLIP learns about 28) uses its own unless a number is given."""
    model, _ = cc.build_clipn("clipn-tiny", seed=3)
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), CLASSES, TEMPLATES)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.clip.logit_scale.fill_(4.60546875)  # OpenAI's ViT-B-16 (fp16 ln 100: exp is 100.03)
    assert model.logit_scale == 100.0
    own = cc.BatchScorer(model, heads)(images)
    fixed = cc.BatchScorer(model, heads, logit_scale=100.0)(images)
    # every score this scorer computes (those needing negative labels are absent without them)
    assert set(own.scores) == set(fixed.scores) == {n for n, s in cc.SCORES.items() if not s.needs_negatives}
    for name in own.scores:
        np.testing.assert_array_equal(own.scores[name], fixed.scores[name])
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(28.0))
    scorer = cc.BatchScorer(model, heads)
    assert scorer.logit_scale == pytest.approx(28.0)
    assert not np.allclose(scorer(images).scores["maxlogit"], fixed.scores["maxlogit"])
    assert cc.BatchScorer(model, heads, logit_scale=100.0).logit_scale == 100.0


@pytest.mark.parametrize("projection", ["parameter", "linear"])
def test_encoding_no_texts_gives_an_empty_matrix_of_the_embedding_width(projection):
    """Negative mining can drop every candidate word: encoding no texts is [0, embed_dim] float32 for both kinds
    of open_clip text projection (a Parameter [width, dim], or an nn.Linear in some text towers)."""
    model, _ = cc.build_clipn("clipn-tiny", seed=0)
    proj = model.clip.text_projection
    dim = proj.shape[-1]
    if projection == "linear":
        del model.clip.text_projection  # a registered Parameter cannot be reassigned to a module
        model.clip.text_projection = torch.nn.Linear(proj.shape[0], dim)
    for tower in ("yes", "no"):
        out = encode_texts(model, torch.zeros((0, 77), dtype=torch.long), tower, batch_size=8)
        assert out.shape == (0, dim) and out.dtype == torch.float32


def test_a_text_tower_without_a_projection_is_refused_in_one_line():
    """open_clip builds text towers without a projection (text_cfg proj_type 'none'); the no tower copies the
    projection and every text path applies it, so such a tower is refused where a CLIPN or a clip stage is built."""
    import open_clip

    from clipn_core.errors import ModelConfigError
    from clipn_core.model import check_standard_text_tower

    clip = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
                          text_cfg={"context_length": 16, "width": 64, "heads": 2, "layers": 1, "proj_type": "none"})
    assert clip.text_projection is None
    with pytest.raises(ModelConfigError, match="proj_type 'none'"):
        check_standard_text_tower(clip)
    with pytest.raises(ModelConfigError, match="proj_type 'none'"):
        CLIPN(clip)
