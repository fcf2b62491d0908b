"""Training pieces shared by any trainer (Ray Train, a notebook): optimiser, schedule, prompt choice, step.

Nothing here knows about Ray. The steps work on one process or under DDP (features
are gathered across ranks by the losses). Two stages use them: ``clip`` trains a whole
base CLIP contrastively (the demo world's tiny model), ``clipn`` trains CLIPN's no tower
on a frozen CLIP.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .losses import clip_contrastive_loss, clipn_loss
from .model import short_text_features

_MIX_A = np.uint64(0x9E3779B97F4A7C15)
_MIX_B = np.uint64(0xBF58476D1CE4E5B9)
# open_clip clamps the learned logit scale at 100 (CLIP paper)
MAX_LOGIT_SCALE = 100.0


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: gains, biases, LayerNorm/BatchNorm parameters and 1-D parameters get no decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, split into decay / no-decay groups."""
    decay, plain = [], []
    for name, p in named_params:
        if p.requires_grad:
            (plain if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for ``LambdaLR``: linear 1/w ... 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def text_id(text: str) -> int:
    """Stable signed 64-bit id of a caption (identical captions -> identical ids, across processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def image_id(image: bytes) -> int:
    """Stable signed 64-bit id of an image's encoded bytes (the key of its cached features in stage lit)."""
    return int.from_bytes(hashlib.blake2b(image, digest_size=8, person=b"clipn-image").digest(), "little", signed=True)


def sample_id(image: bytes, caption: str) -> int:
    """Stable signed 64-bit id of one image-text pair."""
    h = hashlib.blake2b(digest_size=8)
    h.update(image)
    h.update(b"\0")
    h.update(caption.encode("utf-8"))
    return int.from_bytes(h.digest(), "little", signed=True)


def prompt_choices(sample_ids: np.ndarray | torch.Tensor, step: int, seed: int, num_prompts: int) -> torch.Tensor:
    """Per-sample prompt index in ``[0, num_prompts]`` (``num_prompts`` = the mean), int64 [N].

    A hash of (sample id, step, seed): the same pair at the same step always gets the
    same prompt, however the global batch is split across workers, and a resumed run
    repeats the choices of the original.
    """
    ids = np.asarray(sample_ids.cpu() if isinstance(sample_ids, torch.Tensor) else sample_ids).astype(np.int64)
    with np.errstate(over="ignore"):
        h = ids.view(np.uint64) * _MIX_A + np.uint64(step) * _MIX_B + np.uint64(seed & 0xFFFFFFFF)
        h ^= h >> np.uint64(31)
        h *= _MIX_B
        h ^= h >> np.uint64(29)
    return torch.from_numpy((h % np.uint64(num_prompts + 1)).astype(np.int64))


@dataclass
class StepMetrics:
    """One optimiser step: total loss (global batch), its named parts, the gradient norm before
    clipping and the learning rate used."""

    loss: float
    grad_norm: float
    lr: float
    parts: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"loss", <parts>..., "grad_norm", "lr"}`` for logs and metrics files."""
        return {"loss": self.loss, **self.parts, "grad_norm": self.grad_norm, "lr": self.lr}


class ContrastiveCLIP(nn.Module):
    """An open_clip CLIP (``self.clip``) as the clip stage trains it: ``forward(images, text)`` returns what the
    CLIP's own forward returns, (image features, text features, ``exp(logit_scale)``), both L2-normalised
    [N, embed_dim], with the text encoded on the tokens up to the batch's longest caption
    (:func:`~clipn_core.model.short_text_features`: the same features and gradients, to float rounding, at a
    fraction of the text tower's cost). The state dict is the CLIP's under ``clip.``."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, text: torch.Tensor):
        f = self.clip.encode_image(images, normalize=True)
        return f, short_text_features(self.clip, text), self.clip.logit_scale.exp()


def _autocast(dtype: torch.dtype | None):
    return torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _train_step(
    loss_fn: Callable[[], tuple[torch.Tensor, object]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    grad_clip_norm: float | None,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[object, float, float]:
    """zero grads -> ``loss_fn()`` under autocast -> backward -> (unscale) -> clip -> step -> schedule.

    ``loss_fn`` returns (loss to minimise, anything the caller reports). Returns (that
    anything, the gradient norm before clipping, the learning rate used).
    """
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    with _autocast(autocast_dtype):
        loss, report = loss_fn()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    max_norm = grad_clip_norm if grad_clip_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return report, float(grad_norm), lr


def clipn_train_step(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    prompt_idx: torch.Tensor,
    caption_ids: torch.Tensor | None,
    logit_scale: float,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    grad_clip_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepMetrics:
    """One CLIPN step: features -> ITBO + TSO (gathered across ranks) -> backward -> clip -> AdamW -> schedule.

    ``model`` is a :class:`~clipn_core.model.CLIPN` or its DDP wrapper; ``images`` normalised
    [n, 3, H, W], ``tokens`` [n, context], ``prompt_idx`` [n] (see :func:`prompt_choices`),
    ``caption_ids`` [n] int64 or None. ``params`` are the trained parameters (for clipping).
    ``autocast_dtype`` enables CUDA autocast (bf16/fp16); ``scaler`` is needed for fp16.
    Metric parts: ``itbo``, ``tso``.
    """
    def loss_fn():
        f, g, g_no = model(images, tokens, prompt_idx=prompt_idx)
        loss = clipn_loss(f.float(), g.float(), g_no.float(), logit_scale, caption_ids)
        return loss.total, loss

    loss, grad_norm, lr = _train_step(loss_fn, optimizer, scheduler, params, grad_clip_norm, autocast_dtype, scaler)
    return StepMetrics(loss.total.item(), grad_norm, lr, {"itbo": loss.itbo.item(), "tso": loss.tso.item()})


def clip_train_step(
    model: nn.Module,
    clip: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    caption_ids: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    grad_clip_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> StepMetrics:
    """One contrastive step of a whole open_clip CLIP (both towers and the logit scale train).

    ``model`` is the CLIP, a stage's module around it (:class:`ContrastiveCLIP`,
    :class:`~clipn_core.lit.LockedImageCLIP`) or their DDP wrapper (its forward returns normalised
    image and text features and ``exp(logit_scale)``), ``clip`` the unwrapped CLIP (its
    ``logit_scale`` is clamped to ``log(max_logit_scale)`` after the step, as open_clip
    does). Inputs as in :func:`clipn_train_step`; captions sharing a ``caption_ids``
    value are positives. Metric parts: ``contrastive``, ``logit_scale``.
    """
    def loss_fn():
        f, g, scale = model(images, tokens)[:3]
        loss = clip_contrastive_loss(f.float(), g.float(), scale.float(), caption_ids)
        return loss, loss

    loss, grad_norm, lr = _train_step(loss_fn, optimizer, scheduler, params, grad_clip_norm, autocast_dtype, scaler)
    with torch.no_grad():
        clip.logit_scale.clamp_(0, math.log(max_logit_scale))
    return StepMetrics(loss.item(), grad_norm, lr,
                       {"contrastive": loss.item(), "logit_scale": float(clip.logit_scale.detach().exp())})
