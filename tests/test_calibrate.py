"""``clipn calibrate``: thresholds from ID images only, a ready decision block, and refusing runs they do not fit."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import clipn_core as cc
from clipn_core.calibration import bootstrap_interval, id_threshold, tail_size
from clipn_core.images import split_preprocessor
from clipn_core.storage import Storage
from jobs.cli import main as cli_main
from jobs.demo.world import World
from jobs.scoring_setup import negative_labels
from schemas.score_config import NegativesConfig

WORLD = World(seed=11)


def test_threshold_keeps_the_target_share_and_names_its_tail():
    scores = np.arange(1, 1001, dtype=np.float64) / 1000  # 0.001 ... 1.0
    threshold, kept, tail = id_threshold(scores, 0.99)
    assert tail == 10 and threshold == pytest.approx(0.011) and kept == pytest.approx(0.99)
    assert (scores >= threshold).mean() >= 0.99 and (scores >= threshold + 1e-9).mean() < 0.99  # the tightest
    assert id_threshold(scores, 0.999)[2] == 1 and tail_size(1000, 0.95) == 50
    ties = np.array([0.2] * 50 + [0.9] * 50)
    assert id_threshold(ties, 0.9)[1] == 1.0  # ties keep more than the target, never fewer
    low, high = bootstrap_interval(scores, 0.99, resamples=200, seed=3)
    assert low <= threshold <= high and (low, high) == bootstrap_interval(scores, 0.99, resamples=200, seed=3)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        id_threshold(scores, 1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny checkpoints and an evaluation Parquet (ID + OOD) on local disk."""
    root = tmp_path_factory.mktemp("calib")
    ckpts = {}
    for seed in (1, 2):
        model, spec = cc.build_clipn("clipn-tiny", seed=seed)
        ckpts[seed] = str(root / f"m{seed}.safetensors")
        cc.save_checkpoint(model, spec, ckpts[seed])
    eval_uri = WORLD.write_parquet(WORLD.eval_table(60, 40), str(root / "eval.parquet"))
    id_only = WORLD.write_parquet(WORLD.calibration_table(80), str(root / "id.parquet"))
    return {"root": root, "ckpt": ckpts, "eval": eval_uri, "id": id_only}


def _calibrate(setup, out, *extra, ckpt=1):
    return cli_main(["calibrate", "--data.kind", "eval", "--data.uri", setup["id"], "--model.checkpoint",
                     setup["ckpt"][ckpt], "--classes.names", json.dumps(list(WORLD.id_shapes)), "--templates", "world",
                     "--output.dir", str(out), "--bootstrap", "50", "--runtime.cache_dir", str(setup["root"] / "cache"),
                     *extra])


