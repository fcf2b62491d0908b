"""Class sets and template sets known by name, taken from open_clip's own package (never copied).

* class set ``imagenet``: open_clip's 1,000 ImageNet-1K class names
  (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``) in index order, so ``predicted_index``
  is the ImageNet class index. That list names two pairs of classes alike ("missile" at 657 and
  744, "sunglasses" at 836 and 837); :func:`disambiguate` gives the k-th occurrence of a name the
  suffix `` (k)`` (k >= 2), so every class name (``predicted_class``) is unique and the order stays
  ImageNet's. The prompts still say the name open_clip's list gives (``prompts``), so the heads
  are open_clip's zero-shot classifier's, the repeated classes' alike.
* template sets ``openai-imagenet`` (the 80 templates of OpenAI's ImageNet zero-shot evaluation,
  ``OPENAI_IMAGENET_TEMPLATES``) and ``openai-imagenet-simple`` (its 7-template subset,
  ``SIMPLE_IMAGENET_TEMPLATES``), each as ``{}`` templates.

The shipped template files (``default``, ``world``) live in ``clipn_core/templates`` and are
read by :func:`clipn_core.heads.load_templates`. open_clip is imported only when a set is
loaded, so the config schemas can list the names cheaply.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class NamedSet:
    """A set of strings known by name: what it is (for help texts) and how to load it."""

    description: str
    load: Callable[[], tuple[str, ...]]


@dataclass(frozen=True)
class NamedClassSet(NamedSet):
    """A class set: ``load`` gives the unique class names, ``prompts`` the name each class's prompts say."""

    prompts: Callable[[], tuple[str, ...]] = lambda: ()


def disambiguate(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` with the k-th occurrence (k >= 2) of a repeated name suffixed `` (k)``.

    Names compare as the class-list check compares them (NFC, stripped, case-insensitive); the
    first occurrence keeps its name, so a list without repeats is returned unchanged.
    """
    seen: dict[str, int] = {}
    out = []
    for name in names:
        key = unicodedata.normalize("NFC", str(name)).strip().casefold()
        seen[key] = seen.get(key, 0) + 1
        out.append(name if seen[key] == 1 else f"{name} ({seen[key]})")
    return tuple(out)


def _imagenet_prompts() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def _imagenet_classes() -> tuple[str, ...]:
    return disambiguate(_imagenet_prompts())


def _templates(attr: str) -> Callable[[], tuple[str, ...]]:
    def load() -> tuple[str, ...]:
        from open_clip import zero_shot_metadata

        # open_clip's templates are functions of the class name: given "{}" each returns its template
        return tuple(t("{}") for t in getattr(zero_shot_metadata, attr))

    return load


CLASS_SETS: dict[str, NamedClassSet] = {
    "imagenet": NamedClassSet("open_clip's 1,000 ImageNet-1K class names in index order (a repeated name's k-th "
                              "occurrence gets the suffix ' (k)'; its prompts say the name itself)",
                              _imagenet_classes, _imagenet_prompts),
}


def shipped_template_names() -> list[str]:
    """The template files shipped in ``clipn_core/templates`` (``default``, ``world``), by name."""
    from importlib import resources

    return sorted(f.name[:-4] for f in (resources.files("clipn_core") / "templates").iterdir() if f.name.endswith(".txt"))


def template_set_names() -> list[str]:
    """Every template set known by name: the shipped files and open_clip's sets."""
    return sorted({*shipped_template_names(), *TEMPLATE_SETS})

TEMPLATE_SETS: dict[str, NamedSet] = {
    "openai-imagenet": NamedSet("the 80 templates of OpenAI's ImageNet zero-shot evaluation (open_clip's "
                                "OPENAI_IMAGENET_TEMPLATES)", _templates("OPENAI_IMAGENET_TEMPLATES")),
    "openai-imagenet-simple": NamedSet("their 7-template subset (open_clip's SIMPLE_IMAGENET_TEMPLATES)",
                                       _templates("SIMPLE_IMAGENET_TEMPLATES")),
}
