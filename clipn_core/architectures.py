"""Architecture registry: our small JSON configs registered with open_clip at import.

Any open_clip architecture with the standard CLIP text tower works (ViT-B-16,
ViT-B-32, ...); ``clipn_core/model_configs/*.json`` adds tiny ones for tests and the
demo. Registration goes through open_clip's public ``add_model_config``.

A user's own architecture (a domain image tower, for example a timm model) is an open_clip
model config file named as the architecture: ``model.architecture: s3://models/my-tower.json``
(or a local path). Every process that builds the model registers the file first
(:func:`resolve_architecture`), so Ray workers build it like the driver; an architecture added
with ``add_model_config`` in the driver's process alone would be unknown to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip

from .errors import ModelConfigError, StorageError, redact_uri
from .storage import local_copy

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(MODEL_CONFIG_DIR)
CONFIG_FILE_SUFFIX = ".json"
_MODEL_CFG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip's registry requires of a config file
_registered_files: dict[str, str] = {}  # architecture name -> the config file URI this process registered it from


def is_config_file(architecture: str) -> bool:
    """Whether ``architecture`` names an open_clip model config file (local path or URI ending in .json)."""
    return architecture.endswith(CONFIG_FILE_SUFFIX) and not architecture.startswith(("hf-hub:", "local-dir:"))


def resolve_architecture(architecture: str, storage_options: dict | None = None, cache_dir: str | None = None) -> str:
    """The registered name of ``architecture``: itself, or for a model config file (local or ``s3://``, see the
    module docstring) its stem, after registering the file with open_clip's ``add_model_config`` in this process.

    Raises :class:`ModelConfigError` naming the file when it cannot be read, is not a JSON object with
    ``embed_dim``, ``vision_cfg`` and ``text_cfg``, or its stem is already an architecture with another config
    (a built-in such as ``ViT-B-16``, or another file of the same name): open_clip keys its registry by name, so the
    file would silently replace it.
    """
    if not is_config_file(architecture):
        return architecture
    shown = redact_uri(architecture)
    try:
        local = local_copy(architecture, storage_options, cache_dir)
        cfg = json.loads(local.read_text())
    except (StorageError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"model.architecture: cannot read the model config {shown}: {e}") from e
    missing = [k for k in _MODEL_CFG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ModelConfigError(f"model.architecture: {shown} is not an open_clip model config: no {', '.join(missing)}")
    name = local.stem
    existing = open_clip.get_model_config(name)
    if existing is not None and existing != cfg and _registered_files.get(name) != architecture:
        source = _registered_files.get(name, "a built-in or earlier registered config")
        raise ModelConfigError(f"model.architecture: {shown} would replace the architecture {name!r} ({source}) "
                               "with another config; give the file another name")
    if existing != cfg:
        open_clip.add_model_config(local)
        _registered_files[name] = architecture
    return name


def list_architectures() -> list[str]:
    """Every architecture name open_clip can build here, ours included."""
    return open_clip.list_models()


def model_config(architecture: str) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of a registered name."""
    cfg = open_clip.get_model_config(architecture)
    if cfg is None:
        raise ModelConfigError(
            f"unknown architecture {architecture!r}; known: ViT-B-16, ViT-B-32, ... and "
            f"{sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}, or the path of an open_clip model config "
            "file (.json, local or s3://)"
        )
    return cfg
