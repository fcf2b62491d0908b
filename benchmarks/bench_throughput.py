"""Scoring throughput at steady state, against honest baselines measured in the same run. Prints one table.

Images: photo-like JPEGs of 500x375 and 1024x768 (about 70 and 270 KB), with a few PNG
and WebP among them. Every rate is a steady-state rate: the same measurement on N and
on 2N images, rate = N / (t(2N) - t(N)), so start-up (Ray Data planning, actor start,
model load) cancels out; job runs are repeated and the fastest time of each size used (on a
shared machine interference only ever adds time).

Rows, for a cheap 224-px model (``clipn-cheap224``, whose forward costs almost nothing:
the stand-in for a GPU, where the CPU side must keep up) and for ViT-B-16:

* (i)   plain loop, one process: PIL decode + open_clip's eval transform (per core);
* (ii)  a torch DataLoader with the job's number of decode processes, the job's decode
        and the same model (``BatchScorer``) in the main process;
* (iii) the model forward alone on ready uint8 tensors;
* job   ``clipn score`` (Ray Data: read+decode tasks -> scorer actor -> Parquet), local files;
* S3    the job on moto's S3 server behind a loopback proxy adding 0, 30 and 100 ms to every
        request; requests per object counted by the proxy.

Also the driver's RSS growth (peak minus start) in the N and 2N runs: it must not grow with the images.

Then a second table: the scorer actor's own CPU cost per image outside the device work
(:mod:`benchmarks.bench_actor`, well under a minute; alone: ``--actor-only``; left out: ``--no-actor``).

Usage: python benchmarks/bench_throughput.py [--n 1000] [--s3-n 400] [--vit-n 24] [--device cpu|cuda]
       [--actor-only | --no-actor]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import clipn_core as cc  # noqa: E402
from clipn_core.images import split_preprocessor  # noqa: E402

CLASSES = ["cat", "dog", "car", "tree", "house"]
UNIQUE = 48  # distinct images; the lake repeats them under distinct names (decoding costs the same)


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: a smooth colour field, mid-frequency texture and sensor-like noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    mid = np.asarray(Image.fromarray(texture).resize((width, height), Image.BILINEAR), dtype=np.float32)
    arr = 0.7 * base + 0.3 * mid + rng.normal(0, 7, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encoded_images() -> list[tuple[str, bytes]]:
    """(extension, bytes) of the distinct images: JPEGs of both sizes; one PNG and one WebP (500x375) in every 24."""
    out = []
    for i in range(UNIQUE):
        fmt, ext = ("PNG", ".png") if i % 24 == 4 else ("WEBP", ".webp") if i % 24 == 10 else ("JPEG", ".jpg")
        img = photo(*((500, 375) if i % 2 == 0 else (1024, 768)), seed=i)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
        out.append((ext, buf.getvalue()))
    return out


def write_lake(folder: Path, images, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        ext, data = images[i % len(images)]
        p = folder / f"img_{i:06d}{ext}"
        p.write_bytes(data)
        paths.append(p)
    return paths


def steady(t_n: float, t_2n: float, n: int) -> float:
    """Images/s from the N and 2N timings (start-up cancels); nan when the difference is not positive."""
    return n / (t_2n - t_n) if t_2n > t_n else float("nan")


class PeakRss:
    """Samples this process's resident memory every 20 ms while active; ``growth_mb``: peak minus the start."""

    def __init__(self):
        self.peak = self.start = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.peak = self.start = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


class GpuUtilisation:
    """Mean GPU utilisation (%) from nvidia-smi samples every 200 ms while active (None without a GPU)."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5)
                self.samples.append(float(out.stdout.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


@dataclass
class Row:
    name: str
    rate: float
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- baselines

def plain_loop_rate(paths: list[Path], preprocess_cfg: dict) -> float:
    """(i) PIL decode + open_clip's eval transform, one process (images/s of one core)."""
    tf = cc.image_transform(preprocess_cfg)
    for p in paths[:8]:
        tf(Image.open(p).convert("RGB"))
    t = time.perf_counter()
    for p in paths:
        tf(Image.open(p).convert("RGB"))
    return len(paths) / (time.perf_counter() - t)


