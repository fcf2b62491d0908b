"""Scores against values worked out by hand on a 3-class example (the formulas of clipn_core.scores' docstring)."""

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
    assert set(results) == {"msp", "maxlogit", "energy", "mcm", "ctw", "atd"}  # no negatives: those two skipped
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
    assert {n for n, s in SCORES.items() if s.needs_no_tower} == {"ctw", "atd", "clipn_neg", "clipn_neg_lake"}
    assert {n for n, s in SCORES.items() if s.needs_negatives} == {"neglabel", "clipn_neg", "clipn_neg_lake"}
    x = ScoreInputs(torch.tensor([F1]), torch.tensor(W_YES))
    with pytest.raises(KeyError, match="nope"):
        compute_scores(x, ["nope"])
    with pytest.raises(ValueError, match="no heads"):
        compute_scores(x, ["ctw"])
    with pytest.raises(ValueError, match="width"):
        ScoreInputs(torch.zeros(1, 4), torch.zeros(3, 3))


# Four negative words (unit vectors in D = 3) for the same two images; cosines by hand.
W_NEG = [[0.0, 0.0, 1.0], [0.8, 0.0, 0.6], [0.0, 0.8, 0.6], [-1.0, 0.0, 0.0]]
COS_NEG = [[0.0, 0.48, 0.64, -0.6], [0.8, 0.48, 0.96, 0.0]]


def _neg_by_hand(cy, cn, cneg, groups):
    e_id = sum(math.exp(v) for v in cy)
    by_group = [[math.exp(v) for j, v in enumerate(cneg) if j % groups == g] for g in range(groups)]
    neglabel = sum(e_id / (e_id + sum(grp)) for grp in by_group) / groups
    joint_den = e_id + sum(math.exp(v) for v in cneg)
    p_joint = [math.exp(v) / joint_den for v in cy]
    p_no = [math.exp(n) / (math.exp(y) + math.exp(n)) for y, n in zip(cy, cn)]
    terms = [(1 - pn) * pj for pn, pj in zip(p_no, p_joint)]
    return neglabel, sum(terms)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_negative_label_scores_by_hand(groups):
    x = ScoreInputs(torch.tensor([F1, F2]), torch.tensor(W_YES), torch.tensor(W_NO), logit_scale=1.0,
                    negatives=torch.tensor(W_NEG), negative_groups=groups)
    r = compute_scores(x)
    assert {"neglabel", "clipn_neg", "clipn_neg_lake"} <= set(r)
    torch.testing.assert_close(r["clipn_neg_lake"].id_score, r["clipn_neg"].id_score)  # no bank: clipn_neg
    for i in range(2):
        neglabel, clipn_neg = _neg_by_hand(COS_YES[i], COS_NO[i], COS_NEG[i], groups)
        assert r["neglabel"].id_score[i].item() == pytest.approx(neglabel, abs=1e-6), (groups, i)
        assert r["clipn_neg"].id_score[i].item() == pytest.approx(clipn_neg, abs=1e-6), i
    # image 1, one group, worked out: ID mass e^.6 + e^.8 + 1 = 5.0477, negatives 1 + e^.48 + e^.64 + e^-.6 = 5.0614
    if groups == 1:
        assert r["neglabel"].id_score[0].item() == pytest.approx(5.04766 / (5.04766 + 5.06137), abs=1e-5)


def test_without_negatives_clipn_neg_is_atd_and_negative_scores_are_not_computed():
    plain = ScoreInputs(torch.tensor([F1, F2]), torch.tensor(W_YES), torch.tensor(W_NO), logit_scale=1.0)
    assert "neglabel" not in compute_scores(plain) and "clipn_neg" not in compute_scores(plain)
    empty = ScoreInputs(torch.tensor([F1, F2]), torch.tensor(W_YES), torch.tensor(W_NO), logit_scale=1.0,
                        negatives=torch.zeros(0, 3))
    assert empty.negatives is None
    with_none = compute_scores(plain, ["atd", "clipn_neg"])  # asked for explicitly: clipn_neg degrades to ATD
    torch.testing.assert_close(with_none["clipn_neg"].id_score, with_none["atd"].id_score)


