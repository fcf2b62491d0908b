"""The lake bank: OOD proxies only where the evidence says OOD and its known rate of flagging ID images leaves the
flagged rows' purity bound high enough, and the job's reading of its rows and choice of evidence."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from clipn_core.errors import CalibrationError
from clipn_core.lake_bank import Evidence, bank_bytes, bank_from_bytes, build_bank
from clipn_core.scores import ScoreInputs, compute_scores
from clipn_core.storage import Storage
from jobs.calibration import load_calibration
from jobs.score.lake_bank import bank_evidence, build_lake_bank, evidence_column
from schemas.output import OUTPUT_SCHEMA
from schemas.score_config import DecisionConfig, LakeBankConfig, NegativesConfig, ScoreJobConfig
from tests.bank_calibration import calibrate, id_sample

D, C = 16, 3
SCALE = 30.0
SETTINGS = LakeBankConfig()
GATE = {"quantile": SETTINGS.quantile, "clusters": SETTINGS.clusters, "min_ood_rows": SETTINGS.min_ood_rows,
        "min_purity": SETTINGS.min_purity}


def _world(seed: int = 0):
    """Yes heads, no heads and negatives [., D]: classes on the first axes, their no texts and the negatives apart."""
    eye = torch.eye(D)
    yes, no = eye[:C], F.normalize(eye[C:2 * C] + 0.2 * eye[:C], dim=-1)
    negatives = F.normalize(torch.randn(20, D, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return yes, no, negatives


def _night(n_id: int, n_ood: int, seed: int, hard: float = 0.0) -> torch.Tensor:
    """ID images near a yes head (``hard``: leaning that far toward their class's no text, where ATD's rule flags
    them), OOD images near a no head (CLIPN's no tower matches them), shuffled by seed."""
    g = torch.Generator().manual_seed(seed)
    yes, no, _ = _world()
    cls = torch.randint(0, C, (n_id + n_ood,), generator=g)
    centre = torch.cat([yes[cls[:n_id]] + hard * no[cls[:n_id]], no[cls[n_id:]]])
    return F.normalize(centre + 0.15 * torch.randn(n_id + n_ood, D, generator=g), dim=-1)


def _atd(feats: torch.Tensor):
    yes, no, negatives = _world()
    return compute_scores(ScoreInputs(feats, yes, no, SCALE, negatives=negatives), ["atd"])["atd"]


def _calibrated(hard: float = 0.0) -> Evidence:
    """ATD's rule with its rate measured as ``clipn calibrate`` records it: the share of a separate ID sample (of the
    same ID images) it flags."""
    return Evidence("ood_atd", float(_atd(_night(400, 0, seed=99, hard=hard)).is_ood.float().mean()), "cal-test", 400)


def _staged(tmp_path, feats: torch.Tensor, name: str) -> tuple[str, np.ndarray]:
    """The night's rows as the scoring job stages them (OUTPUT_SCHEMA, float16 embeddings, ATD's score and flag)."""
    atd = _atd(feats)
    n = len(feats)
    now = dt.datetime(2026, 11, 24, tzinfo=dt.timezone.utc)
    columns = {"uri": [f"s3://lake/{name}/{i:04d}.jpg" for i in range(n)], "status": ["ok"] * n,
               "score_atd": atd.id_score.tolist(), "ood_atd": atd.is_ood.tolist(), "is_ood": atd.is_ood.tolist(),
               "embedding": feats.half().tolist(), "model_id": ["m"] * n, "class_set_hash": ["c"] * n,
               "run_id": ["r"] * n, "scored_at": [now] * n}
    table = pa.table({f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in OUTPUT_SCHEMA},
                     schema=OUTPUT_SCHEMA)
    folder = tmp_path / name
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder), atd.is_ood.numpy()


def _next_night_scores(bank):
    yes, no, negatives = _world()
    following = _night(200, 60, seed=2)
    x = ScoreInputs(following, yes, no, SCALE, negatives=negatives, bank=(bank.id_proxies, bank.ood_proxies))
    s = compute_scores(x, ["clipn_neg", "clipn_neg_lake"])
    return s["clipn_neg"].id_score, s["clipn_neg_lake"].id_score


