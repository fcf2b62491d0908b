"""Architecture registry: our small JSON configs registered with open_clip at import.

Any open_clip architecture with the standard CLIP text tower works (ViT-B-16,
ViT-B-32, ...); ``clipn_core/model_configs/*.json`` adds tiny ones for tests and the
demo. Registration goes through open_clip's public ``add_model_config``.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

from .errors import ModelConfigError

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(MODEL_CONFIG_DIR)


def list_architectures() -> list[str]:
    """Every architecture name open_clip can build here, ours included."""
    return open_clip.list_models()


def model_config(architecture: str) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of a registered name."""
    cfg = open_clip.get_model_config(architecture)
    if cfg is None:
        raise ModelConfigError(
            f"unknown architecture {architecture!r}; known: ViT-B-16, ViT-B-32, ... and "
            f"{sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}"
        )
    return cfg
