"""The demo world: deterministic for a seed, held-out shapes only outside the ID class list, a far-OOD split."""

from __future__ import annotations

import pyarrow.parquet as pq

import clipn_core as cc
from jobs.demo import world


def test_same_seed_same_bytes_other_seed_other_bytes():
    a, b, c = world.World(seed=1), world.World(seed=1), world.World(seed=2)
    assert a.pairs_table(20).equals(b.pairs_table(20))
    assert a.eval_table(5, 5).equals(b.eval_table(5, 5))
    assert not a.pairs_table(20).equals(c.pairs_table(20))
    assert list(a.samples("lake", 10)) != list(a.samples("pairs", 10))  # splits are independent streams


def test_pairs_cover_every_shape_and_eval_sets_are_labelled():
    w = world.World(seed=0)
    pairs = w.pairs_table(400)
    assert set(pairs.column("shape").to_pylist()) == set(world.SHAPES)  # held-out shapes appear in training
    assert len(set(pairs.column("caption").to_pylist())) > 100          # varied caption styles
    ev = w.eval_table(30, 20)
    rows = ev.to_pylist()
    assert [r["is_id"] for r in rows] == [True] * 30 + [False] * 20
    assert all((r["shape"] in w.id_shapes) == r["is_id"] for r in rows)
    assert set(w.ood_shapes).isdisjoint(w.id_shapes) and len(w.id_shapes) + len(w.ood_shapes) == 8
    assert set(ev.column("split").to_pylist()) == {"id", "near"}  # no far images unless asked for
    assert len(world.SHAPES) >= 8 and len(world.COLOURS) >= 8


def test_the_far_split_is_labelled_deterministic_and_unlike_any_shape():
    import io

    import numpy as np
    from PIL import Image

    w = world.World(seed=0)
    ev = w.eval_table(4, 3, 10)
    assert ev.equals(world.World(seed=0).eval_table(4, 3, 10))
    rows = ev.to_pylist()
    assert [r["split"] for r in rows] == ["id"] * 4 + ["near"] * 3 + ["far"] * 10
    assert [r["is_id"] for r in rows] == [True] * 4 + [False] * 13
    far = rows[7:]
    assert {r["shape"] for r in far} == set(world.FAR_KINDS) and not set(world.FAR_KINDS) & set(world.SHAPES)
    # a shape image is mostly its light background; a far image fills the frame with more than two colours
    for r in far:
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), dtype=np.int16)
        light = (pixels.min(axis=-1) > 190).mean()
        assert light < 0.5 and pixels.reshape(-1, 3).std(axis=0).max() > 20, r["shape"]
    shape = np.asarray(world.render("circle", "red", 0, 32), dtype=np.int16)
    assert (shape.min(axis=-1) > 190).mean() > 0.5
    assert world.render_far("noise", 5).tobytes() == world.render_far("noise", 5).tobytes()
    assert world.render_far("noise", 5).tobytes() != world.render_far("noise", 6).tobytes()


def test_writers_write_decodable_images_and_parquet(tmp_path):
    w = world.World(seed=3, size=40)
    lake = w.write_lake(str(tmp_path / "lake"), 12)
    uris = list(lake)
    serial = w.write_lake(str(tmp_path / "lake2"), 12, workers=1)  # threads change nothing but speed
    assert [(u.rsplit("/", 1)[1], s) for u, s in serial.items()] == [(u.rsplit("/", 1)[1], s) for u, s in lake.items()]
    assert [s.shape for s in lake.values()] == [s.shape for s in w.samples("lake", 12)]
    assert len(uris) == 12 and {u.rsplit(".", 1)[1] for u in uris} == {"jpg", "png"}
    for u in uris:
        img = cc.decode_image(open(u, "rb").read(), cc.image_transform({"size": 32}))
        assert isinstance(img, cc.DecodedImage) and img.width == 40
    w.write_parquet(w.pairs_table(8), str(tmp_path / "pairs.parquet"))
    assert pq.read_table(tmp_path / "pairs.parquet").column_names == ["image", "caption", "shape", "colour", "is_id"]


def test_shipped_world_templates_match_the_caption_styles():
    assert list(cc.load_templates("world")) == world.scoring_templates()
    assert all("{}" in t for t in world.scoring_templates())
