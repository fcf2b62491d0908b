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
from .model import CLIPN
from .scores import (
    DEFAULT_LOGIT_SCALE,
    DEFAULT_MCM_TEMPERATURE,
    SCORES,
    ScoreInputs,
    compute_scores,
)


@dataclass(frozen=True)
class BatchScores:
    """Per-image results of one batch, as numpy arrays of length N.

    ``scores[name]`` is the ID score (higher = more ID) of every registered score;
    ``decisions[name]`` the threshold-free OOD flag (True = OOD) of CTW and ATD.
    ``embeddings`` is the L2-normalised image feature [N, D] (float32).
    """

    predicted_index: np.ndarray
    predicted_prob: np.ndarray
    scores: dict[str, np.ndarray]
    decisions: dict[str, np.ndarray]
    embeddings: np.ndarray


class BatchScorer:
    """Scores batches of preprocessed images [N, 3, H, W] against fixed class heads.

    ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast for the image tower (only on
    CUDA; CPU always runs fp32). Scores are computed in float32 either way.
    """

    def __init__(
        self,
        model: CLIPN,
        heads: ClassHeads,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        mcm_temperature: float = DEFAULT_MCM_TEMPERATURE,
    ):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.heads_yes = heads.yes.to(self.device)
        self.heads_no = heads.no.to(self.device)
        self.precision = precision
        self.logit_scale = logit_scale
        self.mcm_temperature = mcm_temperature

    def _autocast(self):
        if self.device.type != "cuda" or self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> BatchScores:
        images = images.to(self.device, non_blocking=True)
        with self._autocast():
            features = self.model.encode_image(images, normalize=True)
        inputs = ScoreInputs(features.float(), self.heads_yes, self.heads_no, self.logit_scale, self.mcm_temperature)
        results = compute_scores(inputs)
        idx, prob = inputs.predicted
        return BatchScores(
            predicted_index=idx.cpu().numpy(),
            predicted_prob=prob.cpu().numpy(),
            scores={n: r.id_score.cpu().numpy() for n, r in results.items()},
            decisions={n: r.is_ood.cpu().numpy() for n, r in results.items() if SCORES[n].threshold_free},
            embeddings=inputs.features.cpu().numpy(),
        )
