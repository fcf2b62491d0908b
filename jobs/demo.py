"""``clipn demo``: generate a small image lake, build a tiny CLIPN checkpoint, run the scoring job on it.

A first look at the product with no downloads: real decoding, a real local Ray actor
pool and real Parquet output. The tiny model is seeded but untrained, so its OOD
flags are not meaningful (the demo-world issue adds training); the lake also holds
broken files to show that each still gets its row.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.dataset as pads

import clipn_core as cc
from clipn_core import world
from schemas.score_config import ScoreJobConfig

ID_SHAPES = ["circle", "square", "triangle", "star"]


def write_lake(lake: Path, n_images: int) -> None:
    """``n_images`` JPEG/PNG shapes plus three broken files under ``lake``."""
    lake.mkdir(parents=True, exist_ok=True)
    combos = itertools.cycle(itertools.product(world.SHAPES, world.COLOURS))
    for i in range(n_images):
        shape, colour = next(combos)
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        ext = "png" if fmt == "PNG" else "jpg"
        (lake / f"{i:04d}_{colour}_{shape}.{ext}").write_bytes(world.encode(world.render(shape, colour, i, 64), fmt))
    (lake / "broken_empty.jpg").write_bytes(b"")
    (lake / "broken_text.jpg").write_bytes(b"not an image\n")
    good = world.encode(world.render("circle", "red", 0, 64))
    (lake / "broken_truncated.jpg").write_bytes(good[: len(good) // 2])


def run_demo(out: Path, n_images: int = 24) -> int:
    import ray

    from jobs.score import run

    out = out.resolve()
    print(f"[1/3] writing a lake of {n_images} generated images (+3 broken files) to {out / 'lake'}")
    write_lake(out / "lake", n_images)
    ckpt = out / "model" / "clipn-tiny.safetensors"
    print(f"[2/3] building a tiny CLIPN checkpoint at {ckpt}")
    model, spec = cc.build_clipn("clipn-tiny", seed=0)
    cc.save_checkpoint(model, spec, str(ckpt))
    cfg = ScoreJobConfig.model_validate({
        "input": {"kind": "prefix", "uri": str(out / "lake")},
        "output": {"uri": str(out / "scores")},
        "model": {"checkpoint": str(ckpt)},
        "classes": {"names": ID_SHAPES},
        "runtime": {"batch_size": 16, "pool_size": 1},
    })
    print("[3/3] running the scoring job on a local Ray (2 CPUs)")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    manifest = run(cfg)
    table = pads.dataset(manifest["partition"], format="parquet").to_table(
        columns=["uri", "status", "predicted_class", "score_ctw", "score_atd", "is_ood"]).sort_by("uri")
    print(f"\n{'image':32} {'status':14} {'class':9} {'CTW':>6} {'ATD':>6}  OOD")
    for row in table.to_pylist():
        name = Path(row["uri"]).name[:32]
        fmt = lambda v: "" if v is None else f"{v:6.3f}"  # noqa: E731
        print(f"{name:32} {row['status']:14} {row['predicted_class'] or '':9} {fmt(row['score_ctw']):>6} "
              f"{fmt(row['score_atd']):>6}  {'' if row['is_ood'] is None else row['is_ood']}")
    print(f"\nrows {manifest['rows']}, by status {json.dumps(manifest['by_status'])}")
    print(f"output: {manifest['partition']} (model untrained: flags are not meaningful yet)")
    return 0
