"""Locked-image tuning (LiT, Zhai et al., CVPR 2022): a pretrained image tower, frozen, under a trained text tower.

The base CLIP is any open_clip architecture with the standard text tower; its image tower
(``clip.visual``) splits into a *locked* part, whose weights come from a state dict and never
change, and a *head* trained with the text tower. For a timm tower (``timm_model_name`` in the
model config) the locked part is the timm model (``visual.trunk``) and the head open_clip's
projection after it (``visual.head``: empty with ``timm_proj: none``, a linear layer with
``linear``); for any other tower the whole ``clip.visual`` is locked and the head is the identity.

The locked part's features are a function of the image alone (no augmentation, batch norms in
eval mode), so :class:`~clipn_core.feature_cache.ImageFeatureCache` computes them once per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from torch import nn

from .efficientnet_lite import lite0_to_timm
from .errors import WeightsError, redact_uri
from .model import short_text_features
from .weights import load_state_dict_strict, read_state_dict

# how the keys of an image weights file are laid out -> the locked part's layout
LAYOUTS = {
    "timm": lambda state, source: state,  # the locked part's own state dict (timm's, for a timm tower)
    "efficientnet-lite0": lambda state, source: lite0_to_timm(state, source=source),
}


def split_image_tower(clip: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(locked part, trained head) of ``clip.visual``: ``(visual.trunk, visual.head)`` for an open_clip timm
    tower, ``(visual, nn.Identity())`` otherwise. The locked part maps normalised images [N, 3, H, W] to
    features [N, F]; the head maps those to the embedding [N, embed_dim]."""
    visual = clip.visual
    if isinstance(visual, TimmModel):
        return visual.trunk, visual.head
    return visual, nn.Identity()


def load_locked_tower(clip: nn.Module, uri: str, layout: str = "timm", storage_options: dict | None = None,
                      cache_dir: str | None = None, field: str = "model.image_weights") -> dict:
    """Load the locked part of ``clip``'s image tower (:func:`split_image_tower`) from ``uri`` with strict keys,
    after mapping them from ``layout`` (a key of :data:`LAYOUTS`), and freeze it (no gradients, eval mode).

    Returns the identity of the weights (``uri`` redacted, ``sha256``, ``layout``). Raises
    :class:`WeightsError` (unreadable file, unknown layout) or its subclass
    :class:`~clipn_core.errors.CheckpointKeyError` naming ``field``, the URI and the missing, unexpected
    or mis-shaped keys.
    """
    if layout not in LAYOUTS:
        raise WeightsError(f"{field}: unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    state, digest = read_state_dict(uri, field, storage_options, cache_dir)
    source = f"{redact_uri(uri)} ({field})"
    locked, _ = split_image_tower(clip)
    load_state_dict_strict(locked, LAYOUTS[layout](state, source), source)
    locked.requires_grad_(False)
    locked.eval()
    return {"image_weights": redact_uri(uri), "sha256": digest, "layout": layout}


class LockedImageCLIP(nn.Module):
    """An open_clip CLIP (``self.clip``) trained with its image tower's locked part frozen.

    ``forward`` takes the locked part's features instead of images, so they can be computed once
    and reused. ``train()`` leaves the locked part in eval mode (its batch norms never move). The
    locked part and head are reached through ``self.clip`` only, so the state dict is the CLIP's
    under ``clip.`` (no tensor appears twice).
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.locked.requires_grad_(False)

    @property
    def locked(self) -> nn.Module:
        return split_image_tower(self.clip)[0]

    def train(self, mode: bool = True) -> LockedImageCLIP:
        self.training = mode
        self.clip.train(mode)
        self.locked.eval()
        return self

    def forward(self, image_features: torch.Tensor, text: torch.Tensor):
        """(image features, text features, ``exp(logit_scale)``) for the locked part's features [N, F] and token
        ids [N, context]: both L2-normalised [N, embed_dim], as an open_clip CLIP's forward returns them (the text
        on the tokens up to the longest caption's end: :func:`~clipn_core.model.short_text_features`)."""
        _, head = split_image_tower(self.clip)
        f = F.normalize(head(image_features), dim=-1)
        return f, short_text_features(self.clip, text), self.clip.logit_scale.exp()