def test_a_night_without_ood_builds_no_ood_proxies_and_the_next_night_scores_clipn_neg(tmp_path):
    staged, flagged = _staged(tmp_path, _night(300, 0, seed=1), "id-only")
    assert not flagged.any()  # ATD's rule flags nothing on this night
    evidence = _calibrated()
    bank = bank_from_bytes(bank_bytes(build_lake_bank(staged, Storage(), 300, evidence, SETTINGS)))
    # before, the lowest-ATD tenth became 30 rows of OOD proxies whatever they were
    assert len(bank.ood_proxies) == 0 and bank.empty
    assert bank.meta["flagged_ood"] == 0 and bank.meta["ood_rows"] == 0 and bank.meta["ood_proxies"] == 0
    assert bank.meta["empty"].startswith("no row flagged OOD by ood_atd") and bank.meta["evidence"] == "ood_atd"
    assert bank.meta["calibration_id"] == "cal-test" and bank.meta["id_flag_rate"] == evidence.id_flag_rate
    assert bank.meta["max_rows"] == SETTINGS.max_rows and bank.meta["purity_bound"] is None
    base, lake = _next_night_scores(bank)
    assert torch.equal(lake, base)


def test_an_over_flagging_night_builds_no_ood_proxies_when_the_calibration_says_its_evidence_over_flags(tmp_path):
    """Hard ID images only: ATD's rule flags most of them, and the calibration's ID sample says it does so on ID
    images. The old gate (flags on half the lowest tenth) took them as OOD proxies."""
    staged, flagged = _staged(tmp_path, _night(300, 0, seed=1, hard=1.1), "hard-id")
    evidence = _calibrated(hard=1.1)
    assert flagged.mean() > 0.5 and evidence.id_flag_rate > 0.5  # the evidence over-flags, and that is known
    bank = build_lake_bank(staged, Storage(), 300, evidence, SETTINGS)
    assert bank.empty and len(bank.ood_proxies) == 0 and bank.meta["ood_rows"] >= SETTINGS.min_ood_rows
    assert bank.meta["purity_bound"] < SETTINGS.min_purity and "below min_purity" in bank.meta["empty"]
    base, lake = _next_night_scores(bank)
    assert torch.equal(lake, base)


def test_ood_proxies_come_only_from_flagged_rows(tmp_path):
    feats = _night(270, 30, seed=3)
    staged, flagged = _staged(tmp_path, feats, "mixed")
    assert 20 <= flagged.sum() <= 40
    bank = build_lake_bank(staged, Storage(), 300, _calibrated(), SETTINGS)
    assert not bank.empty and bank.meta["ood_rows"] <= bank.meta["flagged_ood"] and bank.meta["empty"] is None
    assert bank.meta["ood_proxies"] == len(bank.ood_proxies) > 0 and bank.meta["id_proxies"] == len(bank.id_proxies)
    assert bank.meta["purity_bound"] >= SETTINGS.min_purity
    _, no, _ = _world()
    # every OOD proxy sits by a no head (the OOD images), none by a yes head
    assert (bank.ood_proxies @ no.T).max(dim=-1).values.min() > 0.8
    base, lake = _next_night_scores(bank)
    assert not torch.equal(base, lake) and (lake <= base).all()
    assert lake[:200].mean() / base[:200].mean() > lake[200:].mean() / base[200:].mean()  # the OOD rows lose more


N = 200


