"""Operating points from in-distribution scores only: the threshold that keeps a target share of ID images.

Every score is an ID score (higher = more ID) and an image is flagged OOD when
``score < threshold``. For ``n`` ID scores sorted ascending and a target share ``q``,
the threshold is the ``k``-th smallest score with ``k = floor((1 - q) n)`` (0-based), so
at least ``q`` of the sample is kept. The estimate rests on the ``k`` images below it:
for ``q = 0.999`` and ``n = 1000`` that is one image. The bootstrap resamples the ID
scores with replacement and reports the 2.5th and 97.5th percentiles of the threshold.
"""

from __future__ import annotations

import math

import numpy as np


def tail_size(n: int, target: float) -> int:
    """``k``: how many of ``n`` sample images may fall below the threshold for ``target``."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target share must be in (0, 1), got {target}")
    return math.floor(round((1.0 - target) * n, 9))


def id_threshold(id_scores: np.ndarray, target: float) -> tuple[float, float, int]:
    """(threshold, share of ``id_scores`` it keeps, tail size k) for keeping ``target`` of them."""
    scores = np.asarray(id_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no ID scores to calibrate on")
    k = tail_size(scores.size, target)
    threshold = float(np.partition(scores, k)[k])
    return threshold, float((scores >= threshold).mean()), k


def bootstrap_interval(id_scores: np.ndarray, target: float, resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95, chunk: int = 100) -> tuple[float, float]:
    """(low, high) percentile bootstrap interval of :func:`id_threshold` at ``confidence``; deterministic for
    ``seed``. Resamples are drawn ``chunk`` at a time so memory stays ``chunk x n``."""
    scores = np.asarray(id_scores, dtype=np.float64)
    n = scores.size
    k = tail_size(n, target)
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        draws.append(np.partition(scores[idx], k, axis=1)[:, k])
    values = np.concatenate(draws)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))
