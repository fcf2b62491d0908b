"""Which pretrained configuration a base CLIP follows: how its weights were trained.

open_clip describes every pretrained tag of an architecture with a configuration
(:func:`open_clip.get_pretrained_cfg`): the activation the weights were trained with
(``quick_gelu``) and the image preprocessing (``mean``, ``std``, ``interpolation``,
``resize_mode``). open_clip's plain architecture configs do not carry it: ``ViT-B-16`` has
no ``quick_gelu``, yet OpenAI's ``ViT-B-16`` weights (and those of 26 more tags in open_clip
3.3) were trained with QuickGELU. ``open_clip.create_model("ViT-B-16", pretrained="openai")``
only warns about that, and a weights *file* cannot say how it was trained at all.

So every base CLIP here is built from a :class:`PretrainedConfig`: the tag's configuration
when ``pretrained`` is a tag, the configuration a weights file names
(``pretrained_config: openai``), or the architecture's plain config (``plain``: weights
trained here by ``clipn train --stage clip``, or none). The choice is recorded in the
checkpoint sidecar's ``base_weights`` and every rebuild follows it.

An architecture whose image tower is a timm model (``timm_model_name`` in its vision config)
takes, in its plain config, the preprocessing of that timm model's pretrained config (mean,
std, interpolation): its image weights come from timm-layout state dicts (``clipn train
--stage lit``), which were trained with that normalisation, not with OpenAI CLIP's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import open_clip

from .errors import ModelConfigError, WeightsError

log = logging.getLogger("clipn.weights")

PLAIN = "plain"  # the architecture's own open_clip config, no tag's
# what a tag's configuration says about preprocessing (open_clip's PreprocessCfg fields; the size is the model's)
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class PretrainedConfig:
    """The configuration a base CLIP's weights were trained with.

    ``tag``: the open_clip pretrained tag whose configuration applies, or None for the
    architecture's plain config. ``quick_gelu``: build with QuickGELU activations.
    ``preprocess``: the tag's preprocessing fields (``PREPROCESS_KEYS``); for plain, those of the
    image tower's timm model (:func:`plain_preprocess`), else empty.
    """

    tag: str | None
    quick_gelu: bool
    preprocess: dict

    @property
    def name(self) -> str:
        """The value recorded in the sidecar and accepted by ``pretrained_config``: the tag or ``plain``."""
        return self.tag or PLAIN


def quick_gelu_tags(architecture: str) -> list[str]:
    """The pretrained tags of ``architecture`` whose weights were trained with QuickGELU (open_clip's list)."""
    return [t for t in open_clip.list_pretrained_tags_by_model(architecture)
            if open_clip.get_pretrained_cfg(architecture, t).get("quick_gelu", False)]


def tag_config(architecture: str, tag: str, field: str = "pretrained_config") -> PretrainedConfig:
    """The :class:`PretrainedConfig` of open_clip's tag ``tag`` for ``architecture``.

    Raises :class:`ModelConfigError` naming ``field`` and the architecture's known tags when
    open_clip has no such tag for that architecture.
    """
    cfg = open_clip.get_pretrained_cfg(architecture, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(architecture)
        raise ModelConfigError(
            f"{field}: open_clip has no pretrained tag {tag!r} for {architecture}; known tags: "
            f"{', '.join(known) if known else 'none'} (or {PLAIN!r} for the architecture's own config)")
    return PretrainedConfig(tag, bool(cfg.get("quick_gelu", False)),
                            {k: cfg[k] for k in PREPROCESS_KEYS if cfg.get(k) is not None})


def resolve(architecture: str, pretrained: str | None, pretrained_config: str | None,
            pretrained_is_tag: bool) -> PretrainedConfig:
    """The configuration a base CLIP of ``architecture`` with weights ``pretrained`` is built with.

    * ``pretrained`` a tag: that tag's configuration (``pretrained_config`` unset or the same tag);
    * ``pretrained`` a file/URI or None: ``pretrained_config`` names a tag of the architecture, or
      ``plain`` (or unset) for the architecture's own config. Unset with a weights file while the
      architecture has QuickGELU-trained tags logs one warning per process and architecture.
    * ``hf-hub:`` / ``local-dir:`` architectures carry their own configuration (plain here), so
      ``pretrained_config`` must be unset.

    Raises :class:`ModelConfigError` for an unknown ``pretrained_config`` or one beside an
    architecture that carries its own, and :class:`WeightsError` for a ``pretrained`` that is no
    tag of the architecture or a ``pretrained_config`` that contradicts the tag it is.
    """
    if architecture.startswith(("hf-hub:", "local-dir:")):
        if pretrained_config not in (None, PLAIN):
            raise ModelConfigError(f"pretrained_config: {architecture} carries its own open_clip config; "
                                   f"do not also pass pretrained_config={pretrained_config!r}")
        return PretrainedConfig(None, False, {})
    if pretrained_is_tag:
        if pretrained_config is not None and _clean(pretrained_config) != _clean(pretrained):
            raise WeightsError(f"pretrained_config={pretrained_config!r} contradicts pretrained={pretrained!r}, "
                               "an open_clip tag that names its own configuration: drop pretrained_config")
        if not open_clip.get_pretrained_cfg(architecture, pretrained):
            known = open_clip.list_pretrained_tags_by_model(architecture)
            raise WeightsError(f"pretrained={pretrained!r} is neither a file, an object-storage URI nor an open_clip "
                               f"tag of {architecture} (its tags: {', '.join(known) if known else 'none'})")
        return tag_config(architecture, pretrained, "pretrained")
    if pretrained_config is None or pretrained_config == PLAIN:
        if pretrained_config is None and pretrained is not None:
            _warn_unnamed(architecture)
        return PretrainedConfig(None, False, plain_preprocess(architecture))
    return tag_config(architecture, pretrained_config)


def plain_preprocess(architecture: str) -> dict:
    """The preprocessing fields (``PREPROCESS_KEYS`` but ``resize_mode``) of the plain config of ``architecture``:
    for a timm image tower, those of timm's default pretrained config of ``timm_model_name`` (e.g.
    ``tf_efficientnet_lite0``: mean = std = (0.5, 0.5, 0.5), bicubic); empty otherwise (open_clip's defaults)."""
    name = ((open_clip.get_model_config(architecture) or {}).get("vision_cfg") or {}).get("timm_model_name")
    if not name:
        return {}
    from timm.models import get_pretrained_cfg  # timm comes with open_clip's timm towers

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return {"mean": tuple(cfg.mean), "std": tuple(cfg.std), "interpolation": cfg.interpolation}


def _clean(tag: str) -> str:
    return tag.lower().replace("-", "_")  # open_clip's own tag normalisation


def _warn_unnamed(architecture: str) -> None:
    tags = quick_gelu_tags(architecture)
    own = (open_clip.get_model_config(architecture) or {}).get("quick_gelu", False)
    if not tags or own or (architecture, "file") in _warned:  # a -quickgelu architecture builds QuickGELU anyway
        return
    _warned.add((architecture, "file"))
    log.warning(
        "base weights file for %s with no pretrained_config: building the architecture's plain config (GELU); "
        "weights of its tags %s were trained with QuickGELU. Set pretrained_config to the tag the file holds "
        "(e.g. pretrained_config: %s), or to %r for weights trained with this config", architecture,
        ", ".join(tags), tags[0], PLAIN)


def warn_unrecorded(architecture: str, uri: str) -> None:
    """Once per process and architecture: a checkpoint over a base weights file that records no configuration, on an
    architecture with QuickGELU-trained tags, may run GELU on QuickGELU-trained weights."""
    tags = quick_gelu_tags(architecture)
    if not tags or (architecture, "checkpoint") in _warned:
        return
    _warned.add((architecture, "checkpoint"))
    log.warning(
        "checkpoint %s runs %s with GELU over a base weights file whose pretrained configuration it does not record; "
        "if the file held weights of a QuickGELU-trained tag (%s), re-save it with `clipn upgrade-checkpoint "
        "--checkpoint %s --output <new>.safetensors --pretrained_config <tag>`", uri, architecture, ", ".join(tags),
        uri)


def tag_adds_quick_gelu(architecture: str, pretrained: str | None, pretrained_config: str | None) -> bool:
    """Whether the tag named by ``pretrained_config`` or ``pretrained`` makes a base CLIP of ``architecture`` QuickGELU
    where the architecture's own config is GELU (computed from names alone: no file is read, nothing is logged)."""
    if (open_clip.get_model_config(architecture) or {}).get("quick_gelu", False):
        return False
    for tag in (pretrained_config, pretrained):
        if tag and tag != PLAIN and open_clip.get_pretrained_cfg(architecture, tag):
            return bool(open_clip.get_pretrained_cfg(architecture, tag).get("quick_gelu", False))
    return False


def recorded(base_weights: dict, architecture: str) -> PretrainedConfig | None:
    """The configuration a checkpoint's ``base_weights`` record names, or None when it names none.

    Checkpoints record ``pretrained_config``; older ones only their ``pretrained`` value, which
    names a configuration when it is a tag (no file digest was recorded for it).
    """
    arch = base_weights.get("architecture") or architecture
    name = base_weights.get("pretrained_config")
    if name is None and base_weights.get("pretrained") and not base_weights.get("sha256"):
        name = base_weights["pretrained"]
    if name is None or name == PLAIN or arch.startswith(("hf-hub:", "local-dir:")):
        return None
    if not open_clip.get_pretrained_cfg(arch, name):
        return None
    return tag_config(arch, name)