def test_the_lake_bank_scales_clipn_neg_by_the_nearest_proxy_side():
    id_p, ood_p = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    base = dict(logit_scale=1.0, negatives=torch.tensor(W_NEG), negative_groups=1)
    x = ScoreInputs(torch.tensor([F1, F2]), torch.tensor(W_YES), torch.tensor(W_NO), bank=(id_p, ood_p), **base)
    r = compute_scores(x, ["clipn_neg", "clipn_neg_lake"])
    # image 1: nearest ID proxy .6, nearest OOD proxy .8 -> sigmoid(-.2); image 2: 0 vs .8 -> sigmoid(-.8)
    for i, gap in enumerate((-0.2, -0.8)):
        expected = r["clipn_neg"].id_score[i].item() / (1 + math.exp(-gap))
        assert r["clipn_neg_lake"].id_score[i].item() == pytest.approx(expected, abs=1e-6)
    empty = ScoreInputs(torch.tensor([F1, F2]), torch.tensor(W_YES), torch.tensor(W_NO),
                        bank=(torch.zeros(0, 3), ood_p), **base)
    same = compute_scores(empty, ["clipn_neg", "clipn_neg_lake"])
    torch.testing.assert_close(same["clipn_neg_lake"].id_score, same["clipn_neg"].id_score)  # empty bank: clipn_neg


def _gap_inputs(gap: float, scale: float = 100.0):
    """Three classes whose no logit leads the yes logit by ``gap`` (s * (cos_no - cos_yes)), one negative label.

    f = e0; head j of each tower is cos * e0 plus the rest of a unit vector on an axis of its own, so every
    cosine is exactly the number chosen."""
    cos_yes = torch.tensor([0.25, 0.2, 0.15])
    cos_no = cos_yes + gap / scale
    d = 1 + 2 * 3 + 1
    yes, no = torch.zeros(3, d), torch.zeros(3, d)
    for j in range(3):
        yes[j, 0], yes[j, 1 + j] = cos_yes[j], (1 - cos_yes[j] ** 2).sqrt()
        no[j, 0], no[j, 4 + j] = cos_no[j], (1 - cos_no[j] ** 2).clamp(min=0).sqrt()
    neg = torch.zeros(1, d)
    neg[0, 0], neg[0, 7] = 0.1, (1 - torch.tensor(0.01)).sqrt()
    f = torch.zeros(1, d)
    f[0, 0] = 1.0
    return ScoreInputs(f, yes, no, logit_scale=scale, negatives=neg, negative_groups=1), (f, yes, no, neg)


def _original_softmax_scores(f, yes, no, neg, scale):
    """The original CLIPN code's CTW / ATD (softmax over [yes, no] per class), and CLIPN-Neg, in float64."""
    f, yes, no, neg = (t.double() for t in (f, yes, no, neg))
    l_yes, l_no, l_neg = scale * f @ yes.T, scale * f @ no.T, scale * f @ neg.T
    yesno = torch.softmax(torch.stack([l_yes, l_no], dim=-1), dim=-1)[..., 0]
    p = torch.softmax(l_yes, dim=-1)
    k = p.argmax(dim=-1, keepdim=True)
    joint = torch.softmax(torch.cat([l_yes, l_neg], dim=-1), dim=-1)[:, : l_yes.shape[1]]
    return {"ctw": yesno.gather(1, k)[:, 0], "atd": (yesno * p).sum(-1), "clipn_neg": (yesno * joint).sum(-1),
            "clipn_neg_lake": (yesno * joint).sum(-1)}


@pytest.mark.parametrize("gap", [-50.0, -20.0, 0.0, 5.0, 10.0, 16.0, 17.0, 18.0, 20.0, 30.0, 50.0, 70.0])
def test_ctw_atd_and_the_scores_built_on_them_keep_the_ood_end_at_every_gap(gap):
    """1 - p_no as sigmoid(l_yes - l_no): the ID scores agree with the original softmax over [yes, no] to 1e-5
    relative even where the no logit leads by 20-70 (1 - sigmoid(l_no - l_yes) is exactly 0 from about 17)."""
    x, tensors = _gap_inputs(gap)
    ours = compute_scores(x, ["ctw", "atd", "clipn_neg", "clipn_neg_lake"])
    reference = _original_softmax_scores(*tensors, scale=100.0)
    for name, expected in reference.items():
        got = ours[name].id_score.double()
        assert got.item() > 0.0, (name, gap)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0.0, msg=f"{name} at gap {gap}")
    assert bool(ours["ctw"].is_ood[0]) == (gap > 0)


def test_the_most_ood_images_stay_ordered():
    """Images further into the OOD end keep strictly falling CTW and ATD scores (no ties at 0)."""
    scores = [compute_scores(_gap_inputs(g)[0], ["ctw", "atd"]) for g in (20.0, 30.0, 40.0, 50.0)]
    for name in ("ctw", "atd"):
        values = [s[name].id_score.item() for s in scores]
        assert all(a > b > 0.0 for a, b in zip(values, values[1:])), (name, values)
