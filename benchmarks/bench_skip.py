"""The skip join of an incremental night: broadcast lookup vs hash-partitioned join, in one Ray session.

Marks N inputs against a skip set of N/2 URIs (``skip_scored``) plus N/4 held by an overlap night (``since``)
with :func:`jobs.score.incremental.skip_table` and :func:`split_skipped`, the job's own functions, and prints
seconds per night (median of the repeats after a warm-up), for N and 2N inputs, each path forced by
``broadcast_max_rows``. The baseline is the hash join the job used for every size before.

Usage: python benchmarks/bench_skip.py [--n 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from jobs.score.counts import InputCounts, totals  # noqa: E402
from jobs.score.incremental import skip_table, split_skipped  # noqa: E402


def night(n: int, broadcast_max_rows: int) -> tuple[float, int]:
    """Seconds to mark ``n`` inputs and the number kept."""
    at = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
    inputs = ray.data.from_arrow(pa.table({"uri": [f"s3://lake/{i}.jpg" for i in range(n)],
                                           "modified": pa.array([at] * n, pa.timestamp("us", tz="UTC"))}))
    scored = ray.data.from_arrow(pa.table({"uri": [f"s3://lake/{i}.jpg" for i in range(0, n, 2)]}))
    held = ray.data.from_arrow(pa.table({"uri": [f"s3://lake/{i}.jpg" for i in range(1, n, 4)]}))
    counts = InputCounts.remote()
    t = time.perf_counter()
    kept = len(split_skipped(inputs, skip_table(scored, [(held, at.timestamp())], broadcast_max_rows),
                             counts).take_all())
    seconds = time.perf_counter() - t
    found, _ = totals(counts)
    assert found["kept"] == kept and found["kept"] + found["skipped"] == n, found
    return seconds, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for n in (args.n, 2 * args.n):
        for name, limit in (("hash join (baseline)", -1), ("broadcast", 10 * n)):
            times = [night(n, limit) for _ in range(args.repeats + 1)][1:]  # the first pays worker start-up
            rows.append((n, name, statistics.median(t for t, _ in times), times[0][1]))
    print(f"\nskip join, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} after a warm-up\n")
    print("| inputs | path | s / night | kept |\n|---:|---|---:|---:|")
    for n, name, seconds, kept in rows:
        print(f"| {n} | {name} | {seconds:.2f} | {kept} |")


if __name__ == "__main__":
    main()
