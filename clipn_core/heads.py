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
import os
import unicodedata
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CacheError, ClassListError, StorageError, TemplateError, redact_uri
from .model import CLIPN, encode_texts
from .named_sets import CLASS_SETS, TEMPLATE_SETS, template_set_names
from .prompt_tokens import log as _PROMPT_LOG  # where tokenize_prompts warns about cut prompts
from .prompt_tokens import tokenize_prompts
from .storage import read_text

DEFAULT_TEMPLATES_NAME = "default"
DEFAULT_HEADS_BATCH = 256
# The path from prompts to heads, as part of every heads cache key: bump it whenever a change to
# build_class_heads or encode_texts can change a single bit of the heads, so no cached heads outlive it.
HEADS_ENCODING = "short-tokens/chunked-template-mean/1"


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
    batch_size: int = DEFAULT_HEADS_BATCH,
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


def heads_cache_key(model_id: str, class_names, templates, prompt_names=None, batch_size: int = DEFAULT_HEADS_BATCH,
                    device: str | torch.device = "cpu") -> str:
    """The identity of the heads :func:`build_class_heads` gives, as a JSON string: the model id, the class
    set (:func:`class_set_hash`: names and templates in order), the names the prompts say, the encoding path
    (:data:`HEADS_ENCODING`), the batch size (it sets which texts share a forward, and so the trimmed length),
    the device type, the torch version (kernels may round differently) and the open_clip version (its tokenizer and
    text towers), so that heads cached under it are the bits a fresh encode gives."""
    import open_clip

    said = None if prompt_names is None else hashlib.sha256("\n".join(prompt_names).encode()).hexdigest()[:16]
    return json.dumps({"model": model_id, "class_set": class_set_hash(class_names, templates), "prompts": said,
                       "encoding": HEADS_ENCODING, "batch_size": batch_size, "device": torch.device(device).type,
                       "torch": torch.__version__, "open_clip": open_clip.__version__}, sort_keys=True)


def write_safetensors_atomically(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (each made contiguous) and string ``metadata`` to the local safetensors file ``path``
    through a temporary file of this process's own, renamed into place: a reader never sees half a file, and
    two jobs writing the same cache entry at once never write into each other's temporary file."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_heads(heads: ClassHeads, path: str | Path, key: str, warnings=()) -> None:
    """Write ``heads`` to a local safetensors file: ``yes`` and ``no`` [C, D] float32, the class names,
    templates, ``key`` (:func:`heads_cache_key`) and the ``warnings`` building them gave (prompts cut at the
    context length: :func:`load_heads` repeats them) in its metadata, atomically
    (:func:`write_safetensors_atomically`)."""
    write_safetensors_atomically({"yes": heads.yes, "no": heads.no}, path,
                                 {"key": key, "class_names": json.dumps(list(heads.class_names)),
                                  "templates": json.dumps(list(heads.templates)),
                                  "warnings": json.dumps(list(warnings))})


def load_heads(path: str | Path, key: str, class_names, templates, dim: int) -> ClassHeads:
    """Heads written by :func:`save_heads` under ``key`` for exactly ``class_names`` and ``templates``, [C, D=dim];
    the warnings building them gave are logged again (``clipn.prompts``), as a fresh build would.

    Raises :class:`CacheError` naming the file and what is wrong when it cannot be read, was written under
    another key, holds other classes or templates, or holds tensors of another shape or dtype or non-finite
    values: such an entry is never returned.
    """
    import safetensors

    names, templates = tuple(class_names), tuple(templates)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        stored = (meta.get("key"), tuple(json.loads(meta.get("class_names", "[]"))),
                  tuple(json.loads(meta.get("templates", "[]"))))
    except Exception as e:  # noqa: BLE001 - truncated, foreign or unparseable file: one line naming it
        raise CacheError(f"heads cache {path} cannot be read: {type(e).__name__}: {e}") from e
    if stored[0] != key:
        raise CacheError(f"heads cache {path} was written under another key: {stored[0]} (expected {key})")
    if stored[1:] != (names, templates):
        raise CacheError(f"heads cache {path} holds other class names or templates than its key says")
    if set(tensors) != {"yes", "no"}:
        raise CacheError(f"heads cache {path} holds tensors {sorted(tensors)}, expected ['no', 'yes']")
    for tower, t in tensors.items():
        if t.dtype != torch.float32 or tuple(t.shape) != (len(names), dim) or not bool(torch.isfinite(t).all()):
            raise CacheError(f"heads cache {path}: {tower} is {t.dtype} {tuple(t.shape)}, expected finite float32 "
                             f"{(len(names), dim)}")
    for message in json.loads(meta.get("warnings", "[]")):
        _PROMPT_LOG.warning("%s", message)
    return ClassHeads(names, templates, tensors["yes"], tensors["no"])

