"""What each training stage trains, how one step runs, and what the run finally writes.

``clipn`` (the product): CLIPN's no tower and prompts over a frozen base CLIP; the final
output is a CLIPN checkpoint for the scoring job. ``clip``: a whole open_clip CLIP
trained contrastively (both towers and the logit scale); the final output is base CLIP
weights that ``model.pretrained`` of a ``clipn`` run loads. The demo world uses
``clip`` to make its tiny base model, since no pretrained weights can be downloaded.
``lit`` (locked-image tuning): the same contrastive training and output as ``clip``, but the
image tower's pretrained part is loaded from ``model.image_weights`` and frozen
(:mod:`clipn_core.lit`); its features are computed once per image and cached in the
worker's host memory up to ``loop.feature_cache_max_mb`` (:mod:`clipn_core.feature_cache`).

The training loop (:mod:`jobs.train.loop`) is the same for every stage: it only sees
``module`` (what Ray Train wraps), ``trained`` (whose state goes into run checkpoints),
``params`` (clipped and counted), ``optimizer``, ``step``, ``counters`` and ``save_final``; the driver
reads ``preprocess_cfg`` and ``context_length`` for the decode step.
"""

from __future__ import annotations

import logging

import open_clip
import torch
from torch import nn

import clipn_core as cc
from clipn_core.errors import redact_uri
from clipn_core.feature_cache import ImageFeatureCache
from clipn_core.images import SplitPreprocessor
from clipn_core.lit import LockedImageCLIP, load_locked_tower
from clipn_core.model import check_standard_text_tower
from clipn_core.pretrained_config import tag_adds_quick_gelu
from clipn_core.training import (
    ContrastiveCLIP,
    StepMetrics,
    build_optimizer,
    clip_train_step,
    clipn_train_step,
    prompt_choices,
)
from clipn_core.weights import create_base_clip
from schemas.train_config import TrainJobConfig

log = logging.getLogger("clipn.train")


def base_identity(cfg: TrainJobConfig) -> dict:
    """What a run checkpoint was trained from; a resume with another stage or base is refused."""
    m = cfg.model
    identity = {"stage": cfg.stage, "architecture": m.architecture, "pretrained": m.pretrained,
                "seed": m.seed if m.pretrained is None else None}
    if cfg.stage == "clipn":
        identity["num_prompts"] = m.num_prompts
    if cfg.stage == "lit":
        identity.update(image_weights=m.image_weights, image_weights_layout=m.image_weights_layout)
    if m.pretrained_config is not None:  # only when named, so runs from before the field resume as they were
        identity["pretrained_config"] = m.pretrained_config
    if tag_adds_quick_gelu(m.architecture, m.pretrained, m.pretrained_config):
        # a run started before base CLIPs followed their tag trained on GELU: it must not resume on QuickGELU
        identity["quick_gelu"] = True
    return identity


class _Stage:
    """What both stages share: the trained parameters, their AdamW, the normalisation of uint8 pixels."""

    def _setup(self, module: nn.Module, trained: nn.Module, preprocess_cfg: dict, context_length: int,
               cfg: TrainJobConfig) -> None:
        self.module, self.trained = module, trained
        self.preprocess_cfg, self.context_length = preprocess_cfg, context_length
        self.normalize = SplitPreprocessor(preprocess_cfg).normalize
        self.optim, self.clip_norm = cfg.optim, cfg.optim.grad_clip_norm
        self.params = [p for p in trained.parameters() if p.requires_grad]

    def counters(self) -> dict[str, int]:
        """Stage-specific running counts (ints) added to each step's metrics; none unless a stage has some."""
        return {}

    def optimizer(self) -> torch.optim.AdamW:
        """AdamW over ``trained`` with open_clip's no-decay groups and the config's hyper-parameters."""
        o = self.optim
        return build_optimizer(self.trained.named_parameters(), o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)


class ClipnStage(_Stage):
    """Train the no tower (and prompts) of a CLIPN built on ``model.architecture`` / ``model.pretrained``."""

    def __init__(self, cfg: TrainJobConfig, storage_options: dict):
        m = cfg.model
        self.core, self.spec = cc.build_clipn(m.architecture, m.pretrained, m.num_prompts, storage_options,
                                              cfg.run.cache_dir, m.seed, m.pretrained_config)
        self.core.train()  # the no tower only; the CLIP stays in eval mode
        self._setup(self.core, self.core.no_tower, self.core.preprocess_cfg, self.core.context_length, cfg)
        self.seed = cfg.loop.seed

    def step(self, model, batch: dict, step: int, optimizer, scheduler, autocast, scaler) -> StepMetrics:
        """One step on a batch of usable rows already on the device (``pixels`` uint8)."""
        prompts = prompt_choices(batch["sample_id"], step, self.seed, self.core.no_tower.num_prompts)
        return clipn_train_step(model, self.normalize(batch["pixels"]), batch["tokens"],
                                prompts.to(batch["tokens"].device), batch["caption_id"], self.core.logit_scale,
                                optimizer, scheduler, self.params, self.clip_norm, autocast, scaler)

    def save_final(self, uri: str, storage_options: dict) -> str:
        """Write the CLIPN checkpoint (+ sidecar); returns the model id."""
        self.core.eval()
        return cc.save_checkpoint(self.core, self.spec, uri, storage_options)


