"""End to end: the scoring job on a small lake in the loopback S3 server (used exactly like MinIO)."""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
import tarfile
import zlib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipn_core as cc
from clipn_core.errors import DriftAlertError
from clipn_core.images import split_preprocessor
from clipn_core.storage import Storage
from jobs.cli import main as cli_main
from jobs.demo import world
from jobs.score import run
from jobs.scoring_setup import negative_labels
from schemas.manifest import ScoreManifest
from schemas.output import OUTPUT_SCHEMA
from schemas.score_config import NegativesConfig, ScoreJobConfig
from tests import ray_metrics

pytestmark = pytest.mark.slow
CLASSES = ["circle", "square", "triangle"]
DAY = dt.date(2026, 11, 1)


def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _huge_png():
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 90000, 90000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 32)) + chunk(b"IEND", b""))


def _gif():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


GOOD = {f"good_{i:02d}_{s}.jpg": world.encode(world.render(s, c, i, 48))
        for i, (s, c) in enumerate([(s, c) for s in ("circle", "square", "star", "ring") for c in ("red", "blue", "green")])}
# keys that URL handling, globbing and Parquet must all leave exactly as they are
GOOD.update({name: world.encode(world.render("square", "pink", i, 48)) for i, name in enumerate(
    ["odd key #1 ?ü+%20[x]*.jpg", "ünïcödé café.jpg"])})
