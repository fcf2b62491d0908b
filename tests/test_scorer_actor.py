"""The scorer actor's per-batch work (jobs.score.scorer.Scoring) without Ray: its vectorised rows equal the
library's scores row by row, calls running at once (Ray Data's max_concurrent_calls_per_actor) change no row, and
with decode: device the read tasks decode what the device decoder does not take, with the CPU path's statuses."""

from __future__ import annotations

import copy
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipn_core as cc
from clipn_core.device_decode import DeviceDecoder, orient
from clipn_core.images import SplitPreprocessor, split_preprocessor
from clipn_core.storage import Storage
from jobs.score.scorer import Scoring
from schemas.output import OUTPUT_SCHEMA, score_column
from schemas.score_config import DecisionConfig

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def parts(tiny):
    """(model, heads, negatives) for a scorer of the tiny model with every score computable."""
    model, _, tokenizer = tiny
    heads = cc.build_class_heads(model, tokenizer, CLASSES, ("a photo of a {}.",))
    negatives = F.normalize(torch.randn(40, heads.yes.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    return model, heads, negatives


def _scoring(parts, embeddings=True, mode="exact", decision=None, device="cpu") -> Scoring:
    model, heads, negatives = parts
    if device != "cpu":  # the session's tiny model stays on the CPU for the other tests
        model = copy.deepcopy(model)
    scorer = cc.BatchScorer(model, heads, device, negatives=negatives, negative_groups=4)
    decoder = DeviceDecoder(split_preprocessor(model.preprocess_cfg, mode=mode), device)
    return Scoring(scorer, decoder, heads, decision or DecisionConfig(), "model-id", "run-id", embeddings)


def _pixel_batch(n: int, side: int, bad: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)
    status = np.array(["truncated" if i in bad else "ok" for i in range(n)], dtype=object)
    pixels[list(bad)] = 0
    pixels.setflags(write=False)  # as Ray hands batches over from its object store
    return {"uri": np.array([f"s3://lake/{i}.jpg" for i in range(n)], dtype=object),
            "byte_size": np.array([-1 if i in bad else 1000 + i for i in range(n)], dtype=np.int64),
            "status": status, "error": np.array(["cut short" if i in bad else "" for i in range(n)], dtype=object),
            "pixels": pixels}


def _without_time(table: pa.Table) -> list[dict]:
    return table.drop_columns(["scored_at"]).to_pylist()


@pytest.mark.parametrize("bad", [(), (1, 4)], ids=["all-ok", "two-failed"])
def test_rows_equal_the_batch_scorer_row_by_row(parts, bad):
    scoring = _scoring(parts, decision=DecisionConfig(rule="threshold", score="mcm", threshold=0.34))
    side = scoring.device_decoder.side
    batch = _pixel_batch(6, side, bad)
    table = scoring(batch)
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == 6
    ok = [i for i in range(6) if i not in bad]
    want = scoring.scorer.score_pixels(torch.from_numpy(batch["pixels"][ok].copy()))
    rows = table.to_pylist()
    for j, i in enumerate(ok):
        r = rows[i]
        assert (r["status"], r["error"], r["byte_size"]) == ("ok", None, 1000 + i)
        assert r["predicted_index"] == want.predicted_index[j]
        assert r["predicted_class"] == CLASSES[want.predicted_index[j]]
        assert r["predicted_prob"] == np.float32(want.predicted_prob[j])
        for name, values in want.scores.items():  # every score, exactly
            assert r[score_column(name)] == np.float32(values[j]), name
        for name, flags in want.decisions.items():
            assert r[f"ood_{name}"] == bool(flags[j]), name
        assert r["is_ood"] == bool(want.scores["mcm"][j] < 0.34)
        assert r["embedding"] == want.embeddings[j].astype(np.float16).tolist()
        assert (r["model_id"], r["run_id"], r["class_set_hash"]) == ("model-id", "run-id", parts[1].class_set_hash)
    for i in bad:
        r = rows[i]
        assert (r["status"], r["error"], r["byte_size"]) == ("truncated", "cut short", None)
        assert all(r[f.name] is None for f in OUTPUT_SCHEMA if f.name.startswith(("score_", "ood_", "predicted_")))
        assert r["embedding"] is None and r["is_ood"] is None
    assert len(set(table.column("scored_at").to_pylist())) == 1


def test_without_embeddings_the_column_is_null(parts):
    table = _scoring(parts, embeddings=False)(_pixel_batch(3, _side(parts), ()))
    assert table.column("embedding").null_count == 3 and table.column("score_mcm").null_count == 0


def _side(parts) -> int:
    return split_preprocessor(parts[0].preprocess_cfg).size[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_calls_running_at_once_change_no_row_and_no_score(parts, device):
    """Ray Data runs up to max_concurrent_calls_per_actor calls of one actor in threads (on CUDA each on a stream
    of its own): the rows of each batch are those of the same batch scored alone."""
    scoring = _scoring(parts, device=device)
    batches = [_pixel_batch(5, _side(parts), (2,) if k % 2 else (), seed=k) for k in range(6)]
    alone = [_without_time(scoring(b)) for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = [_without_time(t) for t in pool.map(scoring, batches)]
    assert together == alone


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def _lake(folder) -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    png = io.BytesIO()
    _photo(70, 50, 3).save(png, format="PNG")
    files = {"a.jpg": _jpeg(_photo(90, 60, 0)), "b.jpg": _jpeg(_photo(90, 60, 1)), "c.jpg": _jpeg(_photo(50, 80, 2)),
             "rotated.jpg": _jpeg(_photo(90, 60, 4), exif=exif.tobytes()), "d.png": png.getvalue(),
             "cmyk.jpg": _jpeg(_photo(40, 40, 5).convert("CMYK")), "text.jpg": b"plain text",
             "cut.jpg": _jpeg(_photo(90, 60, 6))[:400]}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_read_tasks_decode_what_the_device_does_not_take_with_the_cpu_statuses(parts, tmp_path):
    # imported here: jobs.score.decode imports Ray, which the GPU machine that runs this file's gpu tests lacks
    from jobs.score.decode import DecodeSettings, read_decode_batch

    model = parts[0]
    files = _lake(tmp_path)
    uris = np.array([str(tmp_path / name) for name in files], dtype=object)

    def read(decode):
        return read_decode_batch({"uri": uris}, Storage({}), DecodeSettings(model.preprocess_cfg, "fast", decode,
                                                                            64_000_000), concurrency=4)

    cpu, device = read("cpu"), read("device")
    assert device["status"].tolist() == cpu["status"].tolist()
    assert device["status"].tolist() == ["ok"] * 6 + ["not_an_image", "truncated"]
    # plain JPEGs travel encoded with their header; the PNG and the CMYK JPEG arrive as the CPU path's pixels
    on_device = {name: bool(h[0]) for name, h in zip(files, device["header"])}
    assert on_device == {"a.jpg": True, "b.jpg": True, "c.jpg": True, "rotated.jpg": True, "d.png": False,
                         "cmyk.jpg": False, "text.jpg": False, "cut.jpg": False}
    assert device["header"][3].tolist() == [90, 60, 6] and device["data"][0] == files["a.jpg"]
    side = _side(parts)
    for i in (4, 5):
        raw = np.frombuffer(device["data"][i], dtype=np.uint8).reshape(3, side, side)
        assert np.array_equal(raw, cpu["pixels"][i])

    scoring = _scoring(parts, mode="fast")
    rows_cpu, rows_device = scoring(cpu).to_pylist(), scoring(device).to_pylist()
    for a, b in zip(rows_cpu, rows_device):
        assert (a["uri"], a["status"], a["error"], a["byte_size"]) == (b["uri"], b["status"], b["error"], b["byte_size"])
        if a["status"] == "ok":  # the device resize is within 2 grey levels of the CPU one; the others are equal
            same = a["uri"].endswith(("d.png", "cmyk.jpg"))
            assert b["score_mcm"] == (a["score_mcm"] if same else pytest.approx(a["score_mcm"], abs=0.02)), a["uri"]
        else:
            assert b["score_mcm"] is None


def test_rows_the_read_task_decoded_before_jpeg_rows_keep_their_own_scores(parts, tmp_path):
    """Device path, pixels the read task decoded (PNGs) coming before and between JPEGs the device decodes: each
    row's scores and embedding are those of its image scored alone (the batch goes back to row order)."""
    from jobs.score.decode import DecodeSettings, read_decode_batch
    model = parts[0]
    names = []
    for i, kind in enumerate(["png", "jpg", "png", "jpg", "jpg", "png"]):
        img, path = _photo(90 + 7 * i, 60 + 5 * i, i), tmp_path / f"{i}.{kind}"
        img.save(path, format="PNG" if kind == "png" else "JPEG", quality=92)
        names.append(str(path))
    batch = read_decode_batch({"uri": np.array(names, dtype=object)}, Storage({}),
                              DecodeSettings(model.preprocess_cfg, "fast", "device", 64_000_000), concurrency=2)
    assert [bool(h[0]) for h in batch["header"]] == [False, True, False, True, True, False]
    scoring = _scoring(parts, mode="fast")
    together = scoring(batch).to_pylist()
    for i in range(len(names)):
        alone = scoring({k: v[i:i + 1] for k, v in batch.items()}).to_pylist()[0]
        assert together[i]["embedding"] == alone["embedding"], names[i]  # float16: batch size changes no bit
        assert together[i]["score_mcm"] == pytest.approx(alone["score_mcm"], rel=1e-5), names[i]


def test_read_task_pixels_of_a_non_square_model_size_reach_the_scorer():
    """Device path for a model whose input is not square: the device takes no JPEG (its resize is square-only), so
    every ok row is the read task's pixels at the preprocessor's size, batched as they are."""
    cfg = {"size": (32, 24), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    pre = split_preprocessor(cfg, mode="fast")
    scoring = Scoring.__new__(Scoring)  # only the decode step: no model needed
    scoring.device_decoder = DeviceDecoder(pre, "cpu")
    png = io.BytesIO()
    _photo(50, 40, 0).save(png, format="PNG")
    pixels = pre.decode(png.getvalue(), 64_000_000)
    batch = {"status": np.array(["ok", "truncated", "ok"], dtype=object), "error": np.array(["", "cut", ""], dtype=object),
             "data": np.array([pixels.tobytes(), b"", pixels.tobytes()], dtype=object),
             "header": np.zeros((3, 3), np.int32)}
    ok, got, status, _ = scoring._decoded(batch)
    assert ok.tolist() == [True, False, True] and got.shape == (2, 3, 32, 24)
    assert torch.equal(got[1], torch.from_numpy(pixels)) and status.tolist() == ["ok", "truncated", "ok"]


def test_one_resize_per_group_equals_one_image_at_a_time():
    cfg = {"size": (64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    decoder = DeviceDecoder(SplitPreprocessor(cfg, mode="fast"), "cpu")
    images = [torch.from_numpy(np.asarray(_photo(90, 60, s))).permute(2, 0, 1) for s in range(4)]
    images.append(orient(images[0], 6))  # a transposed view, as EXIF orientation leaves it
    groups = {(60, 90): images[:4], (90, 60): images[4:]}
    for group in groups.values():
        together = decoder.resize_crop(group)
        for k, x in enumerate(group):
            assert torch.equal(together[k], decoder.resize_crop([x])[0])
    # a batch of mixed sizes comes back in input order
    datas = [_jpeg(_photo(90, 60, 0)), _jpeg(_photo(50, 80, 2)), _jpeg(_photo(90, 60, 1))]
    planned = decoder.decode_planned(datas, np.array([[90, 60, 1], [50, 80, 1], [90, 60, 1]]))
    assert planned.rows == [0, 1, 2] and planned.on_device == 3 and not planned.errors
    for k, d in enumerate(datas):
        assert torch.equal(planned.pixels[k], decoder([d]).pixels[0])


def test_actor_concurrency_defaults_and_pool_bounds():
    from pydantic import ValidationError

    from schemas.score_config import RuntimeConfig

    assert RuntimeConfig().scorer_concurrency() == 1  # no GPU: calls would share the same cores
    assert RuntimeConfig(gpus_per_actor=1).scorer_concurrency() == 3
    assert RuntimeConfig(gpus_per_actor=1, compile=True).scorer_concurrency() == 1
    assert RuntimeConfig(actor_concurrency=2).scorer_concurrency() == 2
    with pytest.raises(ValidationError, match="pool_max_size"):
        RuntimeConfig(pool_size=4, pool_max_size=2)