class _Files(torch.utils.data.Dataset):
    """The job's decode (``SplitPreprocessor.decode`` in the job's mode) on local files."""

    def __init__(self, paths, preprocess_cfg, mode):
        self.paths, self.preprocess_cfg, self.mode = paths, preprocess_cfg, mode

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        out = split_preprocessor(self.preprocess_cfg, mode=self.mode).decode(self.paths[i].read_bytes())
        return torch.from_numpy(out)


def dataloader_time(scorer: cc.BatchScorer, paths, preprocess_cfg, mode, workers: int, batch: int) -> float:
    loader = torch.utils.data.DataLoader(_Files(paths, preprocess_cfg, mode), batch_size=batch, num_workers=workers,
                                         pin_memory=scorer.device.type == "cuda")
    t = time.perf_counter()
    for pixels in loader:
        scorer.score_pixels(pixels)
    if scorer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def forward_time(scorer: cc.BatchScorer, n: int, batch: int, side: int) -> float:
    pixels = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    if scorer.device.type == "cuda":
        pixels = pixels.to(scorer.device)
    scorer.score_pixels(pixels)  # warm-up
    t = time.perf_counter()
    for start in range(0, n, batch):
        scorer.score_pixels(pixels[: min(batch, n - start)])
    if scorer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


# ---------------------------------------------------------------- the job

def job_config(input_uri: str, out: Path, ckpt: str, runtime: dict, storage: dict | None = None,
               extra: dict | None = None):
    from schemas.score_config import ScoreJobConfig

    return ScoreJobConfig.model_validate({
        "input": {"kind": "prefix", "uri": input_uri}, "output": {"uri": str(out)},
        "model": {"checkpoint": ckpt}, "classes": {"names": CLASSES}, "templates": "default",
        "runtime": runtime, "storage": storage or {}, **(extra or {}),
    })


def time_job(input_uri: str, out_root: Path, ckpt: str, runtime: dict, storage: dict | None = None,
             gpu: GpuUtilisation | None = None, extra: dict | None = None) -> tuple[float, float, int]:
    """(seconds, driver RSS growth MB (peak minus start), rows) of one job run into a fresh output folder."""
    from jobs.score import run

    out = out_root / f"out-{time.time_ns()}"
    with PeakRss() as rss:
        t = time.perf_counter()
        if gpu is not None:
            with gpu:
                manifest = run(job_config(input_uri, out, ckpt, runtime, storage, extra))
        else:
            manifest = run(job_config(input_uri, out, ckpt, runtime, storage, extra))
        seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    if manifest.by_status != {"ok": manifest.rows}:
        raise SystemExit(f"benchmark run on {input_uri} did not score every image: {manifest.by_status}")
    return seconds, rss.growth_mb, manifest.rows


def job_steady(uri_n: str, uri_2n: str, n: int, out_root: Path, ckpt: str, runtime: dict, repeats: int,
               storage: dict | None = None, gpu: GpuUtilisation | None = None,
               extra: dict | None = None) -> tuple[float, dict]:
    """Steady-state images/s of the job from the fastest N and 2N runs (interference on a shared machine only
    ever adds time), and the details."""
    t_n, t_2n, rss_n, rss_2n = [], [], [], []
    for _ in range(repeats):
        s, r, rows = time_job(uri_n, out_root, ckpt, runtime, storage, extra=extra)
        assert rows == n, (rows, n)
        t_n.append(s)
        rss_n.append(r)
        s, r, rows = time_job(uri_2n, out_root, ckpt, runtime, storage, gpu, extra)
        assert rows == 2 * n, (rows, 2 * n)
        t_2n.append(s)
        rss_2n.append(r)
    return steady(min(t_n), min(t_2n), n), {"t_n": t_n, "t_2n": t_2n, "rss_growth_n_mb": max(rss_n),
                                            "rss_growth_2n_mb": max(rss_2n)}


# ---------------------------------------------------------------- S3 through the latency proxy

