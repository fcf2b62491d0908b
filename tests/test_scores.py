"""Scores against values worked out by hand on a 3-class example (design.md formulas)."""

import math

import pytest
import torch

from clipn_core.scores import SCORES, ScoreInputs, compute_scores

# Two images, three classes, D = 3, logit scale 1 so the arithmetic stays readable.
F1 = [0.6, 0.8, 0.0]
F2 = [0.0, 0.6, 0.8]
W_YES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
W_NO = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]
# cosines by hand
COS_YES = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]
COS_NO = [[0.8, 0.6, 0.48], [0.6, 0.0, 1.0]]


def _by_hand(cy, cn):
    e = [math.exp(v) for v in cy]
    p = [v / sum(e) for v in e]
    p_no = [math.exp(n) / (math.exp(y) + math.exp(n)) for y, n in zip(cy, cn)]
    k = max(range(3), key=lambda j: p[j])
    terms = [(1 - pn) * pj for pn, pj in zip(p_no, p)]
    atd = sum(terms)
    mcm_e = [math.exp(v / 0.5) for v in cy]
    return {
        "msp": max(p), "maxlogit": max(cy), "energy": math.log(sum(e)), "mcm": max(mcm_e) / sum(mcm_e),
        "ctw": 1 - p_no[k], "atd": atd,
        "ctw_ood": p_no[k] > 0.5, "atd_ood": (1 - atd) > max(terms), "k": k, "pk": p[k],
    }


@pytest.fixture()
def inputs():
    return ScoreInputs(torch.tensor([F1, F2]), torch.tensor(W_YES), torch.tensor(W_NO), logit_scale=1.0, mcm_temperature=0.5)


def test_hand_values_match_every_registered_score(inputs):
    expected = [_by_hand(COS_YES[i], COS_NO[i]) for i in range(2)]
    results = compute_scores(inputs)
    assert set(results) == {"msp", "maxlogit", "energy", "mcm", "ctw", "atd"}
    for name, r in results.items():
        for i in range(2):
            assert r.id_score[i].item() == pytest.approx(expected[i][name], abs=1e-6), (name, i)


def test_hand_worked_numbers_and_decisions(inputs):
    r = compute_scores(inputs, ["ctw", "atd"])
    # image 1: k = 1, p_no[1] = e^.6 / (e^.8 + e^.6) = 0.450166 -> CTW says ID
    assert r["ctw"].id_score[0].item() == pytest.approx(1 - 0.450166, abs=1e-6)
    assert not r["ctw"].is_ood[0]
    # image 2: k = 2, p_no[2] = e^1 / (e^.8 + e^1) = 0.549834 -> CTW says OOD
    assert r["ctw"].id_score[1].item() == pytest.approx(1 - 0.549834, abs=1e-6)
    assert r["ctw"].is_ood[1]
    # ATD decisions, by hand: both images' p_ood exceeds the largest ID term
    assert r["atd"].is_ood.tolist() == [True, True]
    idx, prob = inputs.predicted
    assert idx.tolist() == [1, 2]


def test_atd_can_say_id_when_one_class_dominates():
    f = torch.tensor([[1.0, 0.0]])
    x = ScoreInputs(f, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    r = compute_scores(x, ["atd", "ctw"])
    assert not r["atd"].is_ood[0] and not r["ctw"].is_ood[0]
    assert r["atd"].id_score[0] > 0.99


def test_logit_scale_is_used():
    f, w = torch.tensor([F1]), torch.tensor(W_YES)
    a = compute_scores(ScoreInputs(f, w, logit_scale=1.0), ["maxlogit"])["maxlogit"].id_score
    b = compute_scores(ScoreInputs(f, w, logit_scale=100.0), ["maxlogit"])["maxlogit"].id_score
    assert b.item() == pytest.approx(100 * a.item())


def test_registry_metadata_and_errors():
    assert {n for n, s in SCORES.items() if s.threshold_free} == {"ctw", "atd"}
    assert {n for n, s in SCORES.items() if s.needs_no_tower} == {"ctw", "atd"}
    x = ScoreInputs(torch.tensor([F1]), torch.tensor(W_YES))
    with pytest.raises(KeyError, match="nope"):
        compute_scores(x, ["nope"])
    with pytest.raises(ValueError, match="no heads"):
        compute_scores(x, ["ctw"])
    with pytest.raises(ValueError, match="width"):
        ScoreInputs(torch.zeros(1, 4), torch.zeros(3, 3))
