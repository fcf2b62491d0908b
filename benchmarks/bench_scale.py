"""Driver memory against lake size, and listing rate. Prints one table.

Nights of ``clipn score`` on a local prefix of zero-byte ``.jpg`` objects (each becomes one
``empty`` row, so the cost is per object, not per pixel), for K and 10K objects: a first
night, then a ``skip_scored`` night over the same objects with the first night's rows
marked ``ok`` (as if every object had been scored), so that it skips all of them. Each
night runs in a fresh driver process; its peak RSS (``ru_maxrss``) is the driver's own.
Growth per object is (peak at 10K - peak at K) / 9K.

Listing rate: objects listed per second by the job's listing (Ray tasks over key ranges)
against one lister on the driver (fsspec ``find``), on the local prefix and on moto's S3
server behind a loopback proxy adding ``--latency-ms`` to every request.

Usage: python benchmarks/bench_scale.py [--k 50000] [--s3-objects 20000] [--latency-ms 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def night(lake: str, out: str, day: str, skip: bool, ckpt: str) -> dict:
    """One night in this process (run by the parent in a fresh interpreter); its figures as a dict."""
    import ray

    from jobs.score import run
    from schemas.score_config import ScoreJobConfig

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    manifest = run(ScoreJobConfig.model_validate({
        "input": {"uri": lake}, "output": {"uri": out, "run_date": day, "skip_scored": skip},
        "model": {"checkpoint": ckpt}, "classes": {"names": ["a", "b"]},
        "runtime": {"batch_size": 1024, "decode_batch_size": 1024, "cpus_per_actor": 0.25},
    }))
    seconds = time.perf_counter() - t
    ray.shutdown()
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds,
            "rows": manifest.rows, "listed": manifest.inputs_listed, "skipped": manifest.skipped_already_scored,
            "by_status": manifest.by_status}


def run_night(*args) -> dict:
    env = {**os.environ, "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "60"}
    proc = subprocess.run([sys.executable, __file__, "--night", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"night {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mark_ok(partition: Path) -> None:
    """Rewrite a published partition's rows as ``ok``: the scored set of a lake where every object scored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in partition.glob("*.parquet"):
        table = pq.read_table(path)
        i = table.schema.get_field_index("status")
        pq.write_table(table.set_column(i, table.schema.field(i), pa.array(["ok"] * len(table), pa.string())), path)


def zero_byte_lake(folder: Path, n: int, per_folder: int = 10_000) -> None:
    """``n`` empty .jpg files, ``per_folder`` per sub-folder (a lake partitioned by hour, say)."""
    for i in range(n):
        sub = folder / f"part-{i // per_folder:04d}"
        if i % per_folder == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:08d}.jpg").touch()


def listing_rates(uri: str, storage_options: dict, n: int) -> tuple[float, float]:
    """(objects/s listed by the job's Ray tasks, objects/s by one lister on the driver) for ``uri``."""
    import ray

    from clipn_core.storage import Storage
    from jobs.inputs import list_objects
    from jobs.score.listing import ObjectListing

    storage = Storage(storage_options)
    t = time.perf_counter()
    listing = ObjectListing(uri, [".jpg"], storage, target_ranges=max(16, 4 * (os.cpu_count() or 2)))
    count = ray.data.read_datasource(listing, num_cpus=0.25).count()
    tasks = count / (time.perf_counter() - t)
    t = time.perf_counter()
    single = len(list_objects(uri, [".jpg"], storage)) / (time.perf_counter() - t)
    assert count == n, (count, n)
    return tasks, single


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=50_000, help="K: the small lake (the large one is 10K)")
    ap.add_argument("--s3-objects", type=int, default=20_000, help="objects for the S3 listing rate")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--night", nargs=5, metavar=("LAKE", "OUT", "DAY", "SKIP", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.night:
        lake, out, day, skip, ckpt = args.night
        print(json.dumps(night(lake, out, day, skip == "True", ckpt)))
        return

    import clipn_core as cc

    # moto accepts any credentials; set before ray.init so that Ray workers inherit them
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    root = Path(tempfile.mkdtemp(prefix="clipn_scale_"))
    model, spec = cc.build_clipn("clipn-tiny", seed=0)
    ckpt = str(root / "tiny.safetensors")
    cc.save_checkpoint(model, spec, ckpt)
    rows = []
    sizes = (args.k, 10 * args.k)
    for n in sizes:
        lake = root / f"lake-{n}"
        zero_byte_lake(lake, n)
        out = root / f"out-{n}"
        first = run_night(lake, out, "2026-11-01", False, ckpt)
        assert first["rows"] == n and first["by_status"] == {"empty": n}, first
        mark_ok(out / "run_date=2026-11-01")
        second = run_night(lake, out, "2026-11-02", True, ckpt)
        assert second["rows"] == 0 and second["skipped"] == n, second
        rows.append((n, first, second))
        print(f"[{n} objects] first night {first['seconds']:.0f} s, skip night {second['seconds']:.0f} s", flush=True)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    local_tasks, local_single = listing_rates(str(root / f"lake-{args.k}"), {}, args.k)
    s3 = s3_listing(args.s3_objects, args.latency_ms)
    ray.shutdown()

    (k, f1, s1), (k10, f2, s2) = rows
    growth_first = (f2["peak_mb"] - f1["peak_mb"]) * 2**20 / (k10 - k)
    growth_skip = (s2["peak_mb"] - s1["peak_mb"]) * 2**20 / (k10 - k)
    print(f"\nmachine: {os.cpu_count()} CPUs; zero-byte .jpg objects, one empty row each; driver peak = ru_maxrss "
          "of a fresh driver process")
    print("| objects | driver peak, first night | driver peak, skip_scored night |\n|---:|---:|---:|")
    for n, first, second in rows:
        print(f"| {n:,} | {first['peak_mb']:,.0f} MB in {first['seconds']:.0f} s | "
              f"{second['peak_mb']:,.0f} MB in {second['seconds']:.0f} s |")
    print(f"| growth per object | {growth_first:.1f} B | {growth_skip:.1f} B |")
    print(f"| projected growth for 10M objects | {growth_first * 1e7 / 2**30:.2f} GiB | {growth_skip * 1e7 / 2**30:.2f} GiB |")
    print("\n| listing | Ray tasks (key ranges) | one lister on the driver | ratio |\n|---|---:|---:|---:|")
    print(f"| local, {args.k:,} objects | {local_tasks:,.0f} obj/s | {local_single:,.0f} obj/s | {local_tasks / local_single:.1f} |")
    print(f"| S3 (moto) +{args.latency_ms:.0f} ms/request, {args.s3_objects:,} objects | {s3[0]:,.0f} obj/s | "
          f"{s3[1]:,.0f} obj/s | {s3[0] / s3[1]:.1f} |")
    shutil.rmtree(root, ignore_errors=True)


def s3_listing(n: int, latency_ms: float) -> tuple[float, float]:
    import fsspec

    from tests.fault_proxy import ProxyProcess, start_moto_process

    server, endpoint = start_moto_process()
    try:
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("lake")
        with ThreadPoolExecutor(16) as pool:  # a flat folder: the listing splits along the key digits
            list(pool.map(lambda i: fs.pipe_file(f"lake/flat/img_{i:08d}.jpg", b""), range(n)))
        proxy = ProxyProcess(endpoint, latency_s=latency_ms / 1000)
        try:
            return listing_rates("s3://lake/flat/", {"client_kwargs": {"endpoint_url": proxy.endpoint}}, n)
        finally:
            proxy.stop()
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