def s3_rows(images, n: int, ckpt: str, runtime: dict, delays_ms: list[int], repeats: int, root: Path) -> list[Row]:
    import fsspec

    from tests.fault_proxy import ProxyProcess, start_moto_process

    server, endpoint = start_moto_process()  # moto and the proxy in processes of their own, as S3 would be
    rows = []
    try:
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("lake")
        for i in range(2 * n):
            ext, data = images[i % len(images)]
            fs.pipe_file(f"lake/{'a' if i < n else 'b'}/img_{i:06d}{ext}", data)
        base_rate = None
        for delay in delays_ms:
            proxy = ProxyProcess(endpoint, latency_s=delay / 1000)
            try:
                rate, detail = job_steady("s3://lake/a/", "s3://lake/", n, root, ckpt, runtime, repeats,
                                          storage={"endpoint_url": proxy.endpoint, "region": "us-east-1"})
                seen = proxy.stats()["seen"]
            finally:
                proxy.stop()
            object_requests = sum(c for (method, path, query), c in seen.items()
                                  if method in ("GET", "HEAD") and not query and path.startswith("/lake/")
                                  and path.rsplit(".", 1)[-1] in ("jpg", "png", "webp"))
            runs = 3 * repeats * n  # each repeat reads N then 2N objects
            base_rate = base_rate or rate
            rows.append(Row(f"job, S3 +{delay} ms/request", rate,
                            f"{rate / base_rate:.2f} of the 0 ms rate; {object_requests / runs:.2f} requests/object",
                            {**detail, "requests_per_object": object_requests / runs}))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return rows


# ---------------------------------------------------------------- main