class ClipStage(_Stage):
    """Train a whole open_clip CLIP contrastively; identical captions count as positives."""

    def __init__(self, cfg: TrainJobConfig, storage_options: dict):
        m = cfg.model
        self.clip, _, identity = create_base_clip(m.architecture, m.pretrained, storage_options, cfg.run.cache_dir,
                                                  m.seed, m.pretrained_config)
        self.pretrained_config = identity.get("pretrained_config", "plain")
        check_standard_text_tower(self.clip)  # so that a CLIPN can be built on the result
        self.clip.train()
        self._setup(ContrastiveCLIP(self.clip), self.clip, dict(open_clip.get_model_preprocess_cfg(self.clip)),
                    int(self.clip.positional_embedding.shape[0]), cfg)

    def step(self, model, batch: dict, step: int, optimizer, scheduler, autocast, scaler) -> StepMetrics:
        """One step on a batch of usable rows already on the device (``pixels`` uint8)."""
        return clip_train_step(model, self.clip, self.normalize(batch["pixels"]), batch["tokens"],
                               batch["caption_id"], optimizer, scheduler, self.params, self.clip_norm,
                               autocast, scaler)

    def save_final(self, uri: str, storage_options: dict) -> str:
        """Write the base CLIP weights (open_clip-loadable .safetensors); returns their sha256. A file says
        nothing of how it was trained: the log names the ``pretrained_config`` to use it with."""
        self.clip.eval()
        digest = cc.save_base_clip(self.clip, uri, storage_options)
        log.info("base CLIP written to %s: use it as model.pretrained with model.pretrained_config: %s",
                 redact_uri(uri), self.pretrained_config)
        return digest


class LitStage(_Stage):
    """Train a base CLIP's text tower, projections and logit scale on a locked pretrained image tower (LiT).

    The base is ``model.architecture`` built from ``model.seed``; the image tower's locked part
    (:func:`clipn_core.lit.split_image_tower`) is then loaded from ``model.image_weights`` with strict keys
    (a mismatch raises :class:`~clipn_core.errors.CheckpointKeyError` on the driver, before any Ray work).
    """

    def __init__(self, cfg: TrainJobConfig, storage_options: dict):
        m = cfg.model
        self.clip, _, _ = create_base_clip(m.architecture, None, storage_options, cfg.run.cache_dir, m.seed,
                                           m.pretrained_config)
        check_standard_text_tower(self.clip)
        self.architecture = m.architecture
        self.image_weights = load_locked_tower(self.clip, m.image_weights, m.image_weights_layout, storage_options,
                                               cfg.run.cache_dir)
        self.locked = LockedImageCLIP(self.clip).train()
        self._setup(self.locked, self.locked, dict(open_clip.get_model_preprocess_cfg(self.clip)),
                    int(self.clip.positional_embedding.shape[0]), cfg)
        self.features = ImageFeatureCache(self.locked.locked, cfg.loop.feature_cache_max_mb * 1_000_000)

    def step(self, model, batch: dict, step: int, optimizer, scheduler, autocast, scaler) -> StepMetrics:
        """One step on a batch of usable rows already on the device (``pixels`` uint8, ``image_id``): the locked
        tower runs only on images the worker has not seen yet."""
        features = self.features(batch["image_id"], batch["pixels"], self.normalize)
        return clip_train_step(model, self.clip, features, batch["tokens"], batch["caption_id"], optimizer,
                               scheduler, self.params, self.clip_norm, autocast, scaler)

    def counters(self) -> dict[str, int]:
        """The feature cache's rows served from memory and images computed by the locked tower, since the worker
        started."""
        return {"feature_cache_hits": self.features.hits, "feature_cache_computed": self.features.computed}

    def save_final(self, uri: str, storage_options: dict) -> str:
        """Write the base CLIP weights, locked image tower included (open_clip-loadable .safetensors); returns their
        sha256. Used like the clip stage's: ``model.pretrained`` with ``model.pretrained_config: plain``."""
        self.clip.eval()
        digest = cc.save_base_clip(self.clip, uri, storage_options)
        log.info("LiT base CLIP written to %s (image tower %s, sha256 %s): use it as model.pretrained of "
                 "model.architecture %s with model.pretrained_config: plain", redact_uri(uri),
                 self.image_weights["image_weights"], self.image_weights["sha256"][:16], self.architecture)
        return digest


STAGES = {"clipn": ClipnStage, "clip": ClipStage, "lit": LitStage}
