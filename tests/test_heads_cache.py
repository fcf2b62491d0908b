"""Class heads: the short-token path is exact, and heads are cached per (model, class set, templates)."""

import logging

import pytest
import torch
import torch.nn.functional as F

import clipn_core as cc
import clipn_core.heads as heads_module
from clipn_core.heads import heads_cache_key, load_heads, save_heads
from clipn_core.storage import Storage
from jobs.scoring_setup import class_heads, prepare
from schemas.score_config import ClassesConfig, ModelConfig, ScoringOptions

CLASSES = ("circle", "square", "triangle", "five pointed star", "ring")
# lengths differ, so a batch's trimmed length is set by its longest prompt, not by each one's own
TEMPLATES = ("a {}.", "a photo of a {}.", "a blurry black and white photo of the small {} seen from far away.")


def test_short_token_heads_equal_full_context_heads(tiny):
    model, _, tok = tiny
    heads = cc.build_class_heads(model, tok, CLASSES, TEMPLATES, batch_size=7)  # chunks of 2 classes
    with torch.no_grad():
        tokens = tok([t.format(c) for c in CLASSES for t in TEMPLATES])  # the full 77-token context
        for tower, encode in (("yes", model.encode_text), ("no", model.encode_text_no)):
            per_text = F.normalize(encode(tokens), dim=-1).reshape(len(CLASSES), len(TEMPLATES), -1)
            full = F.normalize(per_text.mean(dim=1), dim=-1)
            torch.testing.assert_close(getattr(heads, tower), full, atol=2e-6, rtol=0)


def _count_encodes(monkeypatch) -> list:
    calls = []
    real = heads_module.encode_texts

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(heads_module, "encode_texts", counting)
    return calls


def test_a_second_prepare_loads_the_heads_from_the_cache(tmp_path, monkeypatch):
    calls = _count_encodes(monkeypatch)
    args = (ModelConfig(architecture="clipn-tiny"), ClassesConfig(names=list(CLASSES)), "world",
            ScoringOptions(cache_dir=str(tmp_path)), Storage({}))
    first, _ = prepare(*args)
    assert calls and set(calls) == {"yes", "no"}
    calls.clear()
    second, _ = prepare(*args)
    assert calls == []  # the encoder never ran
    assert torch.equal(first.heads.yes, second.heads.yes) and torch.equal(first.heads.no, second.heads.no)
    assert second.heads.class_names == CLASSES and second.heads.class_set_hash == first.heads.class_set_hash
    assert len(list((tmp_path / "heads").iterdir())) == 1


def test_another_model_class_set_template_set_or_prompt_misses(tiny, tmp_path, monkeypatch):
    model, _, _ = tiny
    calls = _count_encodes(monkeypatch)
    base = class_heads(model, "model-a", CLASSES, TEMPLATES, None, str(tmp_path))
    for other in [("model-b", CLASSES, TEMPLATES, None), ("model-a", CLASSES[:4], TEMPLATES, None),
                  ("model-a", CLASSES, TEMPLATES[:2], None),
                  ("model-a", CLASSES, TEMPLATES, ("circle", "square", "triangle", "star", "ring"))]:
        calls.clear()
        heads = class_heads(model, *other, str(tmp_path))
        assert calls == ["yes", "no"], other
        assert heads.yes.shape[0] == len(other[1])
    assert len(list((tmp_path / "heads").iterdir())) == 5
    calls.clear()
    again = class_heads(model, "model-a", CLASSES, TEMPLATES, None, str(tmp_path))
    assert calls == [] and torch.equal(again.yes, base.yes)


def test_a_stale_or_corrupt_entry_is_refused_and_encoded_again(tiny, tmp_path, monkeypatch, caplog):
    model, _, tok = tiny
    fresh = class_heads(model, "m", CLASSES, TEMPLATES, None, str(tmp_path))
    (path,) = (tmp_path / "heads").iterdir()
    key = heads_cache_key("m", CLASSES, TEMPLATES)

    with pytest.raises(cc.CacheError, match="another key"):
        load_heads(path, heads_cache_key("other", CLASSES, TEMPLATES), CLASSES, TEMPLATES, 64)
    # an entry of another shape under the right key (e.g. a different embedding width) is refused
    narrow = cc.ClassHeads(CLASSES, TEMPLATES, fresh.yes[:, :32].contiguous(), fresh.no[:, :32].contiguous())
    save_heads(narrow, path, key)
    with pytest.raises(cc.CacheError, match=r"expected finite float32 \(5, 64\)"):
        load_heads(path, key, CLASSES, TEMPLATES, 64)
    nan = cc.ClassHeads(CLASSES, TEMPLATES, fresh.yes.clone().fill_(float("nan")), fresh.no)
    save_heads(nan, path, key)
    with pytest.raises(cc.CacheError, match="finite"):
        load_heads(path, key, CLASSES, TEMPLATES, 64)

    calls = _count_encodes(monkeypatch)
    for broken in (narrow, None):
        if broken is None:
            path.write_bytes(path.read_bytes()[:100])  # truncated
        else:
            save_heads(broken, path, key)
        calls.clear()
        with caplog.at_level(logging.WARNING, logger="clipn.setup"):
            rebuilt = class_heads(model, "m", CLASSES, TEMPLATES, None, str(tmp_path))
        assert calls == ["yes", "no"] and str(path) in caplog.text
        assert torch.equal(rebuilt.yes, fresh.yes) and torch.equal(rebuilt.no, fresh.no)
        caplog.clear()
    # the rewritten entry is good again
    assert torch.equal(load_heads(path, key, CLASSES, TEMPLATES, 64).no, fresh.no)


def test_a_cut_prompt_warns_on_every_run_cached_or_not(tiny, tmp_path, caplog):
    """The warning that a class name is cut at the context length comes with the heads built from the cut prompts,
    on the run that encodes them and on every run that loads them from the cache."""
    model, _, _ = tiny
    long_name = "an extremely " + " ".join(["long"] * 80) + " class name"
    classes = ("circle", long_name)
    for run in ("encoded", "cached"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipn.prompts"):
            class_heads(model, "tiny-0", classes, ("a photo of a {}.",), None, str(tmp_path))
        cut = [r.getMessage() for r in caplog.records if r.name == "clipn.prompts" and "are cut" in r.getMessage()]
        assert len(cut) == 1 and long_name[:20] in cut[0], (run, caplog.records)
    assert len(list((tmp_path / "heads").iterdir())) == 1
