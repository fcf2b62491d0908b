"""The scorer actor's own CPU cost per image, outside the device work. Prints one table.

The actor (:class:`jobs.score.scorer.Scoring`, what each ``ScorerActor`` runs per batch) is fed ready
batches, as the read tasks hand them over: uint8 pixels (``decode: cpu``) or encoded JPEGs
(``decode: device``), with a stub model whose forward costs nothing (it returns stored
features). The device work (normalisation, the forward and the scores; for JPEGs also the
decode, the orientation and the resize of each group of equal sizes) runs on the GPU in production and is timed apart here; what is left
is the actor's own CPU work per image: reading the batch, row building, host copies, Arrow
construction. That is the figure which must stay far below the 200 us per image that 5,000
images/s per GPU leaves an actor in all.

Per configuration (path, batch size, embeddings on/off): ``repeats`` calls on the same batch
after a warm-up; the median of (call time - device time) / batch size. The model
stand-in is ViT-B-16-shaped: 512-d features, 1,000 classes, 10,000 negative labels.

Usage: python benchmarks/bench_actor.py [--batches 64 256 1024] [--repeats 7]
(also a section of ``benchmarks/bench_throughput.py``, alone with its ``--actor-only``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.io  # noqa: E402
from PIL import Image  # noqa: E402

import clipn_core as cc  # noqa: E402
from clipn_core.device_decode import DeviceDecoder  # noqa: E402
from clipn_core.images import split_preprocessor  # noqa: E402
from schemas.output import OUTPUT_SCHEMA  # noqa: E402
from schemas.score_config import DecisionConfig  # noqa: E402

DIM, CLASSES, NEGATIVES = 512, 1000, 10_000
PREPROCESS = {"size": (224, 224), "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
              "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest",
              "fill_color": 0}
GOAL_US = 20.0  # per image, pixels path, batch 256 (issue 24)


class StubClipn(torch.nn.Module):
    """The part of :class:`clipn_core.CLIPN` that :class:`clipn_core.BatchScorer` calls, with a forward that costs
    nothing: ``encode_image`` returns stored L2-normalised features [N, DIM] (float32)."""

    def __init__(self, max_n: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("features", F.normalize(torch.randn(max_n, DIM, generator=g), dim=-1))
        self.clip = torch.nn.Module()
        self.clip.visual = torch.nn.Identity()  # BatchScorer sets its memory format on CUDA
        self.preprocess_cfg = dict(PREPROCESS)
        self.logit_scale = 100.0

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.features[: images.shape[0]]


def stub_scoring(max_n: int, embeddings: bool, device: str = "cpu"):
    """A :class:`~jobs.score.scorer.Scoring` around the stub model, ViT-B-16-shaped heads and negatives."""
    from jobs.score.scorer import Scoring

    g = torch.Generator().manual_seed(1)
    heads = cc.ClassHeads(tuple(f"class {i:04d}" for i in range(CLASSES)), ("a photo of a {}.",),
                          F.normalize(torch.randn(CLASSES, DIM, generator=g), dim=-1),
                          F.normalize(torch.randn(CLASSES, DIM, generator=g), dim=-1))
    negatives = F.normalize(torch.randn(NEGATIVES, DIM, generator=g), dim=-1)
    scorer = cc.BatchScorer(StubClipn(max_n), heads, device, negatives=negatives)
    decoder = DeviceDecoder(split_preprocessor(PREPROCESS, mode="fast"), device)
    return Scoring(scorer, decoder, heads, DecisionConfig(), "stub-model", "bench-run", embeddings)


class DeviceClock:
    """Seconds spent in the device work while active: the calls wrapped by :meth:`wrap` (nested calls once)."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self._depth -= 1
        return timed


@contextlib.contextmanager
def device_work_timed(scoring, clock: DeviceClock):
    """Route the device work through ``clock``: the scorer's normalise + forward + scores, the JPEG decoder and the
    resize (the functions the actor runs on the GPU in production)."""
    import clipn_core.device_decode as device_decode

    saved = [(scoring.scorer, "device_scores", scoring.scorer.device_scores),
             (scoring.device_decoder, "resize_crop", scoring.device_decoder.resize_crop),
             (torchvision.io, "decode_jpeg", torchvision.io.decode_jpeg),
             (device_decode, "orient", device_decode.orient)]
    try:
        for owner, name, fn in saved:
            setattr(owner, name, clock.wrap(fn))
        yield clock
    finally:
        for owner, name, fn in saved:
            if owner is scoring.scorer or owner is scoring.device_decoder:
                delattr(owner, name)
            else:
                setattr(owner, name, fn)