def bench_model(arch: str, ckpt: str, lake: Path, n: int, args, root: Path, runtime: dict, s3: bool,
                images) -> list[Row]:
    model, _, _ = cc.load_checkpoint(ckpt)
    pre_cfg = model.preprocess_cfg
    heads = cc.build_class_heads(model, cc.get_tokenizer(model), CLASSES, cc.load_templates("default"))
    device = "cuda" if args.device == "cuda" else "cpu"
    scorer = cc.BatchScorer(model, heads, device, "bf16" if device == "cuda" else "fp32")
    side = pre_cfg["size"][0] if isinstance(pre_cfg["size"], list | tuple) else pre_cfg["size"]
    paths_n = sorted((lake / "a").iterdir())
    paths_2n = paths_n + sorted((lake / "b").iterdir())
    batch = runtime["batch_size"]
    rows = []

    loop = plain_loop_rate(paths_n[: min(len(paths_n), 200)], pre_cfg)
    rows.append(Row(f"{arch} (i) PIL + open_clip transform, 1 process", loop, f"x{args.workers} cores = {loop * args.workers:.0f}"))
    dl = steady(dataloader_time(scorer, paths_n, pre_cfg, runtime["preprocess"], args.workers, batch),
                dataloader_time(scorer, paths_2n, pre_cfg, runtime["preprocess"], args.workers, batch), n)
    rows.append(Row(f"{arch} (ii) DataLoader, {args.workers} workers, same decode + model", dl))
    fwd = steady(forward_time(scorer, n, batch, side), forward_time(scorer, 2 * n, batch, side), n)
    rows.append(Row(f"{arch} (iii) forward alone", fwd))
    del scorer, model

    modes = [("cpu", runtime)]
    if args.device == "cuda":
        modes.append(("device", {**runtime, "decode": "device"}))
    for decode, rt in modes:
        gpu = GpuUtilisation() if args.device == "cuda" else None
        rate, detail = job_steady(str(lake / "a"), str(lake), n, root, ckpt, rt, args.repeats, gpu=gpu)
        note = (f"{rate / dl:.2f} x (ii), {rate / fwd:.2f} x (iii); driver RSS growth {detail['rss_growth_n_mb']:.0f} MB (N) "
                f"vs {detail['rss_growth_2n_mb']:.0f} MB (2N)")
        if gpu is not None and gpu.mean is not None:
            note += f"; GPU utilisation {gpu.mean:.0f}%"
        rows.append(Row(f"{arch} job, local files, decode={decode}", rate, note, detail))
        if decode == "cpu" and arch == "clipn-cheap224":  # what the 10,000 negative labels cost the scorer
            off, detail_off = job_steady(str(lake / "a"), str(lake), n, root, ckpt, rt, args.repeats,
                                         extra={"negatives": {"enabled": False}})
            rows.append(Row(f"{arch} job, local files, negative labels off", off,
                            f"with them: {rate / off:.2f} of this rate", detail_off))
    if s3 and args.delays:
        rows += s3_rows(images, args.s3_n, ckpt, runtime, args.delays, args.repeats, root)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="N for the cheap model on local files (2N are scored too; "
                    "none: --n 0)")
    ap.add_argument("--s3-n", type=int, default=1500, help="N for the S3 runs")
    ap.add_argument("--vit-n", type=int, default=24, help="N for ViT-B-16 (none: --vit-n 0)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="decode processes (and Ray CPUs)")
    ap.add_argument("--repeats", type=int, default=2, help="job runs per size (the fastest is taken)")
    ap.add_argument("--delays", type=int, nargs="*", default=[0, 30, 100], help="ms added to every S3 request (none: no S3 runs)")
    ap.add_argument("--preprocess", choices=["fast", "exact"], default="fast")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--actor-only", action="store_true", help="only the scorer actor's own cost (benchmarks/bench_actor.py)")
    ap.add_argument("--no-actor", action="store_true", help="leave out the scorer actor's own cost")
    args = ap.parse_args()
    if args.actor_only:
        actor_section()
        return

    import ray

    root = Path(tempfile.mkdtemp(prefix="clipn_throughput_"))
    images = encoded_images()
    print(f"images: {UNIQUE} distinct ({sum(len(d) for _, d in images) / len(images) / 1024:.0f} KB mean), "
          f"scratch {root}", flush=True)
    rows: list[Row] = []
    gpu = args.device == "cuda"
    # moto accepts any credentials; set before ray.init so that Ray workers inherit them
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=args.workers, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    try:
        plans = []
        if args.n and not gpu:
            plans.append(("clipn-cheap224", args.n, {"batch_size": 64, "decode_batch_size": 32, "cpus_per_actor": 0.25,
                                                     "preprocess": args.preprocess}, True))
        if args.vit_n:
            vit_rt = ({"batch_size": 256, "decode_batch_size": 64, "gpus_per_actor": 1, "cpus_per_actor": 1,
                       "precision": "bf16", "preprocess": args.preprocess} if gpu else
                      {"batch_size": 8, "decode_batch_size": 8, "cpus_per_actor": 0.25, "torch_threads": args.workers,
                       "preprocess": args.preprocess})
            plans.append(("ViT-B-16", args.vit_n, vit_rt, gpu))
        for arch, n, runtime, s3 in plans:
            model, spec = cc.build_clipn(arch, seed=0)
            ckpt = str(root / f"{arch}.safetensors")
            cc.save_checkpoint(model, spec, ckpt)
            del model
            lake = root / f"lake-{arch}"
            write_lake(lake / "a", images, n)
            write_lake(lake / "b", images, n, start=n)
            time_job(str(lake / "a"), root, ckpt, runtime)  # warm-up: worker processes and their imports
            print(f"[{arch}] baselines and job ...", flush=True)
            rows += bench_model(arch, ckpt, lake, n, args, root, runtime, s3, images)
    finally:
        ray.shutdown()

    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"{args.workers} decode workers / Ray CPUs; preprocess={args.preprocess}; steady state = N / (t(2N) - t(N)), fastest of the repeats")
    width = max(len(r.name) for r in rows)
    print(f"{'measurement':{width}} | {'img/s':>8} | notes")
    print(f"{'-' * width}-|-{'-' * 8}-|------")
    for r in rows:
        print(f"{r.name:{width}} | {r.rate:8.1f} | {r.note}")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    shutil.rmtree(root, ignore_errors=True)
    if not args.no_actor:
        actor_section()


def actor_section() -> None:
    """The scorer actor's own CPU cost per image (benchmarks/bench_actor.py), printed as its own table."""
    from benchmarks import bench_actor

    bench_actor.print_table(bench_actor.run([64, 256, 1024], repeats=7))


if __name__ == "__main__":
    main()
