"""Prompt tokens checked against the text tower's context length, before any text is encoded.

A text longer than the context (77 tokens for CLIP) is cut by the tokenizer, silently. Two
class names whose prompts are equal once cut (or once the tokenizer has cleaned them: case,
whitespace) get identical heads: every image then predicts one of them at probability 0.5
and CTW/ATD flag everything. So every (name, template) text is tokenized once, here:

* names whose tokens are equal in every template are refused (:class:`ClassListError` for
  class names, :class:`TemplateError` for negative labels), naming them;
* a cut that leaves the names apart logs one warning naming each cut name and the most
  tokens it lost;
* a template cut before the name (its prompt is the same for every name) logs one warning
  naming it.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from .errors import ClassListError, TemplateError

log = logging.getLogger("clipn.prompts")
_SHOWN = 10  # names listed in one message


def _lengths(tokenizer, texts: list[str]) -> list[int]:
    """Untruncated token counts (start and end tokens included) of ``texts``; -1 where the tokenizer cannot say."""
    encode = getattr(tokenizer, "encode", None)
    return [len(encode(t)) + 2 if encode is not None else -1 for t in texts]


def tokenize_prompts(tokenizer, names, templates, what: str = "class", prompt_names=None) -> torch.Tensor:
    """Tokens of every name in every template, int64 [len(names), len(templates), context], after the checks in the
    module docstring. ``names`` identify the texts in messages; ``prompt_names`` (default ``names``) are what the
    prompts say. ``what``: ``class`` (refused with :class:`ClassListError`) or ``negative label``
    (:class:`TemplateError`)."""
    names, templates = tuple(names), tuple(templates)
    said = names if prompt_names is None else tuple(prompt_names)
    tokens = tokenizer([t.format(n) for n in said for t in templates])
    context = tokens.shape[-1]
    tokens = tokens.reshape(len(names), len(templates), context)
    # only a text that reaches the last position may have been cut: count its tokens exactly
    full = (tokens[..., -1] != 0).nonzero().tolist()
    lost: dict[int, int] = defaultdict(int)
    for (i, _), n in zip(full, _lengths(tokenizer, [templates[j].format(said[i]) for i, j in full])):
        if n > context:
            lost[i] = max(lost[i], n - context)
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i in range(len(names)):
        groups[tokens[i].numpy().tobytes()].append(i)
    # a named set's repeated names (ImageNet's two cranes) say the same text on purpose: only different texts collide
    same = [g for g in groups.values() if len({said[i] for i in g}) > 1]
    if same:
        shown = "; ".join(" = ".join(repr(names[i]) for i in g) for g in same[:_SHOWN])
        error = ClassListError if what == "class" else TemplateError
        raise error(f"{len(same)} group(s) of {what} names give the same prompt tokens in every template once the "
                    f"tokenizer has cut them at the text tower's context of {context} tokens (or cleaned them): "
                    f"{shown}{' ...' if len(same) > _SHOWN else ''}; shorten or reword them")
    if lost:
        shown = ", ".join(f"{names[i]!r} ({k})" for i, k in list(lost.items())[:_SHOWN])
        log.warning("%d %s name(s) are cut at the text tower's context of %d tokens in some template (tokens lost): "
                    "%s%s", len(lost), what, context, shown, " ..." if len(lost) > _SHOWN else "")
    if len(names) > 1:
        blind = [templates[j] for j in range(len(templates)) if bool((tokens[:, j] == tokens[0, j]).all())]
        if blind:
            log.warning("template(s) cut before the %s name at the text tower's context of %d tokens (the same "
                        "prompt for every name): %s", what, context, blind[:_SHOWN])
    return tokens
