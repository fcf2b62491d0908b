"""Metrics: ID positive, FPR95 = share of OOD accepted at 95% ID recall (CLIPN/MCM convention)."""

import numpy as np
import pytest

from clipn_core.metrics import fpr_at_tpr, ood_metrics, top1_accuracy


def test_hand_example():
    # 6 (id, ood) pairs; id > ood in 5 -> AUROC 5/6. Keeping all 3 ID needs threshold 0.7,
    # which accepts the OOD score 0.75 -> FPR95 = 1/2.
    m = ood_metrics([0.9, 0.8, 0.7], [0.75, 0.1])
    assert m.auroc == pytest.approx(100 * 5 / 6)
    assert m.fpr95 == pytest.approx(50.0)
    # AUPR-In by hand: ranks 0.9(id) 0.8(id) 0.75(ood) 0.7(id) 0.1(ood): AP = (1 + 1 + 3/4) / 3
    assert m.aupr_in == pytest.approx(100 * (1 + 1 + 0.75) / 3)
    # AUPR-Out on -scores: 0.1(ood) first, then 0.7(id), 0.75(ood): AP = (1 + 2/3) / 2
    assert m.aupr_out == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_perfect_and_inverted_separation():
    good = ood_metrics([5, 6, 7], [1, 2, 3])
    assert good.auroc == 100.0 and good.fpr95 == 0.0
    bad = ood_metrics([1, 2, 3], [5, 6, 7])
    assert bad.auroc == 0.0 and bad.fpr95 == 100.0


def test_fpr95_threshold_keeps_95_percent_of_id():
    id_scores = np.arange(100, dtype=float)  # keeping 95 of them needs threshold 5
    ood_scores = np.array([4.5, 5.0, 50.0, 99.5])  # 5.0, 50, 99.5 pass -> 3/4
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(75.0)


def test_errors_and_accuracy():
    with pytest.raises(ValueError, match="at least one"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([float("nan")], [1.0])
    assert top1_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(75.0)
    with pytest.raises(ValueError):
        top1_accuracy([0, 1], [0])
