"""``clipn evaluate``: report figures agree with clipn_core's metrics on the same scores; bad input fails first."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipn_core as cc
from clipn_core.images import load_rgb, split_preprocessor
from clipn_core.metrics import ood_metrics, top1_accuracy
from clipn_core.storage import filesystem
from jobs.cli import main as cli_main
from jobs.demo.world import World
from jobs.evaluation import evaluate

WORLD = World(seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    model, spec, _ = tiny
    uri = str(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    cc.save_checkpoint(model, spec, uri)
    return uri


def _eval_parquet(path, broken: bool = True, n_id: int = 30, n_ood: int = 18) -> str:
    table = WORLD.eval_table(n_id, n_ood).drop_columns(["split"])  # the tests below add their own splits
    if broken:  # one empty and one truncated image: left out and counted, never a crash
        extra = pa.table({"image": [b"", table["image"][0].as_py()[:40]], "caption": ["", ""],
                          "shape": ["circle", "circle"], "colour": ["red", "red"], "is_id": [True, False]})
        table = pa.concat_tables([table, extra])
    pq.write_table(table, path)
    return str(path)


def _args(data_uri: str, checkpoint: str, out: str, *extra: str) -> list[str]:
    return ["evaluate", "--data.uri", data_uri, "--model.checkpoint", checkpoint,
            "--classes.names", json.dumps(list(WORLD.id_shapes)), "--templates", "world", "--output.dir", out,
            "--runtime.batch_size", "16", "--data.label_column", "shape", *extra]


def test_report_agrees_with_clipn_core_metrics_on_the_same_scores(tmp_path, checkpoint, s3_bucket, capsys):
    bucket, opts = s3_bucket
    local = _eval_parquet(tmp_path / "eval.parquet")
    fs, _ = filesystem(f"s3://{bucket}/eval/eval.parquet", opts)
    fs.put(local, f"{bucket}/eval/eval.parquet")
    out = tmp_path / "report"
    endpoint = opts["client_kwargs"]["endpoint_url"]
    assert cli_main(_args(f"s3://{bucket}/eval/eval.parquet", checkpoint, str(out),
                          "--storage.endpoint_url", endpoint)) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["data"]["undecodable"] == 2 and report["data"]["id"] == 30 and report["data"]["ood"] == 18
    # no split column: no splits in the report, and the printed summary stays one line
    assert "splits" not in report and len(capsys.readouterr().out.strip().splitlines()) == 1
    assert set(report["scores"]) == set(cc.SCORES)
    assert set(report["decisions"]) == {n for n, s in cc.SCORES.items() if s.threshold_free}

    # the same scores computed here, straight from clipn_core, on the decodable rows
    model, _, _ = cc.load_checkpoint(checkpoint)
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), WORLD.id_shapes, cc.load_templates("world"))
    table = pq.read_table(local)
    pre = split_preprocessor(model.preprocess_cfg)
    rows = [i for i, b in enumerate(table["image"].to_pylist()) if not isinstance(load_rgb(b), cc.DecodeError)]
    pixels = np.stack([pre.to_uint8(load_rgb(table["image"][i].as_py())[0]) for i in rows])
    direct = cc.BatchScorer(model, heads)(pre.normalize(torch.from_numpy(pixels)))
    is_id = np.array(table["is_id"].to_pylist())[rows]
    for name, s in direct.scores.items():
        expected = ood_metrics(s[is_id], s[~is_id]).as_dict()
        for k, v in expected.items():
            assert report["scores"][name][k] == pytest.approx(v, abs=1e-6), (name, k)
    for name, d in direct.decisions.items():
        assert report["decisions"][name]["id_flagged_ood"] == pytest.approx(100 * d[is_id].mean())
        assert report["decisions"][name]["ood_flagged_ood"] == pytest.approx(100 * d[~is_id].mean())
    labels = np.array([WORLD.id_shapes.index(s) if s in WORLD.id_shapes else -1 for s in table["shape"].to_pylist()])[rows]
    assert report["id_accuracy"] == pytest.approx(top1_accuracy(direct.predicted_index[is_id], labels[is_id]))

    per_image = pq.read_table(out / "scores.parquet")
    assert per_image["row"].to_pylist() == rows
    np.testing.assert_allclose(per_image["score_atd"].to_numpy(), direct.scores["atd"], rtol=1e-6)
    md = (out / "report.md").read_text()
    for name in cc.SCORES:
        assert f"| {name} | {report['scores'][name]['auroc']:.2f} |" in md
    for png in ("roc.png", "histograms.png"):
        assert Image.open(io.BytesIO((out / png).read_bytes())).format == "PNG"


@pytest.mark.parametrize("case, extra, message", [
    ("no label column", ["--data.label_column", "species"], "data.label_column"),
    ("label not a class", ["--classes.names", '["circle", "square"]'], "not in the class list"),
    ("only ID rows", [], "needs both ID and OOD"),
    ("missing file", [], "does not exist"),
    ("missing calibration", ["--calibration", "/nonexistent/calibration.json"],
     "calibration /nonexistent/calibration.json: not found"),
])
def test_bad_input_fails_before_writing(tmp_path, checkpoint, capsys, monkeypatch, case, extra, message):
    data = str(tmp_path / "missing.parquet") if case == "missing file" else _eval_parquet(
        tmp_path / "eval.parquet", broken=False, n_ood=0 if case == "only ID rows" else 6)
    out = tmp_path / "report"

    def no_work(*args, **kwargs):  # bad input is refused before the model, heads and negative labels are built
        raise AssertionError("the model was prepared before the input was checked")

    monkeypatch.setattr(evaluate, "prepare", no_work)
    assert cli_main(_args(data, checkpoint, str(out), *extra)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()  # not even an empty folder: the output is probed after the input checks


def test_split_column_reports_each_ood_split_against_all_id(tmp_path, checkpoint, capsys):
    table = pq.read_table(_eval_parquet(tmp_path / "plain.parquet", n_id=12, n_ood=9))  # then 1 broken ID + 1 OOD
    split = [None if ok else ("far" if i % 3 else "near") for i, ok in enumerate(table["is_id"].to_pylist())]
    split[0] = "far"  # an ID row's split is ignored: it stays ID, in every split's comparison
    pq.write_table(table.append_column("split", pa.array(split, pa.string())), tmp_path / "split.parquet")
    out = tmp_path / "report"
    assert cli_main(_args(str(tmp_path / "split.parquet"), checkpoint, str(out), "--data.split_column", "split")) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    per_image = pq.read_table(out / "scores.parquet")
    is_id = per_image["is_id"].to_numpy()
    kept_split = np.array(per_image["split"].to_pylist(), dtype=object)
    assert list(report["splits"]) == ["near", "far"]  # the first OOD row (12) is near: order of first appearance
    for name, got in report["splits"].items():
        ood = ~is_id & (kept_split == name)
        assert got["ood"] == int(ood.sum()) > 0 and report["splits"]["near"]["ood"] + report["splits"]["far"]["ood"] \
            == report["data"]["ood"]
        assert set(got["scores"]) == set(cc.SCORES)
        for score in cc.SCORES:
            s = per_image[f"score_{score}"].to_numpy()
            for k, v in ood_metrics(s[is_id], s[ood]).as_dict().items():
                assert got["scores"][score][k] == pytest.approx(v, abs=1e-6), (name, score, k)
        assert f"{name} AUROC | {name} FPR95" in printed
        atd = got["scores"]["atd"]
        assert "| atd |" in printed and f"{atd['auroc']:.2f} | {atd['fpr95']:.2f}" in printed
    assert "near AUROC" in (out / "report.md").read_text()


def test_ood_rows_without_a_split_are_refused(tmp_path, checkpoint, capsys):
    table = pq.read_table(_eval_parquet(tmp_path / "plain.parquet", broken=False, n_ood=6))
    split = ["near" if not ok else None for ok in table["is_id"].to_pylist()]
    split[-1] = ""
    pq.write_table(table.append_column("split", pa.array(split, pa.string())), tmp_path / "split.parquet")
    out = tmp_path / "report"
    assert cli_main(_args(str(tmp_path / "split.parquet"), checkpoint, str(out), "--data.split_column", "split")) == 1
    assert "data.split_column" in capsys.readouterr().err
    assert not out.exists()
