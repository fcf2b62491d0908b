"""Batch inference: preprocessed images -> predicted class, every registered score, decisions.

This is the one place where features, heads and the score registry meet; the Ray
scoring job, the evaluation job and notebooks all call :class:`BatchScorer`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .heads import ClassHeads
from .images import split_preprocessor
from .model import CLIPN
from .scores import (
    DEFAULT_MCM_TEMPERATURE,
    DEFAULT_NEGATIVE_GROUPS,
    SCORES,
    ScoreInputs,
    compute_scores,
)


@dataclass(frozen=True)
class BatchScores:
    """Per-image results of one batch, as numpy arrays of length N.

    ``scores[name]`` is the ID score (higher = more ID) of every registered score the
    scorer can compute (those needing negative labels only when it has them);
    ``decisions[name]`` the threshold-free OOD flag (True = OOD) of CTW, ATD and CLIPN-Neg.
    ``embeddings`` is the L2-normalised image feature [N, D] (float32).
    """

    predicted_index: np.ndarray
    predicted_prob: np.ndarray
    scores: dict[str, np.ndarray]
    decisions: dict[str, np.ndarray]
    embeddings: np.ndarray


class BatchScorer:
    """Scores batches of images against fixed class heads: normalised float [N, 3, H, W]
    (:meth:`__call__`) or the model's uint8 pixels [N, 3, H, W] (:meth:`score_pixels`, or
    :meth:`device_scores` for every result packed into one buffer, copied to the host once).

    ``negatives``: negative-label text embeddings [M, D] (:mod:`clipn_core.negatives`) for the
    scores that use them, split into ``negative_groups`` groups; ``bank``: (ID, OOD) image
    proxies [K, D] of a lake bank (:mod:`clipn_core.lake_bank`) for ``clipn_neg_lake``.
    ``logit_scale``: the scale ``s`` of the logits; None (the default) takes the base
    CLIP's own learned ``logit_scale.exp()`` (100 for OpenAI's CLIP), so scores mean the
    same for any base model. ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast for
    the image tower (only on CUDA; CPU always runs fp32). Scores are computed in float32
    either way. On CUDA the
    images go in channels-last layout; ``compile`` wraps the image tower in
    ``torch.compile`` (dynamic batch size; the first batches pay the compilation).
    """

    def __init__(
        self,
        model: CLIPN,
        heads: ClassHeads,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        logit_scale: float | None = None,
        mcm_temperature: float = DEFAULT_MCM_TEMPERATURE,
        compile: bool = False,
        negatives: torch.Tensor | None = None,
        negative_groups: int = DEFAULT_NEGATIVE_GROUPS,
        bank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.heads_yes = heads.yes.to(self.device)
        self.heads_no = heads.no.to(self.device)
        self.precision = precision
        self.logit_scale = float(logit_scale) if logit_scale is not None else self.model.logit_scale
        self.mcm_temperature = mcm_temperature
        self.negatives = negatives.to(self.device) if negatives is not None else None
        self.negative_groups = negative_groups
        self.bank = tuple(b.to(self.device) for b in bank) if bank is not None else None
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model.clip.visual.to(memory_format=torch.channels_last)
        self._encode = torch.compile(self.model.encode_image, dynamic=True) if compile else self.model.encode_image
        self._normalize = split_preprocessor(self.model.preprocess_cfg).normalize

    def _autocast(self):
        if self.device.type != "cuda" or self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor) -> BatchScores:
        """Score uint8 pixels [N, 3, H, W] (the model's resized, cropped input, on any device): copied to
        the scoring device (pinned and asynchronous from CPU to CUDA), normalised there, scored."""
        if pixels.device != self.device:
            if self.device.type == "cuda" and pixels.device.type == "cpu":
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
        return self(self._normalize(pixels))

    def _results(self, images: torch.Tensor) -> tuple[ScoreInputs, dict]:
        """(score inputs, score results) of normalised images [N, 3, H, W] float32, on the scoring device."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            features = self._encode(images, normalize=True)
        inputs = ScoreInputs(features.float(), self.heads_yes, self.heads_no, self.logit_scale, self.mcm_temperature,
                             self.negatives, self.negative_groups, self.bank)
        return inputs, compute_scores(inputs)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> BatchScores:
        """Score normalised images [N, 3, H, W] float32 (any device)."""
        inputs, results = self._results(images)
        idx, prob = inputs.predicted
        return BatchScores(
            predicted_index=idx.cpu().numpy(),
            predicted_prob=prob.cpu().numpy(),
            scores={n: r.id_score.cpu().numpy() for n, r in results.items()},
            decisions={n: r.is_ood.cpu().numpy() for n, r in results.items() if SCORES[n].threshold_free},
            embeddings=inputs.features.cpu().numpy(),
        )

    @torch.inference_mode()
    def device_scores(self, pixels: torch.Tensor, embeddings: bool) -> PackedScores:
        """Score uint8 pixels [N, 3, H, W] (as :meth:`score_pixels`) and pack every result into one buffer on the
        scoring device, for one copy to the host (:meth:`PackedScores.to_host`). ``embeddings``: whether the
        float16 embeddings are packed too (nothing is copied that is not written). Work is queued on the
        current CUDA stream and not waited for."""
        if pixels.device != self.device:
            if self.device.type == "cuda" and pixels.device.type == "cpu":
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
        inputs, results = self._results(self._normalize(pixels))
        idx, prob = inputs.predicted
        names = tuple(results)
        decided = tuple(n for n in names if SCORES[n].threshold_free)
        # column-major blocks, so that each column is one contiguous run of the host buffer
        parts = [idx.to(torch.int32), torch.stack([prob.float(), *(results[n].id_score.float() for n in names)])]
        if embeddings:
            parts.append(inputs.features.half())
        parts.append(torch.stack([results[n].is_ood.bool() for n in decided]) if decided
                     else torch.zeros((0, len(idx)), dtype=torch.bool, device=self.device))
        flat = torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])
        return PackedScores(flat, len(idx), names, decided, inputs.features.shape[1] if embeddings else 0)