@pytest.mark.parametrize("p, sample, flagged_lowest, built, why", [
    # an all-ID night whose evidence flags half of it, as the calibration says it does on ID images
    (0.5, 400, N // 2, False, "below min_purity"),
    (0.03, 1000, N // 5, True, None),  # a known low rate (at most ~4%), 20% flagged: at least ~80% of them OOD
    (0.0, 10_000, 10, True, None),  # nothing of a large sample flagged: a rate of at most 0.03%
    # nothing of 200 flagged allows a rate up to 1.5%: 2% of an all-ID night flagged is no evidence of OOD
    (0.0, 200, 4, False, "below min_purity"),
    (0.0, 1000, 0, False, "no row flagged OOD"),
    (0.0, 10**6, 3, False, "fewer than min_ood_rows 4"),
], ids=["all-id-over-flagged", "low-rate", "p-zero-large-sample", "p-zero-small-sample", "none-flagged",
        "fewer-than-min-rows"])
def test_the_gate_takes_ood_proxies_only_when_the_flags_purity_bound_and_count_suffice(p, sample, flagged_lowest,
                                                                                        built, why):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(N, 8)).astype(np.float32)
    scores = rng.permutation(N) / N  # distinct: the lowest tenth is 20 rows
    flagged = scores < flagged_lowest / N  # the flagged rows are the lowest-scored ones
    uris = [f"s3://b/{i:03d}.jpg" for i in range(N)]
    evidence = Evidence("ood_atd", p, "cal", sample)
    bank = build_bank(feats, scores, flagged, uris, evidence, **GATE)
    assert bank.empty != built, bank.meta
    bound = None if not flagged_lowest else 1 - evidence.id_flag_rate_bound * N / flagged_lowest
    assert bank.meta["purity_bound"] == (None if bound is None else pytest.approx(bound))
    assert (bound is not None and bound >= GATE["min_purity"]) == (why in (None, "fewer than min_ood_rows 4"))
    assert bank.meta["flagged_ood"] == flagged_lowest and bank.meta["id_flag_rate"] == p
    assert bank.meta["id_flag_rate_bound"] == evidence.id_flag_rate_bound >= p
    if why is None:
        assert bank.meta["empty"] is None and bank.meta["ood_rows"] == min(flagged_lowest, N // 10)
    else:
        assert why in bank.meta["empty"] and len(bank.ood_proxies) == len(bank.id_proxies) == 0


@pytest.mark.parametrize("p, sample, expected", [
    (0.0, 200, 1 - 0.05 ** (1 / 200)),  # no flag in n: the exact bound has this closed form
    (0.0, 20, 1 - 0.05 ** (1 / 20)),
    (1.0, 50, 1.0),  # every image flagged
    (0.5, 20, 0.698),  # k = 10 of 20 (exact binomial tables, one-sided 95%: 0.698)
])
def test_the_rate_the_gate_takes_is_an_upper_bound_that_shrinks_with_the_sample(p, sample, expected):
    bound = Evidence("ood_atd", p, "cal", sample).id_flag_rate_bound
    assert bound == pytest.approx(expected, abs=1e-3) and bound >= p
    assert Evidence("ood_atd", p, "cal", sample * 100).id_flag_rate_bound <= bound  # more images, a tighter bound


@pytest.mark.parametrize("decision, calibration, column", [
    ({}, "cal.json", "ood_atd"),
    ({"rule": "ctw"}, "cal.json", "ood_atd"),
    ({"rule": "threshold", "score": "atd", "threshold": 0.3, "calibration": "cal.json"}, "cal.json", "is_ood"),
    # a hand-set threshold has no known rate: ATD's rule, with its rate from the bank's own calibration
    ({"rule": "threshold", "score": "atd", "threshold": 0.3}, "cal.json", "ood_atd"),
    # another calibration named for the bank: ATD's rule with that file's rate
    ({"rule": "threshold", "score": "atd", "threshold": 0.3, "calibration": "cal.json"}, "other.json", "ood_atd"),
    # a threshold on the bank's own score would feed the bank its own verdicts
    ({"rule": "threshold", "score": "clipn_neg_lake", "threshold": 0.3, "calibration": "cal.json"}, "cal.json",
     "ood_atd"),
], ids=["atd", "ctw", "calibrated-threshold", "hand-set-threshold", "other-calibration", "threshold-on-bank"])
def test_the_evidence_is_atds_rule_unless_a_calibrated_threshold_on_a_bank_free_score_decides(decision, calibration,
                                                                                              column):
    assert evidence_column(DecisionConfig(**decision), calibration) == column


def _config(output: dict, **extra) -> dict:
    return {"input": {"uri": "/lake"}, "output": {"uri": "/out", "embeddings": True, **output},
            "model": {"architecture": "clipn-tiny"}, "classes": {"names": ["a"]}, **extra}


def test_a_lake_bank_without_a_calibration_is_refused_naming_the_fields():
    with pytest.raises(ValidationError) as err:
        ScoreJobConfig.model_validate(_config({"lake_bank": True}))
    message = str(err.value)
    assert "output.lake_bank" in message and "lake_bank.calibration" in message and "decision.calibration" in message
    assert "flags ID images must be known" in message
    # a calibration for the bank, or the decision's: accepted, the bank's first
    cfg = ScoreJobConfig.model_validate(_config({"lake_bank": True}, lake_bank={"calibration": "/cal/c.json"}))
    assert cfg.bank_calibration() == "/cal/c.json"
    cfg = ScoreJobConfig.model_validate(_config({"lake_bank": True}, decision={
        "rule": "threshold", "score": "atd", "threshold": 0.3, "calibration": "/cal/d.json"}))
    assert cfg.bank_calibration() == "/cal/d.json"
    # no bank, no calibration needed
    assert ScoreJobConfig.model_validate(_config({})).bank_calibration() is None


def test_the_lake_bank_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 8)).astype(np.float32)
    scores = rng.random(200)
    flagged = scores < 0.2
    uris = [f"s3://b/{i:03d}.jpg" for i in range(200)]
    evidence = Evidence("ood_atd", 0.02, "cal", 10_000)
    gate = {**GATE, "clusters": 8}
    bank = build_bank(feats, scores, flagged, uris, evidence, **gate)
    perm = rng.permutation(200)
    shuffled = build_bank(feats[perm], scores[perm], flagged[perm], [uris[i] for i in perm], evidence, **gate)
    assert bank.id == shuffled.id and len(bank.id_proxies) == len(bank.ood_proxies) == 5  # 20 rows a decile, 4 each
    assert bank_from_bytes(bank_bytes(bank)).id == bank.id
    assert build_bank(feats[:5], scores[:5], flagged[:5], uris[:5], evidence, **gate).empty  # too few rows


SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def calibration(ckpt, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bank-cal")
    return calibrate(ckpt, SHAPES, id_sample(root / "id", SHAPES), root / "cal")


def _job(model: dict, calibration: str, decision: dict | None = None) -> ScoreJobConfig:
    return ScoreJobConfig.model_validate({
        "input": {"uri": "/lake"}, "output": {"uri": "/out", "embeddings": True, "lake_bank": True},
        "model": model, "classes": {"names": SHAPES}, "decision": decision or {},
        "lake_bank": {"calibration": calibration}})


@pytest.mark.parametrize("case", ["atd", "calibrated-threshold", "another-model", "old-calibration"])
def test_the_banks_evidence_rate_comes_from_a_calibration_that_fits_the_run(case, calibration, ckpt, tmp_path):
    from jobs.scoring_setup import prepare

    cal = json.loads(open(calibration).read())
    model, decision = {"checkpoint": ckpt}, None
    if case == "another-model":
        model = {"architecture": "clipn-tiny", "seed": 7}
    if case == "calibrated-threshold":
        chosen = cal["thresholds"]["atd"][0]
        decision = {"rule": "threshold", "score": "atd", "threshold": chosen["threshold"], "calibration": calibration}
    if case == "old-calibration":  # a calibration.json written before the rules' rates were recorded
        old = tmp_path / "old" / "calibration.json"
        old.parent.mkdir()
        old.write_text(json.dumps({k: v for k, v in cal.items() if k != "id_flag_rates"}))
        calibration = str(old)
    cfg = _job(model, calibration, decision)
    # ATD's rule reads no negative labels: the setup's are off, as in the calibration
    setup, _ = prepare(cfg.model, cfg.classes, cfg.templates, cfg.runtime, Storage(), NegativesConfig(enabled=False))
    report = load_calibration(calibration, Storage())
    images = cal["sample"]["images"]
    if case == "another-model":
        with pytest.raises(CalibrationError, match=r"calibration .*calibration.json .* does not fit this run: model id"):
            bank_evidence(cfg, setup, report)
    elif case == "old-calibration":
        with pytest.raises(CalibrationError, match=r"old/calibration.json .*rerun clipn calibrate"):
            bank_evidence(cfg, setup, report)
    elif case == "atd":
        assert bank_evidence(cfg, setup, report) == Evidence("ood_atd", cal["id_flag_rates"]["atd"], cal["id"], images)
    else:  # the decision itself, at the share of the ID sample its threshold flags
        assert bank_evidence(cfg, setup, report) == Evidence("is_ood", 1 - chosen["kept"], cal["id"], images)


@pytest.mark.parametrize("case", ["decision calibration missing", "bank calibration missing",
                                  "bank calibration not a calibration"])
def test_a_bad_calibration_file_fails_the_scoring_job_before_the_model_is_built(case, tmp_path, monkeypatch):
    from jobs.score import pipeline

    def no_work(*args, **kwargs):  # the model, heads and negative labels (minutes for a real CLIP) come after
        raise AssertionError("the model was prepared before the calibration files were read")

    monkeypatch.setattr(pipeline, "prepare", no_work)
    bad = tmp_path / "cal" / "calibration.json"
    if case == "bank calibration not a calibration":
        bad.parent.mkdir()
        bad.write_text(json.dumps({"thresholds": {}}))
    decision = ({"rule": "threshold", "score": "atd", "threshold": 0.3, "calibration": str(bad)}
                if case.startswith("decision") else {})
    (tmp_path / "lake").mkdir()
    cfg = ScoreJobConfig.model_validate({
        "input": {"uri": str(tmp_path / "lake")},
        "output": {"uri": str(tmp_path / "out"), "embeddings": True, "lake_bank": not case.startswith("decision")},
        "model": {"architecture": "clipn-tiny"}, "classes": {"names": SHAPES}, "decision": decision,
        "lake_bank": {"calibration": None if case.startswith("decision") else str(bad)}})
    with pytest.raises(CalibrationError, match=str(bad)):
        pipeline.run(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
