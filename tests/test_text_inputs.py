"""Text inputs: every text file read the same way, and prompts checked against the context length before any work."""

from __future__ import annotations

import logging

import pytest

import clipn_core as cc
from clipn_core.errors import ClassListError, TemplateError
from clipn_core.negatives import load_lexicon, mine_negatives
from clipn_core.prompt_tokens import tokenize_prompts

LINES = ["square", "circle", "big triangle"]
ENCODINGS = {
    "plain": lambda text: text.encode(),
    "bom": lambda text: b"\xef\xbb\xbf" + text.encode(),
    "crlf": lambda text: text.replace("\n", "\r\n").encode(),
    "bom-crlf": lambda text: b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(),
    "cr": lambda text: text.replace("\n", "\r").encode(),
}
READERS = {  # every text file the product reads, and what it makes of LINES
    "classes.file": (lambda uri: cc.load_class_names(file=uri), "\n".join(LINES) + "\n"),
    "templates": (lambda uri: cc.load_templates(uri), "\n".join(f"a {w} {{}}." for w in LINES) + "\n"),
    "negatives.lexicon": (lambda uri: load_lexicon(uri), "\n".join(LINES) + "\n"),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("reader", list(READERS))
def test_every_text_file_reads_the_same_with_a_bom_and_any_line_end(tmp_path, reader, encoding):
    read, text = READERS[reader]
    path = tmp_path / "list.txt"
    path.write_bytes(ENCODINGS["plain"](text))
    plain = read(str(path))
    path.write_bytes(ENCODINGS[encoding](text))
    got = read(str(path))
    assert got == plain and not any("\ufeff" in s or "\r" in s for s in got), got
    if reader == "classes.file":  # the class set hashes as the inline list does
        templates = cc.load_templates("world")
        assert cc.class_set_hash(got, templates) == cc.class_set_hash(cc.load_class_names(LINES), templates)


@pytest.mark.parametrize("reader", list(READERS))
def test_a_text_file_that_is_not_utf8_is_one_error_naming_it(tmp_path, reader):
    path = tmp_path / "latin1.txt"
    path.write_bytes("carré {}\n".encode("latin-1"))
    with pytest.raises(cc.ClipnError, match=r"latin1\.txt is not UTF-8 text"):
        READERS[reader][0](str(path))


LONG = " ".join(["very"] * 40)  # far past clipn-tiny's 32-token context


def test_class_names_equal_once_cut_are_refused_naming_them(tiny):
    model, _, tok = tiny
    names = ["square", f"{LONG} red circle", f"{LONG} blue circle"]
    with pytest.raises(ClassListError, match=r"32 tokens.*'very very.*red circle' = 'very very.*blue circle'"):
        cc.build_class_heads(model, tok, names, ["a photo of a {}."])


def test_class_names_equal_once_cleaned_are_refused(tiny):
    model, _, tok = tiny
    with pytest.raises(ClassListError, match="'big cat' = 'big  cat'"):
        cc.build_class_heads(model, tok, ["big cat", "big  cat"], ["a photo of a {}."])


def test_a_cut_that_keeps_names_apart_warns_naming_the_class_and_tokens_lost(tiny, caplog):
    model, _, tok = tiny
    names = ["square", f"red circle {LONG}", f"blue circle {LONG}"]
    with caplog.at_level(logging.WARNING, logger="clipn.prompts"):
        heads = cc.build_class_heads(model, tok, names, ["a photo of a {}.", "{}"])
    cut = [r.getMessage() for r in caplog.records if "are cut" in r.getMessage()]
    assert len(cut) == 1 and "2 class name(s)" in cut[0] and "'red circle very" in cut[0], cut
    lost = len(tok.encode("a photo of a " + names[1] + ".")) + 2 - 32
    assert f"({lost})" in cut[0]
    assert heads.yes.shape[0] == 3


def test_a_template_cut_before_the_name_warns_naming_it(tiny, caplog):
    model, _, tok = tiny
    blind = f"{LONG} {{}}."
    with caplog.at_level(logging.WARNING, logger="clipn.prompts"):
        cc.build_class_heads(model, tok, ["square", "circle"], ["a photo of a {}.", blind])
    assert any("cut before the class name" in r.getMessage() and blind[:20] in r.getMessage() for r in caplog.records)


def test_negative_labels_equal_once_cut_are_refused(tiny):
    model, _, tok = tiny
    heads = cc.build_class_heads(model, tok, ["square", "circle"], ["a photo of a {}."])
    with pytest.raises(TemplateError, match="negative label names"):
        mine_negatives(model, tok, heads, ("banana", f"{LONG} tiger", f"{LONG} lion"), count=2)


def test_short_prompts_pass_untouched(tiny, caplog):
    _, _, tok = tiny
    with caplog.at_level(logging.WARNING, logger="clipn.prompts"):
        tokens = tokenize_prompts(tok, ["square", "circle"], ["a {}.", "the {}"])
    assert tokens.shape == (2, 2, 32) and not caplog.records
    assert (tokens[0, 1] == tok(["the square"])[0]).all()


def test_a_lexicon_keeps_one_spelling_of_words_the_tokenizer_sees_alike(tmp_path):
    path = tmp_path / "lexicon.txt"
    path.write_text("Apple\napple\nbig  cat\nbig cat\nriver\n")
    assert load_lexicon(str(path)) == ("Apple", "big  cat", "river")
