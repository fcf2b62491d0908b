"""CLIPN training losses: image-text binary-opposite (ITBO) and text semantic-opposite (TSO).

With several processes the features of every rank are gathered **with gradients**
(``torch.distributed.nn.functional.all_gather``) and every rank computes the loss of
the global batch, so negatives span ``per_rank_batch x world_size`` pairs. The loss
value is then identical on every rank and equal to the one-process loss of the
concatenated batch; after DDP's gradient averaging the parameter gradients are too
(the all_gather backward sums the world_size identical contributions, DDP divides by
world_size). Unlike the original code, a single process needs no special case.

Ranks may pass different batch sizes (a rank whose batch lost undecodable pairs); each
must hold at least one row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class ClipnLoss:
    """Loss parts of one step; ``total = itbo + tso``."""

    total: torch.Tensor
    itbo: torch.Tensor
    tso: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Per-rank row counts (rank order) of a batch of ``n`` rows on this rank; ``[n]`` on one process."""
    if not _distributed():
        return [n]
    t = torch.tensor([n], dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [int(p.item()) for p in parts]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))]).contiguous()


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] of every rank in rank order, keeping gradients; identity on one process.

    Ranks may hold different row counts (``sizes``, from :func:`gather_sizes`): rows are
    padded to the largest count for the collective and the padding is cut off again.
    """
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = sizes or gather_sizes(x.shape[0], x.device)
    with warnings.catch_warnings():
        # Its suggested replacement lives in a private module (_functional_collectives); this
        # public autograd all_gather is still the supported way to gather with gradients.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        parts = all_gather(_pad_rows(x, max(sizes)))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Like :func:`gather_with_grad` without autograd (labels, ids)."""
    if not _distributed():
        return x
    sizes = sizes or gather_sizes(x.shape[0], x.device)
    padded = _pad_rows(x, max(sizes))
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def itbo_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_features_no: torch.Tensor,
    logit_scale: float | torch.Tensor,
    matched: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-text binary-opposite loss over all N x N pairs of a batch.

    Inputs are L2-normalised [N, D]. ``p_no(i, j) = sigmoid(s f_i.g_no_j - s f_i.g_j)``.
    Matched pairs (the diagonal, or ``matched`` [N, N] bool when captions repeat) are
    pushed to ``p_no -> 0`` and unmatched pairs to ``p_no -> 1``:
    ``mean_matched -log(1 - p_no) + mean_unmatched -log p_no``.
    """
    n = image_features.shape[0]
    logits_yes = logit_scale * image_features @ text_features.T
    logits_no = logit_scale * image_features @ text_features_no.T
    d = (logits_no - logits_yes).float()
    if matched is None:
        matched = torch.eye(n, dtype=torch.bool, device=d.device)
    # -log(1 - sigmoid(d)) = -logsigmoid(-d); -log(sigmoid(d)) = -logsigmoid(d)
    pos = -F.logsigmoid(-d[matched]).mean()
    unmatched = ~matched
    neg = -F.logsigmoid(d[unmatched]).mean() if unmatched.any() else d.new_zeros(())
    return pos + neg


def tso_loss(text_features: torch.Tensor, text_features_no: torch.Tensor) -> torch.Tensor:
    """Text semantic-opposite loss ``mean_i (2 - sqrt(2 - 2 g_i.g_no_i + 1e-4))`` on L2-normalised [N, D]."""
    cos = (text_features * text_features_no).sum(dim=-1).float()
    return (2.0 - torch.sqrt(2.0 - 2.0 * cos + 1e-4)).mean()


def clipn_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_features_no: torch.Tensor,
    logit_scale: float | torch.Tensor,
    caption_ids: torch.Tensor | None = None,
) -> ClipnLoss:
    """ITBO + TSO over the global batch (gathered across ranks when distributed).

    Per-rank inputs are L2-normalised [n, D]. ``caption_ids`` [n] int64 (e.g. a hash of
    the caption text) makes pairs with identical captions count as matched; without it
    only (i, i) is matched.
    """
    sizes = gather_sizes(image_features.shape[0], image_features.device)
    f = gather_with_grad(image_features, sizes)
    g = gather_with_grad(text_features, sizes)
    g_no = gather_with_grad(text_features_no, sizes)
    matched = None
    if caption_ids is not None:
        ids = gather_no_grad(caption_ids.to(image_features.device), sizes)
        matched = ids[:, None] == ids[None, :]
    itbo = itbo_loss(f, g, g_no, logit_scale, matched)
    tso = tso_loss(g, g_no)
    return ClipnLoss(total=itbo + tso, itbo=itbo, tso=tso)


def clip_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE over the global batch (gathered across ranks when distributed).

    Per-rank inputs are L2-normalised [n, D]; ``logit_scale`` is the (trainable) scale
    ``exp(t)``. With ``caption_ids`` [n] int64 every pair sharing a caption is a positive:
    the target of each row is uniform over its positives (small worlds repeat captions
    often, and a one-hot target would push identical captions apart). Without it only
    (i, i) is positive, as in open_clip's ``ClipLoss``.
    """
    sizes = gather_sizes(image_features.shape[0], image_features.device)
    f = gather_with_grad(image_features, sizes)
    g = gather_with_grad(text_features, sizes)
    logits = logit_scale * f @ g.T
    if caption_ids is None:
        matched = torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    else:
        ids = gather_no_grad(caption_ids.to(image_features.device), sizes)
        matched = ids[:, None] == ids[None, :]
    targets = matched.float() / matched.sum(dim=1, keepdim=True)
    # matched is symmetric, so the text->image targets are the same rows
    image_to_text = -(targets * logits.float().log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.T.float().log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2