def test_calibrate_writes_thresholds_a_decision_block_and_a_report(setup, tmp_path, capsys):
    out = tmp_path / "cal"
    assert _calibrate(setup, out) == 0
    assert "decision.yaml" in capsys.readouterr().out
    cal = json.loads((out / "calibration.json").read_text())
    assert set(cal["thresholds"]) == set(cc.SCORES) and cal["sample"]["images"] == 80
    model, _, model_id = cc.load_checkpoint(setup["ckpt"][1])
    assert cal["model_id"] == model_id and cal["logit_scale"] == pytest.approx(model.logit_scale)
    # the thresholds are those of the sample's own scores, computed by the scoring job's code
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), WORLD.id_shapes, cc.load_templates("world"))
    negatives = negative_labels(model, model_id, heads, NegativesConfig(), Storage({}), str(setup["root"] / "cache"))
    assert cal["negatives_id"] == negatives.id
    scored = cc.BatchScorer(model, heads, negatives=negatives.yes)
    pre = split_preprocessor(model.preprocess_cfg, mode="fast")
    images = pq.read_table(setup["id"])["image"].to_pylist()
    direct = scored.score_pixels(torch.from_numpy(np.stack([pre.decode(b) for b in images])))
    for name, ts in cal["thresholds"].items():
        assert [t["target"] for t in ts] == [0.95, 0.99, 0.999]
        for t in ts:
            assert t["threshold"] == pytest.approx(id_threshold(direct.scores[name], t["target"])[0], rel=1e-5)
            assert t["ci_low"] <= t["threshold"] + 1e-9 and t["ci_high"] >= t["threshold"] - 1e-9
    # and each threshold-free rule's share of the sample it flags OOD (the lake bank's evidence rate)
    assert cal["id_flag_rates"] == {k: pytest.approx(float(v.mean())) for k, v in direct.decisions.items()}
    assert {"ctw", "atd"} <= set(cal["id_flag_rates"])
    decision = yaml.safe_load((out / "decision.yaml").read_text())["decision"]
    atd99 = next(t for t in cal["thresholds"]["atd"] if t["target"] == 0.99)
    assert decision == {"rule": "threshold", "score": "atd", "threshold": atd99["threshold"],
                        "calibration": f"{out}/calibration.json"}
    md = (out / "calibration.md").read_text()
    assert cal["id"] in md and "Unstable" in md  # 80 images cannot carry a 99.9% threshold
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"

    # clipn evaluate applies the calibrated thresholds to labelled ID + OOD images
    report_dir = tmp_path / "report"
    assert cli_main(["evaluate", "--data.uri", setup["eval"], "--model.checkpoint", setup["ckpt"][1],
                     "--classes.names", json.dumps(list(WORLD.id_shapes)), "--templates", "world",
                     "--output.dir", str(report_dir), "--calibration", str(out / "calibration.json"),
                     "--runtime.cache_dir", str(setup["root"] / "cache")]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["calibration"] == cal["id"]
    rows = {(r["score"], r["target"]): r for r in report["calibrated"]}
    assert set(rows) == {(n, t) for n in cc.SCORES for t in (0.95, 0.99, 0.999)}
    assert all(0 <= r["id_flagged_ood"] <= 100 and 0 <= r["ood_flagged_ood"] <= 100 for r in rows.values())


@pytest.mark.slow
def test_the_scoring_job_records_a_fitting_calibration_and_refuses_another(setup, tmp_path, ray_local, capsys):
    cal_dir = tmp_path / "cal"
    assert _calibrate(setup, cal_dir) == 0
    decision = yaml.safe_load((cal_dir / "decision.yaml").read_text())["decision"]
    lake = tmp_path / "lake"
    WORLD.write_lake(str(lake), 6)
    cfg = tmp_path / "score.yaml"
    base = {"input": {"uri": str(lake)}, "output": {"uri": str(tmp_path / "out")},
            "model": {"checkpoint": setup["ckpt"][1]}, "classes": {"names": list(WORLD.id_shapes)},
            "templates": "world", "decision": decision,
            "runtime": {"batch_size": 8, "decode_batch_size": 8, "cache_dir": str(setup["root"] / "cache")}}
    cfg.write_text(yaml.safe_dump(base))
    assert cli_main(["score", "--config", str(cfg)]) == 0
    manifest = json.loads(next((tmp_path / "out").glob("run_date=*/_manifest.json")).read_text())
    calibration_id = json.loads((cal_dir / "calibration.json").read_text())["id"]
    assert manifest["calibration_id"] == calibration_id and manifest["decision"]["threshold"] == decision["threshold"]

    capsys.readouterr()
    other = tmp_path / "never"
    # other negative labels matter to a decision whose score reads them (the atd decision above does not)
    neg = json.loads((cal_dir / "calibration.json").read_text())["thresholds"]["clipn_neg"][0]["threshold"]
    for extra, needle in ((["--model.checkpoint", setup["ckpt"][2]], "model id"),
                          (["--classes.names", '["circle", "square"]'], "class set"),
                          (["--runtime.logit_scale", "7.5"], "logit scale"),
                          (["--decision.threshold", "0.123"], "is not one of"),
                          (["--negatives.count", "5", "--decision.score", "clipn_neg", "--decision.threshold",
                            repr(neg)], "negative labels")):
        code = cli_main(["score", "--config", str(cfg), "--output.uri", str(other), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and needle in err[0], err
        assert not other.exists()


@pytest.mark.parametrize("case, extra, needle", [
    ("empty ID sample", ["--data.kind", "eval", "--data.uri", "OOD_ONLY"], "empty ID sample"),
    ("target outside (0, 1)", ["--targets", "[0.99, 1.0]"], "targets"),
    ("decision target not a target", ["--decision_target", "0.9"], "decision_target"),
])
def test_bad_calibration_inputs_give_one_line_and_write_nothing(setup, tmp_path, capsys, case, extra, needle):
    out = tmp_path / "cal"
    if "OOD_ONLY" in extra:
        extra[extra.index("OOD_ONLY")] = WORLD.write_parquet(WORLD.eval_table(0, 10), str(tmp_path / "ood.parquet"))
    code = _calibrate(setup, out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1 and needle in err[0], err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("differs", ["negatives", "bank"])
@pytest.mark.parametrize("score", [*cc.SCORES, None])
def test_a_calibration_fits_while_what_its_score_does_not_read_changes(score, differs):
    """A nightly lake bank is new every night: a decision on a score that does not read it keeps its calibration;
    one that reads it (or a report over every score) is refused, naming what differs."""
    from types import SimpleNamespace

    from jobs.calibration import check_fits
    from schemas.reports import CalibrationReport

    cal = CalibrationReport.model_construct(id="cal1", model_id="m" * 64, class_set_hash="h", logit_scale=10.0,
                                            negatives_id="neg-a", bank_id="bank-a")
    setup = SimpleNamespace(model_id="m" * 64, heads=SimpleNamespace(class_set_hash="h"), logit_scale=10.0,
                            negatives_id="neg-b" if differs == "negatives" else "neg-a",
                            bank_id="bank-b" if differs == "bank" else "bank-a")
    entry = cc.SCORES[score] if score else None
    reads = entry is None or (entry.needs_negatives if differs == "negatives" else entry.uses_bank)
    if reads:
        with pytest.raises(cc.CalibrationError, match="negative labels" if differs == "negatives" else "lake bank"):
            check_fits(cal, "cal.json", setup, score)
    else:
        check_fits(cal, "cal.json", setup, score)