def _jpeg(seed: int, width: int = 320, height: int = 240) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def batch_of(path: str, n: int) -> dict[str, np.ndarray]:
    """One batch as the read tasks hand it to the actor (every row ``ok``): ``pixels`` or encoded JPEG ``data``."""
    from jobs.score.decode import DecodeSettings, _Rows

    rows = _Rows(DecodeSettings(PREPROCESS, "fast", "cpu" if path == "pixels" else "device", 64_000_000))
    jpegs = [_jpeg(i) for i in range(16)]
    for i in range(n):
        if path == "pixels":  # random pixels: decoding is not what is measured here
            rows.add(f"s3://lake/images/{i:07d}.jpg", 70_000 + i, "ok", "",
                     np.random.default_rng(i).integers(0, 256, (3, 224, 224), dtype=np.uint8))
        else:
            rows.add_image(f"s3://lake/images/{i:07d}.jpg", jpegs[i % len(jpegs)])
    return rows.columns()


@dataclass
class Result:
    path: str
    batch: int
    embeddings: bool
    overhead_us: float  # per image, median over the repeats
    spread_us: float  # max - min over the repeats
    device_us: float  # per image, median


def measure(path: str, n: int, embeddings: bool, repeats: int) -> Result:
    scoring = stub_scoring(n, embeddings)
    batch = batch_of(path, n)
    table = scoring(batch)  # warm-up, and a check that the rows are whole
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == n, (table.schema, table.num_rows)
    assert table.column("status").to_pylist() == ["ok"] * n
    overhead, device = [], []
    clock = DeviceClock()
    with device_work_timed(scoring, clock):
        for _ in range(repeats):
            clock.seconds = 0.0
            t = time.perf_counter()
            scoring(batch)
            total = time.perf_counter() - t
            overhead.append((total - clock.seconds) / n * 1e6)
            device.append(clock.seconds / n * 1e6)
    return Result(path, n, embeddings, statistics.median(overhead), max(overhead) - min(overhead),
                  statistics.median(device))


def run(batches: list[int], repeats: int, paths: tuple[str, ...] = ("pixels", "jpeg")) -> list[Result]:
    torch.set_num_threads(1)  # the actor's own work is single-threaded Python; keep the stub's maths out of its way
    return [measure(path, n, emb, repeats if path == "pixels" else max(3, repeats // 2))
            for path in paths for n in batches for emb in (False, True)]


def print_table(results: list[Result]) -> None:
    print(f"\nactor overhead (jobs.score.scorer.Scoring, stub model): machine {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, device work (normalise, forward, scores; JPEG decode, resize) on the CPU and "
          "timed apart; us per image = (call - device work) / batch, median of the repeats")
    print(f"{'path':7} | {'batch':>5} | {'embeddings':10} | {'actor us/img':>12} | {'spread':>6} | {'device us/img':>13}")
    print("--------|-------|------------|--------------|--------|--------------")
    for r in results:
        print(f"{r.path:7} | {r.batch:5d} | {'on' if r.embeddings else 'off':10} | {r.overhead_us:12.1f} | "
              f"{r.spread_us:6.1f} | {r.device_us:13.1f}")
    at_goal = [r for r in results if r.path == "pixels" and r.batch == 256]
    if at_goal:
        worst = max(r.overhead_us for r in at_goal)
        print(f"goal: <= {GOAL_US:.0f} us/image on the pixels path at batch 256: "
              f"{'met' if worst <= GOAL_US else 'NOT met'} ({worst:.1f} us)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per configuration (JPEGs: half)")
    ap.add_argument("--paths", nargs="+", choices=["pixels", "jpeg"], default=["pixels", "jpeg"])
    args = ap.parse_args()
    print_table(run(args.batches, args.repeats, tuple(args.paths)))


if __name__ == "__main__":
    main()
