"""Scoring in this process, with the nightly job's decode and scorer: for labelled sets and calibration samples.

``clipn evaluate`` and ``clipn calibrate`` score thousands of images, not a lake, so they
run without Ray; images go through the same :class:`~clipn_core.images.SplitPreprocessor`
(same ``preprocess`` mode) and the same :class:`~clipn_core.BatchScorer` as in the nightly
job, so their figures describe what the nightly job does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

import clipn_core as cc
from clipn_core.images import DecodeError, split_preprocessor
from jobs.scoring_setup import ScoringSetup
from schemas.score_config import ScoringOptions
from schemas.status import STATUS_READ_ERROR

log = logging.getLogger("clipn.local")


@dataclass
class LocalScores:
    """Scores of the decodable images: ``kept`` (input indices), predicted class index, every registered score
    and the threshold-free decisions, all aligned with ``kept``; ``undecodable`` lists the others (row, status)."""

    kept: np.ndarray
    predicted: np.ndarray
    scores: dict[str, np.ndarray]
    decisions: dict[str, np.ndarray]
    undecodable: list[dict] = field(default_factory=list)


def batch_scorer(model: cc.CLIPN, setup: ScoringSetup, options: ScoringOptions, device: str) -> cc.BatchScorer:
    if device == "cuda" and not torch.cuda.is_available():
        raise cc.ModelConfigError("runtime.device is cuda but no CUDA device is visible")
    return cc.BatchScorer(model, setup.heads, device, options.precision, setup.logit_scale, options.mcm_temperature,
                          **setup.scorer_kwargs())


def score_images(scorer: cc.BatchScorer, setup: ScoringSetup, options: ScoringOptions,
                 images: Iterable[bytes | Exception], batch_size: int, max_pixels: int,
                 total: int | None = None) -> LocalScores:
    """Decode + score ``images`` (encoded bytes, or the exception that stopped an image's read) in batches,
    consuming them as they come; an unreadable or undecodable image is left out and listed with its status."""
    pre = split_preprocessor(setup.preprocess_cfg, mode=options.preprocess)
    kept, undecodable, preds = [], [], []
    scores: dict[str, list] = {}
    decisions: dict[str, list] = {}
    pixels, rows = [], []
    seen = 0

    def flush() -> None:
        out = scorer.score_pixels(torch.from_numpy(np.stack(pixels)))
        kept.extend(rows)
        preds.append(out.predicted_index)
        for name, v in out.scores.items():
            scores.setdefault(name, []).append(v)
        for name, v in out.decisions.items():
            decisions.setdefault(name, []).append(v)
        pixels.clear()
        rows.clear()
        log.info("scored %d/%s images", seen, total if total is not None else "?")

    for i, data in enumerate(images):
        seen = i + 1
        if isinstance(data, Exception):
            undecodable.append({"row": i, "error": STATUS_READ_ERROR})
            continue
        out = pre.decode(data or b"", max_pixels)
        if isinstance(out, DecodeError):
            undecodable.append({"row": i, "error": out.kind.value})
            continue
        pixels.append(out)
        rows.append(i)
        if len(pixels) >= batch_size:
            flush()
    if pixels:
        flush()
    return LocalScores(np.array(kept, dtype=np.int64), np.concatenate(preds) if preds else np.zeros(0, np.int64),
                       {k: np.concatenate(v) for k, v in scores.items()},
                       {k: np.concatenate(v) for k, v in decisions.items()}, undecodable)
