"""Negative labels: thousands of words far from the ID classes, mined from a lexicon (NegLabel, ICLR 2024).

An image of an unknown class is often closer to some word of a large lexicon than to any
ID class; scoring it against those words ("negative labels") beside the ID classes
catches it without training. The lexicon ships offline: the most frequent English words
of the ``wordfreq`` package (Apache-2.0 code; word-frequency data CC BY-SA 4.0) from rank
500 on (the first few hundred are function words), alphabetic, three letters or more; or
a file of one word per line (local or s3).

Mining, for a model and a class set (:func:`mine_negatives`):

1. encode every word with the yes tower (one template, batched on the model's device, through
   :func:`~clipn_core.model.encode_texts` like the class heads);
2. drop the ID class names themselves and near-synonyms, words whose cosine to some ID
   class exceeds ``synonym_bound`` (NegRefine, 2025: sub-categories of an ID class
   must not count against it);
3. rank the rest by NegLabel's distance, the ``percentile`` (5th) of their negated cosines
   to the ID classes (so the few ID classes a word is closest to decide), and keep the
   ``count`` farthest, in a fixed order;
4. encode the kept words with the no tower too (for the fused score).

The result is deterministic for (model, class heads, lexicon, settings) and is cached by
the jobs under that identity (:attr:`NegativeLabels.id`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import StorageError, TemplateError, redact_uri
from .heads import ClassHeads, write_safetensors_atomically
from .model import CLIPN, encode_texts
from .prompt_tokens import tokenize_prompts
from .storage import read_text

SHIPPED_LEXICON = "wordfreq"
DEFAULT_NEGATIVE_COUNT = 10_000
DEFAULT_SYNONYM_BOUND = 0.9
DEFAULT_PERCENTILE = 0.05
DEFAULT_NEGATIVE_TEMPLATE = "a photo of a {}."
_LEXICON_SKIP, _LEXICON_SIZE = 500, 50_000
_WORD = re.compile(r"[a-z]{3,}")


@dataclass(frozen=True)
class NegativeLabels:
    """Mined negative words and their text embeddings [M, D] (L2-normalised, float32, CPU): ``yes`` from the
    yes tower, ``no`` from the no tower; ``settings`` is what they were mined with."""

    words: tuple[str, ...]
    yes: torch.Tensor
    no: torch.Tensor
    settings: dict

    @property
    def id(self) -> str:
        """sha256 (16 hex) of the words, the template and the mining settings: identifies comparable scores."""
        blob = json.dumps({"words": list(self.words), **self.settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.words)


@lru_cache(maxsize=2)
def _shipped_lexicon() -> tuple[str, ...]:
    from wordfreq import top_n_list

    words = top_n_list("en", _LEXICON_SIZE)[_LEXICON_SKIP:]
    return tuple(w for w in words if _WORD.fullmatch(w))


def load_lexicon(uri: str | None = None, storage_options: dict | None = None) -> tuple[str, ...]:
    """The shipped lexicon (``uri`` None or ``wordfreq``) or a file of one word (or phrase) per line; blank
    lines and ``#`` comments ignored, duplicates removed, order kept. :class:`TemplateError` naming the file
    when it cannot be read or holds no word."""
    if uri in (None, SHIPPED_LEXICON):
        return _shipped_lexicon()
    try:
        text = read_text(uri, storage_options)
    except StorageError as e:
        raise TemplateError(f"cannot read lexicon {redact_uri(uri)}: {e}") from e
    # duplicates as the tokenizer sees them (case, runs of spaces) are one word: the first spelling is kept
    first: dict[str, str] = {}
    for line in text.splitlines():
        word = line.strip()
        if word and not word.startswith("#"):
            first.setdefault(" ".join(word.casefold().split()), word)
    words = tuple(first.values())
    if not words:
        raise TemplateError(f"lexicon {redact_uri(uri)} holds no word")
    return words


def lexicon_hash(words: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()[:16]


@torch.no_grad()
def mine_negatives(model: CLIPN, tokenizer, heads: ClassHeads, lexicon: tuple[str, ...],
                   count: int = DEFAULT_NEGATIVE_COUNT, synonym_bound: float = DEFAULT_SYNONYM_BOUND,
                   percentile: float = DEFAULT_PERCENTILE, template: str = DEFAULT_NEGATIVE_TEMPLATE,
                   batch_size: int = 1024, device: str | torch.device | None = None) -> NegativeLabels:
    """The ``count`` lexicon words farthest from ``heads``' classes (module docstring)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if template.count("{}") != 1:
        raise TemplateError(f"negative template needs exactly one '{{}}': {template!r}")
    names = {n.casefold() for n in heads.class_names}
    candidates = [w for w in lexicon if w.casefold() not in names]
    # refuses words the context length cuts to the same tokens
    tokens = tokenize_prompts(tokenizer, candidates, (template,), "negative label")[:, 0]
    emb = encode_texts(model, tokens, "yes", batch_size, device)
    sims = emb @ F.normalize(heads.yes.float(), dim=-1).T  # [W, C]
    keep = sims.max(dim=1).values <= synonym_bound
    # NegLabel: the eta-percentile of the negated similarities; larger = farther from every ID class
    distance = torch.quantile(-sims, percentile, dim=1, interpolation="lower") if sims.shape[1] > 1 else -sims[:, 0]
    distance[~keep] = float("-inf")
    order = torch.argsort(distance, descending=True, stable=True)[: min(count, int(keep.sum()))]
    order = torch.sort(order).values  # lexicon order: the same words always come out in the same order
    words = tuple(candidates[i] for i in order.tolist())
    yes = emb[order]
    no = encode_texts(model, tokens[order], "no", batch_size, device)
    settings = {"count": count, "synonym_bound": synonym_bound, "percentile": percentile, "template": template,
                "lexicon": lexicon_hash(lexicon), "class_set": heads.class_set_hash,
                "dropped_as_synonyms": int((~keep).sum())}
    return NegativeLabels(words, yes, no, settings)


def save_negatives(negatives: NegativeLabels, path: str | Path) -> None:
    """Write ``negatives`` to a local safetensors file (embeddings; words and settings in its metadata),
    atomically (:func:`clipn_core.heads.write_safetensors_atomically`)."""
    write_safetensors_atomically({"yes": negatives.yes, "no": negatives.no}, path,
                                 {"words": json.dumps(list(negatives.words)),
                                  "settings": json.dumps(negatives.settings, sort_keys=True)})


def load_negatives(path: str | Path) -> NegativeLabels:
    """Negative labels written by :func:`save_negatives`."""
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return NegativeLabels(tuple(json.loads(meta["words"])), f.get_tensor("yes"), f.get_tensor("no"),
                              json.loads(meta["settings"]))
