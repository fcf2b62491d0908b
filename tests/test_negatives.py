"""Negative-label mining: the shipped lexicon, determinism, the near-synonym filter and the cache."""

from __future__ import annotations

import pytest
import torch

import clipn_core as cc
from clipn_core.errors import TemplateError
from clipn_core.negatives import load_lexicon, load_negatives, mine_negatives, save_negatives
from clipn_core.storage import Storage
from jobs import scoring_setup
from schemas.score_config import NegativesConfig

CLASSES = ["circle", "square", "triangle"]
WORDS = ("circle", "Square", "diamond", "ring", "hexagon", "banana", "violin", "cloud", "river", "engine",
         "pencil", "tiger", "castle", "orbit")


@pytest.fixture(scope="module")
def setup(tiny):
    model, _, tok = tiny
    return model, tok, cc.build_class_heads(model, tok, CLASSES, cc.load_templates("world"))


def test_the_shipped_lexicon_is_offline_and_holds_shape_words():
    words = load_lexicon()
    assert len(words) > 30_000 and all(w.isalpha() and w.islower() and len(w) >= 3 for w in words)
    assert {"diamond", "ring", "hexagon", "banana"} <= set(words) and "the" not in words
    assert load_lexicon("wordfreq") is words


def test_a_lexicon_file_and_its_errors(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# my words\nalpha\n\nbeta\nalpha\ngamma ray\n")
    assert load_lexicon(str(path)) == ("alpha", "beta", "gamma ray")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(TemplateError, match="empty.txt"):
        load_lexicon(str(tmp_path / "empty.txt"))
    with pytest.raises(TemplateError, match="missing.txt"):
        load_lexicon(str(tmp_path / "missing.txt"))


def test_mining_is_deterministic_drops_class_names_and_keeps_the_farthest(setup):
    model, tok, heads = setup
    a = mine_negatives(model, tok, heads, WORDS, count=5, synonym_bound=1.0)
    b = mine_negatives(model, tok, heads, WORDS, count=5, synonym_bound=1.0)
    assert a.words == b.words and torch.equal(a.yes, b.yes) and torch.equal(a.no, b.no) and a.id == b.id
    assert len(a) == 5 and not {"circle", "Square"} & set(a.words)  # ID class names never count as negatives
    assert list(a.words) == [w for w in WORDS if w in a.words]  # lexicon order
    # the kept words are the farthest by NegLabel's percentile distance
    emb = torch.nn.functional.normalize(model.encode_text(tok([f"a photo of a {w}." for w in WORDS[2:]])), dim=-1)
    sims = (emb @ heads.yes.T).detach()
    distance = torch.quantile(-sims, 0.05, dim=1, interpolation="lower")
    farthest = {WORDS[2 + i] for i in torch.argsort(distance, descending=True)[:5].tolist()}
    assert set(a.words) == farthest
    assert torch.allclose(a.yes.norm(dim=-1), torch.ones(5)) and a.no.shape == a.yes.shape


def test_near_synonyms_above_the_bound_are_dropped(setup):
    model, tok, heads = setup
    emb = torch.nn.functional.normalize(model.encode_text(tok([f"a photo of a {w}." for w in WORDS[2:]])), dim=-1)
    closest = (emb @ heads.yes.T).max(dim=1).values.detach()
    top = closest.sort().values
    bound = float(top[-3] + top[-2]) / 2  # the two words closest to some ID class lie above it, with a margin
    near = {WORDS[2 + i] for i in torch.nonzero(closest > bound).flatten().tolist()}
    mined = mine_negatives(model, tok, heads, WORDS, count=100, synonym_bound=bound)
    assert len(near) == 2 and not near & set(mined.words)
    assert len(mined) == len(WORDS) - 2 - 2 and mined.settings["dropped_as_synonyms"] == 2


def test_the_jobs_cache_mined_negatives_per_model_class_set_and_settings(setup, tmp_path, monkeypatch):
    model, _, heads = setup
    lexicon = tmp_path / "words.txt"
    lexicon.write_text("\n".join(WORDS))
    cfg = NegativesConfig(lexicon=str(lexicon), count=4)
    first = scoring_setup.negative_labels(model, "model-a", heads, cfg, Storage({}), str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "negatives").glob("*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("mined again although cached")

    monkeypatch.setattr(scoring_setup, "mine_negatives", refuse)
    again = scoring_setup.negative_labels(model, "model-a", heads, cfg, Storage({}), str(tmp_path / "cache"))
    assert again.words == first.words and torch.equal(again.yes, first.yes) and again.id == first.id
    monkeypatch.undo()
    other = scoring_setup.negative_labels(model, "model-b", heads, cfg, Storage({}), str(tmp_path / "cache"))
    assert other.id == first.id  # the words and settings, not the model, make the id...
    assert len(list((tmp_path / "cache" / "negatives").glob("*.safetensors"))) == 2  # ...but each model has its cache


def test_save_and_load_round_trip(setup, tmp_path):
    model, tok, heads = setup
    mined = mine_negatives(model, tok, heads, WORDS, count=3)
    save_negatives(mined, tmp_path / "n.safetensors")
    back = load_negatives(tmp_path / "n.safetensors")
    assert back.words == mined.words and back.settings == mined.settings and torch.equal(back.no, mined.no)


def test_short_text_encoding_equals_the_full_context_towers():
    """Mining encodes words on the tokens up to the longest text's end; the features must be those of the
    full 77-token towers (yes, and no with its mean prompt), for texts of different lengths in one batch."""
    model, _ = cc.build_clipn("clipn-tiny", seed=5)
    with torch.no_grad():
        model.no_tower.prompts.normal_(0, 0.5)  # prompts that differ per position, as trained ones do
    model.eval()
    tokens = cc.get_tokenizer(model)(["a photo of a cat.", "x", "a photo of a very long and winding road by the sea."])
    assert tokens.shape[1] == model.context_length and (tokens[:, 20:] == 0).all()  # the trim has work to do
    torch.testing.assert_close(model.encode_short_texts(tokens, "yes"), model.encode_text(tokens, normalize=True),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_short_texts(tokens, "no"), model.encode_text_no(tokens, normalize=True),
                               rtol=1e-5, atol=1e-6)


def test_two_writers_of_one_cache_entry_never_share_a_temporary_file(setup, tmp_path, monkeypatch):
    # Two jobs starting together mine the same negatives and write the same cache entry; a temporary name
    # shared between them let the second rename the first's half-written file away under it.
    import safetensors.torch

    model, tok, heads = setup
    negs = mine_negatives(model, tok, heads, WORDS, count=3)
    path = tmp_path / "negatives" / "entry.safetensors"
    real_save = safetensors.torch.save_file
    nested = []

    def save_then_let_another_writer_finish(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if not nested:  # the other job writes the whole entry while this one is between write and rename
            nested.append(filename)
            save_negatives(negs, path)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_let_another_writer_finish)
    save_negatives(negs, path)
    assert load_negatives(path).words == negs.words
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