GOOD_JPEG = next(iter(GOOD.values()))
ODD = {  # name -> (bytes, expected status)
    "bad_truncated.jpg": (GOOD_JPEG[: len(GOOD_JPEG) // 2], "truncated"),
    "bad_zero.jpg": (b"", "empty"),
    "bad_text.jpg": (b"hello, I am text\n", "not_an_image"),
    "bad_huge.png": (_huge_png(), "too_large"),
    "odd_cmyk.jpg": (world.encode(Image.new("RGB", (20, 20), (200, 10, 10)).convert("CMYK")), "ok"),
    "odd_16bit.png": (_png(Image.fromarray(np.full((20, 20), 40000, np.uint16))), "ok"),
    "odd_anim.gif": (_gif(), "ok"),
    "odd_alpha.png": (_png(Image.new("RGBA", (20, 20), (0, 0, 255, 128))), "ok"),
}


@pytest.fixture(scope="module")
def lake(s3_server, ray_local, tmp_path_factory):
    """Bucket with images under lake/, a checkpoint, a manifest and tar shards; returns a dict of URIs."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="lake")
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "skip_instance_cache": True}
    fs = fsspec.filesystem("s3", **opts)
    for name, data in GOOD.items():
        fs.pipe_file(f"lake/images/{name}", data)
    for name, (data, _) in ODD.items():
        fs.pipe_file(f"lake/images/{name}", data)
    fs.pipe_file("lake/images/notes.txt", b"not listed: wrong extension")
    model, spec = cc.build_clipn("clipn-tiny", seed=1)
    with torch.no_grad():  # make the no tower differ from the yes tower, as after training
        g = torch.Generator().manual_seed(2)
        for p in model.no_tower.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model_id = cc.save_checkpoint(model, spec, "s3://lake/models/clipn.safetensors", opts)
    manifest_uris = [f"s3://lake/images/{n}" for n in list(GOOD)[:5]] + ["s3://lake/images/missing.jpg"]
    with fs.open("lake/manifests/tonight.parquet", "wb") as f:
        pq.write_table(pa.table({"key": manifest_uris}), f)
    for shard in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, data in enumerate(list(GOOD.values())[shard * 4: shard * 4 + 4]):
                for member, payload in ((f"{shard:04d}{i:02d}.jpg", data), (f"{shard:04d}{i:02d}.json", b'{"k": 1}')):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        fs.pipe_file(f"lake/shards/{shard:05d}.tar", buf.getvalue())
    return {"endpoint": s3_server, "opts": opts, "model": model, "model_id": model_id, "manifest_uris": manifest_uris}


def _cfg(lake, out, **over):
    data = {
        "input": {"kind": "prefix", "uri": "s3://lake/images/"},
        "output": {"uri": out, "run_date": str(DAY)},
        "model": {"checkpoint": "s3://lake/models/clipn.safetensors"},
        "classes": {"names": CLASSES},
        "templates": "default",
        "storage": {"endpoint_url": lake["endpoint"]},
        "runtime": {"batch_size": 8, "decode_batch_size": 8},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return ScoreJobConfig.model_validate(data)


def _read(lake, uri):
    fs = fsspec.filesystem("s3", **lake["opts"])
    return pads.dataset(uri.removeprefix("s3://"), filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
                        format="parquet", partitioning="hive").to_table()


def _assert_run_metrics(manifest, table) -> dict:
    """The run's metrics on Ray's endpoint: rows by status as the manifest counts them, OOD flags per decision
    column and bytes read as the rows hold them, at least one latency observation per batch of 8 rows
    (runtime.batch_size). Returns the flags counted."""
    flagged = {c: sum(1 for v in table.column(c).to_pylist() if v) for c in ("is_ood", "ood_ctw", "ood_atd")}
    want = {
        "ray_clipn_rows_total": {(("status", k),): float(v) for k, v in manifest.by_status.items()},
        "ray_clipn_rows_flagged_total": {(("decision", k),): float(v) for k, v in flagged.items() if v},
        "ray_clipn_read_bytes_total": {(): float(sum(v for v in table.column("byte_size").to_pylist() if v))},
    }
    series = ray_metrics.wait_for(manifest.run_id, lambda s: all(dict(s.get(k, {})) == v for k, v in want.items()))
    assert {k: dict(series.get(k, {})) for k in want} == want
    assert series["ray_clipn_scorer_batch_seconds_count"][()] >= -(-len(table) // 8)
    return flagged


def test_prefix_job_one_row_per_image_statuses_schema_and_scores(lake):
    out = "s3://lake/out1"
    # the session's cache (CLIPN_CACHE_DIR): the lake model's negative labels are mined once for every test of it
    manifest = run(_cfg(lake, out, output__embeddings=True, runtime__preprocess="exact"))
    fs = fsspec.filesystem("s3", **lake["opts"])
    part = f"lake/out1/run_date={DAY}"
    assert fs.exists(f"{part}/_SUCCESS") and fs.exists(f"{part}/_manifest.json")
    assert not fs.exists("lake/out1/_staging") or not fs.find("lake/out1/_staging")
    files = [p for p in fs.find(part) if p.endswith(".parquet")]
    assert files and all(p.rsplit("/", 1)[-1].startswith("part-") for p in files)
    for p in files:  # every file carries the declared schema, whatever its rows
        with fs.open(p, "rb") as f:
            assert pq.read_schema(f).equals(OUTPUT_SCHEMA, check_metadata=False)

    table = _read(lake, out)
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}
    assert len(table) == len(GOOD) + len(ODD)  # one row per image, notes.txt not listed
    assert sorted(rows) == sorted([*GOOD, *ODD])
    for name, (_, status) in ODD.items():
        assert rows[name]["status"] == status, name
        if status != "ok":
            assert rows[name]["score_atd"] is None and rows[name]["error"]
    assert all(rows[n]["status"] == "ok" for n in GOOD)
    assert manifest.rows == len(table) and manifest.by_status["ok"] == len(GOOD) + 4
    assert manifest.model_id == lake["model_id"]
    assert str(rows["bad_text.jpg"]["run_date"]) == str(DAY)

    # in exact mode, scores equal clipn_core called directly on the same bytes: the library's one-image
    # decode (open_clip's transform) and the job's split decode + device-side normalisation
    model = lake["model"]
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), CLASSES, cc.load_templates("default"))
    tf = cc.image_transform(model.preprocess_cfg)
    names = list(GOOD)
    batch = torch.stack([cc.decode_image(GOOD[n], tf).tensor for n in names])
    # the negative labels the job mined (the shipped lexicon, default settings), from the job's cache
    negatives = negative_labels(model, manifest.model_id, heads, NegativesConfig(), Storage({}), None)
    assert manifest.negatives_id == negatives.id and manifest.negatives_count == len(negatives) == 10_000
    scorer = cc.BatchScorer(model, heads, negatives=negatives.yes)
    direct = scorer(batch)
    assert set(direct.scores) == set(cc.SCORES)
    pre = split_preprocessor(model.preprocess_cfg, mode="exact")
    split = scorer.score_pixels(torch.from_numpy(np.stack([pre.decode(GOOD[n]) for n in names])))
    for i, n in enumerate(names):
        r = rows[n]
        for score in cc.SCORES:
            assert r[f"score_{score}"] == pytest.approx(float(split.scores[score][i]), rel=1e-5, abs=1e-6), (n, score)
            assert r[f"score_{score}"] == pytest.approx(float(direct.scores[score][i]), rel=1e-4, abs=1e-5), (n, score)
        assert r["predicted_class"] == CLASSES[direct.predicted_index[i]]
        assert r["ood_ctw"] == bool(direct.decisions["ctw"][i]) and r["is_ood"] == bool(direct.decisions["atd"][i])
        assert np.allclose(np.array(r["embedding"], dtype=np.float32), direct.embeddings[i], atol=2e-3)
    # the published manifest never carries credentials
    text = fs.cat_file(f"{part}/_manifest.json").decode()
    assert "testing" not in text and json.loads(text)["classes"] == CLASSES

    _assert_run_metrics(manifest, table)


def test_decoding_on_the_scorer_gives_the_same_rows_and_close_scores(lake):
    """decode: device runs the scorer-side decoder (torchvision's decode_jpeg on this CPU, nvJPEG on CUDA): the
    same row and status for every input as CPU decoding, and scores within resampling noise of it."""
    run(_cfg(lake, "s3://lake/out-cpu"))
    run(_cfg(lake, "s3://lake/out-device", runtime__decode="device"))
    cpu = {r["uri"]: r for r in _read(lake, "s3://lake/out-cpu").to_pylist()}
    device = {r["uri"]: r for r in _read(lake, "s3://lake/out-device").to_pylist()}
    assert sorted(cpu) == sorted(device) and len(cpu) == len(GOOD) + len(ODD)
    for uri, r in cpu.items():
        assert device[uri]["status"] == r["status"], uri
        if r["status"] == "ok":
            assert device[uri]["score_mcm"] == pytest.approx(r["score_mcm"], abs=0.02), uri


def test_rerun_replaces_the_partition_and_skip_scored(lake):
    out = "s3://lake/out2"
    first = run(_cfg(lake, out))
    second = run(_cfg(lake, out))
    table = _read(lake, out)
    assert len(table) == first.rows == second.rows  # not doubled
    assert set(table.column("run_id").to_pylist()) == {second.run_id}
    # the night's aggregates (Ray, one partial per block) are those of its published rows (Arrow, streamed)
    from jobs.history.read import parquet_nights
    from schemas.manifest import NightAggregates

    raw = json.loads(fsspec.filesystem("s3", **lake["opts"]).cat_file(f"lake/out2/run_date={DAY}/_manifest.json"))
    recorded = NightAggregates.model_validate(raw["aggregates"])
    [night] = parquet_nights(out, Storage({**lake["opts"]}))
    assert recorded == second.aggregates == night.aggregates
    assert recorded.by_status == second.by_status and recorded.ood_share == second.ood_rate["is_ood"]
    assert sum(c.ok for c in recorded.by_class.values()) == second.by_status["ok"]
    assert recorded.quantiles["atd"] == pytest.approx(
        np.quantile(np.array([v for v in table.column("score_atd").to_pylist() if v is not None]),
                    recorded.quantile_levels, method="inverted_cdf").tolist())
    assert second.alerts is None  # no alerts: section

    fs = fsspec.filesystem("s3", **lake["opts"])
    fs.pipe_file("lake/images/new_tonight.jpg", world.encode(world.render("triangle", "pink", 99, 48)))
    fs.pipe_file("lake/images/new_broken.jpg", b"not an image either\n")
    try:
        # alerts with fail: the night is published, its manifest names the findings, and then the run fails
        with pytest.raises(DriftAlertError, match="error_share"):
            run(_cfg(lake, out, output__run_date=str(DAY + dt.timedelta(days=1)), output__skip_scored=True,
                     alerts={"min_rows": 1, "fail": True}))
        nxt = ScoreManifest.model_validate_json(fs.cat_file(f"lake/out2/run_date={DAY + dt.timedelta(days=1)}/"
                                                            "_manifest.json"))
        new = _read(lake, f"{out}/run_date={DAY + dt.timedelta(days=1)}")
        # only tonight's new objects are scored: night 1's failures are all permanent and their objects unchanged
        assert {u.rsplit("/", 1)[-1] for u in new.column("uri").to_pylist()} == {"new_tonight.jpg", "new_broken.jpg"}
        assert nxt.skipped_already_scored == len(GOOD) + len(ODD) and (nxt.retried, nxt.healed) == (0, 0)
        # alerts: half the night failed, so its non-ok share left the band of the night before
        assert any(a.startswith(f"{DAY + dt.timedelta(days=1)}: error_share") for a in nxt.alerts), nxt.alerts
        # a later night where everything is already scored publishes an empty partition, not an error
        empty_day = DAY + dt.timedelta(days=2)
        with fs.open("lake/manifests/done.parquet", "wb") as f:
            pq.write_table(pa.table({"uri": lake["manifest_uris"][:5]}), f)
        none_left = run(_cfg(lake, out, input={"kind": "manifest", "uri": "s3://lake/manifests/done.parquet"},
                             output__run_date=str(empty_day), output__skip_scored=True))
        assert none_left.rows == 0 and none_left.by_status == {}
        assert none_left.aggregates.rows == 0 and none_left.aggregates.ood_share is None
        assert fs.exists(f"lake/out2/run_date={empty_day}/_SUCCESS")
    finally:
        fs.rm(["lake/images/new_tonight.jpg", "lake/images/new_broken.jpg"])


def test_manifest_and_tar_inputs(lake):
    m = run(_cfg(lake, "s3://lake/out3", input={"kind": "manifest", "uri": "s3://lake/manifests/tonight.parquet", "uri_column": "key"}))
    table = _read(lake, "s3://lake/out3")
    assert sorted(table.column("uri").to_pylist()) == sorted(lake["manifest_uris"])
    status = dict(zip(table.column("uri").to_pylist(), table.column("status").to_pylist()))
    assert status["s3://lake/images/missing.jpg"] == "read_error" and m.by_status == {"ok": 5, "read_error": 1}

    # a decision that flags every ok row (mcm <= 1), so the flag counter has something to count
    m = run(_cfg(lake, "s3://lake/out4", input={"kind": "tar", "uri": "s3://lake/shards/"},
                 decision={"rule": "threshold", "score": "mcm", "threshold": 2.0}))
    table = _read(lake, "s3://lake/out4")
    uris = sorted(table.column("uri").to_pylist())
    assert len(uris) == 8 and uris[0] == "s3://lake/shards/00000.tar#000000.jpg"
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert _assert_run_metrics(m, table)["is_ood"] == 8  # tar members' bytes, flags of a run that has some


def test_only_errors_still_typed_and_readable(lake, tmp_path):
    lake_dir = tmp_path / "bad"
    lake_dir.mkdir()
    for name, (data, status) in ODD.items():
        if status != "ok":
            (lake_dir / name).write_bytes(data)
    out = tmp_path / "out"
    cfg = _cfg(lake, str(out), input={"kind": "prefix", "uri": str(lake_dir)})
    run(cfg)
    run(_cfg(lake, str(out), output__run_date="2026-11-02"))  # a second partition with scores
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert table.schema.field("score_atd").type == pa.float32()
    assert len(table) == 4 + len(GOOD) + len(ODD)


def test_bad_config_fails_before_any_work(lake, tmp_path, capsys):
    out = tmp_path / "never"
    code = cli_main(["score", "--input.uri", str(tmp_path), "--output.uri", str(out),
                     "--model.checkpoint", "x.safetensors", "--classes.names", "[a, b]", "--decision.rule", "maybe"])
    assert code == 2 and "decision.rule" in capsys.readouterr().err
    code = cli_main(["score", "--input.uri", str(tmp_path), "--output.uri", str(out), "--model.architecture", "clipn-tiny",
                     "--classes.names", "[a, a]"])
    assert code == 1 and "duplicated class" in capsys.readouterr().err
    code = cli_main(["score", "--input.uri", str(tmp_path / "nope"), "--output.uri", str(out),
                     "--model.architecture", "clipn-tiny", "--classes.names", "[a, b]", "--set", "runtime.pool_size=1"])
    assert code == 1 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["score", "--help"])
    assert "--runtime.batch_size" in capsys.readouterr().out
    assert not out.exists()


# ------------------------------------------------------------------ odd lakes and odd manifests

def _tiny_cfg(input_cfg: dict, out: str, endpoint: str | None = None) -> ScoreJobConfig:
    """A job over a randomly initialised clipn-tiny without negatives: the fastest full run."""
    return ScoreJobConfig.model_validate({
        "input": input_cfg, "output": {"uri": out, "run_date": str(DAY)},
        "model": {"architecture": "clipn-tiny"}, "classes": {"names": CLASSES},
        "negatives": {"enabled": False}, "storage": {"endpoint_url": endpoint},
        "runtime": {"batch_size": 8, "decode_batch_size": 8},
    })


def test_a_local_lake_with_entries_the_listing_cannot_use(ray_local, tmp_path):
    """The broken-symlink case and its siblings: the good images are scored, a dangling link gets its read_error
    row, what cannot be listed is counted by reason in the manifest, and no staging is left behind."""
    import os

    root = tmp_path / "lake"
    (root / "sub").mkdir(parents=True)
    (root / "ok.jpg").write_bytes(GOOD_JPEG)
    (root / "sub" / "ok2.jpg").write_bytes(GOOD_JPEG)
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere" / "gone.jpg")
    open(os.path.join(os.fsencode(root), b"caf\xe9.jpg"), "wb").close()  # a Latin-1 name: not UTF-8
    os.mkfifo(root / "pipe.jpg")  # its read would block forever
    (root / "notes.txt").write_text("x")
    out = tmp_path / "out"
    manifest = run(_tiny_cfg({"kind": "prefix", "uri": str(root)}, str(out)))
    table = pq.read_table(out / f"run_date={DAY}")
    status = dict(zip(table.column("uri").to_pylist(), table.column("status").to_pylist()))
    assert status == {str(root / "ok.jpg"): "ok", str(root / "sub" / "ok2.jpg"): "ok",
                      str(root / "gone.jpg"): "read_error"}
    assert manifest.inputs_listed == 3 and manifest.rows == 3
    assert manifest.left_out == {"extension": 1, "watermark": 0, "unencodable_name": 1, "unreadable_folder": 0,
                                 "not_a_file": 1, "duplicate_member": 0}
    assert not (out / "_staging").exists()


def test_malformed_and_foreign_manifest_lines_get_typed_rows_and_no_fetch(ray_local, s3_bucket, tmp_path):
    """One row per manifest line, the line's value kept (null as ""), status invalid_uri with the reason, and no
    request for any of them (observed at a loopback HTTP server and at a proxy in front of S3)."""
    from tests.fault_proxy import FaultProxy
    from tests.test_uri_scope import recording_http_server

    bucket, opts = s3_bucket
    fsspec.filesystem("s3", **opts).pipe_file(f"{bucket}/a.jpg", GOOD_JPEG)
    image = tmp_path / "a.jpg"
    image.write_bytes(GOOD_JPEG)
    proxy = FaultProxy(opts["client_kwargs"]["endpoint_url"], rate=0.0)
    endpoint = proxy.start()
    try:
        with recording_http_server() as (base, seen):
            lines = [None, "", "   ", "a.jpg", "./a.jpg", f"{base}/latest/meta-data/a.jpg", f"s3://{bucket}/a.jpg",
                     f"file://host{image}", f"simplecache::{image}", "http://[::1/a.jpg", str(image), str(image)]
            pq.write_table(pa.table({"uri": pa.array(lines, pa.string())}), tmp_path / "manifest.parquet")
            manifest = run(_tiny_cfg({"kind": "manifest", "uri": str(tmp_path / "manifest.parquet")},
                                     str(tmp_path / "out"), endpoint))
    finally:
        proxy.stop()
    table = pq.read_table(tmp_path / "out" / f"run_date={DAY}").sort_by("uri")
    rows = sorted(zip(table.column("uri").to_pylist(), table.column("status").to_pylist(),
                      table.column("error").to_pylist()))
    assert len(rows) == len(lines) == manifest.rows
    assert sorted(r[0] for r in rows) == sorted("" if v is None else v for v in lines)
    assert [r[1] for r in rows].count("ok") == 2 and manifest.by_status == {"ok": 2, "invalid_uri": len(lines) - 2}
    errors = {r[0]: r[2] for r in rows if r[1] == "invalid_uri"}
    assert "null uri" in " ".join(errors.values()) and "relative" in errors["a.jpg"]
    assert "outside the input's store" in errors[f"s3://{bucket}/a.jpg"]
    assert seen == [] and not [k for k in proxy.seen if k[1].endswith("/a.jpg")]


@pytest.mark.parametrize("lines, by_status", [
    (b"\xef\xbb\xbfuri\r\n{image}\r\n\r\n{image}\r\n", {"ok": 2, "invalid_uri": 1}),  # BOM, CRLF, a blank line
    (b"uri\n", {}),  # a header and no line: an empty night
])
def test_a_csv_manifest_gives_one_row_per_line_blank_or_not(ray_local, tmp_path, lines, by_status):
    image = tmp_path / "a.jpg"
    image.write_bytes(GOOD_JPEG)
    (tmp_path / "m.csv").write_bytes(lines.replace(b"{image}", str(image).encode()))
    manifest = run(_tiny_cfg({"kind": "manifest", "uri": str(tmp_path / "m.csv")}, str(tmp_path / "out")))
    assert manifest.by_status == by_status and manifest.rows == manifest.inputs_listed == sum(by_status.values())
