"""OOD detection metrics on scikit-learn.

Convention (CLIPN / MCM): **ID is the positive class** and scores are ID scores
(higher = more ID). FPR95 is the share of OOD samples accepted as ID at the threshold
that keeps 95% of ID samples (TPR = 0.95 on ID). OpenOOD reports the opposite
convention (OOD positive, FPR on ID at 95% OOD recall); do not compare the two
numbers directly. All metrics are returned in percent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


@dataclass(frozen=True)
class OODMetrics:
    """AUROC, FPR@95%TPR, AUPR-In, AUPR-Out, all in percent."""

    auroc: float
    fpr95: float
    aupr_in: float
    aupr_out: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _labels_and_scores(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise ValueError("need at least one ID and one OOD score")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise ValueError("scores contain NaN or infinity")
    labels = np.concatenate([np.ones_like(id_scores), np.zeros_like(ood_scores)])
    return labels, np.concatenate([id_scores, ood_scores])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Share (percent) of OOD samples whose score reaches the threshold keeping ``tpr`` of ID."""
    labels, scores = _labels_and_scores(id_scores, ood_scores)
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(100.0 * fprs[np.searchsorted(tprs, tpr, side="left")])


def ood_metrics(id_scores, ood_scores) -> OODMetrics:
    """All metrics for ID scores of ID samples ``[N_id]`` and of OOD samples ``[N_ood]``."""
    labels, scores = _labels_and_scores(id_scores, ood_scores)
    return OODMetrics(
        auroc=float(100.0 * roc_auc_score(labels, scores)),
        fpr95=fpr_at_tpr(id_scores, ood_scores),
        aupr_in=float(100.0 * average_precision_score(labels, scores)),
        aupr_out=float(100.0 * average_precision_score(1 - labels, -scores)),
    )


def top1_accuracy(predicted, labels) -> float:
    """Percent of ID samples whose predicted class index equals the label index."""
    predicted = np.asarray(predicted).ravel()
    labels = np.asarray(labels).ravel()
    if predicted.shape != labels.shape or predicted.size == 0:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} must match and be non-empty")
    return float(100.0 * (predicted == labels).mean())
