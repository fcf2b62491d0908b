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

WORLD = World(seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    model, spec, _ = tiny
    uri = str(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    cc.save_checkpoint(model, spec, uri)
    return uri


def _eval_parquet(path, broken: bool = True, n_id: int = 30, n_ood: int = 18) -> str:
    table = WORLD.eval_table(n_id, n_ood)
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


def test_report_agrees_with_clipn_core_metrics_on_the_same_scores(tmp_path, checkpoint, s3_bucket):
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
])
def test_bad_input_fails_before_writing(tmp_path, checkpoint, capsys, case, extra, message):
    data = str(tmp_path / "missing.parquet") if case == "missing file" else _eval_parquet(
        tmp_path / "eval.parquet", broken=False, n_ood=0 if case == "only ID rows" else 6)
    out = tmp_path / "report"
    assert cli_main(_args(data, checkpoint, str(out), *extra)) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
