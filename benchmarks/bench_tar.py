"""Peak memory of the read task of one tar shard, against the shard's size. Prints one table.

Shards of N img2dataset-like samples (a 256x256 JPEG + a small JSON each) on local disk,
decoded at a 224x224 model input (ViT-B-32 preprocessing). Each run reads one shard in a
fresh interpreter, as a Ray read task does, and reports that process's peak RSS
(``ru_maxrss``) above its RSS before the read:

* ``streamed``: the job's ``read_tar_batch`` (``fs.open`` + tarfile stream mode, batches of
  ``--batch`` rows, each batch dropped once yielded, as Ray Data takes it);
* ``whole shard``: what the job did before: ``cat_file`` of the shard, every member decoded,
  then one batch of all pixels.

Usage: python benchmarks/bench_tar.py [--sizes 2000 4000] [--batch 32]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREPROCESS = {"size": (224, 224), "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
              "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest",
              "fill_color": 0}


def make_shard(path: Path, samples: int) -> int:
    from jobs.demo import world

    jpegs = [world.encode(world.render(world.SHAPES[i % 8], "blue", i, 256)) for i in range(16)]
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for name, data in ((f"{i:06d}.jpg", jpegs[i % 16]), (f"{i:06d}.json", b'{"caption": "x"}')):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def read_once(shard: str, mode: str, batch: int) -> dict:
    """Read and decode the shard in this process; figures as a dict."""
    import numpy as np

    from clipn_core.storage import Storage
    from jobs.score.decode import DecodeSettings, _Rows, read_tar_batch

    settings = DecodeSettings(PREPROCESS, "fast", "cpu", 178_956_970)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rows = batches = 0
    if mode == "streamed":
        for out in read_tar_batch({"uri": np.array([shard], dtype=object)}, Storage({}), settings, [".jpg"],
                                  batch, None):
            rows += len(out["uri"])
            batches += 1
            del out
    else:  # the job before streaming: the whole shard in memory, every member decoded, one batch
        fs, path = Storage({}).fs(shard)
        acc = _Rows(settings)
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path)), mode="r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    acc.add_image(f"{shard}#{member.name}", tar.extractfile(member).read())
        out = acc.columns()
        rows, batches = len(out["uri"]), 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "batches": batches, "s": time.perf_counter() - t0, "peak_mb": peak / 1024,
            "growth_mb": (peak - before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(read_once(args.child[0], args.child[1], args.batch)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            shard = Path(tmp) / f"{n}.tar"
            size = make_shard(shard, n)
            for mode in ("streamed", "whole shard"):
                out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--child", str(shard), mode],
                                     check=True, capture_output=True, text=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((n, size, mode, got))
    print("| members | shard | read task | batches | peak RSS | growth during the read | time |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n, size, mode, g in rows:
        print(f"| {n:,} | {size / 2**20:.0f} MB | {mode} | {g['batches']} | {g['peak_mb']:,.0f} MB | "
              f"{g['growth_mb']:,.0f} MB | {g['s']:.1f} s |")


if __name__ == "__main__":
    main()
