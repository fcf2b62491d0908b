"""Class heads: W_yes and W_no from ID class names and prompt templates.

For each class and template the text ``template.format(name)`` is encoded with the yes
and the no tower and L2-normalised; the per-class mean over templates is normalised
again: ``W[c] = normalize(mean_t normalize(E(template_t(name_c))))``, CLIP's prompt
ensembling (Radford et al., ICML 2021), for the yes tower (``W_yes``) and the no tower
(``W_no``) alike. Classes are encoded in chunks, so thousands of classes fit in
memory, through :func:`~clipn_core.model.encode_texts` (eval mode, so the no tower uses the
mean prompt and the heads are deterministic).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from .errors import ClassListError, StorageError, TemplateError, redact_uri
from .model import CLIPN, encode_texts
from .named_sets import CLASS_SETS, TEMPLATE_SETS, template_set_names
from .prompt_tokens import tokenize_prompts
from .storage import read_text

DEFAULT_TEMPLATES_NAME = "default"


@dataclass(frozen=True)
class ClassHeads:
    """Yes / no heads [C, D] (L2-normalised, float32, CPU) for ``class_names`` in order."""

    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    yes: torch.Tensor
    no: torch.Tensor

    @property
    def class_set_hash(self) -> str:
        """sha256 (hex, 16 chars) of the class names and templates: identifies comparable runs."""
        return class_set_hash(self.class_names, self.templates)


def class_set_hash(class_names, templates) -> str:
    """Stable hash of (class names, templates) in order."""
    blob = json.dumps({"classes": list(class_names), "templates": list(templates)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_templates(text: str, source: str) -> tuple[str, ...]:
    """Templates from text, one per line; blank lines and ``#`` comments ignored.

    Each template must contain exactly one ``{}``; errors name ``source`` and the line.
    """
    templates = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1 or "{" in line.replace("{}", "") or "}" in line.replace("{}", ""):
            raise TemplateError(f"{source}:{lineno}: a template needs exactly one '{{}}' placeholder: {line!r}")
        templates.append(line)
    if not templates:
        raise TemplateError(f"{source}: no templates found")
    if len(set(templates)) != len(templates):
        dup = sorted({t for t in templates if templates.count(t) > 1})
        raise TemplateError(f"{source}: duplicated template(s) {dup}")
    return tuple(templates)


def load_templates(uri: str | None = None, storage_options: dict | None = None) -> tuple[str, ...]:
    """Templates from a file URI, or a set known by name (``default`` when ``uri`` is None).

    A bare name (no ``/`` and no ``.txt``) selects a shipped file under ``clipn_core/templates``
    (``default``: 12 short photo templates; ``world``: the demo world's) or a set from open_clip's
    package (:data:`clipn_core.named_sets.TEMPLATE_SETS`: ``openai-imagenet``, the 80 OpenAI
    ImageNet templates). A file is taken as it is, line by line (:func:`parse_templates`): the
    original CLIPN code's template files, whose lines carry literal single quotes, give its heads.
    Raises :class:`TemplateError` naming the set or file.
    """
    name = uri or DEFAULT_TEMPLATES_NAME
    if "/" not in name and not name.endswith(".txt"):
        if name in TEMPLATE_SETS:
            return parse_templates("\n".join(TEMPLATE_SETS[name].load()), f"open_clip template set {name}")
        shipped = resources.files("clipn_core") / "templates" / f"{name}.txt"
        if not shipped.is_file():
            raise TemplateError(f"templates: no template set named {name!r}; named sets: {template_set_names()} "
                                "(or a file URI)")
        return parse_templates(shipped.read_text(encoding="utf-8-sig"), f"templates/{name}.txt")
    try:
        text = read_text(name, storage_options)
    except StorageError as e:
        raise TemplateError(f"cannot read template file {redact_uri(name)}: {e}") from e
    return parse_templates(text, redact_uri(name))


def validate_class_names(names) -> tuple[str, ...]:
    """Stripped class names; :class:`ClassListError` when empty, blank or duplicated (case-insensitive)."""
    cleaned = tuple(unicodedata.normalize("NFC", str(n)).strip() for n in names)
    if not cleaned:
        raise ClassListError("the ID class list is empty")
    blank = [i for i, n in enumerate(cleaned) if not n]
    if blank:
        raise ClassListError(f"blank class name(s) at position(s) {blank}")
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(cleaned):
        key = n.casefold()
        if key in seen:
            dups.append(f"{n!r} (positions {seen[key]} and {i})")
        seen.setdefault(key, i)
    if dups:
        raise ClassListError(f"duplicated class name(s): {', '.join(dups)}")
    return cleaned


def load_class_names(names=None, file: str | None = None, storage_options: dict | None = None,
                     class_set: str | None = None) -> tuple[str, ...]:
    """Validated ID class names from an inline list (``names``), a text file URI (``file``, one name per
    line; blank lines and ``#`` comments ignored) or a named set (``class_set``,
    :data:`clipn_core.named_sets.CLASS_SETS`, e.g. ``imagenet``). Exactly one of the three is given.

    Raises :class:`ClassListError` naming ``classes.file`` when the file cannot be read or decoded,
    or ``classes.set`` when the set is unknown.
    """
    if sum(x is not None for x in (names, file, class_set)) != 1:
        raise ClassListError("give exactly one of classes.names, classes.file or classes.set")
    if class_set is not None:
        if class_set not in CLASS_SETS:
            raise ClassListError(f"classes.set: no class set named {class_set!r}; named sets: {sorted(CLASS_SETS)}")
        return validate_class_names(CLASS_SETS[class_set].load())
    if names is not None:
        return validate_class_names(names)
    try:
        text = read_text(file, storage_options)
    except StorageError as e:
        raise ClassListError(f"classes.file: {e}") from e
    return validate_class_names([ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")])


def class_set_prompts(class_set: str | None) -> tuple[str, ...] | None:
    """The names the prompts of a named class set say (None for no set): its classes' names before
    :func:`~clipn_core.named_sets.disambiguate` suffixed the repeated ones."""
    return None if class_set is None else CLASS_SETS[class_set].prompts()


@torch.no_grad()
def build_class_heads(
    model: CLIPN,
    tokenizer,
    class_names,
    templates,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    prompt_names=None,
) -> ClassHeads:
    """W_yes, W_no [C, D] for ``class_names`` with ``templates`` (see module docstring).

    ``batch_size`` is the number of texts encoded per forward pass. ``prompt_names``: the name each
    class's prompts say, when it differs from its (unique) class name, as for a named class set's
    repeated names (:func:`class_set_prompts`); default the class names. Raises :class:`ClassListError`
    when two classes' prompts are equal once cut at the context length
    (:func:`~clipn_core.prompt_tokens.tokenize_prompts`, which also warns about cuts).
    """
    names = validate_class_names(class_names)
    templates = tuple(templates)
    if not templates:
        raise TemplateError("no templates given")
    said = names if prompt_names is None else tuple(prompt_names)
    if len(said) != len(names):
        raise ClassListError(f"{len(said)} prompt names for {len(names)} classes")
    all_tokens = tokenize_prompts(tokenizer, names, templates, "class", said)  # refuses names the cut makes equal
    per_chunk = max(1, batch_size // len(templates))
    yes_parts, no_parts = [], []
    # a chunk of classes (all their templates) per forward: only the per-class means outlive it
    for start in range(0, len(names), per_chunk):
        chunk = all_tokens[start : start + per_chunk]
        tokens = chunk.reshape(-1, chunk.shape[-1])
        shape = (len(chunk), len(templates), -1)
        for tower, parts in (("yes", yes_parts), ("no", no_parts)):
            mean = encode_texts(model, tokens, tower, len(tokens), device).reshape(shape).mean(dim=1)
            parts.append(F.normalize(mean, dim=-1))
    return ClassHeads(names, templates, torch.cat(yes_parts), torch.cat(no_parts))
