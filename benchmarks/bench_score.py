"""Scoring throughput and driver memory. Prints a table; run with `make bench` or directly.

In one run on the same images and model:
  (a) the scoring job (Ray Data: read+decode tasks -> scorer actor pool -> Parquet),
  (b) the model forward alone on pre-decoded tensors (the upper bound),
  (c) a plain single-process loop: PIL + torch DataLoader + model (like the original
      CLIPN evaluation script),
for the tiny architecture and ViT-B-16 at 224 px (random weights: speed only).
Then the driver's peak RSS for two manifest sizes ten times apart (each in a fresh process).

Usage: python benchmarks/bench_score.py [--images 256] [--vit-images 64] [--mem-sizes 200 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clipn_core as cc  # noqa: E402
from clipn_core import world  # noqa: E402

CLASSES = ["circle", "square", "triangle", "star"]


def make_lake(folder: Path, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        if not p.exists():
            shape, colour = world.SHAPES[i % 8], list(world.COLOURS)[(i // 8) % 8]
            p.write_bytes(world.encode(world.render(shape, colour, i, size)))
        paths.append(p)
    return paths


def bench_forward(model, heads, paths, batch: int) -> float:
    tf = cc.image_transform(model.preprocess_cfg)
    tensors = torch.stack([cc.decode_image(p.read_bytes(), tf).tensor for p in paths])
    scorer = cc.BatchScorer(model, heads)
    scorer(tensors[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(tensors), batch):
        scorer(tensors[i:i + batch])
    return len(tensors) / (time.perf_counter() - t)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, tf):
        self.paths, self.tf = paths, tf

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.open(self.paths[i]).convert("RGB"))


def bench_loop(model, heads, paths, batch: int) -> float:
    tf = cc.image_transform(model.preprocess_cfg)
    loader = torch.utils.data.DataLoader(_Files(paths, tf), batch_size=batch, num_workers=1)
    scorer = cc.BatchScorer(model, heads)
    t = time.perf_counter()
    for images in loader:
        scorer(images)
    return len(paths) / (time.perf_counter() - t)


def bench_job(ckpt: str, lake: Path, out: Path, batch: int) -> tuple[float, float]:
    from jobs.score import run
    from schemas.score_config import ScoreJobConfig

    cfg = ScoreJobConfig.model_validate({
        "input": {"uri": str(lake)}, "output": {"uri": str(out)}, "model": {"checkpoint": ckpt},
        "classes": {"names": CLASSES}, "runtime": {"batch_size": batch, "decode_batch_size": 32},
    })
    t = time.perf_counter()
    m = run(cfg)
    total = time.perf_counter() - t
    return m["images_per_s"], m["rows"] / total


def driver_peak_mb(n: int, root: Path) -> float:
    """Peak RSS of a fresh driver process scoring a manifest of n images (tiny model)."""
    code = f"""
import resource, sys, pyarrow as pa, pyarrow.parquet as pq, ray
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from benchmarks.bench_score import make_lake
from jobs.score import run
from schemas.score_config import ScoreJobConfig
paths = make_lake(__import__('pathlib').Path({str(root / 'lake_mem')!r}), {n}, 48)
pq.write_table(pa.table({{'uri': [str(p) for p in paths]}}), {str(root / f'manifest_{n}.parquet')!r})
del paths
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
run(ScoreJobConfig.model_validate({{'input': {{'kind': 'manifest', 'uri': {str(root / f'manifest_{n}.parquet')!r}}},
    'output': {{'uri': {str(root / f'out_mem_{n}')!r}}}, 'model': {{'checkpoint': {str(root / 'tiny.safetensors')!r}}},
    'classes': {{'names': {CLASSES!r}}}, 'runtime': {{'batch_size': 64}}}}))
print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1].split()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--vit-images", type=int, default=64)
    ap.add_argument("--mem-sizes", type=int, nargs=2, default=[200, 2000])
    args = ap.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="clipn_bench_"))
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    rows = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for arch, n, size, batch in (("clipn-tiny", args.images, 64, 64), ("ViT-B-16", args.vit_images, 256, 16)):
        model, spec = cc.build_clipn(arch, seed=0)
        ckpt = str(root / f"{arch}.safetensors")
        cc.save_checkpoint(model, spec, ckpt)
        if arch == "clipn-tiny":
            cc.save_checkpoint(model, spec, str(root / "tiny.safetensors"))
        heads = cc.build_class_heads(model, cc.get_tokenizer(model), CLASSES, cc.load_templates())
        paths = make_lake(root / f"lake_{arch}", n, size)
        fwd = bench_forward(model, heads, paths, batch)
        loop = bench_loop(model, heads, paths, batch)
        job_steady, job_total = bench_job(ckpt, root / f"lake_{arch}", root / f"out_{arch}", batch)
        rows.append((arch, n, fwd, loop, job_steady, job_total))
    ray.shutdown()
    small, large = args.mem_sizes
    mem = (driver_peak_mb(small, root), driver_peak_mb(large, root))

    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, cuda={torch.cuda.is_available()}")
    print(f"{'model':12} {'images':>6} | {'(b) forward img/s':>17} {'(c) loop img/s':>14} {'(a) job img/s':>13} "
          f"{'(a) job incl. start':>19} | {'a/b':>5} {'a/c':>5}")
    for arch, n, fwd, loop, steady, total in rows:
        print(f"{arch:12} {n:6d} | {fwd:17.1f} {loop:14.1f} {steady:13.1f} {total:19.1f} | {steady / fwd:5.2f} {steady / loop:5.2f}")
    print(f"\ndriver peak RSS (manifest input, tiny): {small} images {mem[0]:.0f} MB, {large} images {mem[1]:.0f} MB "
          f"(ratio {mem[1] / mem[0]:.2f} for 10x the images)")
    print(json.dumps({"rows": rows, "driver_peak_mb": mem}))


if __name__ == "__main__":
    main()
