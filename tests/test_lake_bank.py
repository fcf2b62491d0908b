"""The lake bank: OOD proxies only where ATD's rule says OOD and most of the surest tenth is, and the job's reading
of its rows."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from clipn_core.lake_bank import bank_bytes, bank_from_bytes, build_bank
from clipn_core.scores import ScoreInputs, compute_scores
from clipn_core.storage import Storage
from jobs.score.incremental import bank_evidence, build_lake_bank
from schemas.output import OUTPUT_SCHEMA
from schemas.score_config import DecisionConfig

D, C = 16, 3
SCALE = 30.0


def _world(seed: int = 0):
    """Yes heads, no heads and negatives [., D]: classes on the first axes, their no texts and the negatives apart."""
    eye = torch.eye(D)
    yes, no = eye[:C], F.normalize(eye[C:2 * C] + 0.2 * eye[:C], dim=-1)
    negatives = F.normalize(torch.randn(20, D, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return yes, no, negatives


def _night(n_id: int, n_ood: int, seed: int) -> torch.Tensor:
    """ID images near a yes head, OOD images near a no head (CLIPN's no tower matches them), shuffled by seed."""
    g = torch.Generator().manual_seed(seed)
    yes, no, _ = _world()
    cls = torch.randint(0, C, (n_id + n_ood,), generator=g)
    centre = torch.cat([yes[cls[:n_id]], no[cls[n_id:]]])
    return F.normalize(centre + 0.15 * torch.randn(n_id + n_ood, D, generator=g), dim=-1)


def _staged(tmp_path, feats: torch.Tensor, name: str) -> tuple[str, np.ndarray]:
    """The night's rows as the scoring job stages them (OUTPUT_SCHEMA, float16 embeddings, ATD's score and flag)."""
    yes, no, negatives = _world()
    atd = compute_scores(ScoreInputs(feats, yes, no, SCALE, negatives=negatives), ["atd"])["atd"]
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


def test_a_night_without_ood_builds_no_ood_proxies_and_the_next_night_scores_clipn_neg(tmp_path):
    staged, flagged = _staged(tmp_path, _night(300, 0, seed=1), "id-only")
    assert not flagged.any()  # ATD's rule flags nothing on this night
    bank = bank_from_bytes(bank_bytes(build_lake_bank(staged, Storage(), 300, "ood_atd")))
    # before, the lowest-ATD tenth became 30 rows of OOD proxies whatever they were
    assert len(bank.ood_proxies) == 0 and bank.empty
    assert bank.meta["flagged_ood"] == 0 and bank.meta["ood_rows"] == 0 and bank.meta["ood_proxies"] == 0
    assert bank.meta["empty"].startswith("0 of the ") and bank.meta["evidence"] == "ood_atd"

    yes, no, negatives = _world()
    following = _night(200, 60, seed=2)
    x = ScoreInputs(following, yes, no, SCALE, negatives=negatives, bank=(bank.id_proxies, bank.ood_proxies))
    s = compute_scores(x, ["clipn_neg", "clipn_neg_lake"])
    assert torch.equal(s["clipn_neg_lake"].id_score, s["clipn_neg"].id_score)


def test_ood_proxies_come_only_from_flagged_rows(tmp_path):
    feats = _night(270, 30, seed=3)
    staged, flagged = _staged(tmp_path, feats, "mixed")
    assert 20 <= flagged.sum() <= 40
    bank = build_lake_bank(staged, Storage(), 300, "ood_atd")
    assert not bank.empty and bank.meta["ood_rows"] <= bank.meta["flagged_ood"] and bank.meta["empty"] is None
    assert bank.meta["ood_proxies"] == len(bank.ood_proxies) > 0 and bank.meta["id_proxies"] == len(bank.id_proxies)
    _, no, _ = _world()
    # every OOD proxy sits by a no head (the OOD images), none by a yes head
    assert (bank.ood_proxies @ no.T).max(dim=-1).values.min() > 0.8

    yes, no, negatives = _world()
    following = _night(200, 60, seed=4)
    x = ScoreInputs(following, yes, no, SCALE, negatives=negatives, bank=(bank.id_proxies, bank.ood_proxies))
    s = compute_scores(x, ["clipn_neg", "clipn_neg_lake"])
    base, lake = s["clipn_neg"].id_score, s["clipn_neg_lake"].id_score
    assert not torch.equal(base, lake) and (lake <= base).all()
    assert lake[:200].mean() / base[:200].mean() > lake[200:].mean() / base[200:].mean()  # the OOD rows lose more


def test_flags_on_fewer_than_half_the_surest_tenth_build_no_ood_proxies(tmp_path):
    staged, flagged = _staged(tmp_path, _night(292, 8, seed=5), "rare")
    assert 4 <= flagged.sum() < 15  # enough for a centroid, at the rate of a rule's false positives
    bank = build_lake_bank(staged, Storage(), 300, "ood_atd")
    assert bank.empty and bank.meta["ood_rows_needed"] >= 15 and bank.meta["ood_rows"] < bank.meta["ood_rows_needed"]


def test_the_evidence_is_atds_rule_unless_a_calibrated_threshold_on_a_bank_free_score_decides():
    assert bank_evidence(DecisionConfig()) == "ood_atd"
    assert bank_evidence(DecisionConfig(rule="ctw")) == "ood_atd"
    assert bank_evidence(DecisionConfig(rule="threshold", score="atd", threshold=0.3)) == "is_ood"
    # a threshold on the bank's own score would feed the bank its own verdicts
    assert bank_evidence(DecisionConfig(rule="threshold", score="clipn_neg_lake", threshold=0.3)) == "ood_atd"


def test_the_lake_bank_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 8)).astype(np.float32)
    scores = rng.random(200)
    flagged = scores < 0.2
    uris = [f"s3://b/{i:03d}.jpg" for i in range(200)]
    bank = build_bank(feats, scores, flagged, uris, clusters=8)
    perm = rng.permutation(200)
    shuffled = build_bank(feats[perm], scores[perm], flagged[perm], [uris[i] for i in perm], clusters=8)
    assert bank.id == shuffled.id and len(bank.id_proxies) == len(bank.ood_proxies) == 5  # 20 rows a decile, 4 each
    assert bank_from_bytes(bank_bytes(bank)).id == bank.id
    assert build_bank(feats[:5], scores[:5], flagged[:5], uris[:5]).empty  # too few rows: clipn_neg unchanged