@dataclass(frozen=True)
class HostScores:
    """One batch's results on the host, as numpy views of one buffer: ``predicted_index`` int32 [N],
    ``predicted_prob`` float32 [N], ``scores[name]`` float32 [N] (ID score, higher = more ID),
    ``decisions[name]`` bool [N] (True = OOD, threshold-free scores only), ``embeddings`` float16 [N, D]
    (L2-normalised; None unless packed)."""

    predicted_index: np.ndarray
    predicted_prob: np.ndarray
    scores: dict[str, np.ndarray]
    decisions: dict[str, np.ndarray]
    embeddings: np.ndarray | None


@dataclass(frozen=True)
class PackedScores:
    """The results of :meth:`BatchScorer.device_scores` in one uint8 buffer on the scoring device: int32 index [N],
    float32 [1 + S, N] (probability, then the scores in ``names`` order), float16 embeddings [N, dim] (when
    ``dim``), bool [len(decided), N], back to back."""

    flat: torch.Tensor
    n: int
    names: tuple[str, ...]
    decided: tuple[str, ...]
    dim: int

    def to_host(self) -> HostScores:
        """Copy the buffer to the host (one copy; pinned and waited for on CUDA, none on the CPU) and view it."""
        flat = self.flat
        if flat.device.type != "cpu":
            host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            torch.cuda.current_stream(flat.device).synchronize()  # waits without the GIL
            flat = host
        buf = flat.numpy()
        n, at = self.n, 0

        def take(dtype, count: int) -> np.ndarray:
            nonlocal at
            size = count * np.dtype(dtype).itemsize
            out = buf[at:at + size].view(dtype)
            at += size
            return out

        index = take(np.int32, n)
        floats = take(np.float32, (1 + len(self.names)) * n).reshape(1 + len(self.names), n)
        emb = take(np.float16, n * self.dim).reshape(n, self.dim) if self.dim else None
        flags = take(np.bool_, len(self.decided) * n).reshape(len(self.decided), n)
        return HostScores(index, floats[0], {name: floats[1 + i] for i, name in enumerate(self.names)},
                          {name: flags[i] for i, name in enumerate(self.decided)}, emb)
