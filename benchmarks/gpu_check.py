"""One-process GPU check of the scoring code, without Ray: what one scorer actor does on a GPU, and a training step.

Runs the code the jobs run, fed by a process pool instead of Ray Data (the device machine has no Ray):

* CPU decode: pool workers decode JPEGs with the decode tasks' function (``SplitPreprocessor.decode`` of
  :func:`clipn_core.images.split_preprocessor`, what :mod:`jobs.score.decode` calls per image) into the
  scorer's input batches (``uri``, ``byte_size``, ``status``, ``error``, uint8 ``pixels``), and the main
  process scores them with :class:`jobs.score.scorer.ScorerActor`, the class the actor pool runs;
* device decode: the workers pass the encoded bytes (``data``) and the actor decodes them on its device;
* the bare forward: the image tower alone on a ready batch of normalised images (no decode, no copy, no
  scores), the ceiling the two rows above are measured against;
* a training step of the no tower (:func:`clipn_core.training.clipn_train_step`, bf16 autocast).

Images are generated on the spot (photo-like 640 x 480 JPEGs, each worker builds the same pool from a seed),
so nothing is read from disk or network. Weights are random (the cost of a forward does not depend on them).
Heads: the 1,000 ImageNet classes with the 7 simple templates; 10,000 stand-in negative labels (random unit
vectors: the score step costs what mined ones cost). Prints a Markdown table: images/s, the scorer's share of
wall time spent waiting for its next input batch, and the GPU's mean utilisation (NVML's) per row.

``--dry-run``: the same code path on the CPU with clipn-tiny and a few images (seconds), so it cannot rot.

Usage: python benchmarks/gpu_check.py [--dry-run] [--images N] [--batch B] [--workers W]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

IMAGE_SIZE = (640, 480)

_worker: dict = {}


def make_jpegs(count: int, seed: int, size: tuple[int, int] = IMAGE_SIZE) -> list[bytes]:
    """``count`` photo-like JPEGs (smooth colour fields plus noise, quality 90): the same bytes for the same seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(count):
        f = rng.uniform(0.002, 0.02, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        base = np.stack([np.sin(xx * f[c, 0] + yy * f[c, 1] + phase[c]) for c in range(3)], axis=-1)
        img = np.clip(127.5 + 100 * base + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _init_worker(preprocess_cfg: dict, preprocess: str, max_pixels: int, distinct: int, size: tuple[int, int]) -> None:
    from clipn_core.images import split_preprocessor

    torch.set_num_threads(1)
    _worker["pre"] = split_preprocessor(preprocess_cfg, mode=preprocess)
    _worker["max_pixels"] = max_pixels
    _worker["jpegs"] = make_jpegs(distinct, seed=0, size=size)


def input_batch(start: int, size: int, decode: str) -> dict[str, np.ndarray]:
    """The scorer's input batch of images ``start`` .. ``start + size`` (cycling through the worker's JPEGs), as a
    decode task builds it: decoded to uint8 pixels (``decode="cpu"``), or passed on encoded with its header when the
    device decoder takes it (``device``)."""
    from clipn_core.images import DecodeError
    from schemas.status import STATUS_OK

    pre, jpegs = _worker["pre"], _worker["jpegs"]
    datas = [jpegs[(start + i) % len(jpegs)] for i in range(size)]
    status, error = np.full(size, STATUS_OK, dtype=object), np.full(size, "", dtype=object)
    batch = {"uri": np.array([f"gen://{start + i}.jpg" for i in range(size)], dtype=object),
             "byte_size": np.array([len(d) for d in datas], dtype=np.int64)}
    if decode == "device":  # as jobs/score/decode.py ships them: a JPEG the device takes with its header, else pixels
        from clipn_core.device_plan import DevicePlan

        plan = DevicePlan(pre, _worker["max_pixels"])
        data, header = np.empty(size, dtype=object), np.zeros((size, 3), dtype=np.int32)
        for i, d in enumerate(datas):
            head = plan.header(d)
            if head is not None:
                data[i], header[i] = d, head
                continue
            out = pre.decode(d, _worker["max_pixels"])
            if isinstance(out, DecodeError):
                status[i], error[i], data[i] = out.kind.value, out.message, b""
            else:
                data[i] = out.tobytes()
        batch["data"], batch["header"] = data, header
    else:
        pixels = np.zeros((size, 3, *pre.size), dtype=np.uint8)
        for i, d in enumerate(datas):
            out = pre.decode(d, _worker["max_pixels"])
            if isinstance(out, DecodeError):
                status[i], error[i] = out.kind.value, out.message
            else:
                pixels[i] = out
        batch["pixels"] = pixels
    batch["status"], batch["error"] = status, error
    return batch


class GpuSampler:
    """GPU utilisation (NVML's: the share of the last sample period with a kernel running) sampled every 200 ms in a
    thread, through ``torch.cuda.utilization`` (needs pynvml) or else one ``nvidia-smi`` query per sample, each
    stamped when taken; :meth:`mean` over a time window. Nothing on the CPU."""

    def __init__(self, period_s: float = 0.2):
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.read = self._pick() if torch.cuda.is_available() else None
        if self.read is not None:
            threading.Thread(target=self._loop, args=(period_s,), daemon=True).start()

    @staticmethod
    def _pick():
        try:
            torch.cuda.utilization(0)
            return lambda: float(torch.cuda.utilization(0))
        except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
            if not shutil.which("nvidia-smi"):
                return None
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
            return lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip())

    def _loop(self, period_s: float) -> None:
        while not self.stop.wait(period_s):
            t = time.perf_counter()
            try:
                self.samples.append((t, self.read()))
            except Exception:  # noqa: BLE001 - a failed sample is a missing sample
                continue

    def mean(self, t0: float, t1: float) -> str:
        values = [u for t, u in self.samples if t0 <= t <= t1]
        return f"{np.mean(values):.0f}% ({len(values)} samples)" if values else "n/a"

    def close(self) -> None:
        self.stop.set()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_run(actor, pool: cf.ProcessPoolExecutor, decode: str, images: int, batch: int, workers: int,
              device: torch.device, concurrency: int = 1) -> dict:
    """Score ``images`` images in batches from the pool (2 batches in flight per worker) with ``concurrency`` actor
    calls at once, each on a thread of its own as Ray Data's ``max_concurrent_calls_per_actor`` runs them (the
    actor's per-thread CUDA streams overlap them); two batches scored first warm up and are not counted. Returns
    images, seconds, seconds this process waited for decoded input, and the time window."""
    def check(table):
        assert table.num_rows == batch and table.column("status").to_pylist().count("ok") == batch

    for s in (0, batch):
        check(actor(pool.submit(input_batch, s, batch, decode).result()))
    _sync(device)
    starts = list(range(2 * batch, images + 2 * batch, batch))
    pending: deque = deque(pool.submit(input_batch, s, batch, decode) for s in starts[:2 * workers])
    nxt, wait, rows = 2 * workers, 0.0, 0
    calls: deque = deque()
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as threads:
        while pending:
            tw = time.perf_counter()
            b = pending.popleft().result()
            wait += time.perf_counter() - tw
            if nxt < len(starts):
                pending.append(pool.submit(input_batch, starts[nxt], batch, decode))
                nxt += 1
            while len(calls) >= concurrency:
                check(calls.popleft().result())
            calls.append(threads.submit(actor, b))
            rows += batch
        while calls:
            check(calls.popleft().result())
    _sync(device)
    t1 = time.perf_counter()
    return {"images": rows, "s": t1 - t0, "wait": wait, "t0": t0, "t1": t1}


@torch.inference_mode()
def bare_forward(model, batch: int, steps: int, device: torch.device, precision: str) -> dict:
    """The image tower alone on one ready normalised batch on the device (channels-last, autocast as the scorer)."""
    x = torch.randn(batch, 3, *model.preprocess_cfg["size"], device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
        model.clip.visual.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    ctx = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx:
        for _ in range(2):
            model.encode_image(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.encode_image(x)
        _sync(device)
    t1 = time.perf_counter()
    return {"images": batch * steps, "s": t1 - t0, "t0": t0, "t1": t1}


def train_run(architecture: str, batch: int, steps: int, device: torch.device) -> dict:
    """``steps`` no-tower training steps (after two warm-up steps) at ``batch`` on random pixels and captions."""
    import clipn_core as cc
    from clipn_core.images import SplitPreprocessor
    from clipn_core.training import (
        build_optimizer,
        clipn_train_step,
        prompt_choices,
        text_id,
        warmup_cosine,
    )

    model, _ = cc.build_clipn(architecture, seed=0, device=device)
    model.train()
    params = [p for p in model.no_tower.parameters() if p.requires_grad]
    optimizer = build_optimizer(model.no_tower.named_parameters(), 3e-4, 0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, steps + 2))
    normalize = SplitPreprocessor(model.preprocess_cfg).normalize
    captions = [f"a photo of a thing number {i}" for i in range(batch)]
    tokens = cc.get_tokenizer(model)(captions).to(device)
    caption_ids = torch.tensor([text_id(c) for c in captions], dtype=torch.int64, device=device)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, *model.preprocess_cfg["size"]), dtype=torch.uint8, generator=gen)
    images = normalize(pixels.to(device))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    t0 = 0.0
    for step in range(steps + 2):
        if step == 2:
            _sync(device)
            t0 = time.perf_counter()
        prompts = prompt_choices(caption_ids.cpu().numpy(), step, 0, model.no_tower.num_prompts).to(device)
        metrics = clipn_train_step(model, images, tokens, prompts, caption_ids, model.logit_scale, optimizer,
                                   scheduler, params, 1.0, autocast)
        assert np.isfinite(metrics.loss), metrics
    _sync(device)
    t1 = time.perf_counter()
    return {"images": batch * steps, "s": t1 - t0, "t0": t0, "t1": t1}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, clipn-tiny, a few images: checks the code path")
    ap.add_argument("--architecture", default=None, help="default ViT-B-16 (clipn-tiny with --dry-run)")
    ap.add_argument("--images", type=int, default=None, help="images per scoring row (default 16,384; dry run 16)")
    ap.add_argument("--batch", type=int, default=None, help="scorer batch (default 256; dry run 8)")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: CPUs - 2; dry run 2)")
    ap.add_argument("--train-batch", type=int, default=None, help="training batch (default 256; dry run 4)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    args = ap.parse_args(argv)
    dry = args.dry_run
    arch = args.architecture or ("clipn-tiny" if dry else "ViT-B-16")
    images = args.images or (16 if dry else 16_384)
    batch = args.batch or (8 if dry else 256)
    workers = args.workers or (2 if dry else max(1, (os.cpu_count() or 4) - 2))
    train_batch = args.train_batch or (4 if dry else 256)
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (use --dry-run to check the code path on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")

    import clipn_core as cc
    from clipn_core.named_sets import CLASS_SETS
    from clipn_core.storage import Storage
    from jobs.score.scorer import ScorerActor
    from jobs.scoring_setup import load_model
    from schemas.score_config import DecisionConfig, ModelConfig, RuntimeConfig

    t_setup = time.perf_counter()
    model_cfg = ModelConfig(architecture=arch)
    model, _ = load_model(model_cfg, Storage({}), None)
    model.to(device)
    n_classes = 16 if dry else 1000  # the dry run's heads are encoded on the CPU
    classes = CLASS_SETS["imagenet"].load()[:n_classes]
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), classes, cc.load_templates("openai-imagenet-simple"),
                                 prompt_names=CLASS_SETS["imagenet"].prompts()[:n_classes])
    gen = torch.Generator().manual_seed(0)
    negatives = torch.nn.functional.normalize(torch.randn(256 if dry else 10_000, heads.yes.shape[1], generator=gen),
                                              dim=-1)
    scoring = {"negatives": negatives, "negative_groups": 100, "bank": None}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (dry run on the CPU)"
    print(f"\n## GPU check: {arch} (random weights), {args.precision}, scorer batch {batch}, {len(classes)} classes, "
          f"{len(negatives):,} negatives\n")
    print(f"GPU: {gpu}; {os.cpu_count()} CPUs, {workers} decode processes; torch {torch.__version__}; "
          f"Python {sys.version.split()[0]}; setup {time.perf_counter() - t_setup:.1f} s\n")
    print("| row | batch | images | s | images/s | waits for input | GPU util |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    sampler = GpuSampler()
    try:
        r = bare_forward(model, batch, max(2, images // batch), device, args.precision)
        print(f"| bare image-tower forward (no decode, no copy, no scores) | {batch} | {r['images']} | {r['s']:.2f} | "
              f"{r['images'] / r['s']:,.0f} | - | {sampler.mean(r['t0'], r['t1'])} |", flush=True)
        preprocess_cfg = model.preprocess_cfg
        del model
        # spawn, not fork: this process holds CUDA and a sampler thread, which a forked child must not inherit
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_init_worker, initargs=(preprocess_cfg, "fast", 64_000_000, 8 if dry else 128,
                                              (64, 48) if dry else IMAGE_SIZE)) as pool:
            for decode in ("cpu", "device"):
                runtime = RuntimeConfig(batch_size=batch, decode=decode, precision=args.precision,
                                        gpus_per_actor=1.0 if device.type == "cuda" else 0.0)
                actor = ScorerActor(model_cfg, heads, runtime, DecisionConfig(), Storage({}), "gpu-check",
                                    embeddings=False, logit_scale=100.0, scoring=scoring)
                # the job's concurrency (3 calls at once with a GPU) and one call at a time, the overlap's baseline
                # (the dry run also takes 2, so that the threaded path runs on the CPU)
                for concurrency in sorted({runtime.scorer_concurrency(), 1, *((2,) if dry else ())}, reverse=True):
                    r = score_run(actor, pool, decode, images, batch, workers, device, concurrency)
                    print(f"| ScorerActor, {decode} decode, {concurrency} call(s) at once | {batch} | {r['images']} | "
                          f"{r['s']:.2f} | {r['images'] / r['s']:,.0f} | {r['wait'] / r['s']:.0%} | "
                          f"{sampler.mean(r['t0'], r['t1'])} |", flush=True)
                del actor
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        r = train_run(arch, train_batch, 2 if dry else 20, device)
        print(f"| no-tower training step, {'bf16 autocast' if device.type == 'cuda' else 'fp32'} | {train_batch} | "
              f"{r['images']} | {r['s']:.2f} | {r['images'] / r['s']:,.0f} samples/s | - | "
              f"{sampler.mean(r['t0'], r['t1'])} |", flush=True)
    finally:
        sampler.close()


if __name__ == "__main__":
    main()
