"""A small Parquet read through Ray Data, as a scoring night reads the nights it skips: Ray Data's default reader
(DataSourceV2, a pool of 32 FooterReader actors per read), the same with a pool of one actor
(``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1``, one footer batch), and :func:`jobs.parquet_read.read_parquet`, the V1
reader the jobs use for reads of at most ``V1_MAX_FILES`` files (``DataContext.use_datasource_v2 = False``: no
footer actors). Prints a Markdown table.

Each read is ``read_parquet(files).take_all()`` on a local Ray with ``--cpus`` CPUs (Ray's worker pool kept warm as
the test session keeps it), ``--files`` and twice as many small files (steady state: N and 2N), the three ways
interleaved ``--repeats`` times after one warm-up read each. Per read: seconds, and the worker processes Ray
started (new PIDs of this session's Ray workers, sampled from /proc every 0.1 s during the read and 5 s after it)
with the CPU seconds Ray's workers used in that time.

Usage: python benchmarks/bench_parquet_read.py [--files 4] [--repeats 5] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from jobs.parquet_read import V1_MAX_FILES, read_parquet  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
# after each read, the sampling goes on this long: Ray replaces the pooled workers the footer actors took (each
# actor takes an idle worker, which exits with it) in the seconds after the read, and those starts are its cost too
SETTLE_S = 5.0


def _procs() -> dict[int, tuple[int, bytes, str]]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        out[int(pid)] = (int(stat[stat.rindex(")") + 2:].split()[1]), cmd, stat)
    return out


def ray_workers() -> dict[str, float]:
    """{pid:start time -> CPU seconds} of this session's Ray worker processes (the children of the processes this
    one started: its raylet's), not those of another Ray on the machine."""
    procs = _procs()
    ours = {pid for pid, (ppid, _, _) in procs.items() if ppid == os.getpid()}
    out = {}
    for pid, (ppid, cmd, stat) in procs.items():
        if ppid in ours and (b"default_worker" in cmd or cmd.startswith(b"ray::")):
            fields = stat[stat.rindex(")") + 2:].split()
            out[f"{pid}:{fields[19]}"] = (int(fields[11]) + int(fields[12])) / HZ
    return out


class Sampler:
    """Samples this session's Ray workers every ``period`` s while a read runs: a footer actor may start and be
    killed between two snapshots, so the last CPU time seen of each process is kept."""

    def __init__(self, period: float = 0.1):
        self.period, self.seen, self.done = period, {}, threading.Event()

    def __enter__(self):
        self.before = ray_workers()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.done.is_set():
            self.seen.update(ray_workers())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.seen.update(ray_workers())

    def started_and_cpu(self) -> tuple[int, float]:
        new = [k for k in self.seen if k not in self.before]
        cpu = sum(self.seen[k] for k in new) + sum(max(0.0, v - self.before[k]) for k, v in self.seen.items()
                                                   if k in self.before)
        return len(new), cpu


WAYS = ("V2 (Ray's default), 32 footer actors", "V2, 1 footer actor", "V1 (jobs.parquet_read)")


def one_read(how: str, files: list[str]) -> tuple[float, int, float]:
    with Sampler() as sampler:
        t0 = time.perf_counter()
        if how == WAYS[0]:
            rows = ray.data.read_parquet(files, filesystem=pafs.LocalFileSystem()).take_all()
        elif how == WAYS[1]:  # Ray reads the variable when read_parquet builds the read's indexer
            os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "1"
            try:
                ds = ray.data.read_parquet(files, filesystem=pafs.LocalFileSystem())
            finally:
                del os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"]
            rows = ds.take_all()
        else:
            rows = read_parquet(files, pafs.LocalFileSystem()).take_all()
        seconds = time.perf_counter() - t0
        time.sleep(SETTLE_S)
    assert len(rows) == 100 * len(files)
    return (seconds, *sampler.started_and_cpu())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    if 2 * args.files > V1_MAX_FILES:  # the V1 row would silently measure Ray's reader
        ap.error(f"--files {args.files}: the read of twice as many files is over jobs.parquet_read.V1_MAX_FILES "
                 f"({V1_MAX_FILES}), above which the jobs' reads take Ray's reader")
    os.environ.pop("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", None)
    # Ray's module default of the pool is read when this module is first imported: before any read sets it
    import ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer  # noqa: F401
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _system_config={"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000})
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = Path(tempfile.mkdtemp(prefix="bench-parquet-read-"))
    sets = {}
    for n in (args.files, 2 * args.files):
        sets[n] = []
        for i in range(n):
            path = root / f"n{n}" / f"part-{i}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"uri": [f"s3://lake/{n}/{i}/{j}.jpg" for j in range(100)]}), path)
            sets[n].append(str(path))
    ways = WAYS
    results = {(n, w): [] for n in sets for w in ways}
    for n, files in sets.items():
        for w in ways:
            one_read(w, files)  # warm-up: imports, the first workers
        for _ in range(args.repeats):
            for w in ways:
                results[(n, w)].append(one_read(w, files))
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} CPUs, Ray {ray.__version__}, local Ray with {args.cpus} "
          f"CPUs; {args.repeats} reads each after a warm-up, interleaved\n")
    print("| files | reader | s per read (median) | s (min-max) | worker processes started per read | "
          "worker CPU s per read |")
    print("|---:|---|---:|---:|---:|---:|")
    for (n, w), runs in results.items():
        secs = [r[0] for r in runs]
        print(f"| {n} | {w} | {statistics.median(secs):.2f} | {min(secs):.2f}-{max(secs):.2f} | "
              f"{statistics.mean(r[1] for r in runs):.1f} | {statistics.mean(r[2] for r in runs):.2f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
